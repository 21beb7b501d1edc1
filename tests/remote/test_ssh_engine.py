"""ssh:// engines: the remote test engine behind an sshd on loopback (test -> ssh -> sshd -> docker CLI
``system dial-stdio`` -> engine over TLS), reached by kernelexec as the docker CLI reaches it.

The always-on part of the ssh row of the engine matrix: the Engine API client (calls, archives, the attach
stream, concurrency, cancellation) with one ssh master and no ssh process left; a session with every default
in a child process; a context made by the docker CLI; doctor, ps, gc (after a SIGKILLed owner) and audit;
the failures (wrong key, unknown host key, no docker over there). The whole core suites over ssh run in the
opt-in matrix (tests/remote/test_suites.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from kernelexec._loop import run_blocking
from kernelexec.backend.docker.api import DockerAPI, close_stream
from kernelexec.backend.docker.endpoint import resolve_endpoint
from kernelexec.errors import DockerUnavailable

from . import engine as remote
from .sshd import Sshd, ssh_processes
from .test_remote_engine import config, read_stdout

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def child_env(front: Sshd, tmp: Path, **extra: str) -> dict[str, str]:
    """A kernelexec process on the ssh engine; its ssh control directories land in ``tmp`` (TMPDIR), so its
    ssh processes can be found by that marker."""
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "KERNELEXEC_SSH"))}
    return {**env, **front.env, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT), **extra}


def nothing_on(engine: remote.RemoteEngine) -> None:
    api = engine.api()
    assert run_blocking(api.call("GET", "/containers/json", params={"all": "true"}, what="list")) == []
    assert (run_blocking(api.call("GET", "/volumes", what="volumes")).get("Volumes") or []) == []


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (bounded) for processes that are not our children (ssh masters) to end; the ones still there."""
    import select

    left = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], timeout)[0]:
                left.append(pid)
        finally:
            os.close(fd)
    return left


def test_engine_api_over_ssh_shares_one_master_and_leaves_no_ssh(ssh_front, remote_engine, kernel_image, tmp_path):
    ep = resolve_endpoint(ssh_front.env, docker_config_dir=tmp_path)
    assert ep.scheme == "ssh" and ep.user == "root" and ep.port == ssh_front.port and not ep.is_local
    docker = DockerAPI(ep)
    assert docker._ssh is not None
    control = docker._ssh.control_dir
    assert os.stat(control).st_mode & 0o777 == 0o700
    sent = b"".join(b"line %d %s\n" % (i, os.urandom(40).hex().encode()) for i in range(1500))  # ~130 KB

    async def scenario() -> tuple[list[str], bytes, bytes, list[int]]:
        ids = await asyncio.gather(*(docker.call("GET", "/info", what="info") for _ in range(6)))
        body = config(kernel_image, ["cat"])
        body.update(OpenStdin=True, StdinOnce=False, Tty=False, AttachStdin=True, AttachStdout=True)
        cid = await docker.create_container(f"kx-test-{uuid.uuid4().hex[:8]}", body)
        try:
            reader, writer = await docker.attach(cid, stdin=True)
            try:
                await docker.start(cid)
                received = bytearray()
                reading = asyncio.ensure_future(read_stdout(reader, received, len(sent)))
                for i in range(0, len(sent), 16384):
                    writer.write(sent[i:i + 16384])
                    await writer.drain()
                # other calls ride the same master while the attach stream is open
                payload = os.urandom(200_000)
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    info = tarfile.TarInfo("up.bin")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                await docker.put_archive(cid, "/tmp", buf.getvalue())
                with tarfile.open(fileobj=io.BytesIO(await docker.get_archive(cid, "/tmp/up.bin", 1 << 20))) as tar:
                    member = tar.extractfile("up.bin")
                    assert member is not None
                    back = member.read()
                await asyncio.wait_for(reading, 60)
                masters = ssh_processes(control)
                # a call cancelled while the engine holds it (wait on a running container): its ssh is reaped
                waiting = asyncio.ensure_future(docker.wait(cid))
                await asyncio.sleep(0.5)
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
            finally:
                await close_stream(writer)
        finally:
            await docker.remove_container(cid)
        return [i["ID"] for i in ids], bytes(received), back == payload, masters

    ids, received, archive_ok, during = run_blocking(scenario())
    assert set(ids) == {remote.info(remote_engine)["ID"]}
    assert received == sent and archive_ok
    master = docker._ssh.master_pid()
    assert master is not None and master in during
    # every per-connection ssh was reaped: only the master remains
    assert ssh_processes(control) == [master]
    docker.close()
    assert wait_gone([master], 30) == []
    assert ssh_processes(control) == [] and not os.path.exists(control)
    # usable after close: a new master, ended again
    assert run_blocking(docker.version())["ApiVersion"]
    docker.close()
    nothing_on(remote_engine)


