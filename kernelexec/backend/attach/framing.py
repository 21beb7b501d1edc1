"""The bytes of the attach stream: pure functions and bounded decoders, no I/O.

Both ends use this file: the host imports it, and the relay in the container runs it as source
(kernelexec is not installed there), so it needs nothing but the standard library.

One frame, big-endian::

    header (24 bytes)
      magic      3s   b"KXA"
      version    B    1
      channel    B    0 link, 1 shell, 2 iopub, 3 stdin, 4 control, 5 log, 6 net
      flags      B    0 (anything else is refused: no silent extension)
      count      H    number of message parts, 1..max_frames
      seq        I    per direction, +1 per frame, from 0 (wraps at 2**32)
      body_len   I    4*count + sum of the part lengths
      body_crc   I    crc32 of the body
      head_crc   I    crc32 of the 20 bytes before it
    body
      count x I       the length of each part
      the parts, back to back

Why so: the stream is hostile input. The header checksum lets a garbage header be refused
before its length is trusted, so a forged length never makes the reader wait for or buffer
bytes that will not come; lengths are bounded per channel before anything is buffered; the
sequence number tells a lost or replayed frame from a clean stream; and a decoder that lost
its place can *hunt* for the next valid header (a re-attached stream starts mid-frame).
crc32 guards against desync, not forgery: what could forge a frame (code in the container)
already holds the kernel's HMAC key, so a forged frame is no new power (see docs/security.md).

The ``net`` channel carries the connections the code opens to the egress port (only with
``Policy.egress``): each frame is one operation on one connection (:func:`encode_net`), with
credit-based flow control per connection (a side sends at most ``NET_WINDOW`` bytes the other has
not acknowledged), so one connection can neither starve the kernel's channels nor grow a buffer.

Before any frame, the host sends the bootstrap hello (:func:`encode_boot`): ``b"KXB1"``, a
4-byte length and a JSON document, read by the few lines of ``relay.BOOTSTRAP``. The hello carries
this file's source, which the relay runs: both ends always speak the same version of the framing and
of the link messages (``VERSION`` tells a stream that is not this framing at all). A link message is
one JSON object of a known ``type`` (an unknown type is refused); since both ends run one source,
a field added to a known type (``shape`` on ``violation``) needs no new version.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

try:
    from kernelexec.errors import ProtocolError
except ImportError:  # inside the sandbox: the relay runs this file as source, without kernelexec

    class ProtocolError(Exception):  # type: ignore[no-redef]
        """The peer broke the framing or its bounds."""


__all__ = [
    "BOOT_MAGIC", "CHANNEL_IDS", "CHANNEL_NAMES", "CONTROL", "DELIM", "DockerDemux", "Decoder", "FROM_RELAY",
    "Frame", "FramingError", "HEADER", "IOPUB", "LINK", "LINK_TYPES", "LOG", "Limits", "MAGIC", "SHELL", "STDIN",
    "NET", "NET_CHUNK", "NET_CLOSE", "NET_CREDIT", "NET_DATA", "NET_EOF", "NET_MAX_CONNECTIONS", "NET_OPEN",
    "NET_WINDOW", "TO_RELAY", "VERSION", "decode_boot_header", "decode_link", "decode_log", "decode_net", "encode",
    "encode_boot", "encode_link", "encode_log", "encode_net",
]

MAGIC = b"KXA"
VERSION = 1
#: magic, version, channel, flags, count, seq, body_len, body_crc, head_crc
HEADER = struct.Struct(">3sBBBHIIII")
_HEAD_CHECKED = HEADER.size - 4
DELIM = b"<IDS|MSG>"

LINK, SHELL, IOPUB, STDIN, CONTROL, LOG, NET = range(7)
CHANNEL_IDS = {"link": LINK, "shell": SHELL, "iopub": IOPUB, "stdin": STDIN, "control": CONTROL, "log": LOG,
               "net": NET}
CHANNEL_NAMES = {v: k for k, v in CHANNEL_IDS.items()}
#: What each direction may carry: the host never sends iopub or log.
TO_RELAY = frozenset({LINK, SHELL, STDIN, CONTROL, NET})
FROM_RELAY = frozenset({LINK, SHELL, IOPUB, STDIN, CONTROL, LOG, NET})

#: Operations on the net channel. open (relay: the code connected; host: -), data (both), eof (both:
#: no more data this way), close (both: the connection is over, both ways), credit (both: the
#: sender may send this many more bytes, a 4-byte count).
NET_OPEN, NET_DATA, NET_EOF, NET_CLOSE, NET_CREDIT = range(1, 6)
NET_OPS = frozenset({NET_OPEN, NET_DATA, NET_EOF, NET_CLOSE, NET_CREDIT})
NET_HEAD = struct.Struct(">BI")  # op, connection id
#: Bytes in flight per connection and direction; the receiver grants more as it delivers them.
NET_WINDOW = 256 << 10
#: The largest data frame.
NET_CHUNK = 64 << 10
#: Connections the relay carries at once; more are closed as they come (the proxy caps far lower).
NET_MAX_CONNECTIONS = 64

#: Link messages, both directions. hello (relay: up), keepalive (host: ping, relay: echo), resync
#: (host: nonce, relay: the same nonce), bye (host: end the sandbox), signal (host: signal the
#: kernel), exit (relay: the kernel's status), violation (relay: the kernel broke a bound, ``reason``
#: in the relay's words; with ``shape``, ``{"frames": n, "delimiter": i or null}``, when the message
#: could not be a Jupyter message: the host words that as its parser would, see
#: ``kernelexec.kernel.protocol.shape_error``), desync (relay: what this host sent did not decode).
LINK_TYPES = frozenset({"hello", "keepalive", "resync", "bye", "signal", "exit", "violation", "desync"})
LOG_SOURCES = frozenset({b"stdout", b"stderr", b"relay"})

BOOT_MAGIC = b"KXB1"
BOOT_HEADER = struct.Struct(">4sI")
MAX_BOOT = 8 << 20


class FramingError(ProtocolError):
    """The stream broke the framing or its bounds; ``kind`` names which rule.

    kinds: magic, version, checksum, flags, channel, count, size, sequence, truncated, buffer,
    link, log, net, docker, boot.
    """

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class Limits:
    """Bounds of one stream. The relay gets the same values in its hello."""

    #: one message part (Policy.max_message_bytes)
    max_frame_bytes: int = 16 << 20
    #: parts per message: delimiter, signature, 4 JSON parts and the protocol's 8 buffers, with room
    max_frames: int = 16
    #: a whole message: two full parts (a cut content frame and a buffer) and change
    max_body_bytes: int = 0
    #: a link message (one small JSON object)
    max_link_bytes: int = 64 << 10
    #: a log message (source and a chunk of text)
    max_log_bytes: int = 8 << 10
    #: what a reader may feed at once; the decoder never holds more than one message plus this
    read_chunk: int = 256 << 10

    def __post_init__(self) -> None:
        if self.max_body_bytes <= 0:
            object.__setattr__(self, "max_body_bytes", 2 * self.max_frame_bytes + (64 << 10))
        if min(self.max_frame_bytes, self.max_frames, self.max_link_bytes, self.max_log_bytes, self.read_chunk) <= 0:
            raise ValueError("every framing limit must be positive")

    @property
    def max_buffered(self) -> int:
        return HEADER.size + self.max_body_bytes + self.read_chunk

    def body_limit(self, channel: int) -> int:
        if channel == NET:
            return 8 + NET_HEAD.size + NET_CHUNK
        if channel == LINK:
            return self.max_link_bytes
        if channel == LOG:
            return self.max_log_bytes
        return self.max_body_bytes

    def to_dict(self) -> dict[str, int]:
        return {"max_frame_bytes": self.max_frame_bytes, "max_frames": self.max_frames,
                "max_body_bytes": self.max_body_bytes, "max_link_bytes": self.max_link_bytes,
                "max_log_bytes": self.max_log_bytes, "read_chunk": self.read_chunk}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Limits:
        return cls(**{k: int(d[k]) for k in cls().to_dict() if k in d})


class Frame(NamedTuple):
    channel: int
    seq: int
    parts: list[bytes]


def encode(channel: int, seq: int, parts: Sequence[bytes], limits: Limits) -> list[bytes]:
    """One frame as a list of buffers for ``writelines``/``writev`` (the parts are not copied).

    Raises :class:`FramingError` when the message breaks ``limits``: a sender checks its own
    bounds so that the peer never has to refuse them."""
    if channel not in CHANNEL_NAMES:
        raise FramingError("channel", f"no channel {channel}")
    n = len(parts)
    if not 1 <= n <= limits.max_frames:
        raise FramingError("count", f"a message of {n} parts; 1 to {limits.max_frames} allowed")
    lens = [len(p) for p in parts]
    biggest = max(lens)
    if biggest > limits.max_frame_bytes:
        raise FramingError("size", f"a message part of {biggest:,} bytes; at most {limits.max_frame_bytes:,}")
    body_len = 4 * n + sum(lens)
    if body_len > limits.body_limit(channel):
        raise FramingError("size", f"a {CHANNEL_NAMES[channel]} message of {body_len:,} bytes; "
                                   f"at most {limits.body_limit(channel):,}")
    table = struct.pack(f">{n}I", *lens)
    crc = zlib.crc32(table)
    for p in parts:
        crc = zlib.crc32(p, crc)
    head = HEADER.pack(MAGIC, VERSION, channel, 0, n, seq & 0xFFFFFFFF, body_len, crc, 0)[:_HEAD_CHECKED]
    return [head + struct.pack(">I", zlib.crc32(head)) + table, *parts]


def encode_link(seq: int, message: dict[str, Any], limits: Limits) -> list[bytes]:
    if message.get("type") not in LINK_TYPES:
        raise FramingError("link", f"unknown link message type {message.get('type')!r}")
    return encode(LINK, seq, [json.dumps(message, separators=(",", ":")).encode()], limits)


def decode_link(parts: Sequence[bytes]) -> dict[str, Any]:
    """A link message's JSON object; its size was bounded by the decoder."""
    if len(parts) != 1:
        raise FramingError("link", f"a link message of {len(parts)} parts; 1 expected")
    try:
        obj = json.loads(parts[0])
    except (ValueError, RecursionError) as e:
        raise FramingError("link", f"a link message that is not JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("type") not in LINK_TYPES:
        raise FramingError("link", "a link message that is not an object of a known type")
    return obj


def encode_log(seq: int, source: bytes, data: bytes, limits: Limits) -> list[bytes]:
    return encode(LOG, seq, [source, data], limits)


def decode_log(parts: Sequence[bytes]) -> tuple[str, bytes]:
    if len(parts) != 2 or parts[0] not in LOG_SOURCES:
        raise FramingError("log", "a log message that is not (source, text)")
    return parts[0].decode(), parts[1]


def encode_net(seq: int, op: int, conn: int, limits: Limits, data: bytes = b"") -> list[bytes]:
    """One operation on connection ``conn``: data frames carry at most ``NET_CHUNK`` bytes."""
    head = NET_HEAD.pack(op, conn & 0xFFFFFFFF)
    return encode(NET, seq, [head, data] if data or op == NET_DATA else [head], limits)


def decode_net(parts: Sequence[bytes]) -> tuple[int, int, bytes]:
    """(op, connection, data) of a net frame; credit's data is its 4-byte count."""
    if not 1 <= len(parts) <= 2 or len(parts[0]) != NET_HEAD.size:
        raise FramingError("net", "a net message that is not (op and connection, data)")
    op, conn = NET_HEAD.unpack(parts[0])
    data = parts[1] if len(parts) == 2 else b""
    if op not in NET_OPS:
        raise FramingError("net", f"a net message with unknown operation {op}")
    if op == NET_CREDIT and len(data) != 4:
        raise FramingError("net", "a net credit that is not a 4-byte count")
    if op not in (NET_CREDIT, NET_DATA) and len(parts) != 1:
        raise FramingError("net", f"a net operation {op} that carries data")
    return op, conn, data


def encode_boot(payload: dict[str, Any]) -> bytes:
    """The bootstrap hello: what ``relay.BOOTSTRAP`` reads before anything else."""
    data = json.dumps(payload, separators=(",", ":")).encode()
    if len(data) > MAX_BOOT:
        raise FramingError("boot", f"a bootstrap hello of {len(data):,} bytes; at most {MAX_BOOT:,}")
    return BOOT_HEADER.pack(BOOT_MAGIC, len(data)) + data


def decode_boot_header(head: bytes) -> int:
    """The length of the hello that follows ``head``; the bootstrap does the same in a few lines."""
    if len(head) != BOOT_HEADER.size:
        raise FramingError("boot", "a truncated bootstrap header")
    magic, n = BOOT_HEADER.unpack(head)
    if magic != BOOT_MAGIC:
        raise FramingError("boot", f"a bootstrap header with magic {magic!r}")
    if n > MAX_BOOT:
        raise FramingError("boot", f"a bootstrap hello of {n:,} bytes; at most {MAX_BOOT:,}")
    return int(n)


class Decoder:
    """Frames out of a byte stream fed in arbitrary pieces.

    Bounded: it holds at most one message under construction plus one ``read_chunk`` (feeding
    more raises), so a flood, a forged length or garbage can never make it grow. The first error
    is sticky (the stream's position is lost) until :meth:`hunt` resumes at the next valid header.
    """

    def __init__(self, limits: Limits, channels: frozenset[int], *, seq: int = 0) -> None:
        self.limits = limits
        self.channels = channels
        #: the sequence number the next frame must carry
        self.seq = seq
        #: bytes thrown away while hunting
        self.dropped = 0
        self._buf = bytearray()
        self._pos = 0
        self._head: tuple[int, int, int, int, int] | None = None  # channel, count, seq, body_len, body_crc
        self._hunting = False
        self._error: FramingError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def hunting(self) -> bool:
        return self._hunting

    def _fail(self, kind: str, message: str) -> FramingError:
        self._error = FramingError(kind, message)
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise FramingError(self._error.kind, str(self._error))
        if len(data) > self.limits.read_chunk or self.buffered + len(data) > self.limits.max_buffered:
            raise self._fail("buffer", f"{self.buffered + len(data):,} bytes would be buffered; the reader must "
                                       f"take frames out between feeds of at most {self.limits.read_chunk:,}")
        if self._pos and (self._pos >= len(self._buf) or self._pos > (64 << 10)):
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def hunt(self) -> None:
        """Resume after an error or a re-attach: skip to the next valid header, take its sequence."""
        self._error = None
        self._head = None
        self._hunting = True

    def eof(self) -> None:
        """The stream ended: a partial frame is an error."""
        if self._error is None and (self.buffered or self._head is not None) and not self._hunting:
            raise self._fail("truncated", "the stream ended inside a frame")

    def _check_header(self, at: int) -> tuple[int, int, int, int, int] | str:
        """The header at ``at`` if valid, else why not."""
        magic, version, channel, flags, count, seq, body_len, body_crc, head_crc = HEADER.unpack_from(self._buf, at)
        if magic != MAGIC:
            return f"magic:a frame starting with {magic!r}, not {MAGIC!r}"
        if version != VERSION:
            return f"version:a frame of version {version}; this end speaks {VERSION}"
        if zlib.crc32(memoryview(self._buf)[at:at + _HEAD_CHECKED]) != head_crc:
            return "checksum:a frame header whose checksum does not match"
        if flags:
            return f"flags:a frame with unknown flags {flags:#x}"
        if channel not in self.channels:
            return f"channel:a frame on channel {channel}, which this direction does not carry"
        if not 1 <= count <= self.limits.max_frames:
            return f"count:a message of {count} parts; 1 to {self.limits.max_frames} allowed"
        if not 4 * count <= body_len <= self.limits.body_limit(channel):
            return (f"size:a {CHANNEL_NAMES[channel]} message of {body_len:,} bytes; "
                    f"at most {self.limits.body_limit(channel):,}")
        return channel, count, seq, body_len, body_crc

    def next(self) -> Frame | None:
        """The next complete frame, or None until more bytes are fed. Raises FramingError."""
        if self._error is not None:
            raise FramingError(self._error.kind, str(self._error))
        buf = self._buf
        while self._head is None:
            if self._hunting:
                i = buf.find(MAGIC, self._pos)
                if i < 0:  # keep what could be the start of a magic
                    keep = min(len(MAGIC) - 1, self.buffered)
                    self.dropped += self.buffered - keep
                    self._pos = len(buf) - keep
                    return None
                self.dropped += i - self._pos
                self._pos = i
            if self.buffered < HEADER.size:
                return None
            checked = self._check_header(self._pos)
            if isinstance(checked, str):
                if self._hunting:
                    self._pos += 1
                    self.dropped += 1
                    continue
                kind, _, message = checked.partition(":")
                raise self._fail(kind, f"the attach stream is corrupt: {message}")
            if self._hunting:
                self._hunting = False
                self.seq = checked[2]
            elif checked[2] != self.seq:
                raise self._fail("sequence", f"the attach stream lost its place: frame {checked[2]} where "
                                             f"{self.seq} was due")
            self._head = checked
            self._pos += HEADER.size
        channel, count, seq, body_len, body_crc = self._head
        if self.buffered < body_len:
            return None
        body = memoryview(buf)[self._pos:self._pos + body_len]
        try:
            if zlib.crc32(body) != body_crc:
                raise self._fail("checksum", f"the attach stream is corrupt: frame {seq}'s body checksum "
                                             "does not match")
            lens = struct.unpack_from(f">{count}I", body)
            if 4 * count + sum(lens) != body_len:
                raise self._fail("size", f"frame {seq}'s part lengths do not add up to its body")
            if max(lens) > self.limits.max_frame_bytes:
                raise self._fail("size", f"a message part of {max(lens):,} bytes; at most "
                                         f"{self.limits.max_frame_bytes:,}")
            parts = []
            at = 4 * count
            for n in lens:
                parts.append(bytes(body[at:at + n]))
                at += n
        finally:
            body.release()
        self._pos += body_len
        self._head = None
        self.seq = (seq + 1) & 0xFFFFFFFF
        return Frame(channel, seq, parts)


class DockerDemux:
    """Docker's multiplexing of stdout and stderr on an attach stream without a TTY.

    Each chunk: ``[stream, 0, 0, 0, size (4 bytes, big-endian)]`` then ``size`` bytes, stream 1
    stdout, 2 stderr, 3 an engine error. The payload is passed through as views, never buffered.
    """

    _HEAD = struct.Struct(">B3sI")

    def __init__(self) -> None:
        self._head = bytearray()
        self._stream = 0
        self._left = 0

    def split(self, data: bytes | bytearray | memoryview) -> list[tuple[int, memoryview]]:
        out: list[tuple[int, memoryview]] = []
        mv = memoryview(data)
        i, end = 0, len(mv)
        while i < end:
            if self._left == 0:
                take = mv[i:i + 8 - len(self._head)]
                self._head += take
                i += len(take)
                if len(self._head) < 8:
                    break
                head = bytes(self._head)
                self._head.clear()
                stream, zeros, size = self._HEAD.unpack(head)
                if stream not in (1, 2, 3) or zeros != b"\0\0\0":
                    raise FramingError("docker", f"the engine's attach stream is not multiplexed as expected "
                                                 f"(header {head!r}); is the container's Tty off?")
                self._stream, self._left = stream, size
                continue
            n = min(self._left, end - i)
            out.append((self._stream, mv[i:i + n]))
            i += n
            self._left -= n
        return out
