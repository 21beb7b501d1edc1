"""The per-session socket directory: the only host path the container sees.

The container controls what is inside it, so the host treats it as hostile:

* the connection file is written once and never read back;
* each socket is opened with ``O_PATH|O_NOFOLLOW`` relative to a directory fd
  held since creation, checked (a socket, owned by the kernel's uid, one
  link), and ZeroMQ connects through ``/proc/self/fd/N``. A path swapped
  later (symlink, FIFO, another session's socket) is never followed, and a
  reconnect can only reach the inode that was verified;
* on a root host the directory is handed back to root once the sockets
  exist, so the kernel can no longer create, replace or fill anything in it;
* removal never follows links.

Paths stay short (``/tmp/kx-<pid>-<hex>/k-1``) because a unix socket path
is limited to about 107 bytes.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
import re
import secrets
import socket
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import SandboxError, SandboxStartError
from ..kernel.contract import CONNECTION_FILE, PORTS, SOCKET_BASENAME

PREFIX = "kx-"
_NAME = re.compile(r"^kx-(\d+)-[0-9a-f]{8}$")
_MAX_PATH = 100

_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
_IN_ATTRIB = 0x4
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


def socket_root() -> Path:
    """Where socket directories live; ``KERNELEXEC_SOCKET_ROOT`` overrides."""
    return Path(os.environ.get("KERNELEXEC_SOCKET_ROOT") or tempfile.gettempdir())


def owner_pid_of(name: str) -> int | None:
    """The pid encoded in a socket directory's name, for ``gc``."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def private_dir() -> Path:
    """A host-only directory named like a socket directory (so ``gc`` finds it after a crash)."""
    path = socket_root() / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(path, 0o700)
    return path


