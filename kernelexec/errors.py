"""Every error kernelexec raises, and where each one comes from.

Each message says what happened and what the caller can do about it. Every
error carries ``state_lost``: ``True`` when the kernel's variables are gone,
``False`` when they are known to be intact, ``None`` when the error is not
about a kernel (a bad argument, an engine that cannot be reached)::

    KernelExecError                     state_lost
    ├── SessionClosed                   None    the session was used after close()
    ├── CodeTooLarge (also ValueError)  False   nothing was sent
    ├── OutputLost                      False   the transport was lost and re-attached mid-execution
    ├── ExecutionTimeout                either  interrupted (False) or replaced (True)
    ├── PolicyViolation, ProfileError   None    a role's profile refused or is broken (profiles)
    ├── PoolExhausted, PoolClosed       None    (pool)
    ├── AuditLogError                   None    a failed audit write; the execution is attached (auditlog)
    ├── SnapshotError                   None    a snapshot could not be made, kept or restored (snapshot)
    │   ├── SnapshotCorrupt                     truncated, changed, not a snapshot, or a newer format
    │   ├── SnapshotTooLarge                    over Policy.snapshot_size (or the room to stage it)
    │   ├── RestoreError                        the new sandbox lacks a module, or refused the state
    │   └── SessionBusy                         a paused session already resumed by another process
    └── SandboxError                            the sandbox, the engine or the kernel misbehaved
        ├── DockerUnavailable           None    the engine cannot be reached
        ├── DockerAPIError              None    the engine answered with an HTTP error, mapped once
        │                                       in the engine client (backend.docker.api)
        ├── ImageNotFound, ImageBuildError
        ├── ResponseTooLarge                    an answer over the bound the caller set (a file, /work)
        ├── SandboxStartError           None    the container or its kernel did not come up
        ├── ProtocolError               True    the kernel broke the protocol or its bounds (hostile)
        │   └── FramingError                    the attach stream's framing (backend.attach)
        └── KernelDied                  True    the kernel is gone, with the engine's reason
            └── SandboxLost                     the container went away under the session

Transports report a lost channel as ``backend.base.ChannelsClosed``; the
session turns it into ``KernelDied`` with the engine's account.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .results import Execution


class KernelExecError(Exception):
    """Base class of every kernelexec error."""

    #: whether the kernel's state is gone: True, False, or None (not about a kernel)
    state_lost: bool | None = None


class SandboxError(KernelExecError):
    """The sandbox (container, socket directory or protocol) misbehaved."""


class DockerUnavailable(SandboxError):
    """The Docker engine could not be reached."""


class ResponseTooLarge(SandboxError):
    """The engine's answer (a file or directory asked for) is larger than the caller's bound; nothing of it
    was kept."""


class ImageNotFound(SandboxError):
    """The kernel image is not present on the Docker engine."""


class ImageBuildError(SandboxError):
    """Building the kernel image failed."""


class SandboxStartError(SandboxError):
    """The container or the kernel inside it did not come up."""


def kernel_out_of_memory(memory: int | str, when: str) -> SandboxStartError:
    """The start error for a kernel the memory limit killed before it could serve: the limit is too small
    for the kernel itself, not for any code (none ran yet). One wording for every transport."""
    return SandboxStartError(
        f"the kernel ran out of memory {when}: Policy.memory={memory!r} is too small for the kernel itself (an "
        "idle kernel needs about 40 MiB, more with large imports and tmpfs files). Raise Policy.memory, e.g. to "
        "'256m'")


class ProtocolError(SandboxError):
    """The kernel sent something that breaks the Jupyter protocol or our bounds.

    The kernel runs hostile code and holds the signing key, so a malformed or
    oversized message is treated as an attack: the session is closed.
    """

    state_lost = True


class SessionClosed(KernelExecError):
    """The session was used after ``close()``."""


class SnapshotError(KernelExecError):
    """A snapshot could not be made, kept or restored. The session it came from is unchanged."""


class SnapshotCorrupt(SnapshotError):
    """The snapshot file is truncated, changed since it was written, not a snapshot, or in a format
    newer than this kernelexec reads. Checked before any sandbox is made: nothing was restored."""


class SnapshotTooLarge(SnapshotError):
    """The snapshot is over ``Policy.snapshot_size``, or the sandbox had no room to stage it."""


class RestoreError(SnapshotError):
    """The new sandbox could not take the snapshot's state; it was removed.

    ``missing`` names the modules the image lacks (restore with a policy whose image or ``packages``
    have them); ``errors`` what else the kernel reported."""

    def __init__(self, message: str, *, missing: tuple[str, ...] = (), errors: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing
        self.errors = errors


class SessionBusy(SnapshotError):
    """The paused session is already resumed by another process (or is being paused)."""


class OutputLost(KernelExecError):
    """The connection to the sandbox was lost during an execution and re-established.

    The kernel kept running and its state survives (``state_lost`` is False), but what this
    execution printed and returned while nobody was connected is gone, and so is the news of
    whether it finished. Check the state before running it again if it has side effects.
    """

    state_lost = False

    def __init__(self, frames_lost: int) -> None:
        self.frames_lost = frames_lost
        super().__init__(
            f"the connection to the sandbox was lost during this execution and re-established "
            f"({frames_lost} message frame(s) sent meanwhile are lost); the kernel and its state survive, but "
            "this execution's output and outcome are unknown. Check the state before running it again.")


class CodeTooLarge(KernelExecError, ValueError):
    """The code is larger than one message to the kernel may be; nothing was sent.

    The session and its state are untouched. Large data belongs in a file:
    ``upload()`` it and read it from the code.
    """

    state_lost = False

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit
        super().__init__(
            f"the code is {size:,} bytes as sent (JSON-escaped); at most {limit:,} bytes fit in one message "
            "(Policy.max_message_bytes, less the request's own fields). Nothing was run and the session is "
            "intact: upload() large data as a file and read it from the code, or raise Policy.max_message_bytes."
        )


class KernelDied(SandboxError):
    """The kernel process (and with it the container) is gone.

    ``reason`` is read from Docker: ``"oom-killed"``, ``"exit code 137 (SIGKILL)"``,
    ``"container removed"``... All state in the kernel is lost; call
    ``restart()`` for a fresh one.
    """

    state_lost = True

    def __init__(self, reason: str, *, exit_code: int | None = None, oom_killed: bool = False,
                 restarted: bool = False) -> None:
        self.reason = reason
        self.exit_code = exit_code
        self.oom_killed = oom_killed
        #: True when the session already replaced the kernel (``auto_restart=True``)
        self.restarted = restarted
        what = ("A fresh kernel was started (auto_restart); run your setup code again"
                if restarted else "Call restart() for a fresh kernel")
        super().__init__(
            f"the kernel died ({reason}); its state is lost. {what}"
            + (" and use less memory, or raise Policy.memory" if oom_killed else "")
            + "."
        )

    def again(self, *, restarted: bool = False) -> KernelDied:
        """The same death reported once more (a later call on a dead session)."""
        return type(self)(self.reason, exit_code=self.exit_code, oom_killed=self.oom_killed, restarted=restarted)


class SandboxLost(KernelDied):
    """The container went away under the session: removed or stopped by someone
    else, or the Docker daemon restarted. All state is lost."""


class ExecutionTimeout(KernelExecError):
    """The code ran past its timeout.

    When the interrupt took, ``state_lost`` is False and the session goes on
    with its variables intact. When the kernel ignored the interrupt, it was
    replaced by a fresh one: ``state_lost`` is True.
    """

    def __init__(self, timeout: float, *, state_lost: bool, partial: Execution | None = None) -> None:
        self.timeout = timeout
        self.state_lost = state_lost
        self.partial = partial
        if state_lost:
            detail = (
                "the kernel did not respond to the interrupt, so it was restarted in a fresh "
                "container: all variables and imports are lost"
            )
        else:
            detail = "the kernel was interrupted; the session and its state are intact"
        super().__init__(f"execution exceeded its timeout of {timeout:g} s; {detail}.")
