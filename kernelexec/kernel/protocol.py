"""The Jupyter messaging wire format, with the bounds a hostile kernel demands.

Pure functions over bytes: no sockets here. The kernel holds the HMAC key,
so a valid signature only proves the message came from *this* kernel, not
that it is well-behaved; parsing is bounded in frames, size and nesting, and
every failure is a :class:`ProtocolError`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..errors import ProtocolError

DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.4"
MAX_IDENTITIES = 8
MAX_BUFFERS = 8
MAX_JSON_DEPTH = 64


@dataclass
class Message:
    header: dict[str, Any]
    parent_header: dict[str, Any]
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def parent_id(self) -> str | None:
        pid = self.parent_header.get("msg_id")
        return pid if isinstance(pid, str) else None


class Signer:
    """HMAC-SHA256 over the four JSON frames, as the protocol specifies."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("an empty key would leave messages unsigned")
        self._key = key

    def sign(self, parts: Sequence[bytes]) -> bytes:
        h = hmac.new(self._key, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.hexdigest().encode("ascii")

    def verify(self, signature: bytes, parts: Sequence[bytes]) -> bool:
        return hmac.compare_digest(signature, self.sign(parts))


def new_key() -> bytes:
    """A fresh random key for each kernel: 256 bits, hex-encoded as the spec uses."""
    return os.urandom(32).hex().encode("ascii")


def _dumps(obj: Any) -> bytes:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate (code holding "\udce9") has no UTF-8 form; JSON's \u escape carries it
        # to the kernel unchanged, which then treats it as Python would
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def build(
    signer: Signer,
    msg_type: str,
    content: dict[str, Any],
    *,
    session: str,
    username: str = "kernelexec",
    metadata: dict[str, Any] | None = None,
) -> tuple[str, list[bytes]]:
    """Frames of a request, and its msg_id (replies carry it as their parent)."""
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": msg_type,
        "session": session,
        "username": username,
        "date": datetime.now(timezone.utc).isoformat(),
        "version": PROTOCOL_VERSION,
    }
    parts = [_dumps(header), _dumps({}), _dumps(metadata or {}), _dumps(content)]
    return msg_id, [DELIM, signer.sign(parts), *parts]


def _depth_ok(obj: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return True


def _load(frame: bytes, what: str) -> dict[str, Any]:
    # A cheap pre-check: nesting needs one bracket per level, so a frame with
    # fewer brackets than the limit cannot be too deep and skips the walk.
    try:
        obj = json.loads(frame)
    except RecursionError as e:
        raise ProtocolError(f"the kernel sent a {what} nested too deeply to parse") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"the kernel sent a {what} that is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ProtocolError(f"the kernel sent a {what} that is not a JSON object")
    if (frame.count(b"[") + frame.count(b"{")) > MAX_JSON_DEPTH and not _depth_ok(obj, MAX_JSON_DEPTH):
        raise ProtocolError(f"the kernel sent a {what} nested deeper than {MAX_JSON_DEPTH} levels")
    return obj


def shape_error(frames: int, delimiter: int | None) -> str | None:
    """Why a message of ``frames`` frames whose ``<IDS|MSG>`` delimiter is at index ``delimiter``
    (``None``: not among the first ``MAX_IDENTITIES + 1``) cannot be a Jupyter message, in the words
    :func:`parse` raises; ``None`` when its shape is sound.

    One wording for both transports: on attach the relay refuses messages it cannot frame (no
    delimiter, too many parts) before they reach :func:`parse`, reports only their shape, and the
    host words it here (see ``ChannelsClosed.violation``)."""
    if delimiter is None or not 0 <= delimiter <= MAX_IDENTITIES:
        return "the kernel sent a message without the <IDS|MSG> delimiter"
    after = frames - delimiter - 1
    if after < 5:
        return f"the kernel sent a message with {after} frames after the delimiter; 5 needed"
    if after > 5 + MAX_BUFFERS:
        return f"the kernel sent a message with {after - 5} buffers; at most {MAX_BUFFERS}"
    return None


def parse(signer: Signer, frames: Sequence[bytes]) -> Message:
    """Check and decode one multipart message from the kernel."""
    head = list(frames[: MAX_IDENTITIES + 1])
    idx = head.index(DELIM) if DELIM in head else None
    why = shape_error(len(frames), idx)
    if why is not None:
        raise ProtocolError(why)
    assert idx is not None  # a sound shape has its delimiter
    rest = frames[idx + 1:]
    signature, parts = bytes(rest[0]), [bytes(p) for p in rest[1:5]]
    if not signer.verify(signature, parts):
        raise ProtocolError("the kernel sent a message with a wrong HMAC signature")
    header, parent, metadata, content = (
        _load(p, n) for p, n in zip(parts, ("header", "parent header", "metadata", "content"), strict=True)
    )
    if not isinstance(header.get("msg_type"), str):
        raise ProtocolError("the kernel sent a message header without a msg_type")
    return Message(header, parent, metadata, content, [bytes(b) for b in rest[5:]])


#: The longest msg_id routed between clients that share one kernel (uuid4 hex is 32 characters).
MAX_MSG_ID = 256


def delimiter_index(frames: Sequence[bytes]) -> int:
    """Where a message's routing identities end: the index of ``<IDS|MSG>``, at most
    :data:`MAX_IDENTITIES` frames in, as :func:`parse` looks for it."""
    try:
        return list(frames[: MAX_IDENTITIES + 1]).index(DELIM)
    except ValueError:
        raise ProtocolError(f"a message without the <IDS|MSG> delimiter in its first {MAX_IDENTITIES + 1} "
                            "frames") from None


def peek_msg_id(frames: Sequence[bytes], *, parent: bool) -> str | None:
    """The msg_id of a message's header (``parent=False``) or parent header, to route it.

    Bounded as :func:`parse` is (delimiter position, frame count, JSON nesting); the signature is
    not checked, the client the message is routed to checks it. ``None`` when there is no msg_id,
    or it is not a string of 1 to :data:`MAX_MSG_ID` characters. Raises :class:`ProtocolError`."""
    idx = delimiter_index(frames)
    after = len(frames) - idx - 1
    if not 5 <= after <= 5 + MAX_BUFFERS:
        raise ProtocolError(f"a message with {after} frames after the delimiter; 5 to {5 + MAX_BUFFERS} allowed")
    what = "parent header" if parent else "header"
    obj = _load(bytes(frames[idx + (3 if parent else 2)]), what)
    msg_id = obj.get("msg_id")
    return msg_id if isinstance(msg_id, str) and 0 < len(msg_id) <= MAX_MSG_ID else None