class SocketDir:
    """A private directory of unix sockets shared with one container."""

    def __init__(self, uid: int, gid: int, root: Path | None = None) -> None:
        self.uid, self.gid = uid, gid
        root = root or socket_root()
        path = root / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        if len(str(path / f"{SOCKET_BASENAME}-{max(PORTS.values())}")) > _MAX_PATH:
            raise SandboxStartError(
                f"socket path {path} is too long for a unix socket; set KERNELEXEC_SOCKET_ROOT to a short directory"
            )
        os.mkdir(path, 0o700)
        self.path = path
        self._fd: int | None = None
        self._socket_fds: list[int] = []
        self._written: dict[str, int] = {}
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            if os.geteuid() == 0 and (uid, gid) != (0, 0):
                os.fchown(self._fd, uid, gid)
        except BaseException:
            self.remove()
            raise

    @property
    def socket_prefix(self) -> str:
        return str(self.path / SOCKET_BASENAME)

    def write_connection_file(self, info: dict[str, Any]) -> None:
        self.write_file(CONNECTION_FILE, json.dumps(info).encode(), locked_mode=0o400)

    def write_file(self, name: str, data: bytes, locked_mode: int = 0o444) -> None:
        """A file for the kernel to read at startup; written once, never read back.

        ``locked_mode`` is its mode once :meth:`lock` gives it to root (the key stays 0400)."""
        self._written[name] = locked_mode
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o400, dir_fd=self._dirfd())
        try:
            if os.geteuid() == 0:
                os.fchown(fd, self.uid, self.gid)
            os.write(fd, data)
        finally:
            os.close(fd)

    def _dirfd(self) -> int:
        if self._fd is None:
            raise SandboxError("the socket directory was already removed")
        return self._fd

    def _present(self, names: Iterable[str]) -> bool:
        for name in names:
            try:
                os.stat(name, dir_fd=self._dirfd(), follow_symlinks=False)
            except FileNotFoundError:
                return False
        return True

    async def wait_for(self, names: list[str]) -> None:
        """Return once every name exists, woken by inotify rather than by polling.

        The caller bounds this with its own deadline and races it against the
        container exiting.
        """
        ino = _Inotify(self.path)
        try:
            while not self._present(names):
                await ino.wait()
        finally:
            ino.close()

    def open_socket(self, name: str) -> str:
        """Verify one socket and return a ZeroMQ endpoint that pins its inode."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dirfd())
        try:
            st = os.fstat(fd)
            if not stat.S_ISSOCK(st.st_mode):
                raise SandboxError(f"{self.path / name} is not a socket (mode {stat.filemode(st.st_mode)}); "
                                   "the sandbox tampered with its socket directory")
            if st.st_uid != self.uid:
                raise SandboxError(f"{self.path / name} is owned by uid {st.st_uid}, not the kernel's uid "
                                   f"{self.uid}; refusing to connect")
            if st.st_nlink != 1:
                raise SandboxError(f"{self.path / name} has {st.st_nlink} links; refusing to connect")
        except BaseException:
            os.close(fd)
            raise
        self._socket_fds.append(fd)
        return f"ipc:///proc/self/fd/{fd}"

    def connect_plain(self, name: str) -> socket.socket:
        """Connect a plain stream socket to a verified socket in the directory."""
        endpoint = self.open_socket(name)
        fd = self._socket_fds.pop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.connect(endpoint.removeprefix("ipc://"))
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(fd)  # the connection is made; nothing ever reconnects through this path
        return sock

    def lock(self) -> None:
        """Take the directory back from the kernel once its sockets exist.

        Only a root host can: it gives the directory to root, so the kernel
        (another uid, no capabilities) can no longer add, remove or replace
        entries. A non-root host shares the kernel's uid and relies on the
        verified, pinned sockets instead.
        """
        if os.geteuid() != 0 or self.uid == 0:
            return
        fd = self._dirfd()
        # the files the host wrote go back to root too: their owner could chmod them into a
        # writable (host-disk-filling), executable or setuid file on the host's filesystem
        for name, mode in self._written.items():
            ffd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                os.fchown(ffd, 0, 0)
                os.fchmod(ffd, mode)
            finally:
                os.close(ffd)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o755)

    def close_sockets(self) -> None:
        for fd in self._socket_fds:
            os.close(fd)
        self._socket_fds.clear()

    def remove(self) -> None:
        """Delete the directory and everything the container put in it, following no link."""
        self.close_sockets()
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            _empty_dir(fd)
        finally:
            os.close(fd)
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass  # someone removed it from the host side already: nothing is left


def _empty_dir(top: int) -> None:
    """Remove everything under an open directory fd without following links.

    Iterative, so deep nesting cannot exhaust the stack. A non-root host owns
    what the kernel created (same uid), so a directory chmod-ed to 0 is taken
    back before it is read.
    """
    stack: list[tuple[int, str]] = [(top, "")]
    try:
        while stack:
            dfd = stack[-1][0]
            if os.fstat(dfd).st_uid == os.geteuid():
                os.fchmod(dfd, 0o700)
            child = None
            with os.scandir(dfd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    os.unlink(entry.name, dir_fd=dfd)
            if child is not None:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                stack.append((os.open(child, flags, dir_fd=dfd), child))
                continue
            _, name = stack.pop()
            if stack:
                os.close(dfd)
                os.rmdir(name, dir_fd=stack[-1][0])
    finally:
        for dfd, _ in stack[1:]:
            os.close(dfd)


def remove_path(path: Path) -> None:
    """Remove a leftover socket directory by path (for ``gc``), following no link."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _empty_dir(fd)
    finally:
        os.close(fd)
    os.rmdir(path)


async def wait_for_paths(directory: Path, names: list[str]) -> None:
    """Return once every name exists in ``directory``; inotify, no polling. The caller bounds it."""
    ino = _Inotify(directory)
    try:
        while not all((directory / n).exists() for n in names):
            await ino.wait()
    finally:
        ino.close()


class _Inotify:
    """Just enough inotify to wait for files to appear, driven by the event loop."""

    _libc: Any = None

    def __init__(self, path: Path) -> None:
        if _Inotify._libc is None:
            _Inotify._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc = _Inotify._libc
        self._fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        if libc.inotify_add_watch(self._fd, os.fsencode(path), _IN_CREATE | _IN_MOVED_TO | _IN_ATTRIB) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
