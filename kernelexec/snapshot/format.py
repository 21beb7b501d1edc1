"""The snapshot file: pure functions over bytes, no engine, no kernel.

A snapshot is hostile input twice over: its pickle was made by code the sandbox ran, and the file
may have been changed since. So the host treats every part as opaque bytes it stores and moves
(it never unpickles), and checks the file as a whole before using any of it: magic, format version,
lengths, and a SHA-256 over everything, so that a truncated or corrupted file is refused with a
typed error before a sandbox is even made. Layout (all integers big-endian)::

    b"KERNELEXEC-SNAPSHOT\\n"   magic
    u32                         format version (FORMAT)
    u32 + bytes                 manifest: JSON written by the host (what, when, where from, sections)
    bytes ...                   the sections, in the manifest's order and sizes
    32 bytes                    SHA-256 of everything before it

Sections: ``namespace`` (the variables, one dill pickle), ``work`` (a tar of /work, names relative to
it), and ``tmp``/``home``/``site`` when asked for (tars made inside the sandbox; ``site`` is where
``%pip install`` puts packages in a session with egress).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SnapshotCorrupt, SnapshotTooLarge
from ..policy import HOME, SITE_DIR

MAGIC = b"KERNELEXEC-SNAPSHOT\n"
FORMAT = 1
#: a manifest larger than this is not one kernelexec wrote
MAX_MANIFEST = 4 << 20
SECTIONS = ("namespace", "work", "tmp", "home", "site")
#: the sections made inside the sandbox from a directory, and where that directory is
DIRECTORIES = {"tmp": "/tmp", "home": HOME, "site": SITE_DIR}
_HEAD = struct.Struct(">II")
_DIGEST = 32
#: what a name or a reason from the sandbox may hold in a manifest
MAX_NAME, MAX_REASON, MAX_ENTRIES = 256, 300, 100_000


@dataclass(frozen=True)
class LostItem:
    """A variable that a snapshot could not keep, and why (it is absent after a restore)."""

    name: str
    type: str
    reason: str


@dataclass(frozen=True)
class Snapshot:
    """A session's state as bytes the host can store, move and restore, but never opens itself.

    ``variables`` were saved; ``modules`` (name -> module) are imported again on restore; ``lost``
    says what could not be saved and why. Make one with ``session.snapshot()``; keep it with
    :meth:`save` (atomic) and get it back with :meth:`load`.
    """

    data: bytes = field(repr=False)
    session_id: str
    created: float
    image: str
    kernelexec_version: str
    variables: tuple[str, ...]
    modules: dict[str, str]
    lost: tuple[LostItem, ...]
    sizes: dict[str, int]
    packages: tuple[str, ...] = ()
    #: section -> (offset, size) in ``data``, found when the file was checked
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.data)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int | None = None) -> Snapshot:
        """Check ``data`` as a whole (magic, format, lengths, checksum) and read its manifest."""
        manifest, offsets = _verify(data, max_bytes)
        return cls._from_manifest(data, manifest, offsets)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, max_bytes: int | None = None) -> Snapshot:
        """Read and check a snapshot file; ``max_bytes`` refuses a larger file before reading it."""
        p = Path(path)
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if max_bytes is not None and size > max_bytes:
                    raise SnapshotTooLarge(f"{p} holds {size:,} bytes, more than the {max_bytes:,} allowed "
                                           "(Policy.snapshot_size)")
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no snapshot at {p}") from None
        return cls.from_bytes(data, max_bytes=max_bytes)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: the file at ``path`` is the previous one or this one, never a part."""
        return write_atomic(Path(path), self.data)

    def section(self, name: str) -> bytes:
        """One section's bytes (empty when the snapshot has none of that name)."""
        start, size = self.offsets.get(name, (0, 0))
        return self.data[start:start + size]

    @classmethod
    def _from_manifest(cls, data: bytes, m: dict[str, Any], offsets: dict[str, tuple[int, int]]) -> Snapshot:
        try:
            return cls(
                data=data,
                session_id=_str(m["session_id"]),
                created=float(m["created"]),
                image=_str(m["image"]),
                kernelexec_version=_str(m["kernelexec_version"]),
                variables=tuple(_str(v) for v in _list(m["variables"])),
                modules={_str(k): _str(v) for k, v in _dict(m["modules"]).items()},
                lost=tuple(LostItem(_str(x["name"]), _str(x["type"]), _str(x["reason"], MAX_REASON))
                           for x in _list(m["lost"])),
                sizes={_str(k): int(v) for k, v in _dict(m["sizes"]).items()},
                packages=tuple(_str(p) for p in _list(m.get("packages", []))),
                offsets=offsets,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotCorrupt(f"the snapshot's manifest is not one kernelexec wrote ({e!r})") from None


def encode(manifest: dict[str, Any], sections: dict[str, bytes]) -> bytes:
    """The snapshot file for ``manifest`` (host-written fields) and ``sections`` (opaque bytes)."""
    order = [name for name in SECTIONS if name in sections]
    manifest = {**manifest, "format": FORMAT, "sections": [{"name": n, "size": len(sections[n])} for n in order]}
    head = json.dumps(manifest, sort_keys=True).encode()
    if len(head) > MAX_MANIFEST:
        raise SnapshotTooLarge(f"the snapshot's manifest ({len(head):,} bytes) is over {MAX_MANIFEST:,}: "
                               "too many variables or lost entries")
    h = hashlib.sha256()
    out = io.BytesIO()
    for part in (MAGIC, _HEAD.pack(FORMAT, len(head)), head, *(sections[n] for n in order)):
        h.update(part)
        out.write(part)
    out.write(h.digest())
    return out.getvalue()


def _verify(data: bytes, max_bytes: int | None) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    if max_bytes is not None and len(data) > max_bytes:
        raise SnapshotTooLarge(f"the snapshot holds {len(data):,} bytes, more than the {max_bytes:,} allowed "
                               "(Policy.snapshot_size)")
    if not data.startswith(MAGIC):
        raise SnapshotCorrupt("this is not a kernelexec snapshot (its first bytes are not the snapshot magic)")
    fixed = len(MAGIC) + _HEAD.size
    if len(data) < fixed + _DIGEST:
        raise SnapshotCorrupt(f"the snapshot is truncated ({len(data)} bytes)")
    version, head_len = _HEAD.unpack_from(data, len(MAGIC))
    if version > FORMAT:
        raise SnapshotCorrupt(f"the snapshot is in format {version}, newer than this kernelexec reads ({FORMAT}); "
                              "restore it with the kernelexec version that made it, or a newer one")
    if version < 1:
        raise SnapshotCorrupt(f"the snapshot claims format {version}, which never existed")
    if head_len > MAX_MANIFEST or fixed + head_len + _DIGEST > len(data):
        raise SnapshotCorrupt("the snapshot is truncated or its manifest length is corrupt")
    body, digest = memoryview(data)[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotCorrupt("the snapshot's checksum does not match its contents: it is corrupted or truncated; "
                              "nothing was restored")
    try:
        manifest = json.loads(bytes(data[fixed:fixed + head_len]))
    except ValueError:
        raise SnapshotCorrupt("the snapshot's manifest is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != version:
        raise SnapshotCorrupt("the snapshot's manifest does not match its header")
    offsets: dict[str, tuple[int, int]] = {}
    pos = fixed + head_len
    sections = manifest.get("sections")
    for s in sections if isinstance(sections, list) else [None]:
        name, size = (s.get("name"), s.get("size")) if isinstance(s, dict) else (None, None)
        if name not in SECTIONS or name in offsets or not isinstance(size, int) or size < 0:
            raise SnapshotCorrupt(f"the snapshot lists a section it cannot hold ({name!r})")
        offsets[name] = (pos, size)
        pos += size
    if pos != len(data) - _DIGEST:
        raise SnapshotCorrupt("the snapshot's sections do not add up to its size")
    return manifest, offsets


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> Path:
    """Write to a temporary file beside ``path``, flush it to disk, then rename it over ``path`` (and sync
    the directory): a writer killed at any point leaves the previous file whole."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in ([data] if isinstance(data, bytes) else data):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


# ------------------------------------------------------------------------- /work as a section


def split_work(archive: bytes, stage: str) -> tuple[bytes, dict[str, bytes]]:
    """The engine's tar of /work (names ``work/...``) as a tar of its contents (names relative to /work,
    only files, directories and symlinks, modes without setuid/setgid/sticky) plus the staged files
    whose names start with ``stage`` (what the kernel wrote for this snapshot), by suffix."""
    staged: dict[str, bytes] = {}
    out = io.BytesIO()
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as src, \
                tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as dst:
            for m in src:
                parts = m.name.split("/", 1)
                if len(parts) < 2 or not parts[1]:
                    continue  # the work directory itself
                rel = parts[1]
                if rel.startswith(stage):
                    f = src.extractfile(m) if m.isreg() else None
                    if f is not None:
                        staged[rel[len(stage):].lstrip(".") or "namespace"] = f.read()
                    continue
                _copy_member(src, dst, m, rel, None)
    except tarfile.TarError as e:
        raise SnapshotCorrupt(f"the engine's archive of /work could not be read: {e}") from None
    return out.getvalue(), staged


def work_for_restore(section: bytes, uid: int, gid: int, extra: dict[str, bytes]) -> bytes:
    """The ``work`` section re-checked for a new sandbox: relative names only, no ``..``, files owned by
    the sandbox's user, no special bits; plus ``extra`` files (the staged parts) at the top."""
    out = io.BytesIO()
    try:
        with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as dst:
            if section:
                with tarfile.open(fileobj=io.BytesIO(section), mode="r:") as src:
                    for m in src:
                        _copy_member(src, dst, m, m.name, (uid, gid))
            for name, data in extra.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.uid, info.gid = len(data), 0o600, uid, gid
                dst.addfile(info, io.BytesIO(data))
    except tarfile.TarError as e:
        raise SnapshotCorrupt(f"the snapshot's /work section is not a valid tar: {e}") from None
    return out.getvalue()


def _copy_member(src: tarfile.TarFile, dst: tarfile.TarFile, m: tarfile.TarInfo, name: str,
                 owner: tuple[int, int] | None) -> None:
    name = name.rstrip("/")
    if not name or name.startswith("/") or ".." in name.split("/"):
        return
    if not (m.isreg() or m.isdir() or m.issym()):
        return  # devices, fifos, hard links: nothing a working directory needs
    info = m
    info.name = name
    info.mode &= 0o777
    if owner is not None:
        info.uid, info.gid = owner
        info.uname = info.gname = ""
    if m.isreg():
        dst.addfile(info, src.extractfile(m))
    else:
        dst.addfile(info)


def _str(v: Any, limit: int = MAX_NAME) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v[:limit]


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list) or len(v) > MAX_ENTRIES:
        raise TypeError("expected a list")
    return v


def _dict(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or len(v) > MAX_ENTRIES:
        raise TypeError("expected an object")
    return v
