"""Podman engines for the tests: Debian's podman serving its Docker-compatible API, started and stopped here.

* rootful: ``podman system service --time=0 unix:///run/kxtest-podman-<pid>.sock`` as root;
* rootless: the same as a user made for the run (``kxpodman<pid>``, subordinate ids from useradd), with its
  own ``XDG_RUNTIME_DIR`` and API socket; no login session exists here (no loginctl), so the service runs
  under ``setpriv`` with the user's environment, and overlay storage (fuse-overlayfs or the kernel's).

Each service is stopped by its pid; the rootless user's pause process (it holds the user namespace,
its pid in ``$XDG_RUNTIME_DIR/libpod/tmp/pause.pid``) too; the kernel image copied into the rootful store
is removed unless it was there before; the rootless user goes with its home and storage.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kernelexec._loop import run_blocking
from kernelexec.backend.docker.api import DockerAPI
from kernelexec.backend.docker.endpoint import Endpoint, resolve_endpoint
from kernelexec.backend.docker.sandbox import LABEL
from kernelexec.errors import SandboxError

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def available() -> bool:
    return shutil.which("podman") is not None and shutil.which("setpriv") is not None


@dataclass
class PodmanEngine:
    """A running ``podman system service``: ``.env`` has the DOCKER_HOST that reaches it."""

    name: str
    socket: Path
    process: subprocess.Popen[bytes]
    log: Path
    user: str | None = None  # rootless: the user it runs as
    runtime_dir: Path | None = None
    loaded_image: str | None = None  # copied in by the harness, removed at stop (rootful store)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def rootless(self) -> bool:
        return self.user is not None

    @property
    def endpoint(self) -> Endpoint:
        return resolve_endpoint(self.env, docker_config_dir="/nonexistent")

    def api(self) -> DockerAPI:
        return DockerAPI(self.endpoint)

    def user_env(self) -> dict[str, str]:
        """The environment of a podman command as the engine's user (rootless) or root."""
        if self.user is None:
            return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
        pw = pwd.getpwnam(self.user)
        return {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "USER": self.user, "LOGNAME": self.user,
                "XDG_RUNTIME_DIR": str(self.runtime_dir)}

    def podman(self, *args: str) -> list[str]:
        """A podman command line run as the engine's user."""
        if self.user is None:
            return ["podman", *args]
        return ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups", "podman", *args]

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError as e:
            return f"(no log: {e})"

    def subordinate_range(self) -> tuple[int, int]:
        """(first, count) of the rootless user's subordinate uids."""
        assert self.user is not None
        for line in Path("/etc/subuid").read_text().splitlines():
            name, first, count = line.split(":")
            if name == self.user:
                return int(first), int(count)
        raise AssertionError(f"{self.user} has no subordinate uids")


def start_rootful() -> PodmanEngine:
    sock = Path(f"/run/kxtest-podman-{os.getpid()}.sock")
    log = Path(f"/run/kxtest-podman-{os.getpid()}.log")
    sock.unlink(missing_ok=True)  # left by an earlier run (same pid) killed before its cleanup
    with open(log, "wb") as out:
        process = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd="/",
                                   start_new_session=True)
    engine = PodmanEngine("podman-rootful", sock, process, log, env={"DOCKER_HOST": f"unix://{sock}"})
    try:
        _wait_ready(engine)
    except BaseException:
        stop(engine)
        raise
    return engine


def start_rootless() -> PodmanEngine:
    user = f"kxpodman{os.getpid()}"
    with contextlib.suppress(KeyError):  # made by an earlier run (same pid) killed before its cleanup
        stale = pwd.getpwnam(user)
        for left in (Path(f"/run/kxpodman-{stale.pw_uid}"), *Path("/run").glob(f"kxpodman-{stale.pw_uid}-*")):
            shutil.rmtree(left, ignore_errors=True)
        _remove_user(user, None)
    # useradd gives the user subordinate uid and gid ranges (SUB_UID_COUNT of login.defs)
    subprocess.run(["useradd", "--create-home", "--shell", "/usr/sbin/nologin", user], check=True,
                   capture_output=True)
    pw = pwd.getpwnam(user)
    # a directory of its own (0700) whatever an earlier run, killed before its cleanup, left in /run
    runtime_dir = Path(tempfile.mkdtemp(prefix=f"kxpodman-{pw.pw_uid}-", dir="/run"))
    engine: PodmanEngine | None = None
    try:
        if not any(line.startswith(f"{user}:") for line in Path("/etc/subuid").read_text().splitlines()):
            subprocess.run(["usermod", "--add-subuids", "300000-365535", "--add-subgids", "300000-365535", user],
                           check=True, capture_output=True)
        os.chown(runtime_dir, pw.pw_uid, pw.pw_gid)
        config = Path(pw.pw_dir) / ".config" / "containers"
        config.mkdir(parents=True)
        (config / "storage.conf").write_text('[storage]\ndriver = "overlay"\n')
        for d in (config.parent, config, config / "storage.conf"):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        sock = runtime_dir / "podman.sock"
        log = runtime_dir / "service.log"
        engine = PodmanEngine("podman-rootless", sock, subprocess.Popen(["true"]), log, user=user,
                              runtime_dir=runtime_dir, env={"DOCKER_HOST": f"unix://{sock}"})
        engine.process.wait()
        with open(log, "wb") as out:
            engine.process = subprocess.Popen(engine.podman("system", "service", "--time=0", f"unix://{sock}"),
                                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                              cwd="/", env=engine.user_env(), start_new_session=True)
        _wait_ready(engine)
    except BaseException:
        if engine is not None:
            stop(engine)
        else:
            _remove_user(user, runtime_dir)
        raise
    return engine


