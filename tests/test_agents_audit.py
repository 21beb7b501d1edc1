"""kernelexec audit --agents: exact findings for sample agent files (parsed, never run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernelexec.tools.agents_audit import audit_agents

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


# -- issue 11: a CI gate never passes on nothing; fixes name the framework's executor -------------

def kx_audit(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kernelexec", "audit", "--agents", *args], check=False,
                          capture_output=True, text=True, env=env, timeout=60)


def test_a_missing_path_fails(tmp_path):
    for args in ([str(tmp_path / "nosuchdir")], [str(tmp_path / "nosuchdir"), "--json"]):
        p = kx_audit(*args)
        assert p.returncode == 2, p.stdout
        assert p.stderr == f"kernelexec: audit --agents: {tmp_path / 'nosuchdir'} does not exist; nothing was audited\n"
        assert "no unsafe" not in p.stdout


def test_nothing_to_read_fails_and_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("UserProxyAgent(code_execution_config={'use_docker': False})\n")
    p = kx_audit(str(tmp_path))
    assert p.returncode == 2 and "no unsafe" not in p.stdout
    assert "read 0 Python files" in p.stderr and "nothing was audited" in p.stderr
    j = kx_audit(str(tmp_path), "--json")
    assert j.returncode == 2 and json.loads(j.stdout)["files_read"] == 0


def test_it_says_how_many_files_it_read():
    clean = kx_audit(str(AGENTS / "safe_kernelexec.py"))
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout == f"no unsafe code-execution settings found; read 1 Python file from " \
                           f"{AGENTS / 'safe_kernelexec.py'}\n"
    n = len(list(AGENTS.rglob("*.py")))
    dirty = kx_audit(str(AGENTS))
    assert dirty.returncode == 1
    assert dirty.stdout.rstrip().endswith(f"read {n} Python files from {AGENTS}")
    data = json.loads(kx_audit(str(AGENTS), "--json").stdout)
    assert data["files_read"] == n and len(data["files"]) == n


def test_autogen_07_findings_name_the_autogen_07_executor():
    findings = audit_agents(AGENTS / "unsafe_autogen.py")
    assert {(f.line, f.severity, f.check) for f in findings} == {
        (9, "high", "local executor"),
        (9, "high", "work_dir is the project or home"),  # Local(work_dir="."), an aliased import
        (10, "high", "local executor"),  # AutoGen 0.7's JupyterCodeExecutor: a kernel on the host
        (11, "high", "host directory mounted"),  # work_dir=Path.home()
        (11, "medium", "container runs as root"),
        (11, "medium", "network on"),
    }
    for f in findings:
        if f.check in ("local executor", "work_dir is the project or home"):
            assert "KernelExecCodeExecutor" in f.fix and "kernelexec.integrations.autogen" in f.fix, f
        assert "KernelExecExecutor(" not in f.fix and "integrations.ag2" not in f.fix, f
    assert audit_agents(AGENTS / "safe_autogen.py") == []
    for f in audit_agents(AGENTS / "unsafe_groupchat.py"):  # AG2 code keeps the AG2 executor
        assert "KernelExecCodeExecutor" not in f.fix


def audit_source(tmp_path: Path, source: str) -> set[tuple[str, str]]:
    f = tmp_path / "agent.py"
    f.write_text(source)
    return {(f.severity, f.check) for f in audit_agents(f)}


HOME_OR_PROJECT = ['"."', '"./"', '"~"', '"~/"', '"/"', 'os.getcwd()', 'Path.cwd()', 'Path()', 'Path(".")',
                   'Path.home()', 'Path("~").expanduser()', 'os.path.expanduser("~")', 'Path(__file__).parent',
                   'Path(__file__).resolve().parent', 'os.path.dirname(os.path.abspath(__file__))',
                   'os.path.abspath(".")', 'os.environ["HOME"]', 'os.getenv("HOME")', 'Path.home() / "agent"',
                   'HERE', 'os.curdir']
ELSEWHERE = ['"scratch"', 'Path("coding")', 'tempfile.mkdtemp()', 'Path(__file__).parent / "work"', '"/tmp/agent"']
PRELUDE = "import os, tempfile\nfrom pathlib import Path\nHERE = Path.cwd()\n"


@pytest.mark.parametrize("expr", HOME_OR_PROJECT)
def test_work_dir_at_the_project_or_home_is_a_finding_on_every_executor(tmp_path, expr):
    ag2_local = audit_source(tmp_path, PRELUDE + "from autogen.coding import LocalCommandLineCodeExecutor\n"
                                                 f"e = LocalCommandLineCodeExecutor(work_dir={expr})\n")
    assert ("high", "work_dir is the project or home") in ag2_local
    autogen_local = audit_source(tmp_path, PRELUDE + "from autogen_ext.code_executors.local import "
                                                     f"LocalCommandLineCodeExecutor\ne = LocalCommandLineCodeExecutor(work_dir={expr})\n")
    assert ("high", "work_dir is the project or home") in autogen_local
    docker = audit_source(tmp_path, PRELUDE + "from autogen_ext.code_executors.docker import "
                                              f"DockerCommandLineCodeExecutor\ne = DockerCommandLineCodeExecutor(work_dir={expr})\n")
    assert ("high", "host directory mounted") in docker
    legacy = audit_source(tmp_path, PRELUDE + "from autogen import UserProxyAgent\nu = UserProxyAgent('u', "
                                              f"code_execution_config={{'work_dir': {expr}, 'timeout': 5}})\n")
    assert ("high", "work_dir is the project or home") in legacy


@pytest.mark.parametrize("expr", ELSEWHERE)
def test_a_dedicated_work_dir_is_not(tmp_path, expr):
    found_ = audit_source(tmp_path, PRELUDE + "from autogen_ext.code_executors.docker import "
                                              f"DockerCommandLineCodeExecutor\ne = DockerCommandLineCodeExecutor(work_dir={expr})\n")
    assert ("high", "host directory mounted") not in found_
    local = audit_source(tmp_path, PRELUDE + "from autogen.coding import LocalCommandLineCodeExecutor\n"
                                             f"e = LocalCommandLineCodeExecutor(work_dir={expr})\n")
    assert local == {("high", "local executor")}


def test_ag2_docker_executor_without_work_dir_mounts_the_current_directory(tmp_path):
    ag2 = audit_source(tmp_path, "from autogen.coding import DockerCommandLineCodeExecutor\n"
                                 "e = DockerCommandLineCodeExecutor(timeout=30)\n")
    assert ("high", "host directory mounted") in ag2  # AG2's default work_dir is "."
    autogen = audit_source(tmp_path, "from autogen_ext.code_executors.docker import DockerCommandLineCodeExecutor\n"
                                     "e = DockerCommandLineCodeExecutor(timeout=30)\n")
    assert ("high", "host directory mounted") not in autogen  # AutoGen 0.7's default is a temporary directory
