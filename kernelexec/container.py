"""Container lifecycle: create, start, watch, inspect, remove, garbage-collect.

Everything a session asks of the Docker engine lives here, through the
asyncio Engine API client in :mod:`kernelexec.dockerapi`. The blocking
entry points (atexit, SIGTERM, ``gc``) run the same coroutines on a
short-lived loop of their own.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import json
import logging
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from ._loop import run_blocking
from .backend.base import Channels, EgressHandler
from .backend.base import Sandbox as BaseSandbox
from .backend.streams import HandlerTasks
from .dockerapi import DockerAPIError, NotFound, api, close_stream
from .errors import (
    DockerUnavailable,
    ImageNotFound,
    KernelDied,
    SandboxError,
    SandboxLost,
    SandboxStartError,
    kernel_out_of_memory,
)
from .policy import (
    EGRESS_SOCKET,
    KERNEL_PYTHON,
    OWNER_SOCKET,
    SOCKET_MOUNT,
    Policy,
    container_config,
    parse_size,
    resolve_user,
    work_volume_options,
)
from .sockdir import CONNECTION_FILE, SOCKET_BASENAME, SocketDir, owner_pid_of, remove_path, socket_root

log = logging.getLogger("kernelexec")

LABEL = "kernelexec.session"
LABEL_PID = "kernelexec.owner_pid"
LABEL_START = "kernelexec.owner_start"
LABEL_HOST = "kernelexec.host"
LABEL_CREATED = "kernelexec.created"
LABEL_SOCKDIR = "kernelexec.sockdir"
LABEL_VOLUME = "kernelexec.volume"
LABEL_POLICY = "kernelexec.policy"
LABEL_TRANSPORT = "kernelexec.transport"
#: Below this a SIGKILL at start is most likely the memory limit, even when the engine missed the OOM.
SMALL_MEMORY = 128 << 20

PORTS = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}
_STDERR_TAIL = 4096

STARTUP_FILE = "startup.py"
LAUNCH_FILE = "launch.py"


def kernel_launch_source() -> bytes:
    """:mod:`kernelexec.kernel_launch`, the kernel's main program when ``Policy.fast_kernel``."""
    return (Path(__file__).parent / "kernel_launch.py").read_bytes()


def kernel_startup_source() -> bytes:
    """:mod:`kernelexec.kernel_side`, run by the kernel before the first cell."""
    return (Path(__file__).parent / "kernel_side.py").read_bytes()


T = TypeVar("T")

