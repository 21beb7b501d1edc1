"""A test double of :class:`~.base.Channels` whose kernel is played by the test.

What a transport promises (bounded boxes with backpressure, messages that arrived before the end
still delivered, then :class:`~.base.ChannelsClosed`) with no engine and no kernel: for the pure
tests of what sits on top of a transport (the channel hub, the Jupyter bridge). The kernel's side
is :meth:`LoopbackChannels.emit` (a message from the kernel), :meth:`LoopbackChannels.take` (what a
client sent) and :meth:`LoopbackChannels.end` (the kernel or the transport went away).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from ..kernel.protocol import DELIM, Signer
from .base import Channels, ChannelsClosed
from .fanout import QUEUE_SIZES, SENDABLE, Mailbox

__all__ = ["LoopbackChannels", "message"]


class LoopbackChannels(Channels):
    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        sizes = sizes or QUEUE_SIZES
        self._to_host: dict[str, Mailbox[list[bytes]]] = {c: Mailbox(sizes[c]) for c in QUEUE_SIZES}
        self._to_kernel: dict[str, Mailbox[list[bytes]]] = {c: Mailbox(sizes[c]) for c in SENDABLE}
        self._ended: asyncio.Future[ChannelsClosed] = asyncio.get_running_loop().create_future()
        #: True once the host closed them
        self.closed = False

    # -- the host's side: the Channels contract ----------------------------------------------

    async def send(self, channel: str, frames: list[bytes]) -> None:
        if channel not in self._to_kernel:
            raise ValueError(f"cannot send on {channel!r}")
        if self._ended.done():
            raise self._ended.result().again()
        box = self._to_kernel[channel]
        await box.room()
        box.put(list(frames))

    async def recv(self, channel: str) -> list[bytes]:
        return await self._to_host[channel].get()

    async def wait_closed(self) -> ChannelsClosed:
        return await asyncio.shield(self._ended)

    async def close(self) -> None:
        self.closed = True
        self.end(ChannelsClosed("the channels were closed by this host"))

    # -- the kernel's side: the test ------------------------------------------------------------

    async def emit(self, channel: str, frames: list[bytes]) -> None:
        """A message from the kernel; waits while the host leaves the channel's box full."""
        box = self._to_host[channel]
        await box.room()
        box.put(list(frames))

    def pending(self, channel: str) -> int:
        """Messages from the kernel on ``channel`` the host has not received yet."""
        return len(self._to_host[channel].items)

    def pending_to_kernel(self, channel: str) -> int:
        """Messages clients sent on ``channel`` the kernel has not taken yet."""
        return len(self._to_kernel[channel].items)

    async def take(self, channel: str) -> list[bytes]:
        """The next message a client sent the kernel on ``channel``."""
        return await self._to_kernel[channel].get()

    def end(self, error: ChannelsClosed | None = None) -> None:
        """The transport ends: what the host has not received yet is still delivered."""
        error = error or ChannelsClosed("the kernel exited with status 0", exit_code=0)
        if not self._ended.done():
            self._ended.set_result(error)
        for box in (*self._to_host.values(), *self._to_kernel.values()):
            box.fail(error)


def message(signer: Signer, msg_type: str, content: dict[str, Any] | None = None, *,
            parent: str | None = None, msg_id: str | None = None) -> tuple[str, list[bytes]]:
    """A signed message's frames (from the delimiter on) and its msg_id; ``parent`` is the msg_id
    of the request it answers."""
    msg_id = msg_id or uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": msg_type, "session": "loopback", "username": "kernel",
              "date": "2026-01-01T00:00:00+00:00", "version": "5.4"}
    parts = [json.dumps(p).encode() for p in (header, {"msg_id": parent} if parent else {}, {}, content or {})]
    return msg_id, [DELIM, signer.sign(parts), *parts]
