"""A session used the way people really use it: long, misused, interrupted, killed. Each case once
lost a session, grew the host, or misled the caller (issue 11)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from kernelexec import (
    AsyncSession,
    ExecutionTimeout,
    Policy,
    PolicyViolation,
    ProfileError,
    SandboxError,
    SandboxStartError,
    Session,
    SessionClosed,
    SessionPool,
)
from kernelexec.backend.docker.api import DockerAPI
from kernelexec.profiles import BUILTIN, check_profiles, profile_policy

from .conftest import orphan_errors

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# -- 3. history is bounded --------------------------------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def test_history_keeps_a_bounded_amount_of_output(kernel_image):
    # 30 executions printing 9 MB each took the host to 308 MB RSS before the bound
    policy = Policy(image=kernel_image, max_output_bytes="10m", max_history_bytes="16m")
    with Session(policy) as s:
        base = _rss_mb()
        peak = base
        for i in range(30):
            r = s.execute(f"print('{i % 10}' * 9_000_000)")
            assert len(r.stdout) == 9_000_001  # the caller gets the whole execution
            del r
            peak = max(peak, _rss_mb())
        history = s.history
        assert len(history) == 30 and [h.execution_count for h in history] == list(range(1, 31))
        kept = [h for h in history if not h.outputs_dropped]
        assert kept and kept[-1] is history[-1]
        assert sum(len(h.stdout) for h in kept) <= 16 << 20
        dropped = history[0]
        assert dropped.outputs_dropped and "max_history_bytes" in dropped.stderr
        assert dropped.code == "print('0' * 9_000_000)" and dropped.status == "ok"
        nb = s.to_notebook()  # still a notebook, with the marker where outputs were dropped
        assert len(nb.cells) == 30
        grown = _rss_mb() - base
        print(f"host RSS: {base:.0f} MB before, {peak:.0f} MB peak, grew {grown:.0f} MB after 30 x 9 MB")
        assert grown < 120, f"the host kept {grown:.0f} MB for a history bounded at 16 MB"


def test_history_drops_large_code_to_its_digest(kernel_image):
    with Session(Policy(image=kernel_image, max_history_bytes="1m")) as s:
        big = "x = '" + "a" * 800_000 + "'"
        s.execute(big)
        s.execute("y = '" + "b" * 800_000 + "'")
        assert s.history[0].outputs_dropped and "sha256" in s.history[0].code and len(s.history[0].code) < 200
        assert s.execute("len(x)").text == "800000"


# -- 4. the audit log costs no engine round trip -------------------------------------------------

def test_audit_log_reads_memory_without_the_stats_endpoint(kernel_image, tmp_path, monkeypatch):
    async def tripwire(self, cid):  # ~1 s per call on this engine: must not be on the execute path
        raise AssertionError("the stats endpoint was called during execute()")

    monkeypatch.setattr(DockerAPI, "stats", tripwire)  # what memory_peak reads too
    monkeypatch.setattr(DockerAPI, "memory_peak", tripwire)
    log = tmp_path / "audit.jsonl"
    with Session(Policy(image=kernel_image), audit_log=log) as s:
        r = s.execute("big = bytearray(64 << 20); 1")
        assert r.memory_peak is not None and r.memory_peak > 64 << 20
    executed = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "executed"]
    assert executed[0]["peak_memory_bytes"] == r.memory_peak and executed[0]["peak_memory_from"] == "kernel"


# -- 5. SIGTERM and SIGHUP clean up both faces ----------------------------------------------------

HOLD = textwrap.dedent("""
    import asyncio, sys
    from kernelexec import AsyncSession, Policy, Session
    image, face = sys.argv[1], sys.argv[2]
    if face == "sync":
        s = Session(Policy(image=image))
        print(s.container_id, flush=True)
        s.execute("import time; time.sleep(600)")
    else:
        async def main():
            async with AsyncSession(Policy(image=image)) as s:
                print(s.container_id, flush=True)
                await s.execute("import time; time.sleep(600)")
        asyncio.run(main())
