"""A JSON-lines audit trail of session events, for the people who must answer
"what ran, where, and what happened to it".

One line per event: ``created``, ``executed`` (SHA-256 of the code, its size,
duration, status, error name, peak container memory), ``refused``,
``timeout``, ``interrupted``, ``killed`` (with Docker's reason), ``restarted``,
``closed``. The code itself is not logged (it may hold data); its hash
matches the notebook export. A write that fails (disk full) raises: an audit
trail that silently stops is worse than none.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import KernelExecError


class AuditLogError(KernelExecError):
    """The audit log could not be written.

    When it happens after code ran, ``execution`` holds the result, so that
    nothing the code produced is lost with the audit record.
    """

    execution: object = None


def code_digest(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


class AuditLog:
    """Appends one JSON object per line to a file the user names. Thread-safe."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._host = socket.gethostname()

    def write(self, event: str, session: str, **fields: Any) -> None:
        record = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
            "session": session,
            "host": self._host,
            "pid": os.getpid(),
            **fields,
        }
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    view = memoryview(line)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
            except OSError as e:
                raise AuditLogError(
                    f"cannot write the audit log {self.path}: {e.strerror or e}. The event "
                    f"{event!r} of session {session} is not recorded; free space or fix the path"
                ) from e


def open_audit_log(target: str | os.PathLike[str] | AuditLog | None) -> AuditLog | None:
    """An AuditLog from a path, an existing one, or ``$KERNELEXEC_AUDIT_LOG``."""
    if isinstance(target, AuditLog):
        return target
    if target is None:
        env = os.environ.get("KERNELEXEC_AUDIT_LOG")
        return AuditLog(env) if env else None
    return AuditLog(target)
