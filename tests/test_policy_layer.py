"""Role profiles, the audit log and the code pre-check, with real sessions."""

from __future__ import annotations

import json

import pytest

from kernelexec import (
    AuditLog,
    AuditLogError,
    CodePolicy,
    ExecutionTimeout,
    KernelDied,
    Policy,
    PolicyViolation,
    Session,
)
from kernelexec.auditlog import code_digest
from kernelexec.profiles import ProfileError, load_profiles, profile_policy

PROFILES = """
[profiles.analyst]
memory = "768m"
cpus = 1.0
timeout = 120

[profiles.coder]
extends = "strict"
timeout = 30
"""


def test_profiles_load_and_extend(tmp_path):
    f = tmp_path / "kernelexec.toml"
    f.write_text(PROFILES)
    profiles = load_profiles(f)
    assert set(profiles) >= {"default", "strict", "analyst", "coder"}
    assert profiles["analyst"].memory == "768m" and profiles["analyst"].timeout == 120
    assert profiles["coder"].memory == profiles["strict"].memory and profiles["coder"].timeout == 30


def test_profile_errors_are_clear(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("[profiles.x]\nmemroy = '1g'\n")
    with pytest.raises(ProfileError, match="unknown fields"):
        load_profiles(f)
    f.write_text("[profiles.x]\nextends = 'x'\n")
    with pytest.raises(ProfileError, match="extends itself"):
        load_profiles(f)
    f.write_text("[profiles.x]\nuser = '0:0'\n")
    with pytest.raises(ProfileError, match="root"):
        load_profiles(f)
    f.write_text("[profiles.x]\nmemory = '1g'\n")
    with pytest.raises(ProfileError, match="no profile named"):
        profile_policy("nope", f)


def test_a_role_cannot_widen_its_profile(tmp_path, kernel_image):
    f = tmp_path / "kernelexec.toml"
    f.write_text(PROFILES)
    with pytest.raises(PolicyViolation, match="memory"):
        Session(Policy(image=kernel_image, memory="2g"), profile="analyst", profiles_file=f)
    with pytest.raises(PolicyViolation, match="network"):
        Session(Policy(image=kernel_image, network="bridge"), profile="coder", profiles_file=f)
    # tightening is allowed, and the session really runs with the profile's limits
    with Session(Policy(image=kernel_image, memory="512m", timeout=60), profile="analyst", profiles_file=f) as s:
        assert s.policy.memory == "512m"
        limit = s.execute("int(open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read()) "
                          "if __import__('os').path.exists('/sys/fs/cgroup/memory/memory.limit_in_bytes') "
                          "else int(open('/sys/fs/cgroup/memory.max').read())").text
        assert limit == str(512 << 20)


def test_audit_log_records_every_event(tmp_path, kernel_image):
    log = tmp_path / "audit.jsonl"
    with Session(Policy(image=kernel_image, interrupt_grace=1.0), audit_log=log) as s:
        sid = s.id
        s.execute("x = 1")
        s.execute("1/0")
        with pytest.raises(ExecutionTimeout):
            s.execute("import time; time.sleep(30)", timeout=1)
        with pytest.raises(KernelDied):
            s.execute("import os; os.kill(os.getpid(), 9)")
        s.restart()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["created", "executed", "executed", "timeout", "killed", "created",
                                            "restarted", "closed"]
    assert all(e["session"] == sid for e in events)
    created = events[0]
    assert created["container"] and created["image"] == kernel_image and created["relaxations"] == []
    ok, err = events[1], events[2]
    assert ok["code_sha256"] == code_digest("x = 1") and ok["status"] == "ok" and ok["duration"] >= 0
    assert ok["peak_memory_bytes"] > 10 << 20
    assert err["status"] == "error" and err["error"] == "ZeroDivisionError"
    assert events[3]["state_lost"] is False
    assert "SIGKILL" in events[4]["reason"] and events[4]["exit_code"] == 137


def test_audit_log_write_failure_raises(tmp_path):
    log = AuditLog(tmp_path / "missing-dir" / "audit.jsonl")
    with pytest.raises(AuditLogError, match="not recorded"):
        log.write("created", "s1")


def test_precheck_refuses_before_running(tmp_path, kernel_image):
    log = tmp_path / "audit.jsonl"
    with Session(Policy(image=kernel_image), precheck=CodePolicy.default(), audit_log=log) as s:
        r = s.execute("import subprocess\nsubprocess.run(['id'])")
        assert r.status == "refused" and r.error.ename == "CodeRefused"
        assert "import subprocess" in r.error.evalue
        r = s.execute("import os as o\no.system('id')")
        assert r.status == "refused" and "os.system()" in r.error.evalue
        r = s.execute("!id")
        assert r.status == "refused" and "shell escapes" in r.error.evalue
        r = s.execute("await __import__('asyncio').sleep(0)")
        assert r.status == "refused" and "__import__()" in r.error.evalue
        assert s.execute("import pandas as pd; int(pd.Series([1, 2]).sum())").text == "3"
    assert "refused" in [json.loads(line)["event"] for line in log.read_text().splitlines()]


def test_precheck_unit_cases():
    p = CodePolicy.default()
    assert p.check("x = 1 + 1") == []
    assert p.check("from ctypes import CDLL")[0].what == "from ctypes import CDLL"
    assert p.check("import os\nos.execv('/bin/sh', [])")[0].what == "os.execv()"
    assert p.check("from os import system as s\ns('id')")
    assert p.check("def f(:\n  pass")[0].what == "code the pre-check cannot parse"


def test_missing_runtime_is_a_clear_error(docker, kernel_image):
    from kernelexec import SandboxStartError

    from .conftest import leftovers

    runtimes = docker.info().get("Runtimes") or {}
    if "runsc" in runtimes:
        with Session(Policy(image=kernel_image, runtime="runsc")) as s:
            assert s.execute("1 + 1").text == "2"
        return
    before = leftovers(docker)
    with pytest.raises(SandboxStartError, match="runsc"):
        Session(Policy(image=kernel_image, runtime="runsc"))
    assert leftovers(docker) == before
