"""A sandbox's container on the Docker Engine API: create, start, watch, inspect, remove; and the
ipc transport's sandbox (the host's socket directory bind-mounted in).

Everything a session asks of the engine goes through the one asyncio client
(:mod:`.api`). The blocking entry points (atexit, SIGTERM) run the same
coroutines on a short-lived loop of their own; what crashed owners left is
:mod:`.sessions`'s.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import logging
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from ..._loop import run_blocking
from ...errors import (
    DockerUnavailable,
    ImageNotFound,
    KernelDied,
    SandboxError,
    SandboxLost,
    SandboxStartError,
    kernel_out_of_memory,
)
from ...kernel.contract import (
    LAUNCH_FILE,
    PORTS,
    SOCKET_BASENAME,
    STARTUP_FILE,
    connection_file,
    kernel_argv,
    launch_source,
    startup_source,
)
from ...policy import (
    EGRESS_SOCKET,
    KERNEL_PYTHON,
    OWNER_SOCKET,
    SOCKET_MOUNT,
    Policy,
    parse_size,
    resolve_user,
)
from ..base import Channels, EgressHandler
from ..base import Sandbox as BaseSandbox
from ..sockdir import SocketDir
from ..streams import HandlerTasks
from .api import DockerAPIError, NotFound, api, close_stream
from .config import container_config, work_volume_options

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

_STDERR_TAIL = 4096

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
        """The connection file as the kernel reads it inside the sandbox."""
        return connection_file(SOCKET_MOUNT, self.key)


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
        from . import engines

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
        return kernel_argv(KERNEL_PYTHON, SOCKET_MOUNT, fast=self.policy.fast_kernel)

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

    async def wait_stopped(self) -> int:
        if self.container_id is None:
            return 0
        try:
            return int((await api().wait(self.container_id)).get("StatusCode", 0))
        except NotFound:
            return 0

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
    host (runc): the socket directory (:mod:`kernelexec.backend.sockdir`) is the only host path the
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
        self.sockdir.write_file(STARTUP_FILE, startup_source())
        if self.policy.fast_kernel:
            self.sockdir.write_file(LAUNCH_FILE, launch_source())
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
        from ..ipc import ZmqChannels

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