def _wait_ready(engine: PodmanEngine) -> None:
    api = engine.api()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if engine.process.poll() is not None:
            raise RuntimeError(f"{engine.name} exited with {engine.process.returncode}:\n{engine.log_tail()}")
        try:
            run_blocking(api.version())
            return
        except SandboxError:  # the socket is not there yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"{engine.name} did not answer within {START_TIMEOUT:.0f} s:\n"
                                   f"{engine.log_tail()}") from None
            time.sleep(0.2)


def has_image(engine: PodmanEngine, tag: str) -> bool:
    return run_blocking(engine.api().image_exists(tag))


def copy_image(tag: str, engine: PodmanEngine) -> None:
    """``docker save`` from the local Docker engine into ``podman load`` as the engine's user."""
    if has_image(engine, tag):
        return
    save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE, env={**os.environ, "DOCKER_HOST": ""})
    try:
        load = subprocess.run(engine.podman("load", "-q"), stdin=save.stdout, capture_output=True,
                              env=engine.user_env(), cwd="/", check=False)
    finally:
        assert save.stdout is not None
        save.stdout.close()
        save.wait()
    if save.returncode or load.returncode:
        raise RuntimeError(f"copying {tag} into {engine.name} failed: docker save {save.returncode}, podman load "
                           f"{load.returncode}: {load.stderr.decode(errors='replace')}")
    if not engine.rootless:
        engine.loaded_image = tag
    assert has_image(engine, tag)


def stop(engine: PodmanEngine) -> list[str]:
    """Remove what is left on the engine, stop the service by pid, remove the image copy (rootful) or the user
    (rootless). Returns what had been left (the caller decides whether that fails a test)."""
    left: list[str] = []
    if engine.process.poll() is None:
        with contextlib.suppress(SandboxError):
            left = run_blocking(_remove_everything(engine.api()))
        if engine.loaded_image:
            rmi = subprocess.run(engine.podman("rmi", "-f", engine.loaded_image), capture_output=True, check=False)
            if rmi.returncode:  # reported as left: the rootful store is the host's
                left.append(f"image {engine.loaded_image} ({rmi.stderr.decode(errors='replace').strip()})")
        engine.process.send_signal(signal.SIGTERM)
        try:
            engine.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            engine.process.kill()
            engine.process.wait()
    if engine.user is None:
        engine.socket.unlink(missing_ok=True)
        engine.log.unlink(missing_ok=True)
    else:
        assert engine.runtime_dir is not None
        # storage written by the user's namespace (subordinate owners): reset as the user, then the user goes
        subprocess.run(engine.podman("system", "reset", "--force"), env=engine.user_env(), cwd="/",
                       capture_output=True, check=False)
        _remove_user(engine.user, engine.runtime_dir)
    return left


def _remove_user(user: str, runtime_dir: Path | None) -> None:
    # rootless podman re-executes itself inside the user's namespace (the service we started may live on
    # in that child) and leaves a pause process holding the namespace: every process of this user, made
    # for the run, was started by this harness; each is killed by its pid
    uid = pwd.getpwnam(user).pw_uid
    for pid in _processes_of(uid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _running(uid) and time.monotonic() < deadline:  # userdel refuses a user with live processes
        time.sleep(0.1)
    if runtime_dir is not None:
        shutil.rmtree(runtime_dir, ignore_errors=True)
    subprocess.run(["userdel", "--remove", user], capture_output=True, check=False)
    for table in ("/etc/subuid", "/etc/subgid"):  # older userdel leaves the subordinate ranges
        path = Path(table)
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.startswith(f"{user}:")]
        if kept != lines:
            path.write_text("".join(kept))


def _processes_of(uid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if proc.stat().st_uid == uid:
                    out.append(int(proc.name))
    return out


def _running(uid: int) -> bool:
    """A process of ``uid`` that is not a zombie (a zombie waits for its parent, not for us)."""
    for pid in _processes_of(uid):
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                return True
    return False


async def _remove_everything(api: DockerAPI) -> list[str]:
    """kernelexec's containers and volumes (the rootful store is the host's: nothing else is touched)."""
    left = []
    for c in await api.containers(LABEL):
        left.append(f"container {c['Id'][:12]}")
        await api.remove_container(c["Id"])
    for v in await api.volumes(LABEL):
        left.append(f"volume {v['Name']}")
        await api.remove_volume(v["Name"])
    return left


__all__ = ["PodmanEngine", "available", "copy_image", "has_image", "start_rootful", "start_rootless", "stop"]
