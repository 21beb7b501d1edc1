"""kernelexec on Podman's Docker-compatible API, rootful and rootless, with every default.

The fast tests of each engine, in the normal run; the core suites on Podman are in test_suites.py
(opt-in: the engine matrix). Sessions here reach the Podman engine through the process-wide client
(``kernelexec.backend.docker.api._api``), swapped for the test's duration.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelexec import KernelDied, Policy, Session
from kernelexec._loop import run_blocking
from kernelexec.backend import choose_transport
from kernelexec.backend.docker import api as dockerapi
from kernelexec.backend.docker.api import DockerAPI
from kernelexec.backend.docker.sandbox import LABEL
from kernelexec.errors import SandboxStartError

from . import engine as podman

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def on(monkeypatch) -> Iterator[object]:
    """``on(engine)``: this process's sessions go to ``engine`` until the test ends."""
    def use(engine: podman.PodmanEngine) -> DockerAPI:
        client = engine.api()
        monkeypatch.setattr(dockerapi, "_api", client)
        return client
    yield use


def _ours(engine: podman.PodmanEngine) -> tuple[list[str], list[str]]:
    api = engine.api()
    pid = f"kernelexec.owner_pid={os.getpid()}"
    return ([c["Id"] for c in run_blocking(api.containers(pid))],
            [v["Name"] for v in run_blocking(api.volumes(pid))])


def _inspect(engine: podman.PodmanEngine, cid: str) -> dict:
    return run_blocking(engine.api().inspect(cid))


def test_engine_kind_is_podman_and_rootless_is_told_apart(podman_engine):
    kind = run_blocking(podman_engine.api().engine_kind())
    assert kind.kind == "Podman" and kind.is_podman
    assert kind.rootless is podman_engine.rootless
    assert kind.describe().startswith("Podman ") and ("rootless" in kind.describe()) is podman_engine.rootless


def test_a_session_with_every_default_works_on_rootful_podman(podman_rootful, kernel_image, on):
    on(podman_rootful)
    policy = Policy(image=kernel_image)
    transport, why = choose_transport(policy)
    assert transport == "attach" and "Podman" in why
    with Session(policy) as s:
        assert s.transport == "attach"
        cid = s.container_id
        host = _inspect(podman_rootful, cid)["HostConfig"]
        # the limits hold on this engine: what was asked is what Podman applied
        assert host["Memory"] == 1 << 30 and host["PidsLimit"] == 256 and host["NanoCpus"] == 10**9
        s.execute("x = 41")
        ex = s.execute("print('out'); x + 1")
        assert ex.stdout == "out\n" and ex.text == "42"
        assert s.execute("import os; os.getuid() != 0 and os.access('/', os.W_OK) is False").text == "True"
        # the working directory is the size-bounded tmpfs volume, owned by the sandbox's user
        assert s.execute("import os, shutil; st = os.stat('.'); (st.st_uid == os.getuid(), "
                         "shutil.disk_usage('.').total <= 512 << 20)").text == "(True, True)"
        s.upload(b"hello", "greeting.txt")
        assert s.download("greeting.txt") == b"hello"
        s.restart()
        assert s.container_id != cid
        assert s.execute("'x' in globals()").text == "False"
    assert _ours(podman_rootful) == ([], [])


def test_rootless_podman_on_cgroup_v1_is_refused_not_run_without_limits(podman_rootless, kernel_image, on):
    """Rootless Podman on cgroup v1 drops memory, CPU and pids limits without a word: refused, before anything
    is made. On cgroup v2 (delegated) the same defaults must hold and the session run."""
    api = on(podman_rootless)
    kind = run_blocking(api.engine_kind())
    assert kind.rootless
    if kind.cgroup_version == "1":
        with pytest.raises(SandboxStartError, match="rootless Podman on cgroup v1 ignores memory, CPU and process"):
            Session(Policy(image=kernel_image))
    else:
        with Session(Policy(image=kernel_image)) as s:
            host = _inspect(podman_rootless, s.container_id)["HostConfig"]
            assert host["Memory"] == 1 << 30 and host["PidsLimit"] == 256
            assert s.execute("1 + 1").text == "2"
    assert _ours(podman_rootless) == ([], [])


def test_the_limits_rootless_podman_on_cgroup_v1_drops_are_really_dropped(podman_rootless):
    """Why the refusal above: the engine accepts the limits and applies none (no warning either)."""
    api = podman_rootless.api()
    if run_blocking(api.engine_kind()).cgroup_version != "1":
        pytest.fail("this host has cgroup v2: the refusal does not apply; drop this test for such hosts")
    cid = run_blocking(api.create_container(
        f"kxtest-limits-{os.getpid()}",
        {"Image": _image(podman_rootless), "Cmd": ["true"], "Labels": {LABEL: "limits-probe"},
         "HostConfig": {"Memory": 1 << 28, "PidsLimit": 64, "NanoCpus": 10**9}}))
    try:
        host = _inspect(podman_rootless, cid)["HostConfig"]
        assert (host["Memory"], host["PidsLimit"], host["NanoCpus"]) == (0, 0, 0)
    finally:
        run_blocking(api.remove_container(cid))


