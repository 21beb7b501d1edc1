"""Jupyter's own clients on a transport that offers them no sockets: host-local ZeroMQ sockets
carried to a kernel's shared channels.

The ipc transport hands the provisioner the kernel's own verified sockets. The attach transport has
none on this host, so a :class:`JupyterBridge` binds what a kernel binds (ROUTER for shell, control
and stdin, PUB for iopub, REP for the heartbeat) in a new private directory (mode 0700, named as
socket directories are so that ``gc`` removes it after a crash, and never mounted anywhere), and
passes messages through one client of the session's :class:`~.fanout.ChannelHub`:

* a request goes to the kernel from its delimiter on; the requester's routing identities travel
  with it as the hub's tag, and its replies (and stdin's ``input_request``) go back to them;
* iopub goes to every subscriber; PUB drops for one that does not keep up (past ``IOPUB_HWM``
  messages), as a kernel's own iopub socket does;
* the heartbeat is answered here while the kernel's channels are open, and not once they ended:
  Jupyter then sees the kernel as dead, as it is.

Nothing is re-signed: Jupyter's clients hold the kernel's key and check every message themselves.
Everything held here is bounded: message parts (``max_message_bytes``), queued messages (high-water
marks) and requests in flight (the hub's routes). Only this host's user (and root) can connect.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from ..errors import ProtocolError, SandboxStartError
from ..kernel.contract import PORTS, SOCKET_BASENAME, connection_file
from ..kernel.protocol import delimiter_index
from .base import ChannelsClosed
from .fanout import SharedChannels
from .sockdir import private_dir, remove_path

__all__ = ["IOPUB_HWM", "REQUEST_HWM", "EndpointLinks", "JupyterAccess", "JupyterBridge"]

log = logging.getLogger("kernelexec")

#: Messages ZeroMQ queues per Jupyter client and socket: requests not yet read, replies not yet sent.
REQUEST_HWM = 16
#: iopub messages queued per subscriber that does not keep up; past it PUB drops, as a kernel's does.
IOPUB_HWM = 32
#: A heartbeat ping is a few bytes; anything bigger is refused by ZeroMQ.
HEARTBEAT_BYTES = 4096
_MAX_PATH = 100
_ROUTED = ("shell", "control", "stdin")


class JupyterAccess(abc.ABC):
    """Host-local sockets in :attr:`directory`, named as a connection file wants them, through which
    Jupyter's own clients reach a session's kernel. :meth:`close` removes them (before the session)."""

    directory: Path

    @property
    def connection_info(self) -> dict[str, Any]:
        """The transport part of a connection file (the caller adds the key)."""
        return connection_file(str(self.directory))

    @abc.abstractmethod
    async def close(self) -> None:
        """Remove the sockets and the directory. Idempotent."""


class EndpointLinks(JupyterAccess):
    """On a transport with host sockets (ipc): a private directory of symlinks to the endpoints the
    session verified (``/proc/self/fd/N``), so that Jupyter's clients reach exactly those sockets and
    never a path the container could swap."""

    def __init__(self, endpoints: Mapping[str, str]) -> None:
        self.directory = private_dir()
        try:
            for channel, port in PORTS.items():
                os.symlink(endpoints[channel].removeprefix("ipc://"), self.directory / f"{SOCKET_BASENAME}-{port}")
        except BaseException:
            remove_path(self.directory)
            raise

    async def close(self) -> None:
        if self.directory.exists():
            remove_path(self.directory)


class JupyterBridge(JupyterAccess):
    """On a transport with no host sockets (attach): sockets bound here, whose messages travel over
    the session's shared channels."""

    def __init__(self, channels: SharedChannels, directory: Path, *, max_message_bytes: int) -> None:
        self.channels = channels
        #: the private directory holding the sockets (removed by :meth:`close`)
        self.directory = directory
        self._max_msg = max_message_bytes
        self._ctx: zmq.asyncio.Context | None = None
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        #: requests refused (no delimiter, no msg_id, over the bounds), per channel
        self.refused = dict.fromkeys(_ROUTED, 0)
        #: a failure of the bridge itself (a bug), logged; the heartbeat stops with it
        self.error: BaseException | None = None

    @classmethod
    async def open(cls, channels: SharedChannels, *, max_message_bytes: int) -> JupyterBridge:
        """Bind the sockets in a new private directory and start passing messages."""
        directory = private_dir()
        self = cls(channels, directory, max_message_bytes=max_message_bytes)
        try:
            if len(str(directory / f"{SOCKET_BASENAME}-{max(PORTS.values())}")) > _MAX_PATH:
                raise SandboxStartError(f"socket path under {directory} is too long for a unix socket; set "
                                        "KERNELEXEC_SOCKET_ROOT to a short directory")
            self._bind()
            self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Stop, leave the hub (the session's own client goes on), remove the sockets and the
        directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.channels.close()
        finally:
            for s in self._sockets.values():
                s.close(linger=0)
            self._sockets.clear()
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None
            if self.directory.exists():
                remove_path(self.directory)

    # -- internals ---------------------------------------------------------------------------

    def _bind(self) -> None:
        self._ctx = zmq.asyncio.Context(io_threads=1)
        for name, kind in (("shell", zmq.ROUTER), ("control", zmq.ROUTER), ("stdin", zmq.ROUTER),
                           ("iopub", zmq.PUB), ("hb", zmq.REP)):
            s = self._ctx.socket(kind)
            self._sockets[name] = s
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, HEARTBEAT_BYTES if name == "hb" else self._max_msg)
            s.setsockopt(zmq.RCVHWM, REQUEST_HWM)
            s.setsockopt(zmq.SNDHWM, IOPUB_HWM if name == "iopub" else REQUEST_HWM)
            s.bind(f"ipc://{self.directory / SOCKET_BASENAME}-{PORTS[name]}")

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for channel in _ROUTED:
            self._tasks.append(loop.create_task(self._requests(channel), name=f"kernelexec-bridge-{channel}-in"))
            self._tasks.append(loop.create_task(self._replies(channel), name=f"kernelexec-bridge-{channel}-out"))
        self._tasks.append(loop.create_task(self._iopub(), name="kernelexec-bridge-iopub"))
        self._heartbeat = loop.create_task(self._beat(), name="kernelexec-bridge-hb")
        self._tasks.append(self._heartbeat)
        self._tasks.append(loop.create_task(self._watch(), name="kernelexec-bridge-watch"))

    async def _requests(self, channel: str) -> None:
        """Jupyter -> kernel: frames from the delimiter on, tagged with the requester's identities."""
        sock = self._sockets[channel]
        try:
            while True:
                frames = await sock.recv_multipart(copy=True)
                try:
                    idx = delimiter_index(frames)
                    await self.channels.send(channel, frames[idx:], tag=tuple(frames[:idx]))
                except (ValueError, ProtocolError) as e:  # over a bound, or a reply could not come back
                    self.refused[channel] += 1
                    log.warning("refused a %s message from a Jupyter client: %s", channel, e)
        except ChannelsClosed:
            return  # the kernel's channels ended: _watch stops the heartbeat
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._broken(e)

    async def _replies(self, channel: str) -> None:
        """kernel -> Jupyter: back to the identities of the request answered."""
        sock = self._sockets[channel]
        try:
            while True:
                frames, tag = await self.channels.recv_tagged(channel)
                if not isinstance(tag, tuple):  # unreachable: every request of ours carries its identities
                    continue
                await sock.send_multipart([*tag, *frames])  # ROUTER drops for a peer gone or full
        except ChannelsClosed:
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._broken(e)

    async def _iopub(self) -> None:
        sock = self._sockets["iopub"]
        try:
            while True:
                await sock.send_multipart(await self.channels.recv("iopub"))  # PUB never blocks
        except ChannelsClosed:
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._broken(e)

    async def _beat(self) -> None:
        sock = self._sockets["hb"]
        try:
            while True:
                await sock.send_multipart(await sock.recv_multipart(copy=True))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._broken(e)

    async def _watch(self) -> None:
        closed = await self.channels.wait_closed()
        log.debug("bridge: the kernel's channels ended (%s); heartbeat stopped", closed.reason)
        self._stop_heartbeat()

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()

    def _broken(self, e: BaseException) -> None:
        """A bug of ours: logged and kept, and the heartbeat stops so Jupyter sees a dead kernel
        rather than one that never answers."""
        log.error("the Jupyter bridge failed: %r", e, exc_info=e)
        if self.error is None:
            self.error = e
        self._stop_heartbeat()
