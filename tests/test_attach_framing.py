"""The attach stream's framing, alone: pure functions over bytes (no engine needed).

Every malformed, forged, truncated or oversized input must end in a FramingError (a
ProtocolError) and never make a decoder hold more than its bound.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelexec.backend.attach.framing import (
    CONTROL,
    FROM_RELAY,
    HEADER,
    IOPUB,
    LINK,
    LOG,
    MAGIC,
    SHELL,
    STDIN,
    TO_RELAY,
    VERSION,
    Decoder,
    DockerDemux,
    Frame,
    FramingError,
    Limits,
    decode_boot_header,
    decode_link,
    decode_log,
    encode,
    encode_boot,
    encode_link,
    encode_log,
)
from kernelexec.backend.attach.relay import BOOTSTRAP
from kernelexec.errors import ProtocolError

SMALL = Limits(max_frame_bytes=1024, max_frames=6, max_link_bytes=256, max_log_bytes=128, read_chunk=512)


def wire(frames: list[tuple[int, list[bytes]]], limits: Limits = SMALL, seq: int = 0) -> bytes:
    return b"".join(b"".join(encode(ch, seq + i, parts, limits)) for i, (ch, parts) in enumerate(frames))


def decode_all(data: bytes, limits: Limits = SMALL, channels: frozenset[int] = FROM_RELAY, step: int = 0,
               decoder: Decoder | None = None) -> list[Frame]:
    d = decoder or Decoder(limits, channels)
    out = []
    step = step or limits.read_chunk
    for i in range(0, len(data), step):
        d.feed(data[i:i + step])
        while (f := d.next()) is not None:
            out.append(f)
        assert d.buffered <= limits.max_buffered
    d.eof()
    return out


def header(channel: int = SHELL, count: int = 1, seq: int = 0, body_len: int = 8, body_crc: int = 0,
           flags: int = 0, version: int = VERSION, magic: bytes = MAGIC) -> bytes:
    """A header with a valid checksum over whatever it says (a forger's header)."""
    head = HEADER.pack(magic, version, channel, flags, count, seq, body_len, body_crc, 0)[:20]
    return head + struct.pack(">I", zlib.crc32(head))


def body(parts: list[bytes]) -> tuple[bytes, int]:
    b = struct.pack(f">{len(parts)}I", *(len(p) for p in parts)) + b"".join(parts)
    return b, zlib.crc32(b)


# -- round trips ------------------------------------------------------------------------------

def test_round_trip_every_channel_and_split() -> None:
    frames = [(SHELL, [b"<IDS|MSG>", b"sig", b"{}", b"{}", b"{}", b"{}"]), (IOPUB, [b""]), (STDIN, [b"x" * 1000]),
              (CONTROL, [b"a", b"", b"b"]), (LINK, [b'{"type":"keepalive"}']), (LOG, [b"stderr", b"boom"])]
    data = wire(frames)
    for step in (1, 2, 3, 7, 24, 25, 100, 512):
        got = decode_all(data, step=step)
        assert [(f.channel, f.parts) for f in got] == frames
        assert [f.seq for f in got] == list(range(len(frames)))


def test_sequence_wraps() -> None:
    data = wire([(SHELL, [b"a"]), (SHELL, [b"b"])], seq=0xFFFFFFFF)
    got = decode_all(data, decoder=Decoder(SMALL, FROM_RELAY, seq=0xFFFFFFFF))
    assert [f.seq for f in got] == [0xFFFFFFFF, 0]


def test_encode_does_not_copy_parts() -> None:
    part = b"y" * 1000
    chunks = encode(SHELL, 0, [part], SMALL)
    assert chunks[1] is part


def test_link_and_log_messages() -> None:
    assert decode_link(encode_link(0, {"type": "resync", "nonce": "n"}, SMALL)[1:]) == {"type": "resync",
                                                                                         "nonce": "n"}
    assert decode_log(encode_log(0, b"relay", b"hi", SMALL)[1:]) == ("relay", b"hi")
    with pytest.raises(FramingError) as e:
        encode_link(0, {"type": "launch-missiles"}, SMALL)
    assert e.value.kind == "link"
    for bad in ([b"not json"], [b"[1]"], [b'{"type": "nope"}'], [b"{}", b"{}"], [b"[" * 100_000]):
        with pytest.raises(FramingError):
            decode_link(bad)
    for bad_log in ([b"stdin", b"x"], [b"stderr"], [b"stderr", b"x", b"y"]):
        with pytest.raises(FramingError):
            decode_log(bad_log)


def test_framing_error_is_a_protocol_error() -> None:
    assert issubclass(FramingError, ProtocolError)


# -- the sender checks its own bounds ------------------------------------------------------------

@pytest.mark.parametrize("channel, parts, kind", [
    (SHELL, [], "count"),
    (SHELL, [b"x"] * 7, "count"),
    (SHELL, [b"x" * 1025], "size"),
    (LINK, [b"x" * 300], "size"),
    (LOG, [b"stderr", b"x" * 200], "size"),
    (9, [b"x"], "channel"),
])
def test_encode_refuses(channel: int, parts: list[bytes], kind: str) -> None:
    with pytest.raises(FramingError) as e:
        encode(channel, 0, parts, SMALL)
    assert e.value.kind == kind


# -- what the decoder refuses ----------------------------------------------------------------------

def refused(data: bytes, kind: str, channels: frozenset[int] = FROM_RELAY, limits: Limits = SMALL) -> Decoder:
    d = Decoder(limits, channels)
    with pytest.raises(FramingError) as e:
        decode_all(data, limits, channels, decoder=d)
    assert e.value.kind == kind, str(e.value)
    return d


def test_refuses_bad_magic_version_and_flags() -> None:
    good = wire([(SHELL, [b"abc"])])
    refused(b"XXX" + good[3:], "magic")
    refused(header(version=2) + good[24:], "version")
    b, crc = body([b"abc"])
    refused(header(flags=1, body_len=len(b), body_crc=crc) + b, "flags")


def test_every_corrupted_header_byte_is_refused() -> None:
    good = wire([(SHELL, [b"abc"])])
    for i in range(HEADER.size):
        for bit in (0x01, 0x80):
            bad = bytearray(good)
            bad[i] ^= bit
            with pytest.raises(FramingError):
                decode_all(bytes(bad))


def test_every_corrupted_body_byte_is_refused() -> None:
    good = wire([(SHELL, [b"abc", b"defgh"])])
    for i in range(HEADER.size, len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x20
        with pytest.raises(FramingError) as e:
            decode_all(bytes(bad))
        assert e.value.kind == "checksum"


def test_refuses_channels_a_direction_does_not_carry() -> None:
    refused(wire([(IOPUB, [b"x"])]), "channel", channels=TO_RELAY)
    refused(wire([(LOG, [b"stderr", b"x"])]), "channel", channels=TO_RELAY)


def test_refuses_counts_and_sizes_before_buffering_the_body() -> None:
    refused(header(count=0, body_len=0), "count")
    refused(header(count=7, body_len=28), "count")
    for ch, limit in ((SHELL, SMALL.max_body_bytes), (LINK, SMALL.max_link_bytes), (LOG, SMALL.max_log_bytes)):
        d = refused(header(channel=ch, body_len=limit + 1), "size")
        assert d.buffered == HEADER.size  # refused on the header alone: the forged length is never awaited
    refused(header(count=2, body_len=7), "size")  # shorter than its own length table


def test_refuses_lengths_that_do_not_add_up_and_oversized_parts() -> None:
    lens = struct.pack(">2I", 3, 9)  # says 12 bytes of parts, carries 4
    b = lens + b"abcd"
    refused(header(count=2, body_len=len(b), body_crc=zlib.crc32(b)) + b, "size")
    big = b"z" * 1025  # a part over max_frame_bytes inside a body under max_body_bytes
    b, crc = body([big])
    refused(header(count=1, body_len=len(b), body_crc=crc) + b, "size")


def test_refuses_a_gap_or_a_replay() -> None:
    a = wire([(SHELL, [b"a"])], seq=0)
    c = wire([(SHELL, [b"c"])], seq=2)
    refused(a + c, "sequence")
    refused(a + a, "sequence")


def test_truncated_stream() -> None:
    good = wire([(SHELL, [b"abc"])])
    for cut in (1, 10, 23, 24, 30, len(good) - 1):
        refused(good[:cut], "truncated")
    assert decode_all(b"") == []


def test_errors_are_sticky_until_hunt() -> None:
    d = Decoder(SMALL, FROM_RELAY)
    d.feed(b"garbage" * 5)
    with pytest.raises(FramingError):
        d.next()
    with pytest.raises(FramingError):
        d.next()
    with pytest.raises(FramingError):
        d.feed(wire([(SHELL, [b"a"])]))


def test_buffer_bound() -> None:
    d = Decoder(SMALL, FROM_RELAY)
    with pytest.raises(FramingError) as e:
        d.feed(b"x" * (SMALL.read_chunk + 1))
    assert e.value.kind == "buffer"
    # a reader that never takes frames out is stopped at the bound, not grown
    d = Decoder(SMALL, FROM_RELAY)
    b, crc = body([b"p" * 1000])
    with pytest.raises(FramingError) as e:
        for _ in range(100):
            d.feed(header(body_len=len(b), body_crc=crc) + b)
    assert e.value.kind == "buffer"
    assert d.buffered <= SMALL.max_buffered


# -- hunting: resuming mid-stream ------------------------------------------------------------------

def test_hunt_skips_garbage_and_adopts_the_sequence() -> None:
    frames = [(SHELL, [b"one"]), (IOPUB, [b"two"]), (LINK, [b'{"type":"keepalive"}'])]
    stream = wire(frames, seq=41)
    garbage = b"KXA\x01junk" + b"KX" + header(body_len=99)[:20] + b"\x00" * 50 + b"KXAKX"
    d = Decoder(SMALL, FROM_RELAY)
    d.hunt()
    got = decode_all(garbage + stream, step=5, decoder=d)
    assert [(f.channel, f.parts) for f in got] == frames
    assert [f.seq for f in got] == [41, 42, 43]
    assert d.dropped == len(garbage)


def test_hunt_resumes_after_an_error() -> None:
    d = Decoder(SMALL, FROM_RELAY)
    d.feed(b"\xff" * 30)
    with pytest.raises(FramingError):
        d.next()
    d.hunt()
    got = decode_all(wire([(SHELL, [b"ok"])], seq=7), decoder=d)
    assert [f.parts for f in got] == [[b"ok"]]


def test_hunt_keeps_a_magic_split_across_feeds() -> None:
    stream = wire([(SHELL, [b"ok"])])
    d = Decoder(SMALL, FROM_RELAY)
    d.hunt()
    d.feed(b"noise" + stream[:2])
    assert d.next() is None
    d.feed(stream[2:])
    f = d.next()
    assert f is not None and f.parts == [b"ok"]


# -- the bootstrap hello -----------------------------------------------------------------------------

def test_boot_header() -> None:
    data = encode_boot({"a": 1})
    assert decode_boot_header(data[:8]) == len(data) - 8
    assert json.loads(data[8:]) == {"a": 1}
    for bad in (b"KXB2" + data[4:8], b"KXB1\xff\xff\xff\xff", data[:7]):
        with pytest.raises(FramingError):
            decode_boot_header(bad)
    with pytest.raises(FramingError):
        encode_boot({"x": "y" * (9 << 20)})


def bootstrap(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-I", "-c", BOOTSTRAP], input=stdin, capture_output=True, timeout=60)


def test_bootstrap_runs_the_relay_it_is_given() -> None:
    relay = "import os\nos.write(1, b'ran ' + BOOT['config']['x'].encode() + b' as ' + __name__.encode())"
    done = bootstrap(encode_boot({"relay": relay, "config": {"x": "y"}}) + b"after the hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"ran y as kernelexec_relay"


@pytest.mark.parametrize("stdin, said", [
    (b"", b"closed before the hello"),
    (b"KXB1\x00\x00", b"closed before the hello"),
    (b"HTTP/1.1 200 OK\r\n", b"does not start with KXB1"),
    (b"KXB1\x7f\xff\xff\xff", b"too large"),
])
def test_bootstrap_refuses(stdin: bytes, said: bytes) -> None:
    done = bootstrap(stdin)
    assert done.returncode != 0 and said in done.stderr and done.stdout == b""


# -- Docker's multiplexing -----------------------------------------------------------------------------

def mux(chunks: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack(">BxxxI", s, len(c)) + c for s, c in chunks)


def test_docker_demux_every_split() -> None:
    chunks = [(1, b"hello"), (2, b"err"), (1, b""), (1, b"world"), (3, b"engine error")]
    data = mux(chunks)
    for step in range(1, len(data) + 1):
        demux = DockerDemux()
        got: dict[int, bytes] = {1: b"", 2: b"", 3: b""}
        for i in range(0, len(data), step):
            for s, view in demux.split(data[i:i + step]):
                got[s] += bytes(view)
        assert got == {1: b"helloworld", 2: b"err", 3: b"engine error"}


def test_docker_demux_refuses_a_raw_stream() -> None:
    with pytest.raises(FramingError) as e:
        DockerDemux().split(b"KXA\x01\x01\x00\x00\x01")  # a frame where Docker's header should be (Tty on)
    assert e.value.kind == "docker"


# -- fuzz --------------------------------------------------------------------------------------------------

part = st.binary(max_size=300)
message = st.tuples(st.sampled_from(sorted(FROM_RELAY - {LINK, LOG})), st.lists(part, min_size=1, max_size=6))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(message, max_size=8), st.integers(1, 600))
def test_fuzz_round_trip(frames: list[tuple[int, list[bytes]]], step: int) -> None:
    got = decode_all(wire(frames), step=min(step, SMALL.read_chunk))
    assert [(f.channel, f.parts) for f in got] == frames


@FUZZ
@given(st.binary(max_size=3000), st.integers(1, 512), st.booleans())
def test_fuzz_garbage_only_raises_framing_errors(data: bytes, step: int, hunting: bool) -> None:
    d = Decoder(SMALL, FROM_RELAY)
    if hunting:
        d.hunt()
    try:
        for i in range(0, len(data), step):
            d.feed(data[i:i + step])
            while d.next() is not None:
                pass
            assert d.buffered <= SMALL.max_buffered
        d.eof()
    except FramingError:
        pass


@FUZZ
@given(st.lists(message, min_size=1, max_size=5), st.data())
def test_fuzz_any_corruption_is_detected(frames: list[tuple[int, list[bytes]]], data: st.DataObject) -> None:
    good = wire(frames)
    i = data.draw(st.integers(0, len(good) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(good)
    bad[i] ^= flip
    with pytest.raises(FramingError):
        decode_all(bytes(bad), step=data.draw(st.integers(1, 512)))


@FUZZ
@given(st.lists(message, min_size=1, max_size=5), st.integers(0, len(wire([(SHELL, [b"x"])])) * 4))
def test_fuzz_truncation_is_detected(frames: list[tuple[int, list[bytes]]], cut: int) -> None:
    good = wire(frames)
    cut = cut % len(good)
    if cut == 0:
        return
    d = Decoder(SMALL, FROM_RELAY)
    try:
        got = decode_all(good[:cut], decoder=d)
    except FramingError as e:
        assert e.kind == "truncated"
    else:  # cut on a frame boundary: a clean prefix of what was sent
        assert [(f.channel, f.parts) for f in got] == frames[:len(got)]


@FUZZ
@given(st.binary(max_size=500), st.lists(message, min_size=1, max_size=4), st.integers(1, 512))
def test_fuzz_hunt_finds_frames_after_garbage(garbage: bytes, frames: list[tuple[int, list[bytes]]],
                                              step: int) -> None:
    d = Decoder(SMALL, FROM_RELAY)
    d.hunt()
    try:
        got = decode_all(garbage + wire(frames, seq=5), step=step, decoder=d)
    except FramingError:
        return  # garbage that made a valid header by chance and then broke: refused, not misread
    assert [(f.channel, f.parts) for f in got][-len(frames):] == frames


def test_net_operations_round_trip_and_refuse_malformed() -> None:
    from kernelexec.backend.attach.framing import (
        NET,
        NET_CHUNK,
        NET_CLOSE,
        NET_CREDIT,
        NET_DATA,
        NET_OPEN,
        decode_net,
        encode_net,
    )

    limits = Limits()
    dec = Decoder(limits, TO_RELAY)
    for i, (op, data) in enumerate([(NET_OPEN, b""), (NET_DATA, b"x" * NET_CHUNK), (NET_DATA, b""),
                                    (NET_CREDIT, (1234).to_bytes(4, "big")), (NET_CLOSE, b"")]):
        dec.feed(b"".join(encode_net(i, op, 7, limits, data)))
        frame = dec.next()
        assert frame is not None and frame.channel == NET
        assert decode_net(frame.parts) == (op, 7, data)
    with pytest.raises(FramingError, match="a net message of") as too_big:
        encode_net(0, NET_DATA, 1, limits, b"x" * (NET_CHUNK + 1))
    assert too_big.value.kind == "size"
    head = (NET_OPEN).to_bytes(1, "big") + (3).to_bytes(4, "big")
    for parts in ([b"\x09" + (3).to_bytes(4, "big")], [head, b"abc"], [(NET_CREDIT).to_bytes(1, "big") + b"\0\0\0\1"],
                  [head[:3]], [head, b"", b""]):
        with pytest.raises(FramingError) as e:
            decode_net(parts)
        assert e.value.kind == "net"
