"""The previous majors, which users still run: the MCP SDK 1.x client (and the 1.x server) and the classic AG2
(ag2<1, module autogen), in .venv-previous. They cannot share a venv with the current majors, so their tests
run there, in a pytest of their own; this test fails unless every one of them ran and passed."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from .conftest import ROOT

FILES = ["tests/integrations/test_mcp.py", "tests/integrations/previous/test_ag2_classic.py", "tests/test_notebooks.py"]
#: what must have run there (a test that was not collected would otherwise pass unnoticed)
MUST_PASS = {"test_mcp.test_stdio", "test_mcp.test_stdio_server_of_the_other_major", "test_mcp.test_http_two_clients",
             "test_mcp.test_quiet_server_without_notebook_dir", "test_mcp.test_pause_resume_fork",
             "test_ag2_classic.test_executor_protocol",
             "test_ag2_classic.test_user_proxy_runs_a_scripted_assistant_in_one_kernel",
             "test_notebooks.test_host_side_notebook_runs[ag2_two_agents]"}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_previous_majors_pass_in_their_venv(other_major_python, kernel_image, tmp_path):
    junit = tmp_path / "junit.xml"
    env = {**os.environ, "KERNELEXEC_TEST_IMAGE": kernel_image, "KERNELEXEC_TEST_CURRENT_PYTHON": sys.executable}
    r = subprocess.run([other_major_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                        *FILES], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    print(r.stdout)
    assert r.returncode == 0, f"{r.stdout[-20000:]}\n{r.stderr[-5000:]}"
    outcomes = {}
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}.{case.get('name')}"
        outcomes[name] = [child.tag for child in case if child.tag in ("skipped", "failure", "error")]
    assert not [n for n, bad in outcomes.items() if bad], outcomes
    assert MUST_PASS <= outcomes.keys(), sorted(outcomes)
