"""What kernelexec left on an engine: the sessions its labels name, and the garbage collector
that removes those whose owner process is gone (after a crash, a SIGKILL, a reboot)."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..._loop import run_blocking
from ...errors import SandboxError
from ..sockdir import owner_pid_of, remove_path, socket_root
from .api import DockerAPIError, NotFound, api
from .sandbox import (
    LABEL,
    LABEL_CREATED,
    LABEL_HOST,
    LABEL_PID,
    LABEL_POLICY,
    LABEL_SOCKDIR,
    LABEL_START,
    LABEL_TRANSPORT,
    live_sandboxes,
    owner_alive,
    process_start_ticks,
)

log = logging.getLogger("kernelexec")


@dataclass
class SessionInfo:
    session_id: str
    container_id: str
    status: str
    owner_pid: int
    owner_alive: bool
    host: str
    created: str
    image: str
    #: "ipc" or "attach" (older sessions carry no label: they were ipc)
    transport: str = "ipc"
    #: the container runtime (gVisor's "runsc"...), empty for the engine's default
    runtime: str = ""


async def alist_sessions(all_hosts: bool = False) -> list[SessionInfo]:
    out = []
    here = socket.gethostname()
    for c in await api().containers(LABEL):
        labels = c.get("Labels") or {}
        host = labels.get(LABEL_HOST, "")
        if host != here and not all_hosts:
            continue
        try:
            pid = int(labels.get(LABEL_PID, "0"))
        except ValueError:
            pid = 0
        out.append(SessionInfo(
            session_id=labels.get(LABEL, ""), container_id=c["Id"], status=c.get("State", ""),
            owner_pid=pid, owner_alive=host == here and pid > 0 and owner_alive(pid, labels.get(LABEL_START) or None),
            host=host, created=labels.get(LABEL_CREATED, ""), image=c.get("Image", ""),
            transport=labels.get(LABEL_TRANSPORT, "ipc"), runtime=_policy_runtime(labels.get(LABEL_POLICY)),
        ))
    return out


def _policy_runtime(label: str | None) -> str:
    try:
        runtime = json.loads(label or "{}").get("runtime")
    except (ValueError, AttributeError):
        return ""
    return runtime if isinstance(runtime, str) else ""


def list_sessions(all_hosts: bool = False) -> list[SessionInfo]:
    """Every kernelexec container on the engine (this host's unless ``all_hosts``)."""
    return run_blocking(alist_sessions(all_hosts))


@dataclass
class GcReport:
    containers: list[str]
    volumes: list[str]
    socket_dirs: list[str]
    errors: list[str]


async def agc(*, everything: bool = False) -> GcReport:
    """Remove what dead owners left: containers, volumes, socket directories.

    ``everything`` also removes sessions of live processes on this host
    (but never this process's own live sessions). Sessions started on another
    host sharing the engine are left alone.
    """
    docker = api()
    here = socket.gethostname()
    mine = {sb.conn.session_id for sb in live_sandboxes()}
    report = GcReport([], [], [], [])

    def orphan(labels: dict[str, str]) -> bool:
        if labels.get(LABEL_HOST, here) != here or labels.get(LABEL) in mine:
            return False
        try:
            pid = int(labels.get(LABEL_PID, "0"))
        except ValueError:
            return True
        return everything or not owner_alive(pid, labels.get(LABEL_START) or None)

    for c in await docker.containers(LABEL):
        labels = c.get("Labels") or {}
        if not orphan(labels):
            continue
        try:
            await docker.remove_container(c["Id"])
            report.containers.append(c["Id"][:12])
        except NotFound:
            pass  # removed meanwhile: what gc wanted
        except DockerAPIError as e:
            report.errors.append(f"container {c['Id'][:12]}: {e.explanation}")
        sockdir = labels.get(LABEL_SOCKDIR)
        if sockdir:
            _gc_dir(Path(sockdir), report)
    for v in await docker.volumes(LABEL):
        if not orphan(v.get("Labels") or {}):
            continue
        try:
            await docker.remove_volume(v["Name"])
            report.volumes.append(v["Name"])
        except NotFound:
            pass  # removed meanwhile: what gc wanted
        except DockerAPIError as e:
            report.errors.append(f"volume {v['Name']}: {e.explanation}")
    live_dirs = {sb.sockdir.path.name for sb in live_sandboxes() if sb.sockdir}
    for entry in _scan(socket_root()):
        pid = owner_pid_of(entry.name)
        if pid is None or entry.name in live_dirs:
            continue
        if everything or process_start_ticks(pid) is None:
            _gc_dir(Path(entry.path), report)
    return report


async def startup_gc() -> None:
    """Once per process and engine, before the first session: remove what dead owners left behind.

    A failure here is logged, not raised: leftovers of another process must
    not stop this one from working, and ``kernelexec gc`` reports them too.
    """
    docker = api()
    if docker.startup_gc_done:
        return
    docker.startup_gc_done = True
    try:
        report = await agc()
    except (SandboxError, OSError) as e:
        log.warning("could not clean up after earlier crashed processes: %s", e)
        return
    for kind in ("containers", "volumes", "socket_dirs"):
        if getattr(report, kind):
            log.info("removed %d %s left by processes that died: %s", len(getattr(report, kind)),
                     kind.replace("_", " "), ", ".join(getattr(report, kind)))
    for err in report.errors:
        log.warning("gc: %s", err)


async def retry_failed_cleanups() -> None:
    """Finish cleanups that failed earlier (typically while the Docker engine was restarting)."""
    for sb in live_sandboxes():
        if sb.cleanup_failed:
            try:
                await sb.destroy()
            except SandboxError as e:
                log.warning("%s", e)  # still failing: stays registered for the next try and for exit


def gc(*, everything: bool = False) -> GcReport:
    """Blocking form of :func:`agc`, for the CLI."""
    return run_blocking(agc(everything=everything))


def _scan(root: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(root) as it:
            yield from (e for e in it if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return


def _gc_dir(path: Path, report: GcReport) -> None:
    if owner_pid_of(path.name) is None or path.parent != socket_root():
        report.errors.append(f"refusing to remove {path}: not a kernelexec socket directory")
        return
    try:
        remove_path(path)
        report.socket_dirs.append(str(path))
    except FileNotFoundError:
        pass
    except OSError as e:
        report.errors.append(f"{path}: {e}")

