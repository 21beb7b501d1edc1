"""Paused sessions on the host: one private directory per session in the state directory.

``$KERNELEXEC_STATE_DIR`` (default ``$XDG_STATE_HOME/kernelexec``, i.e. ``~/.local/state/kernelexec``)
holds ``sessions/<id>/`` (0700) with ``snapshot`` (the snapshot file, written atomically), ``session.json``
(what the host needs to make the same sandbox again: policy, profile, image; host-written, never
read from a snapshot) and ``lock``. A process that owns a session (it resumed it, or it paused itself
on idle and resumes on the next call) holds an exclusive ``flock`` on ``lock`` for as long as it does:
a second process cannot resume it meanwhile, and the lock goes with the process, so a session whose
owner died is paused again (its last snapshot) and can be resumed or expired.

The rule ``kernelexec gc`` applies: a paused session that no process holds and that was paused more
than ``KERNELEXEC_PAUSED_TTL`` ago (default 7 days; ``gc --paused-older-than``; seconds, or a number with
``s``, ``m``, ``h`` or ``d``: ``12h``, ``7d``) is removed, and so are partial snapshot files left by
writers that were killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SessionBusy, SnapshotError
from .format import Snapshot, write_atomic

#: seconds a paused session is kept when no process holds it (``kernelexec gc``)
DEFAULT_TTL = 7 * 24 * 3600
_ID = re.compile(r"^[0-9a-f]{12}$")
SNAPSHOT, RECORD, LOCK = "snapshot", "session.json", "lock"


def state_dir() -> Path:
    """Where paused sessions live (created 0700 on first use)."""
    explicit = os.environ.get("KERNELEXEC_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "kernelexec"


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``30m``, ``12h`` or ``7d`` (``1.5h`` too). Nothing else is read, so
    a typo ("7w", "-1d", "7 d") is an error rather than a rule that removes paused sessions too early."""
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration: give seconds (3600) or a number with s, m, h or d "
                         "(90s, 30m, 12h, 7d)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def paused_ttl() -> float:
    """How long an unheld paused session is kept: ``$KERNELEXEC_PAUSED_TTL`` (a duration, as
    :func:`parse_duration` reads), else :data:`DEFAULT_TTL`."""
    value = os.environ.get("KERNELEXEC_PAUSED_TTL")
    if not value:
        return DEFAULT_TTL
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ValueError(f"KERNELEXEC_PAUSED_TTL: {e}") from None


@dataclass(frozen=True)
class PausedSession:
    """A session in the state directory. ``holder`` is the pid of the process that owns it now (it
    resumed the session, or paused it on idle), None when no process does: then it can be resumed."""

    id: str
    paused_at: float
    policy: str  # Policy.to_json()
    image: str | None  # what the session was asked to run (None: the default), not a derived tag
    profile: str | None
    size: int
    variables: int
    lost: int
    holder: int | None = None

    @property
    def path(self) -> Path:
        return session_dir(self.id)


def session_dir(session_id: str, root: Path | None = None) -> Path:
    if not _ID.match(session_id):
        raise SnapshotError(f"{session_id!r} is not a session id (12 hex digits, as `kernelexec ps` shows)")
    return (root or state_dir()) / "sessions" / session_id


