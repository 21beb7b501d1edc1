"""An asyncio Jupyter client for one kernel, bounded against a hostile peer.

Why not ``jupyter_client``'s client: we need every channel bounded (frame
size, queued messages), IOPub drained continuously (the kernel drops what a
slow client does not read, the final ``idle`` included), and death noticed
from the transport itself. The client speaks the protocol over a
:class:`~kernelexec.backend.base.Channels`: it never learns whether the
channels are ipc sockets shared with the container or the container's attach
stream. Reads block on the channels; nothing polls.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..backend.base import Channels, ChannelsClosed
from ..errors import ProtocolError, SandboxError
from ..results import Execution
from . import protocol
from .output import Callbacks, OutputCollector
from .protocol import Message, Signer

log = logging.getLogger("kernelexec")

#: After execute_reply, how long to wait for IOPub to catch up (its idle).
IDLE_GRACE = 1.0


class KernelGone(Exception):
    """Internal: the kernel's transport closed. The session turns it into KernelDied.

    ``closed`` is the transport's account (with the kernel's exit status when it knew it)."""

    def __init__(self, reason: str, closed: ChannelsClosed | None = None) -> None:
        super().__init__(reason)
        self.closed = closed


def _lost(closed: ChannelsClosed) -> KernelGone | ProtocolError:
    """What a closed transport means to the session. The transport caught the kernel sending what no
    Jupyter message can be (``closed.violation``, in this client's parser's words): ProtocolError, as
    when the parser refuses a message itself, so the session ends the same on every transport and
    never tries to resume a kernel that broke the protocol. Anything else: KernelGone."""
    if closed.violation is None:
        return KernelGone(closed.reason, closed)
    error = ProtocolError(closed.violation)
    error.__cause__ = closed
    return error


@dataclass
class _Pending:
    """An execution in flight: its outputs, its reply, and whether IOPub has caught up."""

    collector: OutputCollector
    reply: asyncio.Future[Message]
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=time.monotonic)

    @property
    def execution(self) -> Execution:
        return self.collector.execution


def _observe(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class KernelClient:
    """Shell, control and IOPub of one kernel over its channels, with background readers."""

    def __init__(self, key: bytes, channels: Channels, *, max_output_bytes: int) -> None:
        self._signer = Signer(key)
        self._channels = channels
        self._max_out = max_output_bytes
        self._session = uuid.uuid4().hex
        self._connected = False
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: dict[str, _Pending] = {}
        self._replies: dict[str, asyncio.Future[Message]] = {}
        self._welcome = asyncio.Event()
        self._gone: BaseException | None = None
        self.dropped = 0  # IOPub messages with no matching request

    @property
    def alive(self) -> bool:
        return self._gone is None and self._connected

    @property
    def failure(self) -> BaseException | None:
        """Why the client stopped working, once it has."""
        return self._gone

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._connected = True
        self._tasks = [
            loop.create_task(self._guard(self._read_replies("shell")), name="kernelexec-shell-reader"),
            loop.create_task(self._guard(self._read_replies("control")), name="kernelexec-control-reader"),
            loop.create_task(self._guard(self._read_iopub()), name="kernelexec-iopub-reader"),
            loop.create_task(self._watch(), name="kernelexec-channels-watch"),
        ]

    # -- readers -----------------------------------------------------------------

    async def _recv(self, channel: str) -> tuple[Message, int]:
        frames = await self._channels.recv(channel)
        return protocol.parse(self._signer, frames), sum(len(f) for f in frames)

    async def _guard(self, reader: Coroutine[Any, Any, None]) -> None:
        """A reader's end, whatever ended it, reaches every waiting caller: a protocol violation as
        itself, a lost transport as :func:`_lost` words it, a bug of ours rather than lost."""
        try:
            await reader
        except asyncio.CancelledError:
            raise
        except ChannelsClosed as e:
            self._fail(_lost(e))
        except Exception as e:  # ProtocolError, or a bug of ours
            self._fail(e)

    async def _read_replies(self, channel: str) -> None:
        while True:
            msg, _ = await self._recv(channel)
            fut = self._replies.pop(msg.parent_id or "", None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            else:
                log.debug("dropped %s reply %s with unknown parent", channel, msg.msg_type)

    async def _read_iopub(self) -> None:
        while True:
            msg, size = await self._recv("iopub")
            if msg.msg_type == "iopub_welcome":
                self._welcome.set()
                continue
            self._welcome.set()  # any IOPub message proves the subscription is live
            p = self._pending.get(msg.parent_id or "")
            if p is None:
                self.dropped += 1
                continue
            if p.collector.handle(msg.msg_type, msg.content, size):
                p.idle.set()

    async def _watch(self) -> None:
        closed = await self._channels.wait_closed()
        self._fail(_lost(closed))

    def _fail(self, error: BaseException) -> None:
        if self._gone is None:
            self._gone = error
        self._welcome.set()  # wait_ready() checks _gone after waking
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(self._gone)
        self._replies.clear()
        for p in self._pending.values():
            p.idle.set()

    # -- requests ------------------------------------------------------------------

    async def request(self, channel: str, msg_type: str,
                      content: dict[str, Any]) -> tuple[str, asyncio.Future[Message]]:
        if self._gone is not None:
            raise self._gone
        msg_id, frames = protocol.build(self._signer, msg_type, content, session=self._session)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        # A reply nobody awaits any more (an abandoned or cancelled request) may still fail when the
        # kernel goes; that failure is the client's (`_gone`, raised to the next caller), not an
        # orphan to be logged as "never retrieved".
        fut.add_done_callback(_observe)
        self._replies[msg_id] = fut
        try:
            await self._channels.send(channel, frames)
        except ChannelsClosed as e:
            self._replies.pop(msg_id, None)
            gone = _lost(e)
            self._fail(gone)
            raise gone from e
        return msg_id, fut

    async def wait_ready(self) -> dict[str, Any]:
        """Wait until shell answers and IOPub is subscribed, so no early output is lost.

        ipykernel >= 7.2 greets each new subscriber with ``iopub_welcome``;
        with older kernels, repeating ``kernel_info`` makes IOPub speak
        (busy/idle) once the subscription has reached it. The caller's
        deadline bounds the whole wait.
        """
        _, fut = await self.request("shell", "kernel_info_request", {})
        reply = await fut
        delay = 0.05
        while not self._welcome.is_set():
            try:
                await asyncio.wait_for(self._welcome.wait(), delay)
            except asyncio.TimeoutError:
                _, fut = await self.request("shell", "kernel_info_request", {})
                await fut
                delay = min(delay * 2, 1.0)
        if self._gone is not None:
            raise self._gone
        return reply.content

    async def submit(self, code: str, callbacks: Callbacks, *, silent: bool = False) -> str:
        """Send one execute_request; its outputs are collected from now on. ``silent``: not in the
        kernel's history, its execution count or its output cache (kernelexec's own requests)."""
        content = {"code": code, "silent": silent, "store_history": not silent, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        msg_id, fut = await self.request("shell", "execute_request", content)
        self._pending[msg_id] = _Pending(OutputCollector(Execution(code=code), self._max_out, callbacks), fut)
        return msg_id

    async def finish(self, msg_id: str, timeout: float | None) -> Execution:
        """Wait for the reply of ``msg_id`` (authoritative), then for IOPub to catch up.

        On timeout this raises ``asyncio.TimeoutError`` and leaves the request
        pending, so the caller can interrupt and call again.
        """
        p = self._pending[msg_id]
        reply = await asyncio.wait_for(asyncio.shield(p.reply), timeout)
        try:
            await asyncio.wait_for(p.idle.wait(), IDLE_GRACE)
        except asyncio.TimeoutError:
            log.debug("no idle for %s within %.1fs (IOPub dropped it?)", msg_id, IDLE_GRACE)
        self._pending.pop(msg_id, None)
        ex = p.collector.finish(reply.content, reply.metadata)
        ex.duration = time.monotonic() - p.started
        if p.collector.callback_error is not None:
            raise p.collector.callback_error
        return ex

    # -- is_complete (issue 11, REPL continuation lines) ------------------------------

    async def complete_status(self, code: str, timeout: float) -> str:
        """The kernel's ``is_complete_request`` verdict on ``code``, as Jupyter consoles ask it.

        One of ``"complete"``, ``"incomplete"``, ``"invalid"``, ``"unknown"``;
        ``"unknown"`` too when the kernel does not answer within ``timeout``
        (the request is then forgotten: its late reply is dropped).
        """
        msg_id, fut = await self.request("shell", "is_complete_request", {"code": code})
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._replies.pop(msg_id, None)
            return "unknown"
        status = reply.content.get("status")
        return status if status in ("complete", "incomplete", "invalid") else "unknown"

    def abandon(self, msg_id: str) -> Execution | None:
        """Forget a request whose reply will never be awaited; return what it produced."""
        p = self._pending.pop(msg_id, None)
        self._replies.pop(msg_id, None)
        return p.execution if p else None

    async def interrupt(self, timeout: float) -> None:
        _, fut = await self.request("control", "interrupt_request", {})
        await asyncio.wait_for(fut, timeout)

    async def detach(self) -> None:
        """Stop the readers and fail what waits, leaving the channels open (a transport that
        re-attached gets a fresh client on the same channels)."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._connected = False
        if self._gone is None:
            self._gone = SandboxError("this client was detached from its channels")
        self._fail(self._gone)

    async def close(self) -> None:
        """Stop the readers and release the channels (the kernel's end is the sandbox's business)."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._channels.close()
        self._connected = False
        if self._gone is None:
            self._gone = SandboxError("the session is closed")
        self._fail(self._gone)
