"""Every demo notebook runs: host-side ones drive kernelexec from a local kernel; sandbox-side ones
run inside a kernelexec kernel (see tests/integrations/test_provisioner.py and tests/test_cli.py)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient


def orphans(docker) -> set[str]:
    """Session containers whose owner process is gone: what a notebook's kernel would leak."""
    from kernelexec.backend.docker.sandbox import owner_alive

    out = set()
    for c in docker.api.containers(all=True, filters={"label": "kernelexec.session"}):
        labels = c["Labels"]
        if not owner_alive(int(labels["kernelexec.owner_pid"]), labels.get("kernelexec.owner_start") or None):
            out.add(c["Id"])
    return out

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
#: A notebook for a framework's previous major (metadata ``kernelexec_tests.venv: previous``) runs in
#: .venv-previous (tests/integrations/test_previous_majors.py), the others in the current venv.
VENV = "previous" if int(metadata.version("ag2").split(".")[0]) < 1 else "current"


def _venv(nb: nbformat.NotebookNode) -> str:
    return str(nb.metadata.get("kernelexec_tests", {}).get("venv", "current"))


HOST_SIDE = [p for p in NOTEBOOKS if (nb := nbformat.read(p, as_version=4)).metadata["kernelspec"]["name"] == "python3"
             and _venv(nb) == VENV]


def test_there_are_demos():
    names = {p.stem for p in NOTEBOOKS}
    assert {"quickstart", "data_analysis", "security_demo", "autogen_agent", "ag2_two_agents", "ag2_agent"} <= names


@pytest.mark.parametrize("path", HOST_SIDE, ids=[p.stem for p in HOST_SIDE])
def test_host_side_notebook_runs(path, docker, kernel_image, monkeypatch):
    monkeypatch.setenv("KERNELEXEC_IMAGE", kernel_image)
    before = orphans(docker)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(path.parent)}},
                   env={"KERNELEXEC_IMAGE": kernel_image}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    expected = {"data_analysis": "north", "security_demo": "oom-killed", "autogen_agent": "['lo']",
                "ag2_two_agents": "[1, 1, 3, 4, 5]", "ag2_agent": "['TextInput', 'BinaryInput']"}[path.stem]
    assert expected in text
    assert orphans(docker) <= before  # the notebook's kernel closed what it opened
