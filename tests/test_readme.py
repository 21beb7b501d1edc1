"""Every example in README.md runs as printed, or names the test that runs the same thing.

A block is found by its first line. A python block marked RUN is executed verbatim in a fresh
process (top-level ``await`` allowed, as in a notebook), after a prelude that stands in for what
the reader brings: an LLM (``model``, ``llm``, ``config``), scripted. A block marked TWIN names a
test that does the same with the same API. A README example that is in neither table fails here,
so a new example cannot go untested.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import orphan_errors
from .integrations.mcp_scenario import owned

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"^ *```(\w+)\n(.*?)^ *```", README, re.S | re.M)]

SMOLAGENTS_MODEL = """
from tests.integrations.test_smolagents_langchain import ScriptedModel, step
model = ScriptedModel([step("final_answer(6 * 7)")])
"""
LANGCHAIN_LLM = """
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
class _ToolCallingFake(GenericFakeChatModel):
    def bind_tools(self, tools, **kwargs):
        return self.bind(tools=[t.name for t in tools])
llm = _ToolCallingFake(messages=iter([]))
"""
AG2_CONFIG = """
import json
from ag2.events import ToolCallEvent
from ag2.testing import TestConfig
code = "import pandas as pd\\npd.DataFrame({'month': [1, 2], 'total': [3, 4]}).plot(x='month')"
config = TestConfig(ToolCallEvent("run_code", arguments=json.dumps({"code": code, "language": "python"})), "done")
"""

#: first line of a python block -> the prelude it runs after
RUN = {
    "from kernelexec import Session": "",
    "from kernelexec import Policy, SessionPool": "",
    "from kernelexec import Policy, Session": "",
    "from autogen_agentchat.agents import CodeExecutorAgent": "",
    "from ag2 import Agent": AG2_CONFIG,
    "from smolagents import CodeAgent": SMOLAGENTS_MODEL,
    "from kernelexec.integrations.langchain import KernelExecTool": LANGCHAIN_LLM,
}
#: first line of a block -> the test that runs the same code (file::function)
TWIN = {
    # AG2 classic needs ag2<1, which cannot share this venv with AG2 1.x: it runs in .venv-previous
    "from autogen import UserProxyAgent":
        "tests/integrations/previous/test_ag2_classic.py::test_user_proxy_runs_a_scripted_assistant_in_one_kernel",
    "scripts/setup.sh && .venv/bin/python -m pytest -q": ".ci/run",  # the test suite cannot run itself
    "kernelexec kernelspec install":
        "tests/integrations/test_provisioner.py::test_papermill_runs_the_quickstart",
    # a session on a derived image (found, or built from the host's index on first use)
    'Session(Policy(packages=("scikit-learn>=1.4", "seaborn")))     # built on first use, then found':
        "tests/test_images_packages.py::test_ls_shows_what_each_adds_and_rm_refuses_an_image_in_use",
    # egress: %pip through an allowlist, and a name not on it refused (the tests' own index stands in for PyPI)
    'Session(Policy(egress=("pypi",)))      # the Python package index and its file host':
        "tests/egress/test_egress_sessions.py::test_pip_install_through_an_allowlisted_index",
}
#: blocks checked here by other means (see the tests below)
OWN = {"scripts/setup.sh && .venv/bin/kernelexec run examples/hello.py", '{"mcpServers"', "[profiles."}


def _first(block: str) -> str:
    return block.strip().splitlines()[0].strip()


def _handled(first: str) -> bool:
    return first in RUN or first in TWIN or any(first.startswith(o) for o in OWN) or first.startswith("kernelexec ")


def test_every_example_is_run_or_has_a_twin():
    missing = [_first(b) for lang, b in BLOCKS if lang in ("python", "sh", "json", "toml") and not _handled(_first(b))]
    assert not missing, f"README examples with no test: {missing}; add them to RUN or TWIN in {__file__}"
    found = {_first(b) for _, b in BLOCKS}
    assert not (set(RUN) | set(TWIN)) - found, "entries here for examples the README no longer has"


@pytest.mark.parametrize("first", sorted(TWIN))
def test_each_twin_exists(first):
    target = TWIN[first]
    path, _, name = target.partition("::")
    assert (ROOT / path).exists(), target
    if name:
        tree = ast.parse((ROOT / path).read_text())
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


RUNNER = """
import ast, asyncio, sys
prelude, block = sys.stdin.read().split("\\0")
exec(compile(prelude, "prelude", "exec"), ns := {"__name__": "__main__"})
result = eval(compile(block, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT), ns)
if asyncio.iscoroutine(result):
    asyncio.run(result)
print("example ran", flush=True)
"""


def _env(kernel_image: str) -> dict[str, str]:
    return {**os.environ, "KERNELEXEC_IMAGE": kernel_image, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("first", sorted(RUN))
def test_python_example_runs_verbatim(first, docker, kernel_image):
    (block,) = [b for lang, b in BLOCKS if lang == "python" and _first(b) == first]
    with subprocess.Popen([sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=_env(kernel_image), cwd=ROOT) as proc:
        out, err = proc.communicate(RUN[first] + "\0" + block, timeout=240)
    assert proc.returncode == 0 and "example ran" in out, err[-3000:]
    assert not orphan_errors(err), err
    assert owned(docker, proc.pid) == ([], [], [])  # the example's process is gone, and so is all it made


def test_quick_start_command_runs_the_hello_example(kernel_image):
    (block,) = [b for lang, b in BLOCKS if lang == "sh" and "examples/hello.py" in b]
    proc = subprocess.run(["bash", "-c", block.strip()], capture_output=True, text=True, cwd=ROOT,
                          env=_env(kernel_image), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hello from the sandbox" in proc.stdout and "Network is unreachable" in proc.stdout


def test_profile_file_example_defines_a_profile(tmp_path):
    from kernelexec.profiles import profile_policy

    blocks = [b for lang, b in BLOCKS if lang == "toml" and "[profiles." in b]
    assert len(blocks) == 3  # the policy layer's, the packages of a role, and a role's egress
    for block in blocks:
        f = tmp_path / "kernelexec.toml"
        f.write_text("\n".join(line.strip() for line in block.splitlines()))
        name = re.search(r"\[profiles\.(\w+)\]", block).group(1)
        policy = profile_policy(name, f)
        if "packages" in block:
            assert policy.packages and policy.image_flavour == "analysis" and policy.memory == "2g"
        elif "egress" in block:
            assert policy.egress == ("pypi",) and policy.memory == "2g"  # and the rest of `analyst`
        else:
            assert policy.timeout == 30


def test_mcp_client_configuration_starts_a_working_server(docker, kernel_image, tmp_path):
    from .integrations.mcp_scenario import stdio_session, text

    (block,) = [b for lang, b in BLOCKS if lang == "json" and "mcpServers" in b]
    server = next(iter(json.loads(block)["mcpServers"].values()))
    assert server["command"] == "kernelexec"
    args = [str(tmp_path) if a.startswith("/home/me") else a for a in server["args"]]  # a writable notebook dir
    with open(tmp_path / "server.log", "w+") as log:
        async def main() -> None:
            # the installed `kernelexec` entry point is this venv's `python -m kernelexec`
            async with stdio_session(sys.executable, ["-m", "kernelexec", "--image", kernel_image, *args], log) as (
                    client, _):
                await client.initialize()
                sid = json.loads(text(await client.call_tool("create_session", {})))["session_id"]
                result = await client.call_tool("execute", {"session_id": sid, "code": "6 * 7"})
                assert text(result).strip().endswith("42")  # "Out[1]: 42"

        asyncio.run(main())
