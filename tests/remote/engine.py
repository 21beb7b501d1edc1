"""A second Docker engine that shares no filesystem with the tests, reached only over TCP with TLS.

It stands for an engine on another machine (or in Docker Desktop's VM): dockerd runs in a mount namespace
of its own in which /tmp, /root, /home, /var/tmp, /dev/shm, the project's directories and the local engine's
state are empty private tmpfs, so no path the test process uses means the same thing to it. It listens with
``--tlsverify`` (client certificates from a CA the tests make) on the loopback of a network namespace of its
own, reached through a relay on this host's loopback (see relay.py): so it touches no host networking at
all (dockerd with ``--bridge=none`` deletes any ``docker0`` it can see: the local engine's, in the host's
namespace). It runs its own containerd under its own state directory; containers there use
``network_mode=none``.

The daemon is stopped by its pid, its containerd too should it outlive dockerd, the relay by its pid, and
the state removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kernelexec._loop import run_blocking
from kernelexec.backend.docker.api import DockerAPI
from kernelexec.backend.docker.endpoint import Endpoint, resolve_endpoint
from kernelexec.errors import DockerUnavailable, SandboxError

from .certs import Authority, Pair, cert_dir, make_authority

REPO = Path(__file__).resolve().parents[2]
STATE_ROOT = Path("/var/lib/kernelexec-test-engines")  # not under any directory hidden from the engine
ADDRESS = "127.0.0.1"
#: What the engine must not share with the test process: private, empty tmpfs in its mount namespace.
HIDDEN = ("/tmp", "/root", "/home", "/var/tmp", "/dev/shm",
          # the local engine's state and config, and a system containerd it could otherwise join
          "/var/lib/docker", "/run/docker", "/etc/docker", "/run/containerd")
INNER_PORT = 2376  # in the engine's own network namespace
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


def project_dirs() -> list[str]:
    """The checkout and the virtualenv the tests run from (a system Python's prefix is left alone)."""
    dirs = {str(REPO)}
    if sys.prefix != sys.base_prefix:
        dirs.add(str(Path(sys.prefix).resolve()))
    return sorted(dirs)


# Runs as `unshare --mount --net --propagation private sh -c SCRIPT sh STATE DIR...`: hide, then become dockerd.
_NAMESPACE_SCRIPT = r"""
set -eu
state="$1"; shift
ip link set lo up
for dir in "$@"; do
  if [ -d "$dir" ]; then mount -t tmpfs -o mode=1777,size=64m kernelexec-private "$dir"; fi
done
exec dockerd --config-file "$state/daemon.json" \
  --data-root "$state/data" --exec-root "$state/exec" --pidfile "$state/dockerd.pid" \
  -H "tcp://127.0.0.1:$KX_PORT" \
  --tlsverify --tlscacert "$state/certs/ca.pem" --tlscert "$state/certs/server.pem" \
  --tlskey "$state/certs/server-key.pem" \
  --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false \
  --userland-proxy=false --log-level=warn
"""


@dataclass
class RemoteEngine:
    """A running test engine: how to reach it, as environment variables and as an :class:`Endpoint`."""

    state: Path
    port: int
    ca: Authority
    client: Pair
    process: subprocess.Popen[bytes]
    relay: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def host(self) -> str:
        return f"tcp://{ADDRESS}:{self.port}"

    @property
    def cert_path(self) -> Path:
        """DOCKER_CERT_PATH for a client the engine accepts."""
        return self.state / "client"

    @property
    def endpoint(self) -> Endpoint:
        return resolve_endpoint(self.env, docker_config_dir=self.state / "no-docker-config")

    def api(self) -> DockerAPI:
        return DockerAPI(self.endpoint)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.state / "dockerd.log").read_text(errors="replace")[-n:]
        except OSError as e:
            return f"(no log: {e})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ADDRESS, 0))
        return int(s.getsockname()[1])


def start(kernel_image: str | None = None) -> RemoteEngine:
    """Start the engine, wait until it answers over TLS, and copy ``kernel_image`` onto it."""
    STATE_ROOT.mkdir(mode=0o700, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="e-", dir=STATE_ROOT))
    for d in ("data", "exec", "no-docker-config"):
        (state / d).mkdir()
    (state / "daemon.json").write_text("{}\n")  # not the local engine's /etc/docker/daemon.json
    ca = make_authority(state / "ca")
    server = ca.issue(state / "ca", "server", server_ips=(ADDRESS,))
    client = ca.issue(state / "ca", "client")
    certs = state / "certs"
    certs.mkdir()
    shutil.copy(ca.cert_path, certs / "ca.pem")
    shutil.copy(server.cert, certs / "server.pem")
    shutil.copy(server.key, certs / "server-key.pem")
    cert_dir(state / "client", ca.cert_path, client)
    port = free_port()
    with open(state / "dockerd.log", "wb") as log:
        process = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", _NAMESPACE_SCRIPT, "sh",
             str(state),
             *HIDDEN, *project_dirs()],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/",
            env={**{k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")},
                 "KX_PORT": str(INNER_PORT)},
            start_new_session=True)
    engine = RemoteEngine(state, port, ca, client, process, env={
        "DOCKER_HOST": f"tcp://{ADDRESS}:{port}", "DOCKER_TLS_VERIFY": "1",
        "DOCKER_CERT_PATH": str(state / "client")})
    try:
        engine.relay = _start_relay(engine)
        _wait_ready(engine)
        if kernel_image:
            copy_image(kernel_image, engine)
    except BaseException:
        stop(engine)
        raise
    return engine


