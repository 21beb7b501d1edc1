"""Many idle sessions on one host: memory per session, start time as N grows, idle CPU.

Memory is counted where it lives: the container's cgroup (kernel and children,
working set = usage minus page cache, as ``docker stats`` shows it), the host
process that holds the sessions (RSS growth), and Docker's per-container shim
process on the host. Idle CPU is sampled over a window with every session
connected and doing nothing: the system's busy share, this process's CPU time
and the containers' own CPU time.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernelexec import AsyncSession, Policy
from kernelexec.backend.docker.api import api

from .stats import summary
from .util import close_all

START_CONCURRENCY = 4
TICK = os.sysconf("SC_CLK_TCK")


def _rss(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _shims(container_ids: set[str]) -> list[int]:
    """PIDs of the containerd shims serving these containers (one per container on Docker 20.10+)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and b"containerd-shim" in cmd[0] and any(a.decode(errors="replace") in container_ids for a in cmd):
            pids.append(int(entry))
    return pids


def working_set(stats: dict[str, Any]) -> int:
    """The container's memory as ``docker stats`` shows it: cgroup usage minus the inactive page cache."""
    mem = stats.get("memory_stats") or {}
    inner = mem.get("stats") or {}
    cache = inner.get("total_inactive_file", inner.get("inactive_file", inner.get("cache", 0)))
    return int(mem.get("usage", 0)) - int(cache)


async def _container_stats(cid: str) -> tuple[int, int]:
    """(working-set bytes, CPU nanoseconds so far) from the engine's cgroup stats."""
    stats = await api().stats(cid)
    cpu = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage", 0)
    return working_set(stats), int(cpu)


async def _all_stats(sessions: list[AsyncSession]) -> list[tuple[int, int]]:
    sem = asyncio.Semaphore(8)

    async def one(s: AsyncSession) -> tuple[int, int]:
        async with sem:
            assert s.container_id is not None
            return await _container_stats(s.container_id)

    return await asyncio.gather(*(one(s) for s in sessions))


async def run(levels: list[int], idle_window: float, log: Callable[[str], None]) -> dict[str, Any]:
    sessions: list[AsyncSession] = []
    sem = asyncio.Semaphore(START_CONCURRENCY)
    base_rss = _rss()
    out: dict[str, Any] = {"start_concurrency": START_CONCURRENCY, "levels": []}

    async def start_one() -> float:
        async with sem:
            s = AsyncSession(Policy())
            t = time.perf_counter()
            try:
                await s.start()
            except BaseException:
                await s.close()
                raise
            sessions.append(s)
            return time.perf_counter() - t

    busy0, total0 = _cpu_ticks()
    await asyncio.sleep(idle_window)
    busy1, total1 = _cpu_ticks()
    out["baseline_idle_cpu_pct"] = round(100 * (busy1 - busy0) / max(total1 - total0, 1), 2)
    try:
        for n in levels:
            add = n - len(sessions)
            log(f"density: starting {add} more sessions ({START_CONCURRENCY} at a time) to reach {n}")
            t = time.perf_counter()
            starts = await asyncio.gather(*(start_one() for _ in range(add)))
            wall = time.perf_counter() - t
            await asyncio.sleep(1.0)  # let the kernels finish their start-up work before sampling
            before = await _all_stats(sessions)
            proc0 = os.times()
            busy0, total0 = _cpu_ticks()
            await asyncio.sleep(idle_window)
            busy1, total1 = _cpu_ticks()
            proc1 = os.times()
            after = await _all_stats(sessions)
            ids = {s.container_id for s in sessions if s.container_id}
            shim_rss = sum(_rss(pid) for pid in _shims(ids))
            mem = [m for m, _ in after]
            container_cpu_s = sum(c1 - c0 for (_, c0), (_, c1) in zip(before, after, strict=True)) / 1e9
            level = {
                "n": n,
                "start_wall_s": round(wall, 2),
                "start_per_session_s": round(wall / max(add, 1), 3),
                "start_latency_s": summary(starts),
                "container_mem_mb": summary([m / 2**20 for m in mem], 1),
                "host_process_rss_mb_per_session": round((_rss() - base_rss) / 2**20 / n, 2),
                "shim_rss_mb_per_session": round(shim_rss / 2**20 / n, 2),
                "idle_cpu_pct_system": round(100 * (busy1 - busy0) / max(total1 - total0, 1), 2),
                "idle_cpu_pct_host_process": round(
                    100 * ((proc1.user - proc0.user) + (proc1.system - proc0.system)) / idle_window, 2),
                "idle_cpu_pct_containers": round(100 * container_cpu_s / idle_window, 2),
                "alive": sum(1 for s in sessions if s.alive),
            }
            out["levels"].append(level)
            log(f"density: {n} idle sessions: {level['container_mem_mb']['p50']} MB each in the container, "
                f"{level['idle_cpu_pct_system']}% system CPU while idle")
    finally:
        log(f"density: closing {len(sessions)} sessions")
        t = time.perf_counter()
        await close_all(sessions)
        out["close_all_s"] = round(time.perf_counter() - t, 2)
    return out
