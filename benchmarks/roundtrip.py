"""Round trip of one cell: request sent to the last message (``idle``) received.

Every configuration is driven by the same :class:`kernelexec.kernel.client.KernelClient`
code path; a session adds only what ``AsyncSession.execute`` adds on top of it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kernelexec import AsyncSession, Policy
from kernelexec.kernel.client import Callbacks, KernelClient

from .local_kernel import LocalKernel
from .stats import summary

BLOCKS = {"1+1": "1+1", "pass": "pass", "print_100k": 'print("x" * 100_000)'}
WARMUP = 20


async def _client_loop(client: KernelClient, code: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        msg_id = await client.submit(code, Callbacks())
        ex = await client.finish(msg_id, 30)
        out.append((time.perf_counter() - t) * 1000)
        if ex.status != "ok":
            raise RuntimeError(f"{code!r} failed: {ex.error}")
    return out


async def _session_loop(session: AsyncSession, code: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        ex = await session.execute(code)
        out.append((time.perf_counter() - t) * 1000)
        if ex.status != "ok":
            raise RuntimeError(f"{code!r} failed: {ex.error}")
    return out


ROUNDS = 10


async def run(n: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Stock and kernelexec launchers, on the host and in a sandbox, all alive at once.

    The configurations take turns in ``ROUNDS`` rounds per block, so a burst of
    noise on the machine lands on all of them rather than on one.
    """
    async with contextlib.AsyncExitStack() as stack:
        loops: dict[str, Callable[[str, int], Awaitable[list[float]]]] = {}
        for fast in (False, True):
            k = await stack.enter_async_context(LocalKernel(fast))
            assert k.client is not None
            loops["local_fast" if fast else "local_stock"] = functools.partial(_client_loop, k.client)
        for fast in (False, True):
            s = await stack.enter_async_context(AsyncSession(Policy(fast_kernel=fast)))
            assert s._client is not None
            loops["sandbox_fast" if fast else "sandbox_stock"] = functools.partial(_client_loop, s._client)
            if fast:
                # the public API, with its history, timeout and audit bookkeeping
                loops["session_execute"] = functools.partial(_session_loop, s)
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in loops}
        for block, code in BLOCKS.items():
            log(f"round trip: {block!r}, {n} runs on each of {', '.join(loops)}")
            for loop in loops.values():
                await loop(code, WARMUP)
            for _ in range(ROUNDS):
                for name, loop in loops.items():
                    samples[name].setdefault(block, []).extend(await loop(code, max(n // ROUNDS, 1)))
    return {name: {block: summary(v) for block, v in blocks.items()} for name, blocks in samples.items()}