""")


@pytest.mark.parametrize("face", ["sync", "async"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_terminating_signals_remove_everything(docker, kernel_image, face, sig):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kernel_image, face], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    cid = proc.stdout.readline().strip()
    assert cid, proc.stderr.read()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -sig, err  # it still dies of the signal, as its parent expects
    pid = str(proc.pid)
    assert docker.api.containers(all=True, filters={"label": f"kernelexec.owner_pid={pid}"}) == []
    assert docker.api.volumes(filters={"label": f"kernelexec.owner_pid={pid}"}).get("Volumes") in (None, [])
    from kernelexec.backend.sockdir import PREFIX, socket_root

    assert list(Path(socket_root()).glob(f"{PREFIX}{pid}-*")) == []
    assert not orphan_errors(err), err


# -- 6. a closed session says so, whatever is called -----------------------------------------------

def test_every_call_after_close_raises_session_closed(kernel_image):
    s = Session(Policy(image=kernel_image))
    s.execute("x = 1")
    s.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "coroutine ... was never awaited" fails the test
        for call in (lambda: s.execute("1"), s.interrupt, s.restart, lambda: s.upload(b"x", "a.txt"),
                     lambda: s.download("a.txt")):
            with pytest.raises(SessionClosed):
                call()
    s.close()  # twice is fine
    assert len(s.history) == 1 and "closed" in repr(s)


def test_every_call_after_close_raises_session_closed_async(kernel_image):
    async def main():
        s = AsyncSession(Policy(image=kernel_image))
        await s.start()
        await s.close()
        for call in (lambda: s.execute("1"), s.interrupt, s.restart, lambda: s.upload(b"x", "a.txt"),
                     lambda: s.download("a.txt"), s.start):
            with pytest.raises(SessionClosed):
                await call()

    asyncio.run(main())


def test_pool_sessions_after_release_and_pool_after_close(kernel_image):
    pool = SessionPool(size=1, max_sessions=2, policy=Policy(image=kernel_image))
    with pool.session() as s:
        s.execute("1")
    with pytest.raises(SessionClosed):
        s.execute("1")
    leased = pool.acquire()
    pool.close()
    with pytest.raises(SessionClosed):  # closed by its pool, whose loop is gone
        leased.execute("1")
    from kernelexec import PoolClosed

    with pytest.raises(PoolClosed):
        pool.acquire()


# -- 7. Ctrl-C and failed starts leave no unretrieved error ------------------------------------------

CTRL_C = textwrap.dedent("""
    import asyncio, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from kernelexec import AsyncSession, Policy, Session
    image, face = sys.argv[1], sys.argv[2]
    if face == "sync":
        with Session(Policy(image=image)) as s:
            try:
                print("ready", flush=True)
                s.execute("import time; time.sleep(600)")
            except KeyboardInterrupt:
                print("interrupted; state:", s.execute("1 + 1").text, flush=True)
                raise
    else:
        async def main():
            async with AsyncSession(Policy(image=image)) as s:
                print("ready", flush=True)
                await s.execute("import time; time.sleep(600)")
        asyncio.run(main())
