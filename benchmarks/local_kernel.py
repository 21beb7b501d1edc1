"""An ipykernel on the host, no container, driven by kernelexec's own client: the floor.

Same connection kind (ZeroMQ over ipc), same kernel flags as a session, same client code; only the
container and its hardening are missing. The kernel is :class:`kernelexec.backend.local.LocalSandbox`
(the fast test tier's backend); this module keeps the benchmarks' face of it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from types import TracebackType

from kernelexec import Policy
from kernelexec.backend.local import LocalSandbox
from kernelexec.kernel.client import KernelClient
from kernelexec.kernel.protocol import new_key
from kernelexec.policy import parse_size


class LocalKernel:
    """``fast=False``: ``python -m ipykernel_launcher``; ``True``: kernelexec's launcher.

    Without kernelexec's kernel-side startup code, as the floor has always been measured."""

    def __init__(self, fast: bool) -> None:
        self.fast = fast
        self.sandbox: LocalSandbox | None = None
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
        key = new_key()
        policy = Policy(fast_kernel=self.fast)
        self.sandbox = sandbox = LocalSandbox(policy, key, secrets.token_hex(6), startup=False)
        await sandbox.create()
        try:
            channels = await asyncio.wait_for(sandbox.open(), 30)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the local kernel did not start within 30 s ({sandbox.output()})") from None
        self.client = KernelClient(key, channels, max_output_bytes=parse_size(policy.max_output_bytes))
        await self.client.connect()
        await self.client.wait_ready()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.sandbox is not None:
            await self.sandbox.destroy()
            self.sandbox = None


def ipykernel_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import ipykernel; print(ipykernel.__version__)"],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return out.stdout.strip()
