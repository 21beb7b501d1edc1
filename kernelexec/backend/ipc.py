"""The kernel's channels as ZeroMQ ipc sockets the host shares with the container.

The fastest transport, and only possible where the host and the kernel see the same unix
sockets: a local Linux engine running runc. Each socket is connected through an endpoint pinned
to an inode the socket directory verified (``ipc:///proc/self/fd/N``, see
:mod:`kernelexec.backend.sockdir`); every one is bounded in frame size (``MAXMSGSIZE``) and in queued
messages (high-water marks). ZeroMQ drops a connection whose peer sent a frame over the bound,
and one whose peer died: a monitor per socket turns either into :class:`ChannelsClosed`.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from .base import Channels, ChannelsClosed

__all__ = ["IOPUB_HWM", "REPLY_HWM", "ZmqChannels"]

#: Receive high-water marks, in messages. With ``max_message_bytes`` they bound what ZeroMQ may
#: buffer for one session: (16 + 4 + 4) messages.
IOPUB_HWM = 16
REPLY_HWM = 4

# -- one ZeroMQ context per process, terminated when its last user goes ----------------------------

_ctx_lock = threading.Lock()
_ctx: zmq.asyncio.Context | None = None
_ctx_users = 0


def _acquire_context() -> zmq.asyncio.Context:
    global _ctx, _ctx_users
    with _ctx_lock:
        if _ctx is None:
            _ctx = zmq.asyncio.Context(io_threads=1)
        _ctx_users += 1
        return _ctx


def _release_context() -> None:
    global _ctx, _ctx_users
    with _ctx_lock:
        _ctx_users -= 1
        if _ctx_users == 0 and _ctx is not None:
            _ctx.term()
            _ctx = None


class ZmqChannels(Channels):
    """shell, control and stdin (DEALER) and iopub (SUB) on the given endpoints."""

    def __init__(self, endpoints: dict[str, str], *, max_message_bytes: int) -> None:
        self._endpoints = endpoints
        self._max_msg = max_message_bytes
        self._identity = uuid.uuid4().hex
        self._ctx: zmq.asyncio.Context | None = None
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._monitors: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed: asyncio.Future[ChannelsClosed] | None = None
        self._connected: asyncio.Future[None] | None = None
        self._up: set[str] = set()

    async def connect(self) -> None:
        self._ctx = _acquire_context()
        self._closed = asyncio.get_running_loop().create_future()
        self._connected = asyncio.get_running_loop().create_future()
        for name, kind, hwm in (("shell", zmq.DEALER, REPLY_HWM), ("control", zmq.DEALER, REPLY_HWM),
                                ("stdin", zmq.DEALER, REPLY_HWM), ("iopub", zmq.SUB, IOPUB_HWM)):
            s = self._ctx.socket(kind)
            self._sockets[name] = s
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, self._max_msg)
            s.setsockopt(zmq.RCVHWM, hwm)
            s.setsockopt(zmq.SNDHWM, hwm)
            if kind == zmq.DEALER:
                s.setsockopt(zmq.IDENTITY, f"{self._identity}-{name}".encode())
            else:
                s.setsockopt(zmq.SUBSCRIBE, b"")
        loop = asyncio.get_running_loop()
        for name in ("shell", "control", "iopub"):  # monitored before connecting: no event is missed
            monitor = self._sockets[name].get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            self._monitors.append(monitor)
            self._tasks.append(loop.create_task(self._watch(monitor, name), name=f"kernelexec-ipc-{name}-monitor"))
        for name, s in self._sockets.items():
            s.connect(self._endpoints[name])

    async def _watch(self, monitor: zmq.asyncio.Socket, channel: str) -> None:
        while True:
            frames = await monitor.recv_multipart()
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_CONNECTED:
                self._up.add(channel)
                if len(self._up) == 3 and self._connected is not None and not self._connected.done():
                    self._connected.set_result(None)
            elif event == zmq.EVENT_DISCONNECTED:
                self._fail(ChannelsClosed(
                    f"the {channel} connection closed: the kernel died, or sent a message larger "
                    f"than max_message_bytes ({self._max_msg} bytes)"))
                return

    def _fail(self, error: ChannelsClosed) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(error)

    def _gone(self) -> ChannelsClosed | None:
        return self._closed.result() if self._closed is not None and self._closed.done() else None

    async def send(self, channel: str, frames: list[bytes]) -> None:
        gone = self._gone()
        if gone is not None:
            raise ChannelsClosed(gone.reason)
        if channel == "iopub" or channel not in self._sockets:
            raise ValueError(f"cannot send on {channel!r}")
        await self._sockets[channel].send_multipart(frames)

    async def recv(self, channel: str) -> list[bytes]:
        # A message already queued is delivered; a lost peer is reported by wait_closed(), which the
        # client watches (a recv on a dead ipc peer would otherwise wait for ever).
        try:
            return list(await self._sockets[channel].recv_multipart(copy=True))
        except zmq.ZMQError as e:
            closed = ChannelsClosed(f"the {channel} channel failed: {e}")
            self._fail(closed)
            raise closed from e

    async def wait_connected(self) -> None:
        """Until shell, control and iopub are connected: from then on a dead kernel is a disconnect."""
        assert self._connected is not None, "connect() first"
        await asyncio.shield(self._connected)

    async def wait_closed(self) -> ChannelsClosed:
        assert self._closed is not None, "connect() first"
        return await asyncio.shield(self._closed)

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in [*self._sockets.values(), *self._monitors]:
            s.close(linger=0)
        self._sockets.clear()
        self._monitors.clear()
        self._fail(ChannelsClosed("the channels were closed by this host"))
        if self._ctx is not None:
            self._ctx = None
            _release_context()
