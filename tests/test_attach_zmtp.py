"""The relay's ZMTP codec, alone (no engine): the bytes it writes, the bounds it keeps on what it
reads, and that libzmq (the kernel's side) accepts it as a peer."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelexec.backend.attach.zmtp import (
    GREETING,
    SUBSCRIBE_ALL,
    Reader,
    Refused,
    ZmtpError,
    command,
    encode,
    pong,
    properties,
    ready,
)

PART = 1 << 20


def reader(max_parts: int = 16, max_message: int = 4 << 20, mark: bytes | None = None) -> Reader:
    r = Reader(PART, max_parts, max_message, mark=mark)
    r.feed(GREETING)
    assert r.next() == ("greeting", (3, 0))
    return r


def drain(r: Reader) -> list[tuple[str, object]]:
    out = []
    while (item := r.next()) is not None:
        out.append(item)
    return out


def test_greeting_is_zmtp_3_0_null_as_client() -> None:
    assert len(GREETING) == 64
    assert GREETING[0] == 0xFF and GREETING[9] == 0x7F and GREETING[1:9] == bytes(8)
    assert GREETING[10:12] == b"\x03\x00"
    assert GREETING[12:32] == b"NULL" + bytes(16)
    assert GREETING[32] == 0  # as-server


def test_ready_carries_socket_type_and_identity() -> None:
    r = reader()
    r.feed(ready(b"DEALER", b"kernelexec-relay"))
    [(kind, (name, data))] = drain(r)  # type: ignore[misc]
    assert (kind, name) == ("command", b"READY")
    assert properties(data) == {b"socket-type": b"DEALER", b"identity": b"kernelexec-relay"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=600), min_size=1, max_size=8), min_size=1, max_size=5),
       st.integers(1, 97))
def test_messages_round_trip_whatever_the_cuts(messages: list[list[bytes]], step: int) -> None:
    wire = b"".join(b"".join(encode(m)) for m in messages)
    r = reader()
    got = []
    for i in range(0, len(wire), step):
        r.feed(wire[i:i + step])
        got += drain(r)
    assert got == [("message", m) for m in messages]


def test_long_frames_use_eight_byte_sizes() -> None:
    head, body = encode([b"x" * 300])
    assert head == b"\x02" + (300).to_bytes(8, "big") and body == b"x" * 300
    assert encode([b"ab", b""]) == [b"\x01\x02", b"ab", b"\x00\x00", b""]


def test_a_part_over_the_bound_is_skipped_unbuffered_and_refused_once() -> None:
    r = reader()
    huge = 100 << 20
    r.feed(b"\x01\x05topic" + b"\x03" + huge.to_bytes(8, "big"))  # LONG, MORE
    assert r.next() is None
    for _ in range(huge // (256 << 10)):
        r.feed(bytes(256 << 10))
        assert r.next() is None
        assert r.buffered < 1024  # never held
    r.feed(b"\x00\x03end" + b"".join(encode([b"next", b"ok"])))
    assert drain(r) == [("refused", Refused("part", f"a message part larger than max_message_bytes ({PART} bytes)",
                                            3, None)),
                        ("message", [b"next", b"ok"])]


def test_too_many_parts_or_bytes_are_refused_and_the_stream_continues() -> None:
    r = reader(max_parts=3, max_message=1000)
    r.feed(b"".join(encode([b"a"] * 5)) + b"".join(encode([b"x" * 600, b"y" * 600])) + b"".join(encode([b"fine"])))
    assert drain(r) == [("refused", Refused("parts", "a message of more than 3 parts", 5, None)),
                        ("refused", Refused("message", "a message larger than 1,000 bytes", 2, None)),
                        ("message", [b"fine"])]


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_a_refused_message_is_counted_whole_and_its_mark_found(step: int) -> None:
    """What the relay needs to word a message it cannot hold: how many parts it had, where the
    delimiter was, whatever the cuts; and the count starts afresh for the next message."""
    r = reader(max_parts=4, mark=b"<IDS|MSG>")
    wire = b"".join(b"".join(encode(m)) for m in ([b"id", b"<IDS|MSG>"] + [b"b"] * 54, [b"<IDS|MSG>", b"x"],
                                                   [b"a"] * 9, [b"y"]))
    got = []
    for i in range(0, len(wire), step):
        r.feed(wire[i:i + step])
        got += drain(r)
    assert got == [("refused", Refused("parts", "a message of more than 4 parts", 56, 1)),
                   ("message", [b"<IDS|MSG>", b"x"]),
                   ("refused", Refused("parts", "a message of more than 4 parts", 9, None)),
                   ("message", [b"y"])]


def test_a_part_over_the_bound_wins_over_a_count_already_broken() -> None:
    """libzmq drops the connection for a part over MAXMSGSIZE whatever else the message broke: the
    refusal says so, so the relay reports it as the ipc transport ends."""
    r = reader(max_parts=2, mark=b"<IDS|MSG>")
    r.feed(b"".join(encode([b"<IDS|MSG>", b"a", b"b", b"x" * (PART + 1), b"c"])))
    assert drain(r) == [("refused", Refused("part", f"a message part larger than max_message_bytes ({PART} bytes)",
                                            5, 0))]


@pytest.mark.parametrize("wire,says", [
    (b"\x00" * 64, "signature"),
    (b"\xff" + bytes(8) + b"\x7f\x02\x00" + bytes(52), "ZMTP 2.0"),
    (b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"CURVE".ljust(20, b"\0") + bytes(32), "CURVE"),
])
def test_a_bad_greeting_is_refused(wire: bytes, says: str) -> None:
    r = Reader(PART, 16, 4 << 20)
    r.feed(wire)
    with pytest.raises(ZmtpError, match=says):
        r.next()


@pytest.mark.parametrize("wire,says", [
    (b"\x08\x01x", "reserved flags"),
    (b"\x01\x01a" + command(b"READY"), "inside a message"),
    (b"\x06" + (1 << 20).to_bytes(8, "big"), "command of"),
    (b"\x04\x02\x09R", "name runs past"),
])
def test_broken_frames_are_refused(wire: bytes, says: str) -> None:
    r = reader()
    r.feed(wire)
    with pytest.raises(ZmtpError, match=says):
        drain(r)


def test_properties_that_run_past_their_command_are_refused() -> None:
    with pytest.raises(ZmtpError):
        properties(b"\x0bSocket-Type\x00\x00\x00\x09DEAL")


def test_pong_echoes_the_ping_context() -> None:
    r = reader()
    r.feed(pong(b"\x00\x10ctx"))
    assert drain(r) == [("command", (b"PONG", b"ctx"))]


def _peer(path: str, socket_type: bytes, identity: bytes | None = None) -> tuple[socket.socket, Reader]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(GREETING + ready(socket_type, identity))
    r = Reader(PART, 16, 4 << 20)
    seen: list[tuple[str, object]] = []
    while len(seen) < 2:  # its greeting and its READY
        r.feed(s.recv(4096))
        seen += drain(r)
    assert seen[0][0] == "greeting"
    assert seen[1][0] == "command" and seen[1][1][0] == b"READY"  # type: ignore[index]
    return s, r


def _recv(s: socket.socket, r: Reader) -> list[bytes]:
    while (item := r.next()) is None:
        r.feed(s.recv(4096))
    assert item[0] == "message"
    return item[1]  # type: ignore[return-value]


def test_libzmq_takes_the_codec_as_a_dealer_and_a_subscriber() -> None:
    """The kernel's side is libzmq: a ROUTER routes by the identity in READY, and an XPUB (ipykernel's
    IOPub) takes the 3.0 subscription message and publishes to it."""
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory() as d:
        router, xpub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.XPUB)
        router.linger = xpub.linger = 0
        router.bind(f"ipc://{d}/shell")
        xpub.bind(f"ipc://{d}/iopub")
        dealer, dr = _peer(os.path.join(d, "shell"), b"DEALER", b"kernelexec-relay")
        sub, sr = _peer(os.path.join(d, "iopub"), b"SUB")
        try:
            dealer.sendall(b"".join(encode([b"<IDS|MSG>", b"x" * 1000])))
            assert router.poll(10_000)
            assert router.recv_multipart() == [b"kernelexec-relay", b"<IDS|MSG>", b"x" * 1000]
            router.send_multipart([b"kernelexec-relay", b"<IDS|MSG>", b"reply"])
            assert _recv(dealer, dr) == [b"<IDS|MSG>", b"reply"]

            sub.sendall(SUBSCRIBE_ALL)
            assert xpub.poll(10_000)
            assert xpub.recv() == b"\x01"  # the subscription, as XPUB reports it
            xpub.send_multipart([b"kernel.status", b"<IDS|MSG>", b"idle"])
            assert _recv(sub, sr) == [b"kernel.status", b"<IDS|MSG>", b"idle"]
        finally:
            dealer.close()
            sub.close()
            router.close()
            xpub.close()
            ctx.term()
