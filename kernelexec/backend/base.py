"""The contracts a backend implements; the kernel client is written against these alone.

``Channels`` carries a kernel's Jupyter channels. Whether they travel over ZeroMQ ipc sockets
shared with the container or over the container's attach stream is the backend's business: the
client sends and receives wire frames and learns of a lost transport from one exception,
:class:`ChannelsClosed`, whatever the cause (the kernel exited, the relay or the engine went away,
the peer broke the framing).
"""

from __future__ import annotations

import abc

__all__ = ["CHANNELS", "ChannelsClosed", "Channels"]

#: The channels a client may receive on; it sends on all of them but ``iopub``.
CHANNELS = ("shell", "control", "stdin", "iopub")


class ChannelsClosed(Exception):  # the transport is gone; .reason says why
    """The transport is gone; ``reason`` says why, in words meant for the caller's error message.

    ``exit_code`` and ``signal`` say how the kernel ended when the transport learned it. Both
    ``None``: the transport was lost with the kernel possibly still alive (its state too), which a
    transport that can re-attach may recover.
    """

    def __init__(self, reason: str, *, exit_code: int | None = None, signal: int | None = None) -> None:
        self.reason = reason
        #: the kernel process's exit status, when it exited normally
        self.exit_code = exit_code
        #: the signal that killed the kernel process, when one did
        self.signal = signal
        super().__init__(reason)

    @property
    def kernel_exited(self) -> bool:
        """True when the kernel itself is known to be gone (its state with it)."""
        return self.exit_code is not None or self.signal is not None


class Channels(abc.ABC):
    """A kernel's Jupyter channels, however they are carried (ipc sockets, the attach stream, ...).
    Frames are a message's wire frames from the b"<IDS|MSG>" delimiter on (no routing identities)."""

    @abc.abstractmethod
    async def send(self, channel: str, frames: list[bytes]) -> None:  # channel in shell|control|stdin
        """Queue one message to the kernel; returns once the transport accepted it (backpressure).

        Raises :class:`ChannelsClosed` when the transport is gone."""

    @abc.abstractmethod
    async def recv(self, channel: str) -> list[bytes]:  # shell|control|stdin|iopub; raises ChannelsClosed
        """The next message from the kernel on ``channel``.

        Messages that arrived before the transport was lost are still delivered; after them,
        :class:`ChannelsClosed` is raised. Each channel is bounded: a caller that stops
        receiving on one stops the kernel's sender (backpressure), it never grows the host."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the transport (its tasks, connections and fds). Idempotent.

        Closing the channels does not end the kernel; the sandbox's lifecycle does."""
