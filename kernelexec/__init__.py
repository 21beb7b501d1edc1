"""kernelexec: a sandboxed, stateful Jupyter kernel per AI-agent session."""

from .auditlog import AuditLog, AuditLogError
from .errors import (
    CodeTooLarge,
    DockerUnavailable,
    ExecutionTimeout,
    ImageBuildError,
    ImageNotFound,
    KernelDied,
    KernelExecError,
    OutputLost,
    ProtocolError,
    ResponseTooLarge,
    RestoreError,
    SandboxError,
    SandboxLost,
    SandboxStartError,
    SessionBusy,
    SessionClosed,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotTooLarge,
)
from .policy import Policy
from .pool import AsyncSessionPool, PoolClosed, PoolExhausted, PoolStats, SessionPool
from .precheck import CodePolicy
from .profiles import PolicyViolation, ProfileError, load_profiles
from .results import ErrorInfo, Execution, MimeBundle, Stream
from .session import AsyncSession, Session
from .snapshot import LostItem, PausedSession, Snapshot

__all__ = [
    "AsyncSession",
    "AsyncSessionPool",
    "AuditLog",
    "AuditLogError",
    "CodePolicy",
    "CodeTooLarge",
    "PolicyViolation",
    "ProfileError",
    "load_profiles",
    "DockerUnavailable",
    "ErrorInfo",
    "Execution",
    "ExecutionTimeout",
    "ImageBuildError",
    "ImageNotFound",
    "KernelDied",
    "KernelExecError",
    "MimeBundle",
    "OutputLost",
    "Policy",
    "PoolClosed",
    "PoolExhausted",
    "PoolStats",
    "ProtocolError",
    "SandboxError",
    "SandboxLost",
    "SandboxStartError",
    "Session",
    "SessionPool",
    "SessionClosed",
    "Stream",
    "LostItem",
    "PausedSession",
    "ResponseTooLarge",
    "RestoreError",
    "SessionBusy",
    "Snapshot",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotTooLarge",
]
__version__ = "0.1.0"
