"""Connections to an ssh:// Docker engine, made the way the docker CLI makes them.

The CLI runs ``ssh -l USER -p PORT -- HOST docker system dial-stdio``: the far side's docker CLI connects to
its own engine and copies bytes between that connection and its stdin/stdout, so each HTTP connection of the
Engine API is one ssh session. kernelexec does the same, so every engine a user reaches with
``DOCKER_HOST=ssh://...`` (or an ssh context) is reached with their ssh configuration, agent and known hosts,
and nothing is exposed on the far side but what ssh already allows.

How, and why so:

* One ``ssh`` subprocess per connection, its stdin and stdout one end of a socketpair whose other end is an
  ordinary asyncio stream: the HTTP code (and the attach stream, an upgraded connection) cannot tell it from
  a TCP connection, and half-close (``write_eof``) works as on a socket.
* OpenSSH connection multiplexing (``ControlMaster=auto``, ``ControlPath`` in a private 0700 directory of
  this client, one destination per directory so the socket's name is short, ``ControlPersist`` short): the
  first connection's ssh leaves a master behind, later ones are
  sessions on it, so a request does not pay a key exchange and an authentication. The master ends by itself
  :data:`CONTROL_PERSIST` after its last session (so a SIGKILLed owner leaves none for long) and
  :meth:`SshDialer.close` ends it at once (``ssh -O exit``).
* ``BatchMode=yes``: ssh never prompts (a password, a passphrase, an unknown host key): a session must fail,
  not hang on a terminal nobody watches. ``ConnectTimeout`` bounds an unreachable host.
* Each ssh runs in a session of its own: a terminal's Ctrl-C must not cut the connections the cleanup of
  that same Ctrl-C still needs. Closing a stream ends its ssh (SIGTERM, then SIGKILL) and reaps it.
* When ssh fails (authentication, host key, no ``docker`` on the far side, its engine down) the connection
  just ends; :meth:`SshStream.failure` turns that into one :class:`DockerUnavailable` with ssh's own words.

Options the user gives in ``KERNELEXEC_SSH_OPTS`` (:attr:`Endpoint.ssh_options`) come first: ssh keeps the
first value of each option, so ``-o ControlMaster=no`` or ``-o BatchMode=no`` there override these defaults.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import weakref
from typing import IO

from ...errors import DockerUnavailable
from .endpoint import Endpoint

__all__ = ["CONTROL_PERSIST", "SshDialer", "SshStream"]

#: How long a master outlives its last session: long enough to carry a burst of calls (a CLI command, the
#: calls between two sessions), short enough that an owner killed without cleanup leaves none for long.
CONTROL_PERSIST = "30s"
#: ssh's own bound on connecting (TCP, key exchange, authentication), in seconds.
CONNECT_TIMEOUT = 20
#: How long an ssh asked to end (SIGTERM) gets before SIGKILL; and the wait for a failed ssh's exit status.
_STOP_TIMEOUT = 10.0
_STDERR_TAIL = 2000
#: Longest temp directory the control socket goes under: the directory, kx-ssh-XXXXXXXX/m, and the 17 bytes
#: ssh adds while it binds must fit a unix socket path (104 bytes on macOS, 108 on Linux).
_MAX_BASE = 70

_live: weakref.WeakSet[SshDialer] = weakref.WeakSet()


class SshStream(asyncio.StreamWriter):
    """The writing half of one connection through ssh; closing it ends and reaps that ssh."""

    def __init__(self, transport: asyncio.WriteTransport, protocol: asyncio.BaseProtocol,
                 reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop,
                 proc: asyncio.subprocess.Process, stderr: IO[bytes], endpoint: Endpoint) -> None:
        super().__init__(transport, protocol, reader, loop)
        self.proc = proc
        self._stderr = stderr
        self._endpoint = endpoint
        self._ended_by_us = False

    def close(self) -> None:
        super().close()
        self._terminate(signal.SIGTERM)

    async def wait_closed(self) -> None:
        try:
            await super().wait_closed()
        finally:
            await self._reap()

    def _terminate(self, sig: int) -> None:
        # os.kill, not Popen.send_signal: that one polls (waitpid) behind the event loop's child watcher
        if self.proc.returncode is None:
            self._ended_by_us = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    async def _reap(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), _STOP_TIMEOUT)
        except asyncio.TimeoutError:
            self._terminate(signal.SIGKILL)
            await self.proc.wait()
        finally:
            self._stderr.close()

    async def failure(self) -> DockerUnavailable | None:
        """Why the connection ended before the engine answered, if ssh (or the far side's docker) says so."""
        if self._ended_by_us:
            return None
        try:
            code = await asyncio.wait_for(asyncio.shield(self.proc.wait()), _STOP_TIMEOUT)
        except asyncio.TimeoutError:
            return None
        if code == 0:
            return None
        self._stderr.seek(0)
        said = self._stderr.read()[-_STDERR_TAIL:].decode(errors="replace").strip().rstrip(".") or \
            "(nothing on stderr)"
        if code == 255:
            hint = ("ssh itself failed: check that `ssh "
                    f"{_destination(self._endpoint)} docker version` works without a prompt (key or agent, "
                    "known host key, reachable host)")
        elif code == 127:
            hint = "the far side has no `docker` command on the PATH of a non-interactive ssh session"
        else:
            hint = "the far side's `docker system dial-stdio` could not reach its engine"
        return DockerUnavailable(f"ssh to the Docker engine at {self._endpoint.describe()} ended with exit "
                                 f"status {code}: {said}. {hint}")


def _destination(ep: Endpoint) -> str:
    """The destination as a user would type it to try the same login by hand."""
    return " ".join([*(shlex.quote(o) for o in ep.ssh_options), *(["-p", str(ep.port)] if ep.port else []),
                     (f"{ep.user}@" if ep.user else "") + ep.host])


class SshDialer:
    """Opens connections to one ssh:// engine; owns the private ControlPath directory and the master in it."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._dir: str | None = None
        _live.add(self)

    @property
    def control_dir(self) -> str:
        """This client's 0700 directory for the master's socket (made on first use, again after close)."""
        if self._dir is None or not os.path.isdir(self._dir):
            base = tempfile.gettempdir()
            if len(base) > _MAX_BASE and os.access("/tmp", os.W_OK):
                base = "/tmp"  # a unix socket path has ~100 bytes; ssh refuses a longer ControlPath
            self._dir = tempfile.mkdtemp(prefix="kx-ssh-", dir=base)  # mode 0700, ours alone
        return self._dir

    def argv(self, *action: str) -> list[str]:
        """The ssh command: the user's options, then the multiplexing defaults, then the destination."""
        ep = self.endpoint
        args = ["ssh", *ep.ssh_options, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
                "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_dir}/m",
                "-o", f"ControlPersist={CONTROL_PERSIST}", "-T"]
        if ep.user:
            args += ["-l", ep.user]
        if ep.port:
            args += ["-p", str(ep.port)]
        if action:
            return [*args, *action, "--", ep.host]
        return [*args, "--", ep.host, "docker", "system", "dial-stdio"]

    async def connect(self, limit: int) -> tuple[asyncio.StreamReader, SshStream]:
        """A new connection to the engine: a stream pair whose bytes an ssh subprocess carries."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        stderr = tempfile.TemporaryFile()  # a file, not a pipe: nothing to drain while the connection lives
        proc: asyncio.subprocess.Process | None = None
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.argv(), stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=stderr, start_new_session=True)
            except OSError as e:
                raise DockerUnavailable(f"cannot run ssh for the Docker engine at {self.endpoint.describe()}: "
                                        f"{e.strerror or e}") from e
            finally:
                theirs.close()
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await loop.create_connection(lambda: protocol, sock=ours)
        except BaseException:
            ours.close()
            stderr.close()
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
            raise
        return reader, SshStream(transport, protocol, reader, loop, proc, stderr, self.endpoint)

    def master_pid(self) -> int | None:
        """The pid of this client's master, if one runs (``ssh -O check``)."""
        if self._dir is None or not os.path.isdir(self._dir):
            return None
        p = subprocess.run(self.argv("-O", "check"), capture_output=True, text=True, timeout=CONNECT_TIMEOUT,
                           stdin=subprocess.DEVNULL, check=False)
        found = re.search(r"pid=(\d+)", p.stderr + p.stdout)
        return int(found.group(1)) if p.returncode == 0 and found else None

    def close(self) -> None:
        """End the master now (its sessions end with it) and remove the control directory.

        Blocking and short (a local socket to the master): atexit calls it too. Connections made
        afterwards work, with a new master.
        """
        if self._dir is None:
            return
        pid = self.master_pid()
        if pid is not None:
            subprocess.run(self.argv("-O", "exit"), capture_output=True, timeout=CONNECT_TIMEOUT,
                           stdin=subprocess.DEVNULL, check=False)
            _wait_gone(pid)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None


def _wait_gone(pid: int) -> None:
    """Wait (bounded) for a process that is not our child, the master, to end: its pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return
    try:
        import select

        select.select([fd], [], [], _STOP_TIMEOUT)
    finally:
        os.close(fd)


def _close_all() -> None:
    for dialer in list(_live):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            dialer.close()


# Registered at import, before any exit hook that removes sandboxes (those need the engine): atexit runs
# in reverse order, so the masters end after the last cleanup call.
atexit.register(_close_all)
