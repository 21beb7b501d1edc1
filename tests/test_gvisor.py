"""gVisor as scripts/setup.sh provisions it: runtime "runsc" on the local engine, network none."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path
from typing import Any

import pytest

from kernelexec._loop import run_blocking
from kernelexec.backend.docker.api import api

#: every test here starts containers of its own
pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def runsc() -> dict[str, Any]:
    runtimes = run_blocking(api().call("GET", "/info", what="engine info")).get("Runtimes") or {}
    runtime = runtimes.get("runsc")
    if not isinstance(runtime, dict):
        pytest.skip("runtime runsc is not registered with this engine (scripts/setup.sh registers Debian's runsc)")
    return runtime


def test_setup_registers_runsc_without_network(runsc):
    assert "--network=none" in (runsc.get("runtimeArgs") or [])


def test_kernel_image_runs_under_runsc(runsc, kernel_image):
    """A container of the kernel image runs Python under gVisor here (its kernel, not the host's)."""
    docker = api()
    script = "import platform; print(1); print(platform.release())"

    async def scenario() -> tuple[int, bytes, dict]:
        cid = await docker.create_container(f"kx-test-runsc-{uuid.uuid4().hex[:8]}", {
            "Image": kernel_image, "Entrypoint": [], "Cmd": ["python", "-c", script],
            "HostConfig": {"Runtime": "runsc", "NetworkMode": "none"}})
        try:
            await docker.start(cid)
            status = await docker.wait(cid)
            _, logs, _ = await docker.request("GET", f"/containers/{cid}/logs", params={"stdout": "1"},
                                              what="logs")
            info = await docker.inspect(cid)
            return int(status["StatusCode"]), logs, info
        finally:
            await docker.remove_container(cid)

    code, logs, info = run_blocking(scenario())
    out = bytearray()
    while len(logs) >= 8:
        _, size = struct.unpack(">BxxxL", logs[:8])
        out += logs[8:8 + size]
        logs = logs[8 + size:]
    assert info["HostConfig"]["Runtime"] == "runsc" and info["HostConfig"]["NetworkMode"] == "none"
    assert code == 0
    lines = out.decode().split()
    assert lines[0] == "1"
    host_release = Path("/proc/sys/kernel/osrelease").read_text().strip()
    assert lines[1] != host_release  # gVisor reports its own kernel version, not the host's