def _image(engine: podman.PodmanEngine) -> str:
    images = run_blocking(engine.api().images())
    return next(t for i in images for t in i.get("RepoTags") or [] if "kernelexec-kernel" in t)


def test_a_breakout_from_rootless_podman_lands_as_an_unprivileged_host_user(podman_rootless):
    """The sandbox's uid (10001) inside is a subordinate uid of the engine's user on the host: a process that
    escapes its container holds no host privilege (checked on the host, in /proc)."""
    api = podman_rootless.api()
    first, count = podman_rootless.subordinate_range()
    cid = run_blocking(api.create_container(
        f"kxtest-breakout-{os.getpid()}",
        {"Image": _image(podman_rootless), "Cmd": ["sleep", "300"], "User": "10001:10001",
         "Labels": {LABEL: "breakout-probe"},
         "HostConfig": {"NetworkMode": "none",
                        "Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 1024},
                                    {"Name": "nproc", "Soft": 4096, "Hard": 4096}]}}))
    try:
        run_blocking(api.start(cid))
        pid = _inspect(podman_rootless, cid)["State"]["Pid"]
        status = Path(f"/proc/{pid}/status").read_text()
        uids = [int(u) for u in next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]]
        # container uid 0 is the user itself; uid N > 0 is subordinate uid first + N - 1
        assert uids == [first + 10001 - 1] * 4 and first + 10001 - 1 < first + count
        assert 0 not in uids and pwd_name(uids[0]) is None  # no host account at all
    finally:
        run_blocking(api.remove_container(cid))


def pwd_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _drop_connection(s: Session) -> None:
    sandbox = s._async._sandbox
    assert sandbox is not None and sandbox.channels is not None
    writer = sandbox.channels._writer  # type: ignore[attr-defined]
    s._loop.loop.call_soon_threadsafe(writer.transport.abort)


@pytest.mark.timeout(120)  # the deadline: the session's own bounds end it long before
def test_a_lost_attach_on_podman_is_a_typed_state_lost_error_then_restart_works(podman_rootful, kernel_image, on):
    """Podman delivers no stdin to a second attach: the session does not try to resume (it would wait for a
    relay that never hears it), it says the state is lost, and a restart gives a working kernel."""
    on(podman_rootful)
    with Session(Policy(image=kernel_image)) as s:
        s.execute("x = 41")
        _drop_connection(s)
        with pytest.raises(KernelDied) as info:
            s.execute("x + 1")
        assert info.value.state_lost
        assert "Podman cannot resume it" in info.value.reason and "restart the session" in info.value.reason
        s.restart()
        assert s.execute("x = 1; x + 1").text == "2"
    assert _ours(podman_rootful) == ([], [])


def _kx(engine: podman.PodmanEngine, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    return subprocess.run([sys.executable, "-m", "kernelexec", *args], env={**env, **engine.env}, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


_ORPHAN = """
import sys
from kernelexec import Policy, Session
s = Session(Policy(image=sys.argv[1]))
print(s.container_id, flush=True)
sys.stdin.read()
"""


def test_doctor_ps_gc_and_audit_name_podman_and_clean_up_after_a_sigkilled_owner(podman_engine, kernel_image,
                                                                                  tmp_path):
    kind = "Podman "
    mode = "rootless" if podman_engine.rootless else "rootful"
    doctor = _kx(podman_engine, "doctor", "--image", kernel_image)
    assert f"PASS  engine reachable: {kind}" in doctor.stdout and f"({mode}, cgroup" in doctor.stdout, doctor.stdout
    assert "PASS  transport for sessions: attach: the engine is Podman" in doctor.stdout
    audit = _kx(podman_engine, "audit", "--json")
    assert '"check": "engine"' in audit.stdout and "Podman" in audit.stdout and mode in audit.stdout
    rootless_v1 = podman_engine.rootless and "cgroup v1" in doctor.stdout
    if rootless_v1:  # sessions are refused there (see above): doctor says so, audit flags it high
        assert "FAIL  sandbox works" in doctor.stdout and "rootless Podman on cgroup v1" in doctor.stdout
        assert '"check": "resource limits"' in audit.stdout
        return
    assert "PASS  sandbox works" in doctor.stdout, doctor.stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    owner = subprocess.Popen([sys.executable, "-c", _ORPHAN, kernel_image], env={**env, **podman_engine.env},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        cid = owner.stdout.readline().strip()
        assert cid, "the owner did not start its session"
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    ps = _kx(podman_engine, "ps")
    assert f"{kind}" in ps.stdout and f"({mode}" in ps.stdout and cid[:12] in ps.stdout and "(gone)" in ps.stdout
    assert "attach" in ps.stdout
    gc = _kx(podman_engine, "gc")
    assert gc.returncode == 0 and cid[:12] in gc.stdout, gc.stdout + gc.stderr
    assert not [c for c in run_blocking(podman_engine.api().containers(LABEL)) if c["Id"] == cid]

