"""The Jupyter kernel provisioner: nbclient, papermill and a KernelManager start
their kernels in kernelexec sandboxes, with interrupt, restart and shutdown, on
both transports: ipc (Jupyter connects to the kernel's verified sockets) and
attach (Jupyter connects to the bridge's host-local sockets)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager, KernelManager
from nbclient import NotebookClient

from kernelexec.integrations.jupyter import install_kernelspec

from ..conftest import leftovers

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.fixture(params=["ipc", "attach"])
def transport(request) -> str:
    return request.param


@pytest.fixture
def kernelspec_prefix(tmp_path, kernel_image, monkeypatch, transport):
    prefix = tmp_path / "prefix"
    install_kernelspec(prefix=str(prefix), image=kernel_image, transport=transport)
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    spec = json.loads((prefix / "share" / "jupyter" / "kernels" / "kernelexec" / "kernel.json").read_text())
    assert spec["argv"][0] == "/opt/kernel/bin/python"
    assert spec["metadata"]["kernel_provisioner"]["config"]["transport"] == transport
    return prefix


def check_sandbox(docker, provisioner, transport: str) -> None:
    """The kernel runs on the transport asked for; over attach nothing of the host is mounted, and
    Jupyter's sockets are the bridge's, in a private directory."""
    session = provisioner.session
    assert session.transport == transport
    mounts = docker.api.inspect_container(session.container_id)["Mounts"]
    ip = Path(provisioner.connection_info["ip"])
    from kernelexec.backend.bridge import EndpointLinks, JupyterBridge

    access = provisioner.access
    assert ip.parent == access.directory and stat.S_IMODE(os.stat(ip.parent).st_mode) == 0o700
    if transport == "attach":
        assert [m for m in mounts if m["Type"] == "bind"] == []
        assert isinstance(access, JupyterBridge)
        assert all(stat.S_ISSOCK(os.stat(f"{ip}-{p}").st_mode) for p in range(1, 6))
    else:
        # links to the sockets the session verified (its /proc/self/fd/N), never a path the container holds
        assert isinstance(access, EndpointLinks)
        targets = [os.readlink(f"{ip}-{p}") for p in range(1, 6)]
        assert targets == [session.endpoints[c].removeprefix("ipc://")
                           for c in ("shell", "iopub", "stdin", "control", "hb")]


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


def test_kernel_manager_restart_and_shutdown(docker, kernelspec_prefix, transport):
    before = leftovers(docker)
    threads = threading.active_count()

    async def main() -> tuple[str, str, str]:
        km = AsyncKernelManager(kernel_name="kernelexec")
        await km.start_kernel()
        check_sandbox(docker, km.provisioner, transport)
        first_dir = Path(km.provisioner.connection_info["ip"]).parent
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        first = (await kc.execute_interactive("y = 5; print(y)", timeout=30))["content"]["status"]
        # stdin: the kernel's input_request reaches this client, and its answer the kernel
        out: list[str] = []
        await kc.execute_interactive(
            "print('got', input('name? '))", timeout=30, allow_stdin=True, stdin_hook=lambda m: kc.input("ada"),
            output_hook=lambda m: out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
        await km.restart_kernel()
        assert not first_dir.exists()
        check_sandbox(docker, km.provisioner, transport)
        kc.stop_channels()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        after: list[str] = []
        reply = await kc.execute_interactive(
            "print('y' in dir())", timeout=30,
            output_hook=lambda m: after.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
        kc.stop_channels()
        await km.shutdown_kernel()
        return first, "".join(out).strip(), "".join(after).strip() + reply["content"]["status"]

    assert asyncio.run(main()) == ("ok", "got ada", "Falseok")
    assert leftovers(docker) == before
    assert threading.active_count() == threads  # kernelexec's loop thread is gone with its last kernel


def test_blocking_kernel_manager_between_calls(docker, kernelspec_prefix, transport):
    """A blocking KernelManager (``jupyter console``) runs its event loop only during its own calls:
    the kernel must stay reachable between them (the session and the bridge have their own loop)."""
    before = leftovers(docker)
    km = KernelManager(kernel_name="kernelexec")
    km.start_kernel()
    try:
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            out: list[str] = []
            reply = kc.execute_interactive(
                "print(6 * 7)", timeout=30,
                output_hook=lambda m: out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
            assert (reply["content"]["status"], "".join(out).strip()) == ("ok", "42")
            assert km.is_alive()
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
    assert leftovers(docker) == before


def test_the_session_and_a_jupyter_client_share_one_kernel_over_attach(docker, kernel_image):
    """The bridge beside the session's own client: each gets its own replies and outputs, state is
    one kernel's, the session's interrupt reaches the Jupyter client's cell; closing leaves nothing."""
    from jupyter_client.asynchronous import AsyncKernelClient

    from kernelexec import AsyncSession, Policy
    from kernelexec.backend.bridge import JupyterBridge

    before = leftovers(docker)

    async def main() -> tuple[str, str, str, str]:
        async with AsyncSession(Policy(image=kernel_image, transport="attach"), share_channels=True) as s:
            assert s.transport == "attach" and not s.endpoints
            bridge = await JupyterBridge.open(s.open_channels(), max_message_bytes=1 << 24)
            kc = AsyncKernelClient()
            try:
                kc.load_connection_info({**bridge.connection_info, "key": s.key.decode(),
                                         "signature_scheme": "hmac-sha256"})
                kc.start_channels()
                await kc.wait_for_ready(timeout=60)
                await s.execute("x = 41")
                seen: list[str] = []
                started = asyncio.Event()

                def hook(m: dict) -> None:
                    if m["msg_type"] == "stream":
                        seen.append(m["content"]["text"])
                        started.set()
                    elif m["msg_type"] == "error":
                        seen.append(m["content"]["ename"])

                theirs = asyncio.create_task(kc.execute_interactive(
                    "import time; time.sleep(1); print('jupyter', x)", timeout=60, output_hook=hook))
                mine = await s.execute("print('session', x + 1)")
                await theirs
                jupyter_out = "".join(seen).strip()
                seen.clear()
                started.clear()
                stuck = asyncio.create_task(kc.execute_interactive(
                    "print('sleeping', flush=True); time.sleep(60)", timeout=60, output_hook=hook))
                await asyncio.wait_for(started.wait(), 60)
                await s.interrupt()
                reply = await stuck
                return mine.stdout.strip(), jupyter_out, reply["content"]["status"], seen[-1]
            finally:
                kc.stop_channels()
                directory = bridge.directory
                await bridge.close()
                assert not directory.exists()

    assert asyncio.run(main()) == ("session 42", "jupyter 41", "error", "KeyboardInterrupt")
    assert leftovers(docker) == before
