"""The Jupyter kernel provisioner: nbclient, papermill and a KernelManager start
their kernels in kernelexec sandboxes, with interrupt, restart and shutdown."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError

from kernelexec.provisioner import install_kernelspec

from ..conftest import leftovers

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.fixture
def kernelspec_prefix(tmp_path, kernel_image, monkeypatch):
    prefix = tmp_path / "prefix"
    install_kernelspec(prefix=str(prefix), image=kernel_image)
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    spec = json.loads((prefix / "share" / "jupyter" / "kernels" / "kernelexec" / "kernel.json").read_text())
    assert spec["argv"][0] == "/opt/kernel/bin/python"
    return prefix


def test_nbclient_runs_every_notebook_in_a_sandbox(docker, kernelspec_prefix):
    before = leftovers(docker)
    sandbox_side = [p for p in sorted(NOTEBOOKS.glob("*.ipynb"))
                    if nbformat.read(p, as_version=4).metadata["kernelspec"]["name"] == "kernelexec"]
    assert sandbox_side
    for path in sandbox_side:
        nb = nbformat.read(path, as_version=4)
        nb.cells.append(nbformat.v4.new_code_cell("import os; (os.getuid(), os.listdir('/sys/class/net'))"))
        NotebookClient(nb, kernel_name="kernelexec", timeout=120).execute()
        assert nb.cells[-1].outputs[0]["data"]["text/plain"] == "(10001, ['lo'])", path.name
    assert leftovers(docker) == before


def test_papermill_runs_the_quickstart(docker, kernelspec_prefix, tmp_path):
    import papermill

    before = leftovers(docker)
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / "quickstart.ipynb"), str(out), kernel_name="kernelexec",
                               progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert leftovers(docker) == before


def test_interrupt_by_timeout_then_keep_going(kernelspec_prefix):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("import time; time.sleep(60)")])
    client = NotebookClient(nb, kernel_name="kernelexec", timeout=3, interrupt_on_timeout=True, allow_errors=True)
    client.execute()
    assert nb.cells[1].outputs[-1]["ename"] == "KeyboardInterrupt"


def test_kernel_manager_restart_and_shutdown(docker, kernelspec_prefix):
    before = leftovers(docker)

    async def main() -> tuple[str, str]:
        km = AsyncKernelManager(kernel_name="kernelexec")
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        first = (await kc.execute_interactive("y = 5; print(y)", timeout=30))["content"]["status"]
        await km.restart_kernel()
        kc.stop_channels()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        out: list[str] = []
        reply = await kc.execute_interactive(
            "print('y' in dir())", timeout=30,
            output_hook=lambda m: out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
        kc.stop_channels()
        await km.shutdown_kernel()
        return first, "".join(out).strip() + reply["content"]["status"]

    assert asyncio.run(main()) == ("ok", "Falseok")
    assert leftovers(docker) == before
