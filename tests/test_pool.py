"""The warm pool: acquire/release, single use, refill after a kill, bounds, clean shutdown."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from kernelexec import KernelExecError, Policy
from kernelexec.pool import AsyncSessionPool, PoolClosed, PoolExhausted, SessionPool

from .conftest import leftovers


def test_acquire_is_warm_and_release_destroys(docker, policy):
    before = leftovers(docker)
    with SessionPool(size=2, max_sessions=4, policy=policy) as pool:
        assert pool.stats.warm == 2
        s = pool.acquire()
        assert pool.stats.warm_hits == 1 and pool.stats.cold_starts == 0
        s.execute("secret = 'user A'")
        cid = s.container_id
        pool.release(s)
        # the released container is gone and nobody gets it again
        for _ in range(4):
            with pool.session() as t:
                assert t.container_id != cid
                assert t.execute("'secret' in dir()").text == "False"
        assert docker.api.containers(all=True, filters={"id": cid}) == []
    assert leftovers(docker) == before


def test_pool_bounds_and_cold_starts(policy):
    with SessionPool(size=1, max_sessions=2, policy=policy) as pool:
        a = pool.acquire()
        b = pool.acquire()  # no warm one left at once, so this may be a cold start
        assert pool.stats.leased == 2
        with pytest.raises(PoolExhausted):
            pool.acquire(timeout=0.5)
        pool.release(a)
        c = pool.acquire(timeout=30)  # capacity freed by the release
        assert c.execute("1 + 1").text == "2"
        pool.release(b)
        pool.release(c)
        assert pool.stats.acquired == 3
        with pytest.raises(ValueError):
            pool.release(c)


def test_refill_after_a_warm_session_is_killed(docker, policy):
    with SessionPool(size=1, max_sessions=3, policy=policy) as pool:
        warm = pool._async._warm[0]
        subprocess.run(["docker", "kill", warm.container_id], check=True, capture_output=True)
        # the pool notices at acquire time and hands out a working session instead
        deadline = time.monotonic() + 10  # the client notices the socket closing
        while warm.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not warm.alive
        with pool.session(timeout=60) as s:
            assert s.execute("6 * 7").text == "42"
        assert pool.stats.discarded_dead == 1


def test_async_pool_and_close_leaves_nothing(docker, policy):
    before = leftovers(docker)

    async def main() -> list[str | None]:
        async with AsyncSessionPool(size=2, max_sessions=4, policy=policy) as pool:
            async def one(i: int) -> str | None:
                async with pool.session(timeout=60) as s:
                    return (await s.execute(f"{i} * 2")).text
            out = await asyncio.gather(*(one(i) for i in range(6)))
            leaked = await pool.acquire()  # never released: close() must still remove it
            assert leaked.alive
        with pytest.raises(PoolClosed):
            await pool.acquire()
        return list(out)

    assert asyncio.run(main()) == [str(i * 2) for i in range(6)]
    assert leftovers(docker) == before


def test_pool_start_failure_is_reported(docker):
    before = leftovers(docker)
    with pytest.raises(KernelExecError, match="kernelexec image build"):
        SessionPool(size=1, max_sessions=1, policy=Policy(image="kernelexec-no-such-image:0"))
    assert leftovers(docker) == before


def test_wait_warm_refills_and_close_wakes_every_waiter(docker, policy):
    before = leftovers(docker)

    async def main() -> None:
        pool = AsyncSessionPool(size=2, max_sessions=3, policy=policy)
        await pool.start()
        a, b = await pool.acquire(), await pool.acquire()
        await pool.release(a)
        await pool.release(b)
        await pool.wait_warm()  # both replacements, started in the background
        assert pool.stats.warm == 2 and pool.stats.leased == 0
        # every session the pool may have is taken: both waiters must block until close()
        held = [await pool.acquire() for _ in range(3)]
        waiting = [asyncio.ensure_future(pool.acquire()), asyncio.ensure_future(pool.wait_warm(2))]
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waiting)
        await pool.close()
        for w in waiting:
            with pytest.raises(PoolClosed):
                await asyncio.wait_for(w, 10)
        assert not any(s.alive for s in held)

    asyncio.run(main())
    assert leftovers(docker) == before


def test_wait_warm_reports_a_failing_refill(docker):
    async def main() -> None:
        pool = AsyncSessionPool(size=1, max_sessions=1, policy=Policy(image="kernelexec-no-such-image:0"))
        await pool.start(wait=False)
        try:
            with pytest.raises(KernelExecError, match="refill failed"):
                await asyncio.wait_for(pool.wait_warm(), 30)
        finally:
            await pool.close()

    asyncio.run(main())
