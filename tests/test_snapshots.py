"""Snapshot, restore, fork, pause and resume against real containers and real kernels (issue 16)."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kernelexec import AsyncSession, Policy, Session
from kernelexec.backend import DockerBackend
from kernelexec.backend.docker.sessions import gc
from kernelexec.errors import RestoreError, SessionBusy, SnapshotCorrupt, SnapshotTooLarge
from kernelexec.snapshot import store
from kernelexec.snapshot.format import encode

from .conftest import checked_session, leftovers

pytestmark = pytest.mark.docker

STATE = """
import pandas as pd, numpy as np, itertools, threading
df = pd.DataFrame(np.random.default_rng(0).random((1_600_000, 4)))  # ~49 MiB
checksum = int(pd.util.hash_pandas_object(df).sum())
offset = 10
def f(x): return x + offset
class C:
    def __init__(self, v): self.v = v
    def twice(self): return self.v * 2
c = C(21)
lam = lambda y: y * 3
def make():
    k = 5
    def inner(z): return z + k
    return inner
clo = make()
cnt = itertools.count(7); next(cnt)
lock = threading.Lock()
same = [1, 2]; alias = same
gen = (i for i in range(3))
fh = open('/work/data.txt', 'w+'); fh.write('kept contents'); fh.flush()
"""

CHECK = ("print(int(pd.util.hash_pandas_object(df).sum()) == checksum, f(1), c.twice(), isinstance(c, C), lam(2), "
         "clo(1), next(cnt), lock.acquire(blocking=False), alias is same, open('/work/data.txt').read(), "
         "'gen' in dir(), 'fh' in dir())")
EXPECTED = "True 11 42 True 6 6 8 True True kept contents False False"


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch) -> Path:
    """Paused sessions of this test only (and none left in the user's state directory)."""
    path = tmp_path / "state"
    monkeypatch.setenv("KERNELEXEC_STATE_DIR", str(path))
    yield path
    assert list(store.paused(path)) == [], "the test left a paused session"


def _audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_round_trip_keeps_variables_functions_classes_and_files(policy, tmp_path):
    audit = tmp_path / "audit.jsonl"
    with Session(policy, audit_log=audit) as s:
        checked_session(s)
        ran = s.execute(STATE)
        assert ran.status == "ok", ran.error
        snap = s.snapshot()
        after = s.execute("import os; print(open('/work/data.txt').read(), os.listdir('/work'))").stdout.strip()
        assert after == "kept contents ['data.txt']"  # the file is whole and nothing staged is left behind
    assert {"df", "f", "C", "c", "lam", "clo", "cnt", "lock", "alias", "same", "checksum"} <= set(snap.variables)
    assert snap.modules["pd"] == "pandas" and snap.modules["np"] == "numpy"
    lost = {x.name: x for x in snap.lost}
    assert set(lost) == {"gen", "fh"}
    assert "generator" in lost["gen"].reason and "open file" in lost["fh"].reason
    assert 45 << 20 < snap.size < 80 << 20
    events = {e["event"]: e for e in _audit(audit)}
    assert {x["name"] for x in events["snapshot"]["lost"]} == {"gen", "fh"}

    with Session.restore(snap, policy, audit_log=audit) as r:
        checked_session(r)
        assert r.execute(CHECK).stdout.strip() == EXPECTED
        assert r.execute("sorted(k for k in globals() if k.startswith('_kernelexec') or k == 'ns')").text == "[]"
    restored = [e for e in _audit(audit) if e["event"] == "restored"]
    assert restored and restored[0]["from_session"] == snap.session_id and restored[0]["variables"] >= 11


def test_tmp_and_home_travel_when_asked(policy):
    with Session(policy) as s:
        s.execute("import os; open('/tmp/t.txt','w').write('T'); open(os.path.expanduser('~/h.txt'),'w').write('H')")
        bare, full = s.snapshot(), s.snapshot(include=("tmp", "home"))
        with pytest.raises(ValueError, match="include"):
            s.snapshot(include=("etc",))
    probe = "import os; print(os.path.exists('/tmp/t.txt'), os.path.exists(os.path.expanduser('~/h.txt')))"
    with Session.restore(bare, policy) as r:
        assert r.execute(probe).stdout.strip() == "False False"
    with Session.restore(full, policy) as r:
        assert r.execute(probe).stdout.strip() == "True True"
        assert r.execute("print(open('/tmp/t.txt').read())").stdout.strip() == "T"


def test_fork_gives_two_independent_sessions(policy):
    with Session(policy) as s:
        s.execute("x = [1]; open('/work/f','w').write('parent')")
        with s.fork() as child:
            assert child.id != s.id and child.container_id != s.container_id
            child.execute("x.append(2); open('/work/f','w').write('child')")
            s.execute("x.append(3)")
            assert s.execute("print(x, open('/work/f').read())").stdout.strip() == "[1, 3] parent"
            assert child.execute("print(x, open('/work/f').read())").stdout.strip() == "[1, 2] child"


PAUSER = textwrap.dedent("""
    import json, sys
    from kernelexec import Policy, Session
    s = Session(Policy(image=sys.argv[1]))
    s.execute("import pandas as pd; df = pd.DataFrame({'a': range(1000)}); total = int(df.a.sum())")
    s.execute("open('/work/notes.txt', 'w').write('from the first process')")
    container = s.container_id
    snap = s.pause()
    print(json.dumps({"id": s.id, "container": container, "paused": s.paused, "running": s.container_id,
                      "size": snap.size}))
    s.close()  # a paused session outlives its object and its process
""")

RESUMER = textwrap.dedent("""
    import sys
    from kernelexec import Session
    with Session.resume(sys.argv[1]) as s:
        print(s.execute("print(total, len(df), open('/work/notes.txt').read())").stdout.strip())
        s.pause()
""")


def test_pause_in_one_process_and_resume_in_another(kernel_image, docker, state_dir):
    env = {**os.environ, "KERNELEXEC_STATE_DIR": str(state_dir)}
    first = subprocess.run([sys.executable, "-c", PAUSER, kernel_image], capture_output=True, text=True, env=env,
                           timeout=180)
    assert first.returncode == 0, first.stderr
    info = json.loads(first.stdout.strip().splitlines()[-1])
    assert info["paused"] and info["running"] is None
    assert not docker.api.containers(all=True, filters={"id": info["container"]})  # its memory is freed
    [paused] = store.paused(state_dir)
    assert paused.id == info["id"] and paused.holder is None and paused.size == info["size"]

    second = subprocess.run([sys.executable, "-c", RESUMER, info["id"]], capture_output=True, text=True, env=env,
                            timeout=180)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().splitlines()[-1] == "499500 1000 from the first process"

    with Session.resume(info["id"]) as again:  # paused again by the second: resumable once more, here
        assert again.id == info["id"] and again.policy.image == kernel_image
        with pytest.raises(SessionBusy, match=f"pid {os.getpid()}"):
            Session.resume(info["id"])  # held by this process now
        assert again.execute("total + 1").text == "499501"
    assert list(store.paused(state_dir)) == []  # closing a resumed session ends it


KILLED_MID_PAUSE = textwrap.dedent("""
    import os, sys, time
    from kernelexec import Session
    s = Session.resume(sys.argv[1])
    s.execute("x = 'changed after the first pause'")
    def stuck(fd):  # the new snapshot is written but not yet renamed over the old one: killed here
        print("writing", s.container_id, flush=True)
        time.sleep(600)
    os.fsync = stuck
    s.pause()
""")


def test_a_pause_killed_mid_write_leaves_the_previous_snapshot_resumable(policy, docker, state_dir):
    with Session(policy) as s:
        s.execute("x = 'as first paused'; import numpy as np; big = np.ones(4_000_000)")
        s.pause()
        sid = s.id
    env = {**os.environ, "KERNELEXEC_STATE_DIR": str(state_dir)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_PAUSE, sid], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line[:1] == ["writing"], line
        assert list((state_dir / "sessions" / sid).glob(".snapshot.*.partial"))
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    report = gc()  # the killed process's container (its owner is gone)
    assert line[1][:12] in report.containers
    with Session.resume(sid) as again:
        assert again.execute("print(x, int(big.sum()))").stdout.strip() == "as first paused 4000000"
    assert not (state_dir / "sessions" / sid).exists()


def test_a_paused_object_resumes_on_its_next_call_unless_another_process_holds_it(policy, state_dir):
    with Session(policy) as s:
        s.execute("x = 5")
        s.pause()
        assert s.paused and s.container_id is None and "paused" in repr(s)
        holder = store.Claim(s.id)
        try:
            with pytest.raises(SessionBusy):
                s.execute("x")
        finally:
            holder.release()
        assert s.execute("x * 2").text == "10" and not s.paused
        s.upload(b"up", "u.txt")
        s.pause()
        s.interrupt()  # nothing runs: nothing to do, and no resume for it
        assert s.paused
        assert s.download("u.txt") == b"up" and not s.paused  # files resume it too
        s.pause()
        s.restart()  # back, then afresh
        assert not s.paused and s.execute("'x' in dir()").text == "False"
    assert list(store.paused(state_dir)) == []


def test_idle_pause_frees_the_container_and_the_next_call_resumes(kernel_image, docker, tmp_path):
    audit = tmp_path / "audit.jsonl"
    with Session(Policy(image=kernel_image, idle_pause=1.0), audit_log=audit) as s:
        s.execute("import numpy as np; a = np.arange(10)")
        s.execute("import time; time.sleep(2.5)")  # runs past the idle clock: idle counts from its end
        time.sleep(0.4)
        assert not s.paused, "paused right after a long execution, not after idling"
        container = s.container_id
        deadline = time.monotonic() + 60
        while not s.paused and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.paused, "the session did not pause within 60 s of idling"
        assert not docker.api.containers(all=True, filters={"id": container})
        [held] = store.paused()
        assert held.holder == os.getpid()  # paused on idle: still this process's
        assert s.execute("int(a.sum())").text == "45"
        assert s.container_id not in (None, container)
    assert list(store.paused()) == []
    events = [e["event"] for e in _audit(audit)]
    assert events.index("paused") < events.index("resumed")


def test_restore_into_an_image_that_lacks_a_module_names_it(policy, docker):
    with Session(policy) as s:
        s.execute("import sys; open('/tmp/onlyhere.py','w').write('class K: pass'); sys.path.insert(0, '/tmp')\n"
                  "import onlyhere; k = onlyhere.K()")
        snap = s.snapshot()  # without /tmp: the module is not in the new sandbox
    assert snap.modules == {"onlyhere": "onlyhere", "sys": "sys"}
    before = leftovers(docker)
    with pytest.raises(RestoreError, match="onlyhere") as e:
        Session.restore(snap, policy)
    assert e.value.missing == ("onlyhere",)
    assert leftovers(docker) == before  # the new sandbox was removed


def test_corrupted_truncated_newer_or_foreign_snapshots_are_refused_before_a_sandbox(policy, docker, tmp_path):
    with Session(policy) as s:
        s.execute("x = 1")
        data = s.snapshot().data
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0xFF
    newer = bytearray(data)
    newer[20:24] = (99).to_bytes(4, "big")
    backend = CountingBackend()
    for bad, why in ((bytes(changed), "checksum"), (data[:-100], "checksum|truncated"), (bytes(newer), "newer"),
                     (pickle.dumps({"x": 1}), "not a kernelexec snapshot")):
        with pytest.raises(SnapshotCorrupt, match=why):
            Session.restore(bad, policy, backend=backend)
    path = tmp_path / "s.kxsnap"
    path.write_bytes(data[:1000])
    with pytest.raises(SnapshotCorrupt):
        Session.restore(path, policy, backend=backend)
    assert backend.made == 0  # refused before any sandbox was asked for
    with Session.restore(data, policy, backend=backend) as fine:
        assert fine.execute("x").text == "1" and backend.made == 1


class CountingBackend(DockerBackend):
    """The Docker backend, counting the sandboxes asked of it."""

    made = 0

    def new_sandbox(self, *args, **kwargs):
        self.made += 1
        return super().new_sandbox(*args, **kwargs)


class _Payload:
    """A pickle that runs code when opened: it may run only inside the sandbox it is restored into."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def test_a_crafted_pickle_runs_only_inside_the_new_sandbox(policy, tmp_path):
    marker = f"/tmp/kernelexec-crafted-{secrets.token_hex(4)}"
    code = f"open({marker!r}, 'w').write('ran')"
    with Session(policy) as s:
        s.execute("y = 1")
        honest = s.snapshot()
    manifest = {"session_id": honest.session_id, "created": honest.created, "image": "anything:latest",
                "kernelexec_version": honest.kernelexec_version, "variables": ["x"], "modules": {}, "lost": [],
                "sizes": {}}
    crafted = encode(manifest, {"namespace": pickle.dumps({"x": _Payload(code)}), "work": b""})
    with Session.restore(crafted, policy) as r:
        assert r.execute(f"print(open({marker!r}).read(), x)").stdout.strip() == "ran None"  # it ran in here
    assert not Path(marker).exists(), "the crafted pickle ran on the host"


def test_the_size_limit_is_kept_and_a_refused_snapshot_leaves_the_session_as_it_was(kernel_image, state_dir):
    with Session(Policy(image=kernel_image, snapshot_size="2m")) as s:
        s.execute("import os; big = os.urandom(3 << 20); small = 1")
        with pytest.raises(SnapshotTooLarge, match="snapshot_size"):
            s.snapshot()
        with pytest.raises(SnapshotTooLarge):
            s.pause()
        assert not s.paused and list(store.paused()) == []
        assert s.execute("print(len(big), small, os.listdir('/work'))").stdout.strip() == f"{3 << 20} 1 []"
        s.execute("del big; open('/work/f', 'wb').write(os.urandom(3 << 20))")
        with pytest.raises(SnapshotTooLarge):
            s.snapshot()  # /work counts too
        s.execute("os.remove('/work/f')")
        snap = s.snapshot()
    with pytest.raises(SnapshotTooLarge):
        Session.restore(snap, Policy(image=kernel_image, snapshot_size="1k"))


def test_the_async_face_snapshots_and_restores(policy):
    async def main() -> None:
        async with AsyncSession(policy) as s:
            await s.execute("z = {'k': [1, 2, 3]}")
            snap = await s.snapshot()
            child = await s.fork()
            try:
                assert (await child.execute("z['k'][-1]")).text == "3"
            finally:
                await child.close()
        restored = await AsyncSession.restore(snap, policy)
        try:
            assert (await restored.execute("len(z['k'])")).text == "3"
        finally:
            await restored.close()

    asyncio.run(asyncio.wait_for(main(), 120))
