"""The attach transport: a kernel's channels over the container's own attach stream.

:mod:`.framing` (the bytes) and :mod:`.zmtp` (the relay's side of ZeroMQ), both pure; :mod:`.relay`
(pid 1 in the container); :mod:`.channels` (the host's :class:`~kernelexec.backend.base.Channels`);
:mod:`.boot` (the relay's command, environment and bootstrap hello). Nothing here names an engine:
Docker's create body and attach call are :mod:`kernelexec.backend.docker.attach`, and a Kubernetes
backend would reuse all of this. Import the submodules; this package imports nothing.
"""
