"""Soak: many sessions, many executions, injected faults; nothing hangs, nothing leaks,
no session sees another's output.

Quick mode runs in CI. The long mode (1,000 cycles; 50 sessions x 100 executions):

    KERNELEXEC_SOAK=long .venv/bin/python -m pytest tests/soak -s
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from kernelexec import AsyncSession, ExecutionTimeout, KernelDied, Policy, Session

from ..conftest import leftovers

LONG = os.environ.get("KERNELEXEC_SOAK") == "long"
CYCLES = 1000 if LONG else 200
ASYNC_CYCLES = 400 if LONG else 80
FLEET, EXECS = (50, 100) if LONG else (10, 20)
pytestmark = pytest.mark.slow


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def summary(title: str, rows: dict[str, object]) -> None:
    width = max(len(k) for k in rows)
    print(f"\n{title}\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows.items()))


def test_open_execute_close_cycles_across_threads(docker, policy):
    with Session(policy) as s:  # warm caches and the loop before taking the baseline
        s.execute("1")
    before = leftovers(docker)  # first: the docker SDK keeps pooled connections (fds) open
    base_fds, base_threads, base_rss = fds(), threading.active_count(), rss_mb()
    errors: list[BaseException] = []
    t0 = time.monotonic()

    def cycle(i: int) -> None:
        try:
            with Session(policy) as s:
                assert s.execute(f"{i} * 3").text == str(i * 3)
        except BaseException as e:  # collected and asserted on below
            errors.append(e)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(cycle, range(CYCLES)))
    elapsed = time.monotonic() - t0
    now_fds = fds()
    leaks = leftovers(docker)
    summary("sync cycles", {"cycles": CYCLES, "worker threads": 8, "seconds": round(elapsed, 1),
                            "errors": len(errors), "containers/volumes/dirs left": [len(x) for x in leaks],
                            "fds": f"{base_fds} -> {now_fds}", "python threads": f"{base_threads} -> {threading.active_count()}",
                            "rss MB": f"{base_rss:.0f} -> {rss_mb():.0f}"})
    assert errors == []
    assert leaks == before
    assert now_fds == base_fds and threading.active_count() == base_threads
    assert rss_mb() - base_rss < 150


def test_open_execute_close_cycles_asyncio(docker, policy):
    before = leftovers(docker)
    base_fds = fds()

    async def main() -> list[str | None]:
        sem = asyncio.Semaphore(8)

        async def cycle(i: int) -> str | None:
            async with sem, AsyncSession(policy) as s:
                return (await s.execute(f"{i} + 1")).text

        return await asyncio.gather(*(cycle(i) for i in range(ASYNC_CYCLES)))

    t0 = time.monotonic()
    out = asyncio.run(main())
    summary("async cycles", {"cycles": ASYNC_CYCLES, "concurrency": 8, "seconds": round(time.monotonic() - t0, 1)})
    assert out == [str(i + 1) for i in range(ASYNC_CYCLES)]
    assert fds() == base_fds
    assert leftovers(docker) == before


FAULTS = ("kill_inside", "docker_kill", "timeout", "ignore_sigint", "flood", "error")


def test_fleet_with_random_faults(docker, kernel_image):
    """Every execution returns, or raises a typed error; none gets another's output. (An execution that
    hangs never returns: the test's timeout, pytest-timeout's, reports it with every thread's stack.)"""
    rng = random.Random(1234)
    policy = Policy(image=kernel_image, interrupt_grace=1.0, max_output_bytes="256k")
    outcomes: Counter[str] = Counter()
    problems: list[str] = []
    before = leftovers(docker)
    lock = threading.Lock()

    def worker(n: int) -> None:
        with Session(policy, auto_restart=True) as s:
            for i in range(EXECS):
                token = f"tok-{n}-{i}"
                fault = rng.choice(FAULTS) if rng.random() < 0.10 else None
                code = f"print('{token}')"
                timeout = 10.0
                if fault == "kill_inside":
                    code += "\nimport os; os.kill(os.getpid(), 9)"
                elif fault == "docker_kill":
                    code += "\nimport time; time.sleep(5)"
                    threading.Timer(0.5, lambda cid=s.container_id: subprocess.run(
                        ["docker", "kill", cid], capture_output=True)).start()
                elif fault == "timeout":
                    code, timeout = code + "\nimport time; time.sleep(30)", 1.0
                elif fault == "ignore_sigint":
                    code, timeout = code + "\nimport signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN)" \
                                           "\ntime.sleep(30)", 1.0
                elif fault == "flood":
                    code += "\nfor _ in range(2000): print('x' * 1000)"
                elif fault == "error":
                    code += "\n1/0"
                try:
                    ex = s.execute(code, timeout=timeout)
                    kind = "ok" if ex.ok else f"error:{ex.error.ename if ex.error else ex.status}"
                    stray = [t for t in ex.stdout.split() if t.startswith("tok-") and t != token]
                    if not ex.stdout.startswith(token) or stray:
                        problems.append(f"{token}: wrong output {ex.stdout[:80]!r}")
                except ExecutionTimeout as e:
                    kind = f"timeout(state_lost={e.state_lost})"
                except KernelDied as e:
                    kind = f"{type(e).__name__}(restarted={e.restarted})"
                with lock:
                    outcomes[f"{fault or 'none'} -> {kind}"] += 1

    t0 = time.monotonic()
    with ThreadPoolExecutor(FLEET) as pool:
        for f in [pool.submit(worker, n) for n in range(FLEET)]:
            f.result()
    rows: dict[str, object] = {"sessions x executions": f"{FLEET} x {EXECS}",
                               "seconds": round(time.monotonic() - t0, 1)}
    rows.update({k: v for k, v in sorted(outcomes.items())})
    rows["problems"] = len(problems)
    rows["containers/volumes/dirs left"] = [len(x) for x in leftovers(docker)]
    summary("fleet with faults", rows)
    assert problems == []
    assert sum(outcomes.values()) == FLEET * EXECS
    assert leftovers(docker) == before
