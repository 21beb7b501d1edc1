"""A kernel as a plain process on this host: a test double and a development backend, NOT a sandbox.

:class:`LocalSandbox` runs ipykernel with this interpreter, in a private temporary directory, with
the same connection kind (ZeroMQ over ipc), the same kernel flags, the same startup code and the
same client as a Docker session. It exists so that what the session decides (timeouts, interrupts,
replacing a kernel that ignored one, cancellation, deaths, restarts, history, files) can be tested
and developed without an engine, and so that benchmarks have a floor to compare the sandbox with.

There is no isolation at all: the code runs as this user, with this user's files, network and
environment, and none of ``Policy``'s limits apply (only the host-side bounds do: message and
output sizes, the working directory's size for uploads). It is never chosen automatically; pass it
explicitly::

    AsyncSession(backend=LocalBackend())

Paths: the kernel's working directory stands for ``/work`` (``upload("x")`` lands where the code's
``open("x")`` finds it), but the code sees host paths, not ``/work``.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import importlib.util
import io
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import KernelDied, ResponseTooLarge, SandboxError, SandboxStartError
from ..kernel.contract import (
    CONNECTION_FILE,
    LAUNCH_FILE,
    PORTS,
    SOCKET_BASENAME,
    STARTUP_FILE,
    connection_file,
    kernel_argv,
    launch_source,
    startup_source,
)
from ..policy import OWNER_SOCKET, WORKDIR, Policy, parse_size
from .base import Backend, Channels, EgressHandler, Sandbox
from .sockdir import wait_for_paths

if TYPE_CHECKING:  # pragma: no cover
    from .ipc import ZmqChannels

__all__ = ["LocalBackend", "LocalSandbox"]

log = logging.getLogger("kernelexec")

#: What is kept of the kernel's own stdout/stderr, to explain a failed start.
_TAIL = 4096


class LocalBackend(Backend):
    """Kernels as host processes (:class:`LocalSandbox`). No isolation: for tests and development."""

    name = "local"

    def __init__(self, *, python: str | None = None, startup: bool = True) -> None:
        """``python``: the interpreter that runs the kernel (default: this one; it needs ipykernel).
        ``startup``: run kernelexec's kernel-side startup code, as a sandbox does."""
        self.python = python or sys.executable
        self.startup = startup

    def new_sandbox(self, policy: Policy, image: str, key: bytes, session_id: str, *,
                    egress: EgressHandler | None = None) -> LocalSandbox:
        if egress is not None:
            raise SandboxStartError("the local backend runs kernels on this host, with its network: it cannot hold "
                                    "their traffic to Policy.egress. Use the Docker backend for sessions with egress")
        return LocalSandbox(policy, key, session_id, python=self.python, startup=self.startup)