def process_start_ticks(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot: with the pid, it names a process uniquely."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses; fields resume after the last ')'
    fields = data[data.rindex(b")") + 2:].split()
    return fields[19].decode()


def owner_alive(pid: int, start: str | None) -> bool:
    now = process_start_ticks(pid)
    return now is not None and (start is None or now == start)


def describe_exit(state: dict[str, Any]) -> tuple[str, int | None, bool]:
    """Why a container stopped, in words, from ``docker inspect``'s State."""
    code = state.get("ExitCode")
    oom = bool(state.get("OOMKilled"))
    if oom:
        return "oom-killed: the code used more memory than Policy.memory allows", code, True
    if isinstance(code, int) and code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"exit code {code} ({name})", code, False
    err = state.get("Error") or ""
    return f"exit code {code}" + (f": {err}" if err else ""), code, False


@dataclass
class ConnectionInfo:
    """What the host keeps in memory about a kernel. Never re-read from disk."""

    key: bytes
    session_id: str

    def file_contents(self) -> dict[str, Any]:
        return {
            "transport": "ipc",
            "ip": f"{SOCKET_MOUNT}/{SOCKET_BASENAME}",
            **{f"{name}_port": port for name, port in PORTS.items()},
            "key": self.key.decode(),
            "signature_scheme": "hmac-sha256",
            "kernel_name": "kernelexec",
        }


class DockerSandbox(BaseSandbox):
    """One container on a Docker Engine API, with its working-directory volume.

    What every transport shares: labels, the volume, create errors, start, death, the archive
    API, destroy. A transport adds how the kernel is started and reached (:meth:`create`,
    :meth:`open`). ``destroy()`` is idempotent; ``destroy_blocking()`` is what atexit and
    SIGTERM call.
    """

    def __init__(self, policy: Policy, image: str, conn: ConnectionInfo, *,
                 egress: EgressHandler | None = None) -> None:
        if policy.egress and egress is None:
            raise SandboxStartError("Policy.egress names what the code may reach, but the session gave no egress "
                                    "proxy to carry it; make sessions through AsyncSession/Session")
        self.policy = policy
        self.image = image
        self.conn = conn
        self.uid, self.gid = resolve_user(policy, os.geteuid(), os.getegid())
        self.sockdir: SocketDir | None = None
        self.container_id: str | None = None
        self.volume: str | None = None
        self.endpoints: dict[str, str] = {}
        #: held open for the kernel's orphan watchdog: it ends the kernel when this closes
        self.owner: socket.socket | None = None
        #: a cleanup failed (engine down?): it is retried at the next start, and at exit
        self.cleanup_failed = False
        self._destroyed = False
        self._channels: Channels | None = None
        self._channels_loop: asyncio.AbstractEventLoop | None = None
        #: the connections the code opens to its egress port, each handled by the session's proxy
        self.egress = HandlerTasks(egress, self.name) if policy.egress and egress is not None else None
        self._egress_server: asyncio.AbstractServer | None = None

    @property
    def name(self) -> str:
        return f"kernelexec-{self.conn.session_id}"

    @property
    def channels(self) -> Channels | None:
        """The channels :meth:`open` returned (closed with the sandbox)."""
        return self._channels

    def labels(self) -> dict[str, str]:
        pid = os.getpid()
        return {
            **self.policy.labels,
            LABEL: self.conn.session_id,
            LABEL_PID: str(pid),
            LABEL_START: process_start_ticks(pid) or "",
            LABEL_HOST: socket.gethostname(),
            LABEL_CREATED: datetime.now(timezone.utc).isoformat(timespec="seconds"),
            LABEL_VOLUME: self.name,
            LABEL_POLICY: self.policy.to_json(),
            LABEL_TRANSPORT: self.transport,
        }

    async def _create_container(self, labels: dict[str, str], body_for: Callable[[str], dict[str, Any]]) -> None:
        """The volume, then the container whose create body ``body_for(volume)`` gives."""
        from .backend import engines

        _register(self)
        docker = api()
        kind = await docker.engine_kind()
        engines.check_enforceable(kind, self.policy)
        self.volume = await docker.create_volume(
            self.name, engines.volume_options(kind, work_volume_options(self.policy, self.uid, self.gid)),
            {k: labels[k] for k in (LABEL, LABEL_PID, LABEL_START, LABEL_HOST)},
        )
        try:
            with engines.create_body(kind, docker.endpoint, body_for(self.volume)) as body:
                self.container_id = await docker.create_container(self.name, body)
        except DockerAPIError as e:
            if isinstance(e, NotFound) and "image" in e.explanation.lower():
                raise ImageNotFound(
                    f"the kernel image {self.image!r} is not on this Docker engine. Build it with "
                    "`kernelexec image build` (works offline), or pass Policy(image=...)"
                ) from e
            if self.policy.runtime and "runtime" in e.explanation.lower():
                raise SandboxStartError(
                    f"the container runtime {self.policy.runtime!r} is not configured in the Docker engine "
                    f"({e.explanation}); install it or drop Policy.runtime"
                ) from e
            raise SandboxStartError(f"Docker refused to create the sandbox container: {e.explanation}") from e
        for r in self.policy.relaxations():
            log.warning("session %s: policy loosened: %s", self.conn.session_id, r)

    async def put_archive(self, path: str, tar: bytes) -> None:
        assert self.container_id is not None
        try:
            await api().put_archive(self.container_id, path, tar)
        except DockerAPIError as e:
            if "no space left" in e.explanation.lower():
                raise OSError(errno.ENOSPC, f"no space left in the sandbox at {path}") from e
            raise SandboxError(f"the engine refused the files for {path}: {e.explanation}") from e

    async def get_archive(self, path: str, limit: int) -> bytes:
        assert self.container_id is not None
        try:
            return await api().get_archive(self.container_id, path, limit)
        except NotFound as e:
            raise FileNotFoundError(f"{path} does not exist in the sandbox") from e
        except DockerAPIError as e:
            raise SandboxError(f"the engine did not give {path}: {e.explanation}") from e

    def command(self) -> list[str]:
        main = [f"{SOCKET_MOUNT}/{LAUNCH_FILE}"] if self.policy.fast_kernel else ["-m", "ipykernel_launcher"]
        return [
            KERNEL_PYTHON, *main, "-f", f"{SOCKET_MOUNT}/{CONNECTION_FILE}",
            # history on disk is pointless in a throwaway sandbox and costs time per cell
            "--HistoryManager.hist_file=:memory:",
            "--IPKernelApp.quiet=True",
            f"--IPKernelApp.exec_files={SOCKET_MOUNT}/{STARTUP_FILE}",
        ]

    async def start(self) -> None:
        assert self.container_id is not None
        try:
            await api().start(self.container_id)
        except DockerAPIError as e:
            raise SandboxStartError(f"Docker could not start the sandbox container: {e.explanation}") from e

    async def inspect_state(self) -> dict[str, Any] | None:
        if self.container_id is None:
            return None
        try:
            return dict((await api().inspect(self.container_id))["State"])
        except NotFound:
            return None

    async def death(self, wait: float = 2.0, cause: str | None = None) -> KernelDied:
        """The typed error for a kernel that went away, with Docker's reason.

        ``cause`` is what the client saw; it is the reason when the container
        still runs (the kernel broke its bounds rather than died).
        """
        if self.container_id is None:
            return KernelDied("the container was never created")
        try:
            await asyncio.wait_for(api().wait(self.container_id), wait)
            state = await self.inspect_state()
        except asyncio.TimeoutError:
            state = await self.inspect_state()  # still running after `wait` seconds: say what we know
        except NotFound:
            state = None
        except DockerUnavailable as e:
            return SandboxLost(f"the Docker engine is unreachable ({e}); it may be restarting")
        if state is None:
            return SandboxLost("the container was removed by someone else")
        if state.get("Running"):
            return KernelDied(cause or "the kernel stopped answering although its container still runs")
        reason, code, oom = describe_exit(state)
        if not oom and state.get("Error"):
            return SandboxLost(reason, exit_code=code)
        return KernelDied(reason, exit_code=code, oom_killed=oom)

    async def _start_failed(self, said: str, when: str) -> SandboxStartError:
        died = await self.death(2.0)
        if not died.oom_killed and died.exit_code == 137 and parse_size(self.policy.memory) < SMALL_MEMORY:
            return SandboxStartError(
                f"the kernel was killed (SIGKILL) {when}; with Policy.memory={self.policy.memory!r} the likely "
                "cause is the memory limit (an idle kernel needs about 40 MiB; the engine did not report an OOM "
                "kill). Raise Policy.memory, e.g. to '256m'")
        if died.oom_killed:
            return kernel_out_of_memory(self.policy.memory, when)
        return SandboxStartError(
            f"the kernel exited {when} ({died.reason})" + (f"; it said:\n{said}" if said else "")
            + "\nCheck the image with `kernelexec doctor`.")

    async def destroy(self) -> None:
        """Remove the container, its volume and the socket directory. Safe to call twice."""
        if self._destroyed:
            return
        self._destroyed = True
        try:
            await self._destroy()
        except BaseException:
            # a failed or cancelled cleanup (Ctrl-C in the middle of close) stays registered: atexit,
            # the next start and gc retry it
            self._destroyed, self.cleanup_failed = False, True
            raise

    async def _destroy(self) -> None:
        errors: list[BaseException] = []
        if self._channels_loop is asyncio.get_running_loop():
            # idempotent; from another loop (atexit, a signal) the process is going
            if self._channels is not None:
                await self._channels.close()
            if self._egress_server is not None:
                self._egress_server.close()
                await self._egress_server.wait_closed()
            if self.egress is not None:
                await self.egress.close()
        if self.owner is not None:
            self.owner.close()
        docker = api()
        # a create cancelled in flight (a start that timed out on a slow engine) may have made the container
        # all the same: it has the session's name, and it holds the volume until it goes
        container = self.container_id or (self.name if self.volume is not None else None)
        for what, remove in ((container, docker.remove_container), (self.volume, docker.remove_volume)):
            if what is None:
                continue
            try:
                await remove(what)
            except NotFound:
                pass  # already gone is what we wanted
            except (DockerAPIError, DockerUnavailable) as e:
                errors.append(e)
        if self.sockdir is not None:
            try:
                self.sockdir.remove()
            except OSError as e:
                errors.append(e)
        if errors:
            raise SandboxError(
                f"cleaning up session {self.conn.session_id} failed ({errors[0]}); "
                "run `kernelexec gc` to remove what is left"
            ) from errors[0]
        self.cleanup_failed = False
        _unregister(self)

    def destroy_blocking(self) -> None:
        run_blocking(self.destroy())

    async def attach(self) -> AttachStream:
        """Open the container's stdout/stderr before it starts.

        It ends exactly when the container exits, which tells a failed start
        apart from a slow one without polling; its tail explains the failure.
        """
        assert self.container_id is not None
        reader, writer = await api().attach(self.container_id)
        return AttachStream(reader, writer)


class IpcSandbox(DockerSandbox):
    """The kernel's ZeroMQ ipc sockets in a host directory bind-mounted into the container.

    The fastest transport, for a local Linux engine whose runtime shares unix sockets with the
    host (runc): the socket directory (:mod:`kernelexec.sockdir`) is the only host path the
    container sees, and the host connects only to the inodes it verified.
    """

    transport = "ipc"

    def labels(self) -> dict[str, str]:
        assert self.sockdir is not None
        return {**super().labels(), LABEL_SOCKDIR: str(self.sockdir.path)}

    async def create(self) -> None:
        """Socket directory, connection file, volume and (not yet started) container."""
        endpoint = api().endpoint
        if not endpoint.is_local:
            raise DockerUnavailable(
                f"the Docker engine is at {endpoint.describe()}, not on this host: the ipc transport bind-mounts "
                "the kernel's sockets from this host, which needs a local engine. Leave Policy.transport at "
                "'auto' (or set 'attach') for remote engines"
            )
        _register(self)
        self.sockdir = SocketDir(self.uid, self.gid)
        self.sockdir.write_connection_file(self.conn.file_contents())
        self.sockdir.write_file(STARTUP_FILE, kernel_startup_source())
        if self.policy.fast_kernel:
            self.sockdir.write_file(LAUNCH_FILE, kernel_launch_source())
        sockdir = str(self.sockdir.path)
        if self.egress is not None:
            await self._serve_egress()

        def body_for(volume: str) -> dict[str, Any]:
            body = container_config(self.policy, image=self.image, command=self.command(), uid=self.uid,
                                    gid=self.gid, socket_dir=sockdir, work_volume=volume, labels=self.labels())
            if self.egress is not None:  # where the kernel's forwarder carries the code's egress connections
                body["Env"].append(f"KERNELEXEC_EGRESS_SOCKET={SOCKET_MOUNT}/{EGRESS_SOCKET}")
            return body

        await self._create_container(self.labels(), body_for)

    async def _serve_egress(self) -> None:
        """Listen on the egress socket in the socket directory: only the sandbox's uid may connect."""
        assert self.sockdir is not None and self.egress is not None
        path = self.sockdir.path / EGRESS_SOCKET
        self._channels_loop = asyncio.get_running_loop()
        self._egress_server = await asyncio.start_unix_server(self.egress.on_connection, path=str(path),
                                                              limit=1 << 16)
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)
        os.chmod(path, 0o600)  # the directory is ours and the container not yet started: no link to follow

    async def open(self) -> Channels:
        """Start; wait for the kernel's sockets (or its early exit), connect to the verified inodes."""
        from .backend.ipc import ZmqChannels

        assert self.sockdir is not None
        attach = await self.attach()  # ends exactly when the container exits: a failed start, not a slow one
        tasks: list[asyncio.Future[Any]] = []
        try:
            await self.start()
            names = [f"{SOCKET_BASENAME}-{port}" for port in PORTS.values()] + [OWNER_SOCKET]
            ready = asyncio.ensure_future(self.sockdir.wait_for(names))
            exited = asyncio.ensure_future(attach.wait_closed())
            tasks += [ready, exited]
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                raise await self._start_failed(attach.text(), "before it was ready")
            ready.result()
            # every channel is pinned, including the two our client does not use (stdin, heartbeat),
            # so that other Jupyter clients (the kernel provisioner) connect only to verified sockets
            self.endpoints = {c: self.sockdir.open_socket(f"{SOCKET_BASENAME}-{port}") for c, port in PORTS.items()}
            self.owner = self.sockdir.connect_plain(OWNER_SOCKET)
            self.sockdir.lock()
            channels = ZmqChannels(self.endpoints, max_message_bytes=parse_size(self.policy.max_message_bytes))
            self._channels, self._channels_loop = channels, asyncio.get_running_loop()
            await channels.connect()
            connected = asyncio.ensure_future(channels.wait_connected())
            tasks.append(connected)
            # once connected, ZeroMQ reports the kernel's death itself (a disconnect)
            await asyncio.wait({connected, exited}, return_when=asyncio.FIRST_COMPLETED)
            if not connected.done():
                raise await self._start_failed(attach.text(), "while starting")
            return channels
        finally:
            for t in tasks:
                t.cancel()
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(r, Exception):  # the start already failed for the reason raised
                    log.debug("session %s: a start step also ended with %r", self.conn.session_id, r)
            await attach.close()


