"""Cold start (nothing running) and warm acquire (from a pool), each to the first result."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kernelexec import AsyncSession, AsyncSessionPool, Policy
from kernelexec.kernel.client import Callbacks

from .local_kernel import LocalKernel
from .stats import summary


async def cold(n: int, log: Callable[[str], None]) -> dict[str, Any]:
    log(f"cold start: {n} sandboxes, Session() to the result of 1+1")
    sandbox, local = [], []
    for _ in range(n):
        t = time.perf_counter()
        async with AsyncSession(Policy()) as s:
            ex = await s.execute("1+1")
            sandbox.append(time.perf_counter() - t)
        assert ex.text == "2", ex
    log(f"cold start: {n} local kernels (no container)")
    for _ in range(n):
        t = time.perf_counter()
        async with LocalKernel(fast=False) as k:
            assert k.client is not None
            msg_id = await k.client.submit("1+1", Callbacks())
            await k.client.finish(msg_id, 30)
            local.append(time.perf_counter() - t)
    return {"sandbox_s": summary(sandbox), "local_stock_s": summary(local)}


async def warm(n: int, log: Callable[[str], None]) -> dict[str, Any]:
    """``acquire()`` to the first result; each acquire finds a warm session. Twice: back to back (only
    one session is waited warm, so the previous session's removal and its replacement's start run
    during the measured execute), and settled (the pool whole again: nothing in flight)."""
    log(f"warm acquire: {n} acquires from a pool of 2, back to back, then {n} with the pool settled")
    times: dict[str, list[float]] = {"busy": [], "settled": []}
    async with AsyncSessionPool(size=2, max_sessions=4) as pool:
        for mode in ("busy", "settled"):
            for _ in range(n):
                await pool.wait_warm(1 if mode == "busy" else None)  # None: the whole pool (refills follow removals)
                t = time.perf_counter()
                s = await pool.acquire()
                ex = await s.execute("1+1")
                times[mode].append((time.perf_counter() - t) * 1000)
                await pool.release(s)
                assert ex.text == "2", ex
        stats = pool.stats
    return {"acquire_to_result_ms": summary(times["busy"]), "acquire_to_result_settled_ms": summary(times["settled"]),
            "warm_hits": stats.warm_hits, "cold_starts": stats.cold_starts}