def _start_relay(engine: RemoteEngine) -> subprocess.Popen[bytes]:
    own = os.readlink("/proc/self/ns/net")
    netns = f"/proc/{engine.pid}/ns/net"
    deadline = time.monotonic() + START_TIMEOUT
    while os.readlink(netns) == own:  # unshare has not switched yet
        if engine.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the test engine did not get its namespaces:\n{engine.log_tail()}")
        time.sleep(0.05)
    relay = subprocess.Popen([sys.executable, str(Path(__file__).with_name("relay.py")), str(engine.port), netns,
                              str(INNER_PORT)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert relay.stdout is not None
    if relay.stdout.readline().strip() != b"ready":
        relay.wait()
        raise RuntimeError(f"the relay to the test engine did not start (exit {relay.returncode})")
    relay.stdout.close()
    return relay


def _wait_ready(engine: RemoteEngine) -> None:
    api = engine.api()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if engine.process.poll() is not None:
            raise RuntimeError(f"the test engine exited with {engine.process.returncode}:\n{engine.log_tail()}")
        try:
            run_blocking(api.version())
            return
        except SandboxError:  # not listening yet: the relay drops the connection
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test engine did not answer within {START_TIMEOUT:.0f} s:\n"
                                   f"{engine.log_tail()}") from None
            time.sleep(0.2)


def copy_image(tag: str, engine: RemoteEngine) -> None:
    """``docker save`` on the local engine streamed into ``docker load`` on the test engine (SDK clients
    configured from the two endpoints)."""
    from ..sdk import docker_client

    local = docker_client()
    remote = docker_client(engine.endpoint)
    try:
        for line in remote.api.load_image(local.images.get(tag).save(chunk_size=1 << 20, named=tag)):
            if line.get("error"):
                raise RuntimeError(f"loading {tag} into the test engine failed: {line['error']}")
        remote.images.get(tag)  # raises if the load did not produce it
    finally:
        remote.close()


def stop(engine: RemoteEngine) -> list[str]:
    """Remove what is left on the engine, stop dockerd (and its containerd) by pid, remove the state.

    Returns what had been left on the engine (the caller decides whether that fails a test).
    """
    left: list[str] = []
    if engine.process.poll() is None:
        with contextlib.suppress(DockerUnavailable):
            left = run_blocking(_remove_everything(engine.api()))
        engine.process.send_signal(signal.SIGTERM)
        try:
            engine.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            engine.process.kill()
            engine.process.wait()
    if engine.relay is not None and engine.relay.poll() is None:
        engine.relay.terminate()
        engine.relay.wait()
    for pid in _processes_using(engine.state):  # a containerd or shim that outlived dockerd: ours, by pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(engine.state, ignore_errors=True)
    with contextlib.suppress(OSError):
        STATE_ROOT.rmdir()  # only when no other engine's state is there
    return left


async def _remove_everything(api: DockerAPI) -> list[str]:
    left = []
    for c in await api.call("GET", "/containers/json", params={"all": "true"}, what="list containers"):
        left.append(f"container {c['Id'][:12]}")
        await api.remove_container(c["Id"])
    volumes = (await api.call("GET", "/volumes", what="list volumes")).get("Volumes") or []
    for v in volumes:
        left.append(f"volume {v['Name']}")
        await api.remove_volume(v["Name"])
    return left


def _processes_using(state: Path) -> list[int]:
    """Processes whose command line names the engine's state directory (its containerd and shims)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if str(state).encode() in (proc / "cmdline").read_bytes():
                out.append(int(proc.name))
    return out


def mount_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def network_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


@contextlib.contextmanager
def running(kernel_image: str | None = None) -> Iterator[RemoteEngine]:
    engine = start(kernel_image)
    try:
        yield engine
    finally:
        stop(engine)


def info(engine: RemoteEngine) -> dict[str, object]:
    return dict(run_blocking(engine.api().call("GET", "/info", what="engine info")))


__all__ = ["RemoteEngine", "copy_image", "info", "mount_namespace", "network_namespace", "running", "start",
           "stop"]
