"""The contracts a backend implements; the kernel client is written against these alone.

``Channels`` carries a kernel's Jupyter channels. Whether they travel over ZeroMQ ipc sockets
shared with the container or over the container's attach stream is the backend's business: the
client sends and receives wire frames and learns of a lost transport from one exception,
:class:`ChannelsClosed`, whatever the cause (the kernel exited, the relay or the engine went away,
the peer broke the framing, the kernel sent what no Jupyter message can be).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..errors import KernelDied
    from ..policy import Policy

__all__ = ["CHANNELS", "Backend", "ByteStream", "Channels", "ChannelsClosed", "EgressHandler", "Sandbox",
           "StreamPair"]

#: The channels a client may receive on; it sends on all of them but ``iopub``.
CHANNELS = ("shell", "control", "stdin", "iopub")


class ChannelsClosed(Exception):  # the transport is gone; .reason says why
    """The transport is gone; ``reason`` says why, in words meant for the caller's error message.

    ``exit_code`` and ``signal`` say how the kernel ended when the transport learned it. Both
    ``None``: the transport was lost with the kernel possibly still alive (its state too), which a
    transport that can re-attach may recover.

    ``violation`` is set when the transport ended because the kernel sent a message that breaks the
    Jupyter wire format, caught before it reached the client (the attach relay cannot forward a
    message it cannot frame): what the kernel sent, in the words of
    :func:`kernelexec.kernel.protocol.shape_error`, the client's own parser. The client then fails as its
    parser would have, with :class:`~kernelexec.errors.ProtocolError`, so a violation reads the same
    whichever transport caught it.
    """

    def __init__(self, reason: str, *, exit_code: int | None = None, signal: int | None = None,
                 violation: str | None = None) -> None:
        self.reason = reason
        #: the kernel process's exit status, when it exited normally
        self.exit_code = exit_code
        #: the signal that killed the kernel process, when one did
        self.signal = signal
        #: what the kernel sent that no Jupyter message can be (``"the kernel sent a message ..."``), when
        #: that is why the transport ended; the kernel is then not to be trusted again
        self.violation = violation
        super().__init__(reason)

    @property
    def kernel_exited(self) -> bool:
        """True when the kernel itself is known to be gone (its state with it)."""
        return self.exit_code is not None or self.signal is not None

    def again(self) -> ChannelsClosed:
        """The same end as a fresh exception, for each caller that hears of it (one object raised
        twice would pile up tracebacks)."""
        new = ChannelsClosed(self.reason, exit_code=self.exit_code, signal=self.signal, violation=self.violation)
        new.__cause__ = self.__cause__
        return new


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
    async def wait_closed(self) -> ChannelsClosed:
        """Returns (does not raise) why the transport ended, once it has.

        A client watches this: some transports (ZeroMQ) learn of a lost peer without a pending
        ``recv`` ever returning."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the transport (its tasks, connections and fds). Idempotent.

        Closing the channels does not end the kernel; the sandbox's lifecycle does."""