""")


@pytest.mark.parametrize("face", ["sync", "async"])
def test_ctrl_c_during_execute_is_one_clean_keyboard_interrupt(docker, kernel_image, face):
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C, kernel_image, face], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in err, err
    if face == "sync":  # the kernel was interrupted, not lost: the same session answers
        assert "interrupted; state: 2" in out
    assert not orphan_errors(err), err
    assert err.count("Traceback") <= 2, err  # the KeyboardInterrupt, and asyncio's CancelledError chain
    assert docker.api.containers(all=True, filters={"label": f"kernelexec.owner_pid={proc.pid}"}) == []


def test_a_start_that_times_out_leaves_no_task_behind(kernel_image):
    # the fixture no_unretrieved_asyncio_errors fails this test if a start step outlives the start
    for _ in range(3):
        with pytest.raises(SandboxStartError, match="start_timeout"):
            Session(Policy(image=kernel_image, start_timeout=0.3))


# -- 9 and 8: role profiles --------------------------------------------------------------------------

def test_a_partial_policy_tightens_a_profile(kernel_image):
    with Session(Policy(image=kernel_image, memory="256m"), profile="strict") as s:
        strict = profile_policy("strict")
        assert s.policy.memory == "256m" and s.policy.cpus == strict.cpus and s.policy.timeout == strict.timeout
        assert s.policy.max_output_bytes == strict.max_output_bytes
        assert s.execute("1 + 1").text == "2"
    with pytest.raises(PolicyViolation) as info:
        Session(Policy(image=kernel_image, memory="2g", cpus=2.0), profile="strict")
    assert "memory='2g'" in str(info.value) and "cpus=2.0" in str(info.value)
    assert "timeout" not in str(info.value)  # only what the caller asked for


@pytest.mark.parametrize("role", ["analyst", "coder"])
def test_the_role_profiles_the_readme_names_exist_and_run(kernel_image, role):
    with Session(Policy(image=kernel_image), profile=role) as s:
        assert s.policy == BUILTIN[role].replace(image=kernel_image)
        assert s.execute("import pandas; 6 * 7").text == "42"


def test_a_missing_profile_says_how_to_define_it(tmp_path):
    f = tmp_path / "kernelexec.toml"
    f.write_text("[profiles.reviewer]\nextends = 'strict'\n")
    with pytest.raises(ProfileError) as info:
        profile_policy("auditor", f)
    assert "[profiles.auditor]" in str(info.value) and str(f) in str(info.value)


def test_one_broken_profile_leaves_the_others_usable(tmp_path):
    f = tmp_path / "kernelexec.toml"
    f.write_text("[profiles.good]\nextends = 'strict'\ntimeout = 30\n\n[profiles.bad]\nmemroy = '1g'\n")
    assert profile_policy("good", f).timeout == 30
    with pytest.raises(ProfileError) as info:
        profile_policy("bad", f)
    assert str(f) in str(info.value) and "memroy" in str(info.value)
    good, bad = check_profiles(f)
    assert "good" in good and set(bad) == {"bad"}
    from kernelexec.tools.audit import audit_profiles

    findings = audit_profiles(f)
    assert any(x.severity == "high" and "bad" in x.check for x in findings)
    assert any("good" in x.check for x in findings) or all("bad" in x.check or x.area != "profile"
                                                            for x in findings if x.severity != "info")


# -- smaller: clear answers -------------------------------------------------------------------------

def test_policy_sizes_are_checked_when_made():
    with pytest.raises(ValueError, match="Policy.memory"):
        Policy(memory="1k")
    with pytest.raises(ValueError, match="Policy.tmp_size"):
        Policy(tmp_size="lots")
    with pytest.raises(ValueError, match="max_message_bytes"):
        Policy(max_message_bytes=100)


def test_a_memory_limit_too_small_for_the_kernel_says_so(kernel_image):
    with pytest.raises(SandboxStartError) as info:
        Session(Policy(image=kernel_image, memory="12m"))
    assert "Policy.memory" in str(info.value) and "the code" not in str(info.value)


def test_upload_that_does_not_fit_leaves_no_partial_file(session):
    session.execute("open('/work/keep.txt', 'w').write('kept')")
    # the working directory is 256 MiB: 200 in it, 100 more do not fit
    session.execute("open('/work/fill.bin', 'wb').write(b'f' * (200 << 20))")
    with pytest.raises(SandboxError, match="working directory is full"):
        session.upload(b"z" * (100 << 20), "big.bin")
    r = session.execute("import os; os.path.getsize('/work/big.bin') if os.path.exists('/work/big.bin') else -1")
    assert r.text in ("0", "-1")
    assert session.download("keep.txt") == b"kept"


def test_download_of_a_directory_says_so(session):
    session.execute("import os; os.makedirs('/work/d', exist_ok=True)")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        session.download("d")


def test_session_and_execution_print_as_summaries(shared_session):
    r = shared_session.execute("print('x' * 100_000); 6 * 7")
    assert repr(r).startswith("<Execution [") and "-> '42'" in repr(r) and len(repr(r)) < 200
    assert str(r) == repr(r)
    text = repr(shared_session)
    assert text.startswith("<Session id=") and "running" in text and shared_session.container_id[:12] in text
    assert repr(Policy(memory="256m")) == "Policy(memory='256m')"


@pytest.mark.parametrize("fast", [True, False], ids=["fast kernel", "stock kernel"])
def test_interrupted_code_shows_only_the_users_frames(kernel_image, fast):
    with Session(Policy(image=kernel_image, fast_kernel=fast, interrupt_grace=5)) as s:
        for code in ("import time; time.sleep(60)", "while True: print('x' * 100)", "while True: pass"):
            with pytest.raises(ExecutionTimeout) as info:
                s.execute(code, timeout=1)
            assert not info.value.state_lost
            tb = info.value.partial.error.traceback
            assert info.value.partial.error.ename == "KeyboardInterrupt"
            assert "/run/kernelexec" not in tb and "deferring_int_handler" not in tb, tb
            assert code.split(";")[0][:12] in tb


def test_an_interrupt_racing_a_blocking_call_does_not_cost_the_state(kernel_image):
    # A SIGINT that lands just after a flush and before time.sleep starts is only seen when the sleep
    # returns; one interrupt alone lost the state about one time in five here (the kernel was replaced)
    with Session(Policy(image=kernel_image, interrupt_grace=3)) as s:
        s.execute("x = 41")
        container = s.container_id
        for _ in range(15):
            with pytest.raises(ExecutionTimeout) as info:
                s.execute("print('go', flush=True); import time; time.sleep(30)", timeout=0.3)
            assert not info.value.state_lost
        assert s.execute("x + 1").text == "42" and s.container_id == container