SESSION = textwrap.dedent("""
    import io, json, sys
    from kernelexec import Policy, Session
    from kernelexec.backend import choose_transport
    from kernelexec.errors import ExecutionTimeout
    from PIL import Image

    out = {"transport": choose_transport(Policy(image=sys.argv[1]))}
    with Session(Policy(image=sys.argv[1])) as s:
        s.execute("kept = 41")
        out["state"] = s.execute("kept + 1").text
        r = s.execute("import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.show()")
        out["png"] = [Image.open(io.BytesIO(i)).format for i in r.images]
        try:
            s.execute("import time; print('started'); time.sleep(60); finished = True", timeout=2)
        except ExecutionTimeout as e:
            out["timeout"] = [e.state_lost, "started" in e.partial.stdout]
        out["after_timeout"] = [s.execute("'finished' in dir()").text, s.execute("kept").text]
        data = bytes(range(256)) * 4096
        out["upload"] = s.upload(data, "d/blob.bin")
        out["download"] = s.download("d/blob.bin") == data
        first = s.container_id
        s.restart()
        out["restart"] = [s.container_id != first, s.execute("'kept' in dir()").text]
    print(json.dumps(out))
""")


def test_a_session_with_every_default_works_over_ssh(ssh_front, remote_engine, kernel_image, tmp_path):
    env = child_env(ssh_front, tmp_path / "tmp")
    p = subprocess.run([sys.executable, "-c", SESSION, kernel_image], capture_output=True, text=True, timeout=600,
                       env=env, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["transport"][0] == "attach" and "ssh://" in out["transport"][1]
    assert out["state"] == "42" and out["png"] == ["PNG"]
    assert out["timeout"] == [False, True] and out["after_timeout"] == ["False", "41"]
    assert out["upload"] == "/work/d/blob.bin" and out["download"] is True
    assert out["restart"] == [True, "False"]
    nothing_on(remote_engine)
    # the child's ssh processes, its master included (atexit), ended with it
    assert ssh_processes(str(tmp_path / "tmp")) == []


OWNER = textwrap.dedent("""
    import sys, time
    from kernelexec import Session, Policy
    s = Session(Policy(image=sys.argv[1], orphan_timeout=3))
    print(s.container_id, flush=True)
    time.sleep(600)
""")


CLI = "import sys; from kernelexec.tools.cli import main; sys.exit(main())"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=300, env=env,
                          check=False)