Sandbox = IpcSandbox  # the name this module's callers knew


class AttachStream:
    """Demultiplexed container output, keeping only a bounded tail."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.tail = bytearray()

    async def wait_closed(self) -> None:
        """Read until the container exits; keep the last few KB of what it said."""
        while True:
            try:
                head = await self._reader.readexactly(8)
            except asyncio.IncompleteReadError:
                return
            _, size = struct.unpack(">BxxxL", head)
            while size:
                chunk = await self._reader.read(min(size, 65536))
                if not chunk:
                    return
                size -= len(chunk)
                self.tail += chunk
                del self.tail[:-_STDERR_TAIL]

    async def close(self) -> None:
        await close_stream(self._writer)

    def text(self) -> str:
        return self.tail.decode(errors="replace").strip()


# -- cleanup at exit and on SIGTERM --------------------------------------------

_live: dict[int, DockerSandbox] = {}
_live_lock = threading.Lock()
_atexit_installed = False
_signals_installed = False
#: Signals whose default action ends the process without running atexit: a terminal
#: closing (SIGHUP) is as common as a supervisor's SIGTERM.
CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_previous_handlers: dict[int, Any] = {}


def _register(sb: DockerSandbox) -> None:
    with _live_lock:
        _live[id(sb)] = sb
    install_exit_hooks()


def install_exit_hooks() -> None:
    """Clean up live sandboxes at exit and on SIGTERM/SIGHUP.

    Python sets signal handlers only from the main thread, and a sync
    ``Session`` creates its sandbox on its loop thread: so each session calls
    this from the caller's thread too, and the handlers go in the first time
    it runs on the main thread. A process whose sessions all live on other
    threads should call it once from the main thread (atexit works anyway).
    """
    global _atexit_installed, _signals_installed
    with _live_lock:
        if not _atexit_installed:
            _atexit_installed = True
            atexit.register(destroy_all)
        if _signals_installed or threading.current_thread() is not threading.main_thread():
            return
        _signals_installed = True
        for sig in CLEANUP_SIGNALS:
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                continue  # e.g. SIGHUP under nohup: the process lives on, and so do its sessions
            _previous_handlers[sig] = previous
            signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: Any) -> None:
    destroy_all()
    prev = _previous_handlers.get(signum)
    if callable(prev):
        prev(signum, frame)
    else:  # the default action: die of the same signal, as the parent expects
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _unregister(sb: DockerSandbox) -> None:
    with _live_lock:
        _live.pop(id(sb), None)


def live_sandboxes() -> list[DockerSandbox]:
    with _live_lock:
        return list(_live.values())


def destroy_all() -> None:
    """Remove every sandbox this process still owns (atexit, SIGTERM)."""
    sandboxes = live_sandboxes()
    if not sandboxes:
        return

    async def all_() -> list[BaseException | None]:
        return await asyncio.gather(*(sb.destroy() for sb in sandboxes), return_exceptions=True)

    for e in run_blocking(all_()):
        if e is not None:
            log.error("%s", e)


# -- listing and garbage collection ---------------------------------------------

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


_startup_gc_done = False


async def startup_gc() -> None:
    """Once per process, before the first session: remove what dead owners left behind.

    A failure here is logged, not raised: leftovers of another process must
    not stop this one from working, and ``kernelexec gc`` reports them too.
    """
    global _startup_gc_done
    if _startup_gc_done:
        return
    _startup_gc_done = True
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