class LocalSandbox(Sandbox):
    """One ipykernel process in a private temporary directory; see the module's warning.

    ``death()`` reports the process's exit status or signal; ``put_archive``/``get_archive`` work on
    its working directory, bounded by ``Policy.workdir_size`` as the sandbox's volume is.
    ``destroy()`` kills the kernel's process group and removes the directory.
    """

    transport = "ipc"
    image = "local"

    def __init__(self, policy: Policy, key: bytes, session_id: str, *, python: str | None = None,
                 startup: bool = True) -> None:
        self.policy = policy
        self.key = key
        self.session_id = session_id
        self.python = python or sys.executable
        self.startup = startup
        self.uid, self.gid = os.geteuid(), os.getegid()
        self.endpoints: dict[str, str] = {}
        #: the private directory: ``run/`` (connection file, sockets), ``work/`` (cwd), ``home/`` (HOME)
        self.dir: Path | None = None
        self.proc: asyncio.subprocess.Process | None = None
        #: ``local-<pid>`` once started: the kernel's pid stands in for a container id
        self.container_id: str | None = None
        self._owner: socket.socket | None = None
        self._channels: ZmqChannels | None = None
        self._tail = bytearray()
        self._drain: asyncio.Task[None] | None = None
        self._destroyed = False

    @property
    def run_dir(self) -> Path:
        assert self.dir is not None, "create() first"
        return self.dir / "run"

    @property
    def workdir(self) -> Path:
        """What ``/work`` is for this kernel."""
        assert self.dir is not None, "create() first"
        return self.dir / "work"

    async def create(self) -> None:
        if importlib.util.find_spec("ipykernel") is None and self.python == sys.executable:
            raise SandboxStartError("the local backend runs ipykernel on this host: `pip install ipykernel`")
        await asyncio.to_thread(self._make_dir)

    def _make_dir(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"kernelexec-local-{self.session_id}-"))
        _live[id(self)] = self
        _install_atexit()
        for sub in ("run", "work", "home"):
            (self.dir / sub).mkdir(mode=0o700)
        conn = connection_file(str(self.run_dir), self.key, kernel_name="kernelexec-local")
        (self.run_dir / CONNECTION_FILE).write_text(json.dumps(conn))
        (self.run_dir / STARTUP_FILE).write_bytes(startup_source())
        (self.run_dir / LAUNCH_FILE).write_bytes(launch_source())

    def command(self) -> list[str]:
        return kernel_argv(self.python, str(self.run_dir), fast=self.policy.fast_kernel, startup=self.startup)

    def environment(self) -> dict[str, str]:
        """This process's environment with the sandbox's kernel settings (and a private HOME and IPython dir)."""
        assert self.dir is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KERNELEXEC_", "JPY_", "IPYTHON"))}
        env.update({
            "HOME": str(self.dir / "home"),
            "PYTHONUNBUFFERED": "1",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "JUPYTER_PLATFORM_DIRS": "1",
            "KERNELEXEC_MAX_OUTPUT": str(parse_size(self.policy.max_output_bytes)),
            "KERNELEXEC_MAX_MESSAGE": str(parse_size(self.policy.max_message_bytes)),
            "KERNELEXEC_ORPHAN_TIMEOUT": str(self.policy.orphan_timeout),
            "KERNELEXEC_OWNER_SOCKET": str(self.run_dir / OWNER_SOCKET),
        })
        env.update(self.policy.env)
        return env

    async def open(self) -> Channels:
        """Start the kernel; wait for its sockets (or its exit), connect, hold the owner connection."""
        from .ipc import ZmqChannels

        # its own session: ipykernel interrupts its whole process group, which must not be ours
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(), cwd=self.workdir, env=self.environment(), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.container_id = f"local-{self.proc.pid}"
        self._drain = asyncio.get_running_loop().create_task(self._keep_tail(), name="kernelexec-local-output")
        names = [f"{SOCKET_BASENAME}-{port}" for port in PORTS.values()]
        if self.startup:
            names.append(OWNER_SOCKET)
        await self._until_exit(wait_for_paths(self.run_dir, names), "before it was ready")
        self.endpoints = {c: f"ipc://{self.run_dir}/{SOCKET_BASENAME}-{port}" for c, port in PORTS.items()}
        if self.startup:
            owner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                owner.connect(str(self.run_dir / OWNER_SOCKET))
            except OSError:
                owner.close()
                raise
            self._owner = owner
        channels = ZmqChannels(self.endpoints, max_message_bytes=parse_size(self.policy.max_message_bytes))
        self._channels = channels
        await channels.connect()
        await self._until_exit(channels.wait_connected(), "while starting")
        return channels

    async def _until_exit(self, step: Coroutine[Any, Any, None], when: str) -> None:
        """``step``, unless the kernel exits first: then a SandboxStartError with what it said."""
        assert self.proc is not None
        done = asyncio.ensure_future(step)
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            await asyncio.wait({done, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not done.done():
                done.cancel()
            exited.cancel()
            await asyncio.gather(done, exited, return_exceptions=True)
        if not done.cancelled():
            done.result()  # the step's own error, if it failed
            return
        died = await self.death(2.0)
        said = self.output()
        raise SandboxStartError(f"the local kernel exited {when} ({died.reason})"
                                + (f"; it said:\n{said}" if said else ""))

    async def _keep_tail(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self._tail += chunk
            del self._tail[:-_TAIL]

    def output(self) -> str:
        """The last few KB the kernel process wrote to its own stdout and stderr."""
        return self._tail.decode(errors="replace").strip()

    async def wait_stopped(self) -> int:
        return 0 if self.proc is None else await self.proc.wait()

    async def death(self, wait: float = 2.0, cause: str | None = None) -> KernelDied:
        """The kernel's exit status or signal; ``cause`` when it still runs after ``wait`` seconds."""
        if self.proc is None:
            return KernelDied("the local kernel was never started")
        try:
            code = await asyncio.wait_for(self.proc.wait(), wait)
        except asyncio.TimeoutError:
            return KernelDied(cause or "the kernel stopped answering although its process still runs")
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return KernelDied(f"killed by {name}", exit_code=128 - code)
        return KernelDied(f"exit code {code}", exit_code=code)

    # -- files: the working directory, bounded as the sandbox's volume is ------------------------

    def _local(self, path: str) -> Path:
        """The host path of ``path`` (under ``/work``)."""
        p = PurePosixPath(path)
        if p != PurePosixPath(WORKDIR) and PurePosixPath(WORKDIR) not in p.parents:
            raise SandboxError(f"{path!r} is not under {WORKDIR}; the local backend has files only there")
        parts = p.relative_to(WORKDIR).parts
        if ".." in parts:
            raise SandboxError(f"{path!r} leaves the working directory")
        return self._inside(self.workdir.joinpath(*parts), path)

    def _inside(self, local: Path, path: str) -> Path:
        """``local``, once sure no symbolic link on its way leads out of the working directory."""
        real = Path(os.path.realpath(local.parent if local != self.workdir else local))
        if real != self.workdir and self.workdir not in real.parents:
            raise SandboxError(f"{path!r} leads out of the working directory (a symbolic link on the way)")
        return local

    def _used(self) -> int:
        total = 0
        for root, dirs, files in os.walk(self.workdir):
            for name in files + dirs:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    continue
        return total

    async def put_archive(self, path: str, tar: bytes) -> None:
        await asyncio.to_thread(self._put, path, tar)

    def _put(self, path: str, tar: bytes) -> None:
        dest = self._local(path)
        limit = parse_size(self.policy.workdir_size)
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
            members = tf.getmembers()
            for m in members:
                name = PurePosixPath(m.name)
                if name.is_absolute() or ".." in name.parts or not (m.isreg() or m.isdir()):
                    raise SandboxError(f"the archive for {path} holds {m.name!r}: only files and directories "
                                       "under it are accepted")
            incoming = sum(m.size for m in members if m.isreg())
            if self._used() + incoming > limit:
                raise OSError(errno.ENOSPC, f"no space left in the working directory at {path} "
                                            f"(Policy.workdir_size={self.policy.workdir_size!r})")
            for m in members:
                target = self._inside(dest.joinpath(*PurePosixPath(m.name).parts), f"{path}/{m.name}")
                if m.isdir():
                    target.mkdir(mode=0o700, parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                src = tf.extractfile(m)
                assert src is not None
                # O_NOFOLLOW: a link the code left in the file's place is not written through
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out)

    async def get_archive(self, path: str, limit: int) -> bytes:
        return await asyncio.to_thread(self._get, path, limit)

    def _get(self, path: str, limit: int) -> bytes:
        local = self._local(path)
        if not os.path.lexists(local):
            raise FileNotFoundError(f"{path} does not exist in the working directory")
        size = os.lstat(local).st_size
        if local.is_dir() and not local.is_symlink():
            size = sum(os.lstat(os.path.join(r, n)).st_size for r, ds, fs in os.walk(local) for n in ds + fs)
        if size > limit:
            raise ResponseTooLarge(f"{path} is larger than {limit} bytes")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            tf.add(local, arcname=local.name, recursive=True)  # links are stored as links, never followed
        return buf.getvalue()

    # -- the end ---------------------------------------------------------------------------------

    async def destroy(self) -> None:
        """Kill the kernel's process group, close what was opened, remove the directory. Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._channels is not None:
            await self._channels.close()
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        if self.proc is not None:
            _kill_group(self.proc.pid)
            await self.proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            await asyncio.gather(self._drain, return_exceptions=True)
        _live.pop(id(self), None)
        if self.dir is not None:
            await asyncio.to_thread(_remove, self.dir)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        raise SandboxError(f"could not remove the local kernel's directory {path}; remove it by hand")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the kernel leads its own group (start_new_session)
    except ProcessLookupError:
        pass  # the group is empty: the kernel and whatever it started are gone already


# -- at exit, kill what is left (a session not closed): no kernel outlives its host ------------------

_live: dict[int, LocalSandbox] = {}
_atexit_lock = threading.Lock()
_atexit_installed = False


def _install_atexit() -> None:
    global _atexit_installed
    with _atexit_lock:
        if not _atexit_installed:
            _atexit_installed = True
            atexit.register(_kill_all)


def _kill_all() -> None:
    for sb in list(_live.values()):
        if sb.proc is not None:
            _kill_group(sb.proc.pid)
        if sb.dir is not None:
            shutil.rmtree(sb.dir, ignore_errors=True)
