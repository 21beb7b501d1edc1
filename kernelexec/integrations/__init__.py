"""Adapters for agent frameworks. Each imports its framework lazily and is an
optional extra (``pip install kernelexec[autogen]``); the core never imports these."""
