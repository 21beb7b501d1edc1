"""The attach transport: a kernel's channels over the container's own attach stream.

:mod:`.framing` (the bytes), :mod:`.relay` (pid 1 in the container), :mod:`.channels` (the
host's :class:`~kernelexec.backend.base.Channels`), :mod:`.engine` (the create body, the attach
call, the bootstrap hello). Import the submodules; this package imports nothing.
"""
