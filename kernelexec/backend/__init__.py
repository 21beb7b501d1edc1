"""Backends: where a kernel runs and how its Jupyter channels are carried (see :mod:`.base`)."""
