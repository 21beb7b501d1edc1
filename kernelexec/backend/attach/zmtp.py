"""ZMTP 3.0 with the NULL mechanism, as the relay speaks it to the kernel's ipc sockets: pure, no I/O.

Why the relay speaks it itself: with pyzmq every kernel message crossed libzmq's io thread and a
mailbox to the relay's own thread before the relay saw it; on a small host that CPU sat on the
critical path of every execution. The kernel keeps libzmq (ipykernel); a ZMTP 3.0 peer is what
libzmq expects on the other end of its sockets.

Like :mod:`.framing`, both ends use this file: the host's tests import it, and the relay in the
container runs it as source, so it needs nothing but the standard library.

The wire (rfc.zeromq.org/spec/23)::

    greeting  64 bytes: 0xFF, 8 bytes of padding, 0x7F, major 3, minor 0,
              mechanism b"NULL" padded with zeros to 20, as-server 0, 31 bytes of filler
    frame     flags (MORE 0x01, LONG 0x02, COMMAND 0x04), size (1 byte, or 8 big-endian when LONG), body
    command   name length (1 byte), name, data
    READY     properties: name length (1 byte), name, value length (4 bytes big-endian), value

The relay greets as 3.0 so that the kernel's XPUB takes the subscription as a message whose first
byte is 1 (3.1 peers use a SUBSCRIBE command instead).

The kernel is hostile: :class:`Reader` checks each frame's size before it buffers it, and a message
over its bounds is skipped, not held, and reported as refused with its shape (how many parts it had,
where a given part was), which is all the relay needs to say what the kernel sent.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["GREETING", "SUBSCRIBE_ALL", "Reader", "Refused", "ZmtpError", "command", "encode", "pong", "properties",
           "ready"]

MORE = 0x01
LONG = 0x02
COMMAND = 0x04
GREETING_SIZE = 64
GREETING = b"\xff" + bytes(8) + b"\x7f" + bytes((3, 0)) + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
#: Commands are small (READY, PING, ERROR): a larger one is a broken peer.
MAX_COMMAND = 64 << 10


class ZmtpError(Exception):
    """The peer broke ZMTP: the connection cannot continue."""


class Refused(NamedTuple):
    """A message over the reader's bounds: skipped, not held, its shape counted on the way."""

    #: the bound it broke: "part" (a part over ``max_part``), "parts" (more than ``max_parts``) or
    #: "message" (more than ``max_message`` bytes). A part over ``max_part`` is reported as such even
    #: after the message broke another bound: it is the bound a ZMTP peer (libzmq's MAXMSGSIZE)
    #: enforces by dropping the connection, and the relay reports it as the ipc transport would
    bound: str
    #: the bound broken, in words
    why: str
    #: how many parts the whole message had
    parts: int
    #: where the reader's ``mark`` first was among the parts read before the refusal, if there
    mark_at: int | None


def _head(flags: int, size: int) -> bytes:
    if size > 255:
        return bytes((flags | LONG,)) + size.to_bytes(8, "big")
    return bytes((flags, size))


def command(name: bytes, data: bytes = b"") -> bytes:
    body = bytes((len(name),)) + name + data
    return _head(COMMAND, len(body)) + body


def ready(socket_type: bytes, identity: bytes | None = None) -> bytes:
    props = [(b"Socket-Type", socket_type)]
    if identity is not None:
        props.append((b"Identity", identity))
    return command(b"READY", b"".join(bytes((len(k),)) + k + len(v).to_bytes(4, "big") + v for k, v in props))


def properties(data: bytes) -> dict[bytes, bytes]:
    """A READY command's metadata; raises :class:`ZmtpError` when it does not parse."""
    out: dict[bytes, bytes] = {}
    i, n = 0, len(data)
    while i < n:
        k = data[i]
        if i + 1 + k + 4 > n:
            raise ZmtpError("a READY property runs past its command")
        name = data[i + 1:i + 1 + k]
        i += 1 + k
        v = int.from_bytes(data[i:i + 4], "big")
        i += 4
        if i + v > n:
            raise ZmtpError("a READY property value runs past its command")
        out[name.lower()] = data[i:i + v]
        i += v
    return out


def pong(ping: bytes) -> bytes:
    """The answer to a PING's data (a 2-byte TTL, then a context of up to 16 bytes)."""
    return command(b"PONG", ping[2:18])


def encode(parts: list[bytes]) -> list[bytes]:
    """One message as buffers for ``sendmsg``/``join`` (the parts are not copied)."""
    out: list[bytes] = []
    last = len(parts) - 1
    for i, p in enumerate(parts):
        out.append(_head(MORE if i < last else 0, len(p)))
        out.append(p)
    return out


#: A SUB socket's subscription to everything, as a ZMTP 3.0 message.
SUBSCRIBE_ALL = b"".join(encode([b"\x01"]))


