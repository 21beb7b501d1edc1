"""The host's end of the attach stream (AttachChannels) against a relay played by the test: no engine,
no container. What the relay reports of a kernel that broke the protocol, and how far the host believes it.

The relay is in the sandbox (code that took over the kernel may have subverted it), so its notice of a
violation may end the session and nothing more: the words the client raises are the host parser's,
made from a shape the host checks, never the relay's text.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from kernelexec.backend.attach.channels import AttachChannels
from kernelexec.backend.attach.framing import Limits, encode_link
from kernelexec.backend.base import ChannelsClosed
from kernelexec.errors import ProtocolError
from kernelexec.kernel.client import KernelClient, KernelGone
from kernelexec.kernel.protocol import new_key

from .conftest import run_alone

HANG = 20.0
LIMITS = Limits()
NO_DELIMITER = "the kernel sent a message without the <IDS|MSG> delimiter"


class Relay:
    """The relay's side of the stream: link messages, multiplexed on stdout as the engine does."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.seq = 0

    async def link(self, message: dict[str, Any]) -> None:
        frame = b"".join(encode_link(self.seq, message, LIMITS))
        self.seq += 1
        self.writer.write(struct.pack(">BxxxI", 1, len(frame)) + frame)
        await self.writer.drain()


@asynccontextmanager
async def attached() -> AsyncIterator[tuple[AttachChannels, Relay]]:
    """AttachChannels opened on one end of a socket pair; the test is the relay on the other."""
    host_sock, relay_sock = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=host_sock)
    _, relay_writer = await asyncio.open_connection(sock=relay_sock)
    relay = Relay(relay_writer)
    await relay.link({"type": "hello", "version": 1, "kernel_pid": 7})
    channels = await AttachChannels.open(reader, writer, b"the bootstrap hello", LIMITS, keepalive=30.0,
                                         dead_after=60.0, timeout=HANG)
    try:
        yield channels, relay
    finally:
        await channels.close()
        relay_writer.close()
        await relay_writer.wait_closed()


async def closed_by(notice: dict[str, Any]) -> ChannelsClosed:
    async with attached() as (channels, relay):
        await relay.link({"type": "violation", **notice})
        with pytest.raises(ChannelsClosed) as e:
            await asyncio.wait_for(channels.recv("shell"), HANG)
        final = await asyncio.wait_for(channels.wait_closed(), HANG)
        assert (final.reason, final.violation) == (e.value.reason, e.value.violation)
        with pytest.raises(ChannelsClosed) as again:  # a kernel that broke the protocol is not resumed
            await channels.reattach(channels._reader, channels._writer, timeout=HANG)
        assert again.value.violation == e.value.violation
        return e.value


@pytest.mark.parametrize("shape, words", [
    ({"frames": 5, "delimiter": None}, NO_DELIMITER),
    ({"frames": 56, "delimiter": 0}, "the kernel sent a message with 50 buffers; at most 8"),
    ({"frames": 30, "delimiter": 12}, NO_DELIMITER),  # past the identities the parser allows
])
def test_a_shape_the_parser_refuses_is_a_violation_in_the_parsers_words(shape: dict[str, Any], words: str) -> None:
    closed = run_alone(closed_by({"reason": "the kernel sent a shell message ...", "shape": shape}))
    assert closed.violation == words
    assert closed.reason == "the kernel broke the protocol's bounds: the kernel sent a shell message ..."
    assert not closed.kernel_exited


@pytest.mark.parametrize("shape", [
    None,  # a bound that is not the message's shape (a part over max_message_bytes, broken ZMTP)
    {"frames": 14, "delimiter": 0},  # a shape the parser takes: only the relay's bound was broken
    {"frames": 6, "delimiter": 6}, {"frames": 0, "delimiter": None}, {"frames": -3, "delimiter": None},
    {"frames": True, "delimiter": None}, {"frames": "56", "delimiter": 0}, {"frames": 1 << 40, "delimiter": 0},
    {"frames": 56, "delimiter": 0.0}, {"frames": 56, "delimiter": -1}, [56, 0],
    "the kernel sent whatever the relay says",
])
def test_anything_else_ends_the_session_without_a_violation(shape: Any) -> None:
    closed = run_alone(closed_by({"reason": "x" * 60_000, **({"shape": shape} if shape is not None else {})}))
    assert closed.violation is None
    assert closed.reason.startswith("the kernel broke the protocol's bounds: x")
    assert len(closed.reason) < 600  # the relay's text is cut


async def request_then(end: Callable[[Relay], Awaitable[None]]) -> tuple[KernelClient, BaseException]:
    """A client's request in flight when the relay ends the session with ``end``: what the request raised."""
    async with attached() as (channels, relay):
        client = KernelClient(new_key(), channels, max_output_bytes=1 << 20)
        await client.connect()
        try:
            _, reply = await client.request("shell", "kernel_info_request", {})
            await end(relay)
            with pytest.raises(Exception) as e:
                await asyncio.wait_for(reply, HANG)
            return client, e.value
        finally:
            await client.close()


def test_the_client_raises_the_violation_as_its_parser_would() -> None:
    async def many_buffers(relay: Relay) -> None:
        await relay.link({"type": "violation", "reason": "the kernel sent on shell a message of more than 25 parts",
                          "shape": {"frames": 56, "delimiter": 0}})

    client, error = run_alone(request_then(many_buffers))
    assert type(error) is ProtocolError
    assert str(error) == "the kernel sent a message with 50 buffers; at most 8"
    assert isinstance(error.__cause__, ChannelsClosed)
    assert client.failure is error  # remembered for every later request


def test_a_closed_stream_is_still_the_kernel_gone() -> None:
    async def stdout_ends(relay: Relay) -> None:
        relay.writer.write_eof()

    _, error = run_alone(request_then(stdout_ends))
    assert type(error) is KernelGone
    assert str(error).startswith("the attach stream ended")
