"""Faults injected into real sessions: every call ends with a result or a typed
error (never a hang), nothing is left behind, and the caller knows whether
state survived."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kernelexec import AuditLog, AuditLogError, KernelDied, SandboxLost, Session
from kernelexec.backend.docker.sessions import gc

from .conftest import leftovers

ROOT = Path(__file__).resolve().parent.parent


def _later(delay: float, fn) -> threading.Timer:
    t = threading.Timer(delay, fn)
    t.start()
    return t


def test_docker_kill_mid_execution(session):
    session.execute("x = 1")
    t = _later(1.0, lambda: subprocess.run(["docker", "kill", session.container_id], capture_output=True))
    with pytest.raises(KernelDied) as info:
        session.execute("import time; time.sleep(30)", timeout=20)
    t.join()
    assert info.value.state_lost and "137" in info.value.reason
    with pytest.raises(KernelDied):  # remembered: raised again, not a hang on a dead socket
        session.execute("x")
    session.restart()
    assert session.execute("'x' in dir()").text == "False"


def test_docker_kill_while_idle(session):
    subprocess.run(["docker", "kill", session.container_id], check=True, capture_output=True)
    deadline = time.monotonic() + 10
    while session.alive and time.monotonic() < deadline:  # the client notices the socket closing
        time.sleep(0.05)
    with pytest.raises(KernelDied):
        session.execute("1")


def test_container_removed_by_someone_else(session):
    subprocess.run(["docker", "rm", "-f", session.container_id], check=True, capture_output=True)
    with pytest.raises(SandboxLost, match="removed by someone else"):
        session.execute("1", timeout=10)
    session.restart()
    assert session.execute("1 + 1").text == "2"


def test_container_stopped_by_someone_else_with_auto_restart(policy):
    with Session(policy, auto_restart=True) as s:
        s.execute("x = 1")
        t = _later(0.5, lambda: subprocess.run(["docker", "stop", "-t", "0", s.container_id], capture_output=True))
        with pytest.raises(KernelDied) as info:
            s.execute("import time; time.sleep(20)", timeout=15)
        t.join()
        assert info.value.restarted is True and info.value.state_lost is True
        assert "fresh kernel was started" in str(info.value)
        assert s.execute("'x' in dir(), 2 + 2").text == "(False, 4)"


@pytest.mark.ipc
def test_socket_directory_deleted_from_host_side(docker, policy):
    before = leftovers(docker)
    s = Session(policy)
    try:
        shutil.rmtree(s.socket_dir)
        # connections were pinned to verified inodes when the session started: they keep working
        assert s.execute("21 * 2").text == "42"
    finally:
        s.close()
    assert leftovers(docker) == before


def test_audit_log_on_a_full_disk_raises_with_the_result(docker, policy, tmp_path):
    before = leftovers(docker)
    with pytest.raises(AuditLogError, match="No space left"):
        Session(policy, audit_log="/dev/full")  # no audit trail, no session
    assert leftovers(docker) == before
    log = AuditLog(tmp_path / "audit.jsonl")
    with Session(policy, audit_log=log) as s:
        log.path = Path("/dev/full")  # the disk fills up while the session runs
        with pytest.raises(AuditLogError) as info:
            s.execute("6 * 7")
        assert "No space left" in str(info.value)
        assert info.value.execution.text == "42"  # what the code produced is not lost
        log.path = tmp_path / "audit.jsonl"
        assert s.execute("1 + 1").text == "2"


def test_output_file_on_a_full_disk_is_a_clear_error(kernel_image, tmp_path):
    nb = ROOT / "notebooks" / "quickstart.ipynb"
    proc = subprocess.run([sys.executable, "-m", "kernelexec", "--image", kernel_image, "run", str(nb), "-o",
                           "/dev/full"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "No space left" in proc.stderr
    assert "Traceback" not in proc.stderr


OWNER = textwrap.dedent("""
    import sys, time
    from kernelexec import Session, Policy
    s = Session(Policy(image=sys.argv[1], orphan_timeout=3))
    print(s.container_id, s.socket_dir or "-", flush=True)  # "-": the attach transport has none
    time.sleep(600)
""")


def test_owner_sigkilled_container_ends_itself_and_gc_cleans(docker, kernel_image):
    proc = subprocess.Popen([sys.executable, "-c", OWNER, kernel_image], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    cid, sockdir = proc.stdout.readline().split()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # no host connection any more: the kernel's watchdog ends it within the orphan timeout
    status = docker.api.wait(cid, timeout=30)
    assert status["StatusCode"] == 0
    report = gc()
    assert cid[:12] in report.containers
    if sockdir != "-":
        assert sockdir in report.socket_dirs
        assert not Path(sockdir).exists()
    assert docker.api.containers(all=True, filters={"label": f"kernelexec.owner_pid={proc.pid}"}) == []
    assert docker.api.volumes(filters={"label": f"kernelexec.owner_pid={proc.pid}"}).get("Volumes") in (None, [])


def test_next_start_cleans_what_a_dead_owner_left(docker, kernel_image):
    proc = subprocess.Popen([sys.executable, "-c", OWNER.replace("orphan_timeout=3", "orphan_timeout=600"),
                             kernel_image], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    cid, sockdir = proc.stdout.readline().split()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    starter = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        from kernelexec import Session, Policy
        with Session(Policy(image=sys.argv[1])) as s:
            print(s.execute('1 + 1').text)
    """), kernel_image], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert starter.stdout.strip() == "2", starter.stderr
    assert docker.api.containers(all=True, filters={"id": cid}) == []
    assert sockdir == "-" or not Path(sockdir).exists()


def _dockerd() -> tuple[int, list[str]] | None:
    try:
        pid = int(Path("/var/run/docker.pid").read_text())
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except (OSError, ValueError):
        return None
    return pid, argv


@pytest.mark.slow
def test_docker_daemon_restart_while_sessions_exist(docker, policy):
    found = _dockerd()
    if found is None or os.geteuid() != 0:
        pytest.fail("this test restarts the engine it runs against: it needs root and a dockerd it can see "
                    "(/var/run/docker.pid); .ci/run and scripts/setup.sh provide that")
    pid, argv = found
    with Session(policy) as s:
        s.execute("x = 1")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists(), "dockerd did not stop"
        try:
            with pytest.raises(KernelDied) as info:
                s.execute("x", timeout=10)
            assert info.value.state_lost
        finally:
            log = open("/var/log/kernelexec-dockerd.log", "ab")
            subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
                    break
                time.sleep(0.5)
        s.restart()
        assert s.execute("'x' in dir()").text == "False"