class Reader:
    """The bytes from one peer, cut into its greeting, commands and messages.

    :meth:`next` returns ``None`` (feed more), ``("greeting", (major, minor))``,
    ``("command", (name, data))``, ``("message", parts)`` or ``("refused", Refused(...))`` for a
    message over the bounds, whose bytes were skipped. It raises :class:`ZmtpError` when the peer
    broke the protocol. It never holds more than one message within its bounds plus what was fed.

    ``mark``: a part to locate in refused messages (the relay gives Jupyter's ``<IDS|MSG>``), so that
    the shape of a message too big to hold can still be told.
    """

    def __init__(self, max_part: int, max_parts: int, max_message: int, *, mark: bytes | None = None) -> None:
        self.max_part = max_part
        self.max_parts = max_parts
        self.max_message = max_message
        self.mark = mark
        self._buf = bytearray()
        self._pos = 0
        self._greeted = False
        self._parts: list[bytes] = []
        self._size = 0
        self._count = 0  # parts of the current message so far, held or skipped
        self._refusing = ""  # why the message being skipped is refused
        self._bound = ""  # which bound it broke
        self._mark_at: int | None = None
        self._skip = 0  # bytes of a refused part still to come
        self._refused_done = False  # the refused message ended; report it once its bytes are skipped

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos + sum(map(len, self._parts))

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._skip:
            take = min(self._skip, len(data))
            self._skip -= take
            data = data[take:]
        if data:
            self._buf += data

    def _refuse(self, bound: str, why: str) -> None:
        if not self._refusing:
            mark = self.mark
            self._mark_at = self._parts.index(mark) if mark is not None and mark in self._parts else None
        self._refusing = why
        self._bound = bound
        self._parts = []
        self._size = 0

    def _refused(self) -> tuple[str, Refused]:
        """The refused message that just ended, and a clean slate for the next one."""
        done = Refused(self._bound, self._refusing, self._count, self._mark_at)
        self._refusing, self._bound, self._mark_at, self._count, self._refused_done = "", "", None, 0, False
        return ("refused", done)

    def next(self) -> tuple[str, object] | None:
        if self._skip:
            return None
        if self._refused_done:
            return self._refused()
        buf = self._buf
        pos = self._pos
        try:
            if not self._greeted:
                if len(buf) - pos < GREETING_SIZE:
                    if len(buf) - pos >= 1 and buf[pos] != 0xFF:
                        raise ZmtpError("the peer's greeting does not start with the ZMTP signature")
                    return None
                g = bytes(buf[pos:pos + GREETING_SIZE])
                pos += GREETING_SIZE
                if g[0] != 0xFF or not g[9] & 1:
                    raise ZmtpError("the peer's greeting does not carry the ZMTP signature")
                if g[10] < 3:
                    raise ZmtpError(f"the peer speaks ZMTP {g[10]}.{g[11]}; 3.0 or later is needed")
                if g[12:32].rstrip(b"\0") != b"NULL":
                    raise ZmtpError(f"the peer wants the {g[12:32].rstrip(bytes(1))!r} mechanism; only NULL is spoken")
                self._greeted = True
                return ("greeting", (g[10], g[11]))
            while True:
                avail = len(buf) - pos
                if avail < 2:
                    return None
                flags = buf[pos]
                if flags & 0xF8:
                    raise ZmtpError(f"a frame with reserved flags set ({flags:#04x})")
                if flags & LONG:
                    if avail < 9:
                        return None
                    size = int.from_bytes(buf[pos + 1:pos + 9], "big")
                    head = 9
                else:
                    size = buf[pos + 1]
                    head = 2
                if flags & COMMAND:
                    if flags & MORE or self._parts or self._refusing:
                        raise ZmtpError("a command inside a message")
                    if size > MAX_COMMAND or size < 1:
                        raise ZmtpError(f"a command of {size:,} bytes")
                    if avail < head + size:
                        return None
                    body = bytes(buf[pos + head:pos + head + size])
                    pos += head + size
                    n = body[0]
                    if 1 + n > size:
                        raise ZmtpError("a command whose name runs past it")
                    return ("command", (body[1:1 + n], body[1 + n:]))
                if size > self.max_part and self._bound != "part":
                    self._refuse("part", f"a message part larger than max_message_bytes ({self.max_part} bytes)")
                elif not self._refusing:
                    if len(self._parts) >= self.max_parts:
                        self._refuse("parts", f"a message of more than {self.max_parts} parts")
                    elif self._size + size > self.max_message:
                        self._refuse("message", f"a message larger than {self.max_message:,} bytes")
                if self._refusing:
                    self._count += 1
                    pos += head
                    take = min(size, len(buf) - pos)
                    pos += take
                    self._skip = size - take
                    if not flags & MORE:
                        self._refused_done = True
                    if self._skip:
                        return None
                    if self._refused_done:
                        return self._refused()
                    continue
                if avail < head + size:
                    return None
                part = bytes(buf[pos + head:pos + head + size])
                pos += head + size
                if not flags & MORE:
                    parts = self._parts
                    parts.append(part)
                    self._parts = []
                    self._size = 0
                    self._count = 0
                    return ("message", parts)
                self._parts.append(part)
                self._size += size
                self._count += 1
        finally:
            if pos >= len(buf):
                buf.clear()
                pos = 0
            elif pos > 1 << 16:
                del buf[:pos]
                pos = 0
            self._pos = pos
