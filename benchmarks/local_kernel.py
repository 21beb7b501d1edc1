"""An ipykernel on the host, no container, driven by kernelexec's own client: the floor.

Same connection kind (ZeroMQ over ipc), same kernel flags as a session, same
client code; only the container and its hardening are missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

from kernelexec import kernel_launch
from kernelexec.backend.ipc import ZmqChannels
from kernelexec.client import KernelClient
from kernelexec.sockdir import wait_for_paths

PORTS = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}
FLAGS = ["--HistoryManager.hist_file=:memory:", "--IPKernelApp.quiet=True"]


class LocalKernel:
    """``fast=False``: ``python -m ipykernel_launcher``; ``True``: kernelexec's launcher."""

    def __init__(self, fast: bool) -> None:
        self.fast = fast
        self.dir = Path(tempfile.mkdtemp(prefix="kx-bench-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: KernelClient | None = None

    async def __aenter__(self) -> LocalKernel:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def start(self) -> None:
        key = uuid.uuid4().hex
        conn = {"transport": "ipc", "ip": str(self.dir / "k"), **{f"{c}_port": p for c, p in PORTS.items()},
                "key": key, "signature_scheme": "hmac-sha256", "kernel_name": ""}
        (self.dir / "conn.json").write_text(json.dumps(conn))
        main = [kernel_launch.__file__] if self.fast else ["-m", "ipykernel_launcher"]
        self.proc = subprocess.Popen([sys.executable, *main, "-f", str(self.dir / "conn.json"), *FLAGS],
                                     cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await asyncio.wait_for(wait_for_paths(self.dir, [f"k-{p}" for p in PORTS.values()]), 30)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the local kernel did not start within 30 s (exit code {self.proc.poll()})") from None
        channels = ZmqChannels({c: f"ipc://{self.dir}/k-{p}" for c, p in PORTS.items()}, max_message_bytes=16 << 20)
        await channels.connect()
        self.client = KernelClient(key.encode(), channels, max_output_bytes=8 << 20)
        await self.client.connect()
        await self.client.wait_ready()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def ipykernel_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import ipykernel; print(ipykernel.__version__)"],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return out.stdout.strip()
