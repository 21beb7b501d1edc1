"""kernelexec audit --agents: exact findings for sample agent files (parsed, never run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kernelexec.agents_audit import audit_agents

AGENTS = Path(__file__).parent / "agents"
ROOT = Path(__file__).resolve().parent.parent


def found(name: str) -> set[tuple[int, str, str]]:
    return {(f.line, f.severity, f.check) for f in audit_agents(AGENTS / name)}


def test_safe_setup_has_no_findings():
    assert found("safe_kernelexec.py") == set()


def test_local_execution():
    assert found("unsafe_local.py") == {
        (6, "high", "AUTOGEN_USE_DOCKER"),
        (10, "high", "use_docker=False"),
        (10, "medium", "missing timeout"),
    }


def test_group_chat_with_execution_everywhere():
    assert found("unsafe_groupchat.py") == {
        (6, "high", "work_dir is the project or home"),
        (7, "medium", "network on"),
        (8, "high", "local executor"),
        (8, "medium", "more than one executing agent"),
        (9, "high", "code execution on GroupChatManager"),
        (10, "medium", "container runs as root"),
        (10, "medium", "network on"),
    }


def test_docker_undone():
    assert found("unsafe_docker.py") == {
        (9, "high", "host directory mounted"),
        (10, "high", "host network"),
        (10, "high", "privileged container"),
        (7, "medium", "container runs as root"),
        (7, "medium", "missing timeout"),
    }


def test_every_finding_has_location_and_fix():
    for f in audit_agents(AGENTS):
        assert f.file.startswith("agents/") and f.line > 0 and f.fix


def test_cli_json_and_exit_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, "-m", "kernelexec", "audit", "--agents", str(AGENTS / "unsafe_local.py"),
                          "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1, bad.stderr
    data = json.loads(bad.stdout)
    assert {d["check"] for d in data["agents"]} == {"AUTOGEN_USE_DOCKER", "use_docker=False", "missing timeout"}
    good = subprocess.run([sys.executable, "-m", "kernelexec", "audit", "--agents",
                           str(AGENTS / "safe_kernelexec.py"), "--json"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["agents"] == []


def test_the_audited_code_is_never_run(tmp_path):
    trap = tmp_path / "trap.py"
    marker = tmp_path / "ran"
    trap.write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom autogen import UserProxyAgent\n"
                    "a = UserProxyAgent('a', code_execution_config={'use_docker': False, 'timeout': 5})\n")
    assert {f.check for f in audit_agents(trap)} == {"use_docker=False"}
    assert not marker.exists()