class ByteStream(abc.ABC):
    """One TCP connection the sandbox's code opened to its egress port, carried to the host.

    The container has no network interface: the sandbox side listens on a loopback port and
    carries each connection over the session's own transport (a unix socket next to the kernel's
    on ipc, a multiplexed stream on attach). The host's egress proxy reads the code's request
    from it and decides; it never learns which transport carried the bytes."""

    @abc.abstractmethod
    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` the code sent; ``b""`` once it closed its side (or the stream broke)."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Send ``data`` to the code; returns once the transport accepted it (backpressure).

        Raises ConnectionError when the code's side is gone."""

    async def write_eof(self) -> None:  # noqa: B027 (optional: a transport without half-close closes instead)
        """No more data to the code; reading goes on (TCP half-close)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """End the connection both ways. Idempotent."""


#: What a sandbox calls for each connection its code opens to the egress port; the sandbox closes
#: the stream when it returns.
EgressHandler = Callable[[ByteStream], Awaitable[None]]


class StreamPair(ByteStream):
    """A :class:`ByteStream` over an asyncio connection (a unix socket on ipc, TCP in the tests)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._closed = False

    async def read(self, max_bytes: int) -> bytes:
        try:
            return await self.reader.read(max_bytes)
        except ConnectionError:
            return b""

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionResetError("the stream was closed")
        self.writer.write(data)
        await self.writer.drain()

    async def write_eof(self) -> None:
        if not self._closed and self.writer.can_write_eof() and not self.writer.is_closing():
            try:
                self.writer.write_eof()
            except OSError:
                pass  # the peer is gone; reading will say so

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass  # closing a connection the peer already reset: closed is what we wanted


class Sandbox(abc.ABC):
    """One kernel in one isolated container: what a session needs of a backend, and no more.

    The session never learns the engine, the runtime or the transport: it creates the sandbox,
    opens its channels, asks why it died, moves files in and out of the working directory, and
    destroys it. ``destroy()`` is idempotent and leaves nothing on the engine or the host.
    """

    #: how the channels travel ("ipc", "attach"), for people: ``ps``, ``doctor``, the audit log
    transport: str = ""
    #: the engine's id for the container, once created
    container_id: str | None = None
    #: uid and gid the kernel runs as (files uploaded are theirs)
    uid: int = 0
    gid: int = 0
    #: channel -> ZeroMQ endpoint on this host, for other Jupyter clients of the same kernel (the
    #: provisioner); empty when the transport offers none
    endpoints: dict[str, str] = {}
    #: the image the container runs
    image: str = ""

    @property
    def channels(self) -> Channels | None:
        """The channels :meth:`open` returned, if it has."""
        return None

    @abc.abstractmethod
    async def create(self) -> None:
        """Everything up to a created, not yet started container."""

    @abc.abstractmethod
    async def open(self) -> Channels:
        """Start the kernel and return its channels once they are connected.

        Raises :class:`~kernelexec.errors.SandboxStartError` when the kernel ends first, with what
        it said. The caller bounds the wait (``Policy.start_timeout``)."""

    @abc.abstractmethod
    async def death(self, wait: float = 2.0, cause: str | None = None) -> KernelDied:
        """The typed error for a kernel that went away, with the engine's reason."""

    @abc.abstractmethod
    async def put_archive(self, path: str, tar: bytes) -> None:
        """Unpack a tar archive at ``path`` in the container (no host path is mounted)."""

    @abc.abstractmethod
    async def get_archive(self, path: str, limit: int) -> bytes:
        """A tar archive of ``path`` in the container, at most ``limit`` bytes.

        Raises FileNotFoundError when there is nothing at ``path``, and
        :class:`~kernelexec.errors.ResponseTooLarge` past ``limit``."""

    @abc.abstractmethod
    async def wait_stopped(self) -> int:
        """Until the kernel's sandbox stops (a Jupyter client asked the kernel to shut down); its exit
        status, 0 when it is gone already."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Remove the container and everything made for it. Idempotent."""

    #: whether :meth:`reattach` can recover lost channels with the kernel still running
    can_reattach: bool = False

    async def reattach(self) -> int:
        """Reconnect channels that were lost while the kernel kept running; the kernel's state
        survives. Returns how many frames the kernel sent meanwhile that are lost. Raises
        :class:`ChannelsClosed` when that is not possible (the kernel exited, the transport cannot)."""
        raise ChannelsClosed(f"the {self.transport or 'this'} transport cannot re-attach")

class Backend(abc.ABC):
    """Where a session's kernels run: it makes their sandboxes, and cleans up after crashed owners.

    A session holds one (``AsyncSession(backend=...)``, default: the Docker engine's) and learns
    nothing else of it; a pool passes it on to its sessions. A new backend (another engine, a
    local process for tests) is one subclass.
    """

    #: for people (``repr``, logs)
    name: str = ""

    @abc.abstractmethod
    def new_sandbox(self, policy: Policy, image: str, key: bytes, session_id: str, *,
                    egress: EgressHandler | None = None) -> Sandbox:
        """A sandbox for one session, not yet created; ``key`` is the kernel's HMAC key.

        With ``egress`` (the session's egress proxy), the sandbox offers its code a loopback port
        (``EGRESS_PORT``) whose connections reach ``egress`` on this host; without it, no such
        port exists. A backend that cannot carry them raises rather than open the network."""

    async def image_with(self, image: str, packages: tuple[str, ...], flavour: str | None) -> str:
        """The image a session asking for ``packages`` (and ``flavour``'s) on ``image`` runs; called only
        when it asks for some. A backend that can build images builds (or finds) the derived one."""
        raise NotImplementedError(f"the {self.name or type(self).__name__} backend cannot add packages to an "
                                  "image (Policy.packages, Policy.image_flavour); use an image that has them")

    async def prepare(self) -> None:  # noqa: B027 (optional: most backends have nothing to do)
        """Before each start: remove what owners that died left, retry cleanups that failed."""

    def install_exit_hooks(self) -> None:  # noqa: B027 (optional)
        """Called on the caller's thread when a session is made (it may be the main thread): a
        backend whose sandboxes outlive their process unless removed installs its cleanup here."""