def test_doctor_ps_gc_audit_over_ssh_and_gc_after_a_sigkilled_owner(ssh_front, remote_engine, kernel_image,
                                                                    tmp_path):
    env = child_env(ssh_front, tmp_path / "tmp", KERNELEXEC_IMAGE=kernel_image)
    owner = subprocess.Popen([sys.executable, "-c", OWNER, kernel_image], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert owner.stdout is not None
        cid = owner.stdout.readline().strip()
        assert cid, "the owner did not start a session"
        ps = cli(env, "ps")
        assert ps.returncode == 0 and cid[:12] in ps.stdout, ps.stdout + ps.stderr
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    # no host connection any more: the kernel's watchdog ends it within the orphan timeout
    assert run_blocking(asyncio.wait_for(remote_engine.api().wait(cid), 60))["StatusCode"] == 0
    gc = cli(env, "gc")
    assert gc.returncode == 0 and cid[:12] in gc.stdout, gc.stdout + gc.stderr
    nothing_on(remote_engine)

    doctor = cli(env, "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"ssh://root@127.0.0.1:{ssh_front.port}" in doctor.stdout and "attach: the engine is remote" in \
        doctor.stdout and "all good" in doctor.stdout, doctor.stdout
    audit = cli(env, "audit", "--json")
    findings = json.loads(audit.stdout)
    connection = [f for f in findings if f["check"] == "engine connection"]
    assert len(connection) == 1 and connection[0]["severity"] == "info", connection
    assert "over ssh" in connection[0]["detail"] and f":{ssh_front.port}" in connection[0]["detail"]
    nothing_on(remote_engine)
    # the SIGKILLed owner's ssh processes end by themselves (its connections closed; the master after its
    # ControlPersist); the CLI's ended with each command
    assert wait_gone(ssh_processes(str(tmp_path / "tmp")), 120) == []


@pytest.mark.docker  # the relay forwards to the local engine's socket
def test_audit_flags_a_tcp_endpoint_without_tls_as_high(tmp_path):
    """The local engine behind a plain TCP port on loopback (a relay this test runs): what ``-H tcp://`` without
    --tlsverify gives anyone on the path."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    threads: list[threading.Thread] = []
    conns: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            engine = socket.socket(socket.AF_UNIX)
            conns.extend([client, engine])
            try:
                engine.connect("/var/run/docker.sock")
            except OSError:
                client.close()  # the CLI sees the connection end, as with a dead engine
                continue
            for a, b in ((client, engine), (engine, client)):
                t = threading.Thread(target=pump, args=(a, b))
                t.start()
                threads.append(t)

    server = threading.Thread(target=serve)
    server.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        p = cli({**env, "DOCKER_HOST": f"tcp://127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}, "audit", "--json")
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        server.join()
        for t in threads:
            t.join(30)
        for c in conns:
            c.close()
    findings = json.loads(p.stdout)
    connection = [f for f in findings if f["check"] == "engine connection"]
    assert p.returncode != 0
    assert len(connection) == 1 and connection[0]["severity"] == "high", connection
    assert "no TLS" in connection[0]["detail"]


def test_a_docker_context_with_an_ssh_endpoint_made_by_the_cli_is_honoured(ssh_front, remote_engine,
                                                                            kernel_image, tmp_path):
    cfg = tmp_path / "docker-config"
    # the docker CLI runs `ssh` from PATH: the wrapper gives it the test's key and known hosts
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "KERNELEXEC_SSH"))},
           "PATH": ssh_front.wrapper_path}

    def docker_cli(*args: str) -> str:
        p = subprocess.run(["docker", "--config", str(cfg), *args], capture_output=True, text=True, timeout=120,
                           check=False, env=env)
        assert p.returncode == 0, p.stderr
        return p.stdout

    docker_cli("context", "create", "kx-ssh", "--docker", f"host={ssh_front.host}")
    docker_cli("context", "use", "kx-ssh")
    remote_id = remote.info(remote_engine)["ID"]
    assert docker_cli("info", "--format", "{{.ID}}").strip() == remote_id  # the CLI agrees

    ep = resolve_endpoint({"KERNELEXEC_SSH_OPTS": f"-F {ssh_front.config}"}, docker_config_dir=cfg)
    assert ep.source == "context kx-ssh" and ep.scheme == "ssh" and not ep.tls
    assert (ep.user, ep.host, ep.port) == ("root", "127.0.0.1", ssh_front.port)
    docker = DockerAPI(ep)
    try:
        assert run_blocking(docker.call("GET", "/info", what="info"))["ID"] == remote_id
    finally:
        docker.close()
    # a session through the context alone (DOCKER_CONFIG, no DOCKER_HOST)
    code = ("import sys\nfrom kernelexec import Policy, Session\n"
            "with Session(Policy(image=sys.argv[1])) as s:\n    print(s.execute('6 * 7').text)\n")
    child = child_env(ssh_front, tmp_path / "tmp", DOCKER_CONFIG=str(cfg))
    del child["DOCKER_HOST"]
    p = subprocess.run([sys.executable, "-c", code, kernel_image], capture_output=True, text=True, timeout=300,
                       env=child, check=False)
    assert p.returncode == 0 and p.stdout.strip() == "42", p.stderr[-3000:]
    nothing_on(remote_engine)
    assert ssh_processes(str(tmp_path / "tmp")) == []


@pytest.mark.parametrize("case", ["wrong key", "unknown host key", "no docker over there"])
def test_a_failing_ssh_is_one_clear_error(ssh_front, tmp_path, case):
    env: dict[str, Any] = dict(ssh_front.env)
    if case == "wrong key":
        env["KERNELEXEC_SSH_OPTS"] = f"-F {ssh_front.client_config('stranger_config', key='stranger')}"
        said, status = "Permission denied (publickey)", 255
    elif case == "unknown host key":
        env["KERNELEXEC_SSH_OPTS"] = f"-F {ssh_front.client_config('no_hosts', known_hosts='empty_known_hosts')}"
        said, status = "Host key verification failed", 255
    else:
        env["DOCKER_HOST"] = f"ssh://root@127.0.0.1:{ssh_front.no_docker_port}"
        said, status = "kx-no-such-docker: command not found", 127
    docker = DockerAPI(resolve_endpoint(env, docker_config_dir=tmp_path))
    assert docker._ssh is not None
    control = docker._ssh.control_dir
    try:
        with pytest.raises(DockerUnavailable) as failed:
            run_blocking(docker.version())
    finally:
        docker.close()
    message = str(failed.value)
    assert said in message and f"exit status {status}" in message, message
    assert ssh_processes(control) == []
