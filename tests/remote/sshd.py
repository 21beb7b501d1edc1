"""An sshd on this host's loopback in front of the remote test engine: the far side of an ssh:// engine.

Its sessions run the docker CLI (``docker system dial-stdio``, as ``DOCKER_HOST=ssh://`` clients ask) with the
remote engine's ``DOCKER_HOST``/TLS settings (sshd ``SetEnv``), so the chain a test drives is
test -> ssh -> this sshd -> docker CLI -> the remote engine over TLS. Keys are made here: a host key, a client
key in ``authorized_keys`` (root, key only), and a stranger's key. The client side is an ssh config file
(``-F``): the key, a known_hosts with this sshd's key, no agent, no other file read. It is given to
kernelexec as ``KERNELEXEC_SSH_OPTS=-F FILE``, and to the docker CLI and docker-py (which run ``ssh`` from
PATH and take no options) by a ``bin/ssh`` that adds ``-F FILE``: what a user's ``~/.ssh/config`` does.

A second port, for the "no docker over there" case, runs a command that does not exist instead. sshd runs
as ``sshd -D`` (no daemonising), is stopped by its pid, and its directory is removed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .engine import ADDRESS, RemoteEngine, free_port

SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 30.0


@dataclass
class Sshd:
    dir: Path
    port: int
    no_docker_port: int
    process: subprocess.Popen[bytes]
    config: Path  # the client's ssh config (key, known hosts)

    @property
    def host(self) -> str:
        return f"ssh://root@{ADDRESS}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a kernelexec process needs to reach the engine through this sshd."""
        return {"DOCKER_HOST": self.host, "KERNELEXEC_SSH_OPTS": f"-F {self.config}"}

    @property
    def wrapper_path(self) -> str:
        """PATH with the ``ssh`` that reads the test config first (for the docker CLI and docker-py)."""
        return f"{self.dir / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"

    def client_config(self, name: str, *, key: str = "client", known_hosts: str = "known_hosts") -> Path:
        """Another client config (another key, other known hosts) for the failure cases."""
        path = self.dir / name
        path.write_text(_client_config(self.dir, key, known_hosts))
        return path

    def log(self) -> str:
        try:
            return (self.dir / "sshd.log").read_text(errors="replace")[-4000:]
        except OSError as e:
            return f"(no log: {e})"


def _keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL, timeout=30)
    return path.with_suffix(".pub").read_text().strip()


def _client_config(d: Path, key: str, known_hosts: str) -> str:
    return (f"Host *\n  IdentityFile {d / key}\n  IdentitiesOnly yes\n  IdentityAgent none\n"
            f"  UserKnownHostsFile {d / known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n  UpdateHostKeys no\n  LogLevel ERROR\n")


def start(engine: RemoteEngine, d: Path) -> Sshd:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    host_pub = _keygen(d / "host", "kx-test-host")
    (d / "authorized_keys").write_text(_keygen(d / "client", "kx-test-client") + "\n")
    _keygen(d / "stranger", "kx-test-stranger")
    (d / "far-docker-config").mkdir()  # the far side's docker CLI reads no context of this host's root
    port, no_docker_port = free_port(), free_port()
    (d / "known_hosts").write_text(f"[{ADDRESS}]:{port} {host_pub}\n[{ADDRESS}]:{no_docker_port} {host_pub}\n")
    (d / "empty_known_hosts").write_text("")
    config = d / "ssh_config"
    config.write_text(_client_config(d, "client", "known_hosts"))
    (d / "bin").mkdir()
    wrapper = d / "bin" / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {config} "$@"\n')
    wrapper.chmod(0o755)
    e = engine.env
    (d / "sshd_config").write_text(
        f"ListenAddress {ADDRESS}:{port}\nListenAddress {ADDRESS}:{no_docker_port}\n"
        f"HostKey {d / 'host'}\nPidFile none\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nAllowUsers root\nUsePAM no\nStrictModes no\nPermitTTY no\n"
        "AllowTcpForwarding no\nAllowStreamLocalForwarding no\nX11Forwarding no\nLogLevel VERBOSE\n"
        f"SetEnv DOCKER_HOST={e['DOCKER_HOST']} DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH={e['DOCKER_CERT_PATH']} "
        f"DOCKER_CONFIG={d / 'far-docker-config'}\n"
        f"Match LocalPort {no_docker_port}\n  ForceCommand kx-no-such-docker system dial-stdio\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    with open(d / "sshd.log", "wb") as log:
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sshd = Sshd(d, port, no_docker_port, process, config)
    try:
        _wait_listening(sshd)
    except BaseException:
        stop(sshd)
        raise
    return sshd


def _wait_listening(sshd: Sshd) -> None:
    import socket

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if sshd.process.poll() is not None:
            raise RuntimeError(f"sshd exited with {sshd.process.returncode}:\n{sshd.log()}")
        with socket.socket() as s:
            if s.connect_ex((ADDRESS, sshd.no_docker_port)) == 0:  # the last one it binds
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd did not listen within {START_TIMEOUT:.0f} s:\n{sshd.log()}")
        time.sleep(0.1)


def stop(sshd: Sshd) -> None:
    """sshd by its pid, and the per-connection sshd processes it forked (children of that pid): a client
    still connected would otherwise keep them (and their docker CLI) alive."""
    if sshd.process.poll() is None:
        for pid in _children(sshd.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        sshd.process.send_signal(signal.SIGTERM)
        try:
            sshd.process.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            sshd.process.kill()
            sshd.process.wait()


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(proc.name))
    return found


def ssh_processes(marker: str) -> list[int]:
    """Pids of ssh processes whose command line has ``marker``: a control directory of ours (masters name
    only that), or a port."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # a master renames itself "ssh: CONTROLPATH [mux]"
            cmdline = (proc / "cmdline").read_bytes()
            if (proc / "exe").resolve().name == "ssh" and marker.encode() in cmdline:
                out.append(int(proc.name))
    return out


@contextlib.contextmanager
def running(engine: RemoteEngine, d: Path) -> Iterator[Sshd]:
    sshd = start(engine, d)
    try:
        yield sshd
    finally:
        stop(sshd)
