"""The host's end of the attach transport: :class:`AttachChannels`.

One connection carries everything: Docker multiplexes the container's stdout and stderr on it
(8-byte headers, ``Tty=false``), the relay frames the kernel's channels on stdout
(:mod:`.framing`), and what the host writes reaches the relay's stdin. A background reader
demultiplexes into one bounded box per channel; when a box is full the reader stops reading,
the engine stops reading the relay, and the relay stops reading the kernel: backpressure all
the way to the kernel's IOPub, never growth here. The reader reads whatever channel is full
last, so a client must keep receiving IOPub while it waits for a reply (as every Jupyter client
does).

Egress connections (``Policy.egress``) share the stream on the ``net`` channel: each is a
:class:`~..base.ByteStream` handed to the sandbox's :class:`~..streams.HandlerTasks`, bounded by
per-connection credit, so the reader never waits on one and never buffers more than a window each.

Liveness both ways: the host sends a keepalive every ``keepalive`` seconds and the relay echoes
it; the relay ends the sandbox when the host's bytes stop for ``orphan_timeout``, and the host
declares the relay gone when its bytes stop for ``dead_after`` while the reader waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...kernel.protocol import shape_error
from ..base import ByteStream, Channels, ChannelsClosed
from ..docker.api import close_stream
from ..streams import HandlerTasks
from .framing import (
    CHANNEL_IDS,
    CHANNEL_NAMES,
    FROM_RELAY,
    LINK,
    LOG,
    NET,
    NET_CHUNK,
    NET_CLOSE,
    NET_CREDIT,
    NET_DATA,
    NET_EOF,
    NET_MAX_CONNECTIONS,
    NET_OPEN,
    NET_WINDOW,
    Decoder,
    DockerDemux,
    Frame,
    FramingError,
    Limits,
    decode_link,
    decode_log,
    decode_net,
    encode,
    encode_link,
    encode_net,
)

log = logging.getLogger("kernelexec")

__all__ = ["AttachChannels", "Resync"]

#: Messages each channel may hold before the reader stops (as the ipc client's high-water marks).
QUEUE_SIZES = {"iopub": 16, "shell": 4, "control": 4, "stdin": 4}
SENDABLE = ("shell", "control", "stdin")
STDERR_TAIL = 4096
LOG_TAIL = 8192


@dataclass
class Resync:
    """What a re-attach found: the stream resumed, the kernel (and its state) survived."""

    #: frames the relay sent that never reached this host (the engine drops stdout while nobody is
    #: attached): replies and output of requests in flight may be among them
    frames_lost: int
    #: bytes skipped to find the first whole frame of the new stream
    bytes_skipped: int


class _Box:
    """A bounded FIFO with one failure: items put before it are still delivered."""

    __slots__ = ("items", "size", "getters", "putters", "error")

    def __init__(self, size: int) -> None:
        self.items: deque[list[bytes]] = deque()
        self.size = size
        self.getters: deque[asyncio.Future[None]] = deque()
        self.putters: deque[asyncio.Future[None]] = deque()
        self.error: ChannelsClosed | None = None

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def full(self) -> bool:
        return len(self.items) >= self.size

    def put(self, item: list[bytes]) -> None:
        self.items.append(item)
        self._wake(self.getters)

    async def room(self) -> None:
        while self.full() and self.error is None:
            fut = asyncio.get_running_loop().create_future()
            self.putters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()

    async def get(self) -> list[bytes]:
        while not self.items:
            if self.error is not None:
                raise self.error.again()
            fut = asyncio.get_running_loop().create_future()
            self.getters.append(fut)
            try:
                await fut
            except BaseException:
                fut.cancel()
                if self.items:  # a put chose this getter: hand its wake-up to the next one
                    self._wake(self.getters)
                raise
        item = self.items.popleft()
        self._wake(self.putters)
        return item

    def fail(self, error: ChannelsClosed | None) -> None:
        self.error = error
        for waiters in (self.getters, self.putters):
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
            waiters.clear()


class AttachChannels(Channels):
    """A kernel's channels over the container's attach stream, through the relay (:mod:`.relay`).

    Built by :meth:`open` on an upgraded attach connection (``stdin``, ``stdout`` and ``stderr``)
    of a container created by :func:`.engine.create_body` and not yet started, or started and
    waiting for its hello.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: Limits, *,
                 keepalive: float, dead_after: float, egress: HandlerTasks | None = None) -> None:
        self.limits = limits
        #: runs the session's proxy on each connection the code opens to the egress port
        self.egress = egress
        self._net: dict[int, _NetStream] = {}
        self.keepalive = keepalive
        self.dead_after = dead_after
        #: the kernel's pid in the container, from the relay's hello
        self.kernel_pid: int | None = None
        self._reader, self._writer = reader, writer
        self._boxes = {name: _Box(size) for name, size in QUEUE_SIZES.items()}
        self._decoder = Decoder(limits, FROM_RELAY)
        self._demux = DockerDemux()
        self._seq = 0
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._error: ChannelsClosed | None = None
        self._closed = False
        self._exited: ChannelsClosed | None = None  # the relay reported the kernel's exit
        self._violated: ChannelsClosed | None = None  # the kernel broke a bound: not to be resumed
        self._ended_fut: asyncio.Future[ChannelsClosed] = asyncio.get_running_loop().create_future()
        self._hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._hello.add_done_callback(_observe)
        self._resync: tuple[str, asyncio.Future[int], int] | None = None  # nonce, answer, seq due
        self._next_seq = 0  # the relay's next frame, as of the last frame received
        self._waiting_since: float | None = None
        self._stderr = bytearray()
        self._log: deque[tuple[str, bytes]] = deque()
        self._log_bytes = 0

    # -- opening -------------------------------------------------------------------------

    @classmethod
    async def open(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, boot: bytes, limits: Limits, *,
                   keepalive: float, dead_after: float, timeout: float,
                   egress: HandlerTasks | None = None) -> AttachChannels:
        """Send the bootstrap hello and wait (at most ``timeout``) for the relay's own hello."""
        self = cls(reader, writer, limits, keepalive=keepalive, dead_after=dead_after, egress=egress)
        try:
            self._start_tasks()
            async with self._lock:
                writer.write(boot)
                await writer.drain()
            try:
                hello = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
            except asyncio.TimeoutError:
                said = self.stderr_text()
                raise ChannelsClosed(f"the relay did not start within {timeout:g} s"
                                     + (f"; the container said: {said}" if said else "")) from None
            self.kernel_pid = hello.get("kernel_pid") if isinstance(hello.get("kernel_pid"), int) else None
            return self
        except ConnectionError as e:
            await self.close()
            raise ChannelsClosed(f"the attach connection failed while sending the hello: {e}") from e
        except BaseException:
            await self.close()
            raise

    def _start_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop(), name="kernelexec-attach-reader"),
                       loop.create_task(self._keepalive_loop(), name="kernelexec-attach-keepalive")]

    # -- the contract --------------------------------------------------------------------

    async def send(self, channel: str, frames: list[bytes]) -> None:
        if channel not in SENDABLE:
            raise ValueError(f"cannot send on {channel!r}; one of {', '.join(SENDABLE)}")
        await self._send(CHANNEL_IDS[channel], frames)

    async def recv(self, channel: str) -> list[bytes]:
        box = self._boxes.get(channel)
        if box is None:
            raise ValueError(f"no channel {channel!r}; one of {', '.join(self._boxes)}")
        return await box.get()

    async def wait_closed(self) -> ChannelsClosed:
        return await asyncio.shield(self._ended_fut)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail(ChannelsClosed("the channels were closed by this host"))
        await self._stop_tasks()
        await close_stream(self._writer)

    # -- beyond the contract ---------------------------------------------------------------

    async def signal(self, signum: int) -> None:
        """Have the relay signal the kernel (SIGINT, SIGTERM or SIGKILL): works while the
        kernel's control channel does not answer."""
        await self._send(LINK, [], link={"type": "signal", "signum": int(signum)})

    async def bye(self) -> None:
        """Ask the relay to end the sandbox (kernel and container) now."""
        await self._send(LINK, [], link={"type": "bye"})

    async def reattach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                       timeout: float) -> Resync:
        """Continue on a new attach connection after this one was lost; the kernel's state survives.

        What the relay sent while nobody was attached is gone (the engine drops it): the result
        says how many frames, and the caller reports its requests in flight as lost. Raises
        :class:`ChannelsClosed` when the kernel has exited or broke the protocol's bounds (a kernel
        not to be trusted again; ``violation`` is set when it sent what no Jupyter message can be), or
        when the relay does not answer.
        """
        if self._closed:
            raise ChannelsClosed("the channels were closed by this host")
        final = self._exited or self._violated
        if final is not None:
            raise final.again()
        await self._stop_tasks()
        lost_streams = list(self._net.values())
        for stream in lost_streams:  # bytes of theirs were in what the engine dropped: their place is lost
            stream.reset()
        old, self._reader, self._writer = self._writer, reader, writer
        await close_stream(old)
        self._demux = DockerDemux()
        self._decoder = Decoder(self.limits, FROM_RELAY)
        self._decoder.hunt()
        self._error = None
        self._ended_fut = asyncio.get_running_loop().create_future()
        for box in self._boxes.values():
            box.fail(None)
        nonce = secrets.token_hex(8)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_observe)
        self._resync = (nonce, done, self._next_seq)
        self._start_tasks()
        try:
            await self._send(LINK, [], link={"type": "resync", "nonce": nonce})
            try:
                lost = await asyncio.wait_for(asyncio.shield(done), timeout)
            except asyncio.TimeoutError:
                raise ChannelsClosed(f"the relay did not answer a resync within {timeout:g} s") from None
        except ChannelsClosed as e:
            self._fail(e)
            raise
        for stream in lost_streams:
            await stream.close()  # tells the relay to close the code's end
        return Resync(frames_lost=lost, bytes_skipped=self._decoder.dropped)

    @property
    def kernel_exit(self) -> ChannelsClosed | None:
        """How the relay reported the kernel's exit; ``None`` while it has not (the stream may still be lost)."""
        return self._exited

    def stderr_text(self) -> str:
        """The last bytes of the container's stderr (the bootstrap's or the relay's last words)."""
        return self._stderr.decode(errors="replace").strip()

    def log_text(self) -> str:
        """The last of the kernel's own stdout/stderr, as the relay forwarded it."""
        return b"".join(data for _, data in self._log).decode(errors="replace")

    # -- internals ---------------------------------------------------------------------------

    async def _send(self, channel: int, frames: list[bytes], link: dict[str, Any] | None = None) -> None:
        await self._write(lambda seq: encode_link(seq, link, self.limits) if link is not None
                          else encode(channel, seq, frames, self.limits))

    async def _send_net(self, op: int, conn: int, data: bytes = b"") -> None:
        await self._write(lambda seq: encode_net(seq, op, conn, self.limits, data))

    async def _write(self, frame_at: Callable[[int], list[bytes]]) -> None:
        """One frame, numbered in the order frames leave (``frame_at(seq)`` encodes it)."""
        if self._error is not None:
            raise self._error.again()
        async with self._lock:
            chunks = frame_at(self._seq)
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            try:
                self._writer.writelines(chunks)
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                closed = ChannelsClosed(f"the attach connection failed while sending: {e}")
                closed.__cause__ = e
                self._fail(closed)
                raise closed.again() from e

    def _fail(self, error: ChannelsClosed) -> None:
        if self._error is not None:
            return
        self._error = error
        for stream in list(self._net.values()):
            stream.reset()
        if not self._ended_fut.done():
            self._ended_fut.set_result(error)
        for box in self._boxes.values():
            box.fail(error)
        if not self._hello.done():
            self._hello.set_exception(error.again())
        if self._resync is not None and not self._resync[1].done():
            self._resync[1].set_exception(error.again())

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        me = asyncio.current_task()
        for t in tasks:
            if t is not me:
                t.cancel()
        await asyncio.gather(*(t for t in tasks if t is not me), return_exceptions=True)

    def _ended(self) -> ChannelsClosed:
        said = self.stderr_text()
        return ChannelsClosed("the attach stream ended: the container stopped or the engine dropped the connection"
                              + (f"; the container said: {said[-1000:]}" if said else ""))

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        read = self.limits.read_chunk
        try:
            while self._error is None:
                self._waiting_since = loop.time()
                data = await self._reader.read(read)
                self._waiting_since = None
                if not data:
                    self._decoder.eof()
                    self._fail(self._exited or self._ended())
                    return
                for stream, chunk in self._demux.split(data):
                    if stream != 1:
                        self._stderr += chunk
                        del self._stderr[:-STDERR_TAIL]
                        continue
                    self._decoder.feed(chunk)
                    while (frame := self._decoder.next()) is not None:
                        await self._dispatch(frame)
                        if self._error is not None:
                            return
        except FramingError as e:
            self._fail(self._exited or _closed(f"the attach stream broke its framing ({e}); the relay or the "
                                               "engine is corrupting it. The kernel may still run: re-attach "
                                               "to resynchronise", e))
        except (ConnectionError, OSError) as e:
            self._fail(self._exited or _closed(f"the attach connection failed: {e}", e))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug of ours: every waiting caller hears of it
            log.exception("attach reader failed")
            self._fail(_closed(f"the attach reader failed: {e!r}", e))
        finally:
            self._waiting_since = None

    async def _dispatch(self, frame: Frame) -> None:
        self._next_seq = (frame.seq + 1) & 0xFFFFFFFF
        if frame.channel == LINK:
            self._on_link(frame, decode_link(frame.parts))
            return
        if frame.channel == NET:
            await self._on_net(*decode_net(frame.parts))
            return
        if frame.channel == LOG:
            source, data = decode_log(frame.parts)
            self._log.append((source, data))
            self._log_bytes += len(data)
            while self._log_bytes > LOG_TAIL and len(self._log) > 1:
                self._log_bytes -= len(self._log.popleft()[1])
            log.debug("kernel %s: %s", source, data.decode(errors="replace").rstrip())
            return
        if self._resync is not None:
            return  # before the relay's answer: the tail of what was in flight, partly lost
        box = self._boxes[CHANNEL_NAMES[frame.channel]]
        if box.full():
            await box.room()
            if self._error is not None:
                return
        box.put(frame.parts)

    async def _on_net(self, op: int, conn: int, data: bytes) -> None:
        """One operation of the relay on an egress connection; never waits on the connection's reader."""
        stream = self._net.get(conn)
        if op == NET_OPEN and stream is None:
            if self.egress is None or len(self._net) >= NET_MAX_CONNECTIONS:
                await self._send_net(NET_CLOSE, conn)  # the relay listens only with egress; refuse, do not trust
                return
            stream = self._net[conn] = _NetStream(self, conn)
            self.egress.spawn(stream)
        elif stream is None:
            if op != NET_CLOSE:
                await self._send_net(NET_CLOSE, conn)  # a connection this host no longer knows (a re-attach)
        elif op == NET_DATA:
            if not stream.feed(data):
                log.warning("the relay sent more than the window on egress connection %d; closing it", conn)
                stream.reset()
                await stream.close()
        elif op == NET_EOF:
            stream.feed_eof()
        elif op == NET_CLOSE:
            stream.reset(relay_closed=True)
            self._net.pop(conn, None)
        elif op == NET_CREDIT:
            stream.grant(int.from_bytes(data, "big"))

    def _on_link(self, frame: Frame, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "keepalive":
            return
        if kind == "hello":
            if not self._hello.done():
                self._hello.set_result(msg)
            return
        if kind == "resync":
            if self._resync is not None and msg.get("nonce") == self._resync[0]:
                _, done, due = self._resync
                self._resync = None
                if not done.done():  # every frame from the first one missed up to this answer
                    done.set_result((frame.seq - due) & 0xFFFFFFFF)
            return
        if kind == "desync" and self._resync is not None:
            return  # the lost connection cut a frame of ours; the relay skipped it
        if kind == "exit":
            code, sig = msg.get("code"), msg.get("signal")
            code = code if isinstance(code, int) and not isinstance(code, bool) else None
            sig = sig if isinstance(sig, int) and not isinstance(sig, bool) else None
            how = f"with status {code}" if code is not None else f"by signal {sig}"
            tail = str(msg.get("tail") or "").strip()
            self._exited = ChannelsClosed(f"the kernel exited {how}" + (f"; it said: {tail[-1000:]}" if tail else ""),
                                          exit_code=code, signal=sig)
            self._fail(self._exited)
            return
        if kind == "violation":
            # The relay runs in the sandbox: code that took over the kernel may have subverted it, or (under
            # a runtime that does not honour its PR_SET_DUMPABLE, gVisor) write frames into its stream. So a
            # notice is believed only as far as ending the session, which closing the stream would do
            # anyway: it cannot resume, restart or reach anything. Its text is cut and kept as the relay's
            # account; the violation the client raises (ProtocolError) is worded here from a shape checked
            # here (_kernel_sent), never taken from the relay's text.
            self._violated = ChannelsClosed(f"the kernel broke the protocol's bounds: {str(msg.get('reason'))[:500]}",
                                            violation=_kernel_sent(msg.get("shape")))
            self._fail(self._violated)
            return
        if kind == "desync":
            self._fail(ChannelsClosed("the relay could not decode what this host sent "
                                      f"({str(msg.get('error'))[:300]}); the kernel still runs: re-attach to resume"))
            return

    async def _keepalive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._error is None:
                await asyncio.sleep(self.keepalive)
                since = self._waiting_since
                if since is not None and loop.time() - since > self.dead_after:
                    self._fail(ChannelsClosed(
                        f"the relay sent nothing for {self.dead_after:g} s, not even keepalives: it is stopped, "
                        "or the engine stalled"))
                    self._writer.transport.abort()
                    return
                with contextlib.suppress(ChannelsClosed):  # the failure is recorded for every caller
                    await self._send(LINK, [], link={"type": "keepalive"})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug of ours
            log.exception("attach keepalive failed")
            self._fail(_closed(f"the attach keepalive failed: {e!r}", e))


class _NetStream(ByteStream):
    """One egress connection on the net channel: what the relay sent waits here (at most a
    window: the relay sends no more than this end has credited), writes wait for the relay's credit."""

    def __init__(self, channels: AttachChannels, conn: int) -> None:
        self._channels = channels
        self.conn = conn
        self._buf = bytearray()
        self._eof = False
        self._dead = False  # reset by the relay or the stream: nothing more either way
        self._relay_closed = False
        self._closed = False
        self._readable = asyncio.Event()
        self._credit = NET_WINDOW
        self._credited = asyncio.Event()
        self._credited.set()
        self._consumed = 0

    def feed(self, data: bytes) -> bool:
        """False when the relay broke the window (the connection is then closed)."""
        if len(self._buf) + len(data) > NET_WINDOW:
            return False
        self._buf += data
        self._readable.set()
        return True

    def feed_eof(self) -> None:
        self._eof = True
        self._readable.set()

    def grant(self, n: int) -> None:
        self._credit = min(self._credit + n, NET_WINDOW)
        self._credited.set()

    def reset(self, relay_closed: bool = False) -> None:
        self._relay_closed = self._relay_closed or relay_closed
        self._dead = self._eof = True
        self._readable.set()
        self._credited.set()

    async def read(self, max_bytes: int) -> bytes:
        while not self._buf and not self._eof:
            self._readable.clear()
            await self._readable.wait()
        if not self._buf:
            return b""
        data = bytes(self._buf[:max_bytes])
        del self._buf[:len(data)]
        self._consumed += len(data)
        if self._consumed >= NET_WINDOW // 4 and not self._dead:
            consumed, self._consumed = self._consumed, 0
            await self._send(NET_CREDIT, consumed.to_bytes(4, "big"))
        return data

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self._credit <= 0 and not self._dead:
                self._credited.clear()
                await self._credited.wait()
            if self._dead or self._closed:
                raise ConnectionResetError("the code's connection to the egress port is closed")
            n = min(len(view), self._credit, NET_CHUNK)
            await self._send(NET_DATA, bytes(view[:n]))
            self._credit -= n
            view = view[n:]

    async def write_eof(self) -> None:
        if not self._dead and not self._closed:
            await self._send(NET_EOF)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._channels._net.get(self.conn) is self:
            del self._channels._net[self.conn]
        self.reset()
        if not self._relay_closed:
            with contextlib.suppress(ConnectionResetError):  # the whole stream is gone: so is this connection
                await self._send(NET_CLOSE)

    async def _send(self, op: int, data: bytes = b"") -> None:
        try:
            await self._channels._send_net(op, self.conn, data)
        except ChannelsClosed as e:
            self.reset()
            raise ConnectionResetError(f"the sandbox's stream is gone: {e.reason}") from e


def _kernel_sent(shape: Any) -> str | None:
    """What the kernel sent, in the words of the host's parser, from the shape of a message the relay
    refused (``{"frames": n, "delimiter": i or null}``); None when there is no shape, when it is not one
    a message can have, or when the parser would have taken a message of that shape (then the notice
    is only the relay's bound, reported as such)."""
    if not isinstance(shape, dict):
        return None
    frames, delimiter = shape.get("frames"), shape.get("delimiter")
    if type(frames) is not int or not 0 < frames < 1 << 32:  # a ZMTP message's parts, counted by the relay
        return None
    if delimiter is not None and (type(delimiter) is not int or not 0 <= delimiter < frames):
        return None
    return shape_error(frames, delimiter)


def _closed(reason: str, cause: BaseException) -> ChannelsClosed:
    e = ChannelsClosed(reason)
    e.__cause__ = cause
    return e


def _observe(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()