class Claim:
    """A process's hold on one session directory (the ``flock``); released by :meth:`release` or
    when the process ends."""

    def __init__(self, session_id: str, root: Path | None = None) -> None:
        self.id = session_id
        self.dir = session_dir(session_id, root)
        _private(self.dir.parent.parent)
        _private(self.dir.parent)
        _private(self.dir)
        self._fd: int | None = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                                       0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self._fd)
            os.close(self._fd)
            self._fd = None
            raise SessionBusy(f"session {session_id} is held by another process"
                              + (f" (pid {holder})" if holder else "")
                              + ": it was resumed there, or pauses there when idle") from None
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def save(self, snapshot: Snapshot, record: PausedSession) -> None:
        """The snapshot, then the record (each atomic): a crash between them leaves the previous pair's
        record naming a valid snapshot, since the record only describes it."""
        assert self._fd is not None
        write_atomic(self.dir / SNAPSHOT, snapshot.data)
        write_atomic(self.dir / RECORD, json.dumps(asdict(record) | {"holder": None}).encode())

    def load(self, max_bytes: int | None = None) -> tuple[Snapshot, PausedSession]:
        record = read_record(self.dir)
        if record is None:  # nothing paused under this id: the directory the claim made goes with it
            self.release(remove=True)
            raise SnapshotError(f"session {self.id} has no paused state in {self.dir.parent}")
        return Snapshot.load(self.dir / SNAPSHOT, max_bytes=max_bytes), record

    def remove(self) -> None:
        """The session ended: its directory goes (the lock last, with the claim)."""
        for name in (SNAPSHOT, RECORD):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()
        self.release(remove=True)

    def release(self, *, remove: bool = False) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if remove:
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)


def read_record(directory: Path) -> PausedSession | None:
    try:
        data = json.loads((directory / RECORD).read_text())
        record = PausedSession(**{k: data[k] for k in PausedSession.__dataclass_fields__ if k != "holder"})
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        raise SnapshotError(f"{directory / RECORD} is not a paused session's record ({e!r}); remove the "
                            "directory") from None
    return record


def paused(root: Path | None = None) -> Iterator[PausedSession]:
    """Every session in the state directory, with the pid holding it (if any)."""
    sessions = (root or state_dir()) / "sessions"
    if not sessions.is_dir():
        return
    for d in sorted(sessions.iterdir()):
        if not _ID.match(d.name):
            continue
        try:
            record = read_record(d)
        except SnapshotError:
            continue
        if record is None:
            continue
        yield PausedSession(**{**asdict(record), "holder": _probe(d)})


def expire(older_than: float | None = None, root: Path | None = None) -> list[str]:
    """Remove paused sessions no process holds, paused more than ``older_than`` seconds ago (default
    :func:`paused_ttl`), and partial files left by killed writers. Returns what went, in words."""
    ttl = paused_ttl() if older_than is None else older_than
    removed: list[str] = []
    sessions = (root or state_dir()) / "sessions"
    if not sessions.is_dir():
        return removed
    now = time.time()
    for d in sorted(sessions.iterdir()):
        if not _ID.match(d.name):
            continue
        try:
            claim = Claim(d.name, root)
        except SessionBusy:
            continue  # held: its owner is alive
        try:
            record = read_record(d) if (d / RECORD).exists() else None
        except SnapshotError:
            record = None
        for partial in d.glob(".*.partial"):
            partial.unlink(missing_ok=True)
            removed.append(f"partial snapshot {partial}")
        if record is None or now - record.paused_at > ttl:
            claim.remove()
            removed.append(f"paused session {d.name}" + (f" (paused {age(now - record.paused_at)} ago)"
                                                          if record else " (no record)"))
        else:
            claim.release()
    return removed


def _probe(directory: Path) -> int | None:
    """The pid holding ``directory``'s lock, or None when none does."""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode() or 0) or None
    except (ValueError, OSError):
        return None


def _private(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.geteuid():
        raise SnapshotError(f"{path} is not a directory of this user's; the state directory must be private")


def age(seconds: float) -> str:
    """A duration in the unit a person reads it in: "40 s", "3 min", "1.5 h", "7 d" (a tenth below ten of
    the unit, so a rule of 90 minutes does not read as 2 hours)."""
    unit, size = next(((u, n) for u, n in (("d", 86400), ("h", 3600), ("min", 60)) if seconds >= n), ("s", 1))
    value = seconds / size
    return f"{value:.0f} {unit}" if value >= 10 or round(value, 1) == round(value) else f"{value:.1f} {unit}"
