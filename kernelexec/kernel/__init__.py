"""The kernel side of the seam, whatever carries the channels.

:mod:`.contract` (what host and kernel agree on: files, ports, the connection file, the command
line), :mod:`.protocol` (the wire format, pure functions over bytes), :mod:`.output` (an
execution's outputs collected from its messages, pure), :mod:`.client` (the asyncio client over a
backend's :class:`~kernelexec.backend.base.Channels`). :mod:`.launch` and :mod:`.startup` run inside
the kernel: they are sent as source and never imported on the host.
"""
