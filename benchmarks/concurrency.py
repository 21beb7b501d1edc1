"""Eight sessions working at once: a small pandas task, executions per second in total."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from kernelexec import AsyncSession, Policy

from .stats import summary
from .util import close_all

SETUP = "import pandas as pd, numpy as np\ndf = pd.DataFrame({'k': np.arange(10_000) % 10, 'v': np.arange(10_000.0)})"
TASK = "df.groupby('k')['v'].agg(['mean', 'sum']).round(2).to_dict()"


async def run(sessions: int, seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    log(f"concurrency: {sessions} sessions, a pandas groupby each, for {seconds:g} s")
    started = await asyncio.gather(*(AsyncSession(Policy()).__aenter__() for _ in range(sessions)),
                                   return_exceptions=True)
    live = [s for s in started if isinstance(s, AsyncSession)]
    try:
        failed = [s for s in started if isinstance(s, BaseException)]
        if failed:
            raise failed[0]
        for s in live:
            ex = await s.execute(SETUP)
            if ex.status != "ok":
                raise RuntimeError(f"setup failed: {ex.error}")
        latencies: list[float] = []

        async def worker(s: AsyncSession, until: float) -> int:
            done = 0
            while time.perf_counter() < until:
                t = time.perf_counter()
                ex = await s.execute(TASK)
                latencies.append((time.perf_counter() - t) * 1000)
                if ex.status != "ok":
                    raise RuntimeError(f"the task failed: {ex.error}")
                done += 1
            return done

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(worker(s, t0 + seconds) for s in live))
        wall = time.perf_counter() - t0
        single: list[float] = []
        for _ in range(50):  # the same task alone, for the latency it has without contention
            t = time.perf_counter()
            await live[0].execute(TASK)
            single.append((time.perf_counter() - t) * 1000)
    finally:
        await close_all(live)
    return {
        "sessions": sessions,
        "executions": sum(counts),
        "executions_per_s": round(sum(counts) / wall, 1),
        "latency_ms": summary(latencies),
        "alone_latency_ms": summary(single),
    }
