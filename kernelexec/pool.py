"""A pool of warm sandboxes, so that a new agent conversation starts in milliseconds.

Sessions are single-use: a released session is destroyed (in the background)
and replaced by a fresh one, never handed to another user, because whatever
one agent's code left in a kernel (variables, files, processes) is not the
next agent's business. Acquire takes a warm session when there is one and
never waits for refills; when there is none it starts one itself (counted as
a cold start in :attr:`stats`), up to ``max_sessions`` alive at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from ._loop import LoopThread
from .errors import KernelExecError
from .policy import Policy
from .session import AsyncSession, Session

T = TypeVar("T")

log = logging.getLogger("kernelexec")


class PoolExhausted(KernelExecError):
    """Every session the pool may have is in use."""


class PoolClosed(KernelExecError):
    """The pool was closed."""


@dataclass
class PoolStats:
    warm: int = 0  # started and waiting
    leased: int = 0  # handed out, not yet released
    starting: int = 0  # being started (refills and cold starts)
    acquired: int = 0
    warm_hits: int = 0  # acquires served by a warm session
    cold_starts: int = 0  # acquires that had to start a session themselves
    discarded_dead: int = 0  # warm sessions found dead at acquire time
    refill_failures: int = 0
    last_error: str | None = None


class AsyncSessionPool:
    """Keeps ``size`` sessions warm; at most ``max_sessions`` exist at once.

    ``session_kwargs`` go to every :class:`AsyncSession` it makes (``backend=``, ``profile=``...)."""

    def __init__(self, size: int = 2, max_sessions: int = 16, policy: Policy | None = None,
                 **session_kwargs: Any) -> None:
        if size < 0 or max_sessions < 1 or size > max_sessions:
            raise ValueError("need 0 <= size <= max_sessions and max_sessions >= 1")
        self.size, self.max_sessions = size, max_sessions
        self.policy = policy
        self._kwargs = session_kwargs
        self._warm: list[AsyncSession] = []
        self._leased: set[AsyncSession] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._capacity: asyncio.Condition | None = None
        self._closed = False
        self.stats = PoolStats()

    def _total(self) -> int:
        return len(self._warm) + len(self._leased) + self.stats.starting

    def _sync_stats(self) -> None:
        self.stats.warm, self.stats.leased = len(self._warm), len(self._leased)

    async def __aenter__(self) -> AsyncSessionPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, wait: bool = True) -> None:
        """Begin filling the pool; with ``wait``, return once ``size`` sessions are warm."""
        if self._capacity is None:
            self._capacity = asyncio.Condition()
        self._refill()
        if wait:
            await asyncio.gather(*list(self._tasks))
            if self.size and not self._warm and self.stats.last_error:
                raise KernelExecError(f"the pool could not start any session: {self.stats.last_error}")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refill(self) -> None:
        while not self._closed and len(self._warm) + self.stats.starting < self.size \
                and self._total() < self.max_sessions:
            self.stats.starting += 1
            self._spawn(self._start_one())

    async def _new_session(self) -> AsyncSession:
        s = AsyncSession(self.policy, **self._kwargs)
        await s.start()
        return s

    async def _start_one(self) -> None:
        try:
            s = await self._new_session()
        except KernelExecError as e:
            self.stats.refill_failures += 1
            self.stats.last_error = str(e)
            log.error("pool refill failed: %s", e)
            await self._notify()
            return
        finally:
            self.stats.starting -= 1
        if self._closed:
            await s.close()
            return
        self._warm.append(s)
        self._sync_stats()
        await self._notify()

    async def _notify(self) -> None:
        assert self._capacity is not None
        async with self._capacity:
            self._capacity.notify_all()

    async def acquire(self, timeout: float | None = None) -> AsyncSession:
        """A session for one user. Warm if possible; never a used one."""
        if self._closed:
            raise PoolClosed("the pool is closed")
        if self._capacity is None:
            await self.start(wait=False)
        assert self._capacity is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._closed:
                raise PoolClosed("the pool is closed")
            while self._warm:
                s = self._warm.pop()
                if s.alive:
                    self.stats.warm_hits += 1
                    return self._lease(s)
                self.stats.discarded_dead += 1
                self._spawn(self._dispose(s))
            if self._total() < self.max_sessions:
                self.stats.starting += 1
                self.stats.cold_starts += 1
                try:
                    s = await self._new_session()
                finally:
                    self.stats.starting -= 1
                return self._lease(s)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise PoolExhausted(f"all {self.max_sessions} sessions are in use; release one or raise "
                                    "max_sessions")
            async with self._capacity:
                try:
                    await asyncio.wait_for(self._capacity.wait(), remaining)
                except asyncio.TimeoutError:
                    continue

    async def wait_warm(self, count: int | None = None) -> None:
        """Return once ``count`` sessions (default and at most: ``size``) are warm.

        For callers that want the next ``acquire`` to be a warm hit, e.g. after
        a burst of releases. Raises when a refill fails meanwhile, with its error.
        """
        want = self.size if count is None else min(count, self.size)  # the pool never keeps more
        if self._capacity is None:
            await self.start(wait=False)
        assert self._capacity is not None
        failures = self.stats.refill_failures
        async with self._capacity:
            while len(self._warm) < want:
                if self._closed:
                    raise PoolClosed("the pool is closed")
                if self.stats.refill_failures != failures:
                    raise KernelExecError(f"a pool refill failed: {self.stats.last_error}")
                await self._capacity.wait()

    def _lease(self, s: AsyncSession) -> AsyncSession:
        self._leased.add(s)
        self.stats.acquired += 1
        self._sync_stats()
        self._refill()
        return s

    async def release(self, s: AsyncSession) -> None:
        """Give a session back: it is destroyed, and a fresh one takes its place."""
        if s not in self._leased:
            raise ValueError("this session was not acquired from this pool (or was released already)")
        self._leased.discard(s)
        self._sync_stats()
        self._spawn(self._dispose(s))

    async def _dispose(self, s: AsyncSession) -> None:
        try:
            await s.close()
        finally:
            self._refill()
            await self._notify()

    @contextlib.asynccontextmanager
    async def session(self, timeout: float | None = None) -> AsyncIterator[AsyncSession]:
        s = await self.acquire(timeout)
        try:
            yield s
        finally:
            await self.release(s)

    async def close(self) -> None:
        """Close every session, warm and leased, and wait for all background work."""
        self._closed = True
        if self._capacity is not None:
            await self._notify()  # waiters in acquire() and wait_warm() see the pool closed
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=False)
        sessions = self._warm + list(self._leased)
        self._warm, self._leased = [], set()
        self._sync_stats()
        results = await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]


class SessionPool:
    """The synchronous face of :class:`AsyncSessionPool`."""

    def __init__(self, size: int = 2, max_sessions: int = 16, policy: Policy | None = None,
                 **session_kwargs: Any) -> None:
        self._loop = LoopThread.acquire()
        self._async = AsyncSessionPool(size, max_sessions, policy, **session_kwargs)
        self._released = False
        try:
            self._loop.run(self._async.start())
        except BaseException:
            self._loop.run(self._async.close())
            self._release()
            raise

    def _release(self) -> None:
        if not self._released:
            self._released = True
            LoopThread.release()

    @property
    def stats(self) -> PoolStats:
        return self._async.stats

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._released:
            coro.close()
            raise PoolClosed("the pool is closed; create a new one")
        return self._loop.run(coro)

    def acquire(self, timeout: float | None = None) -> Session:
        return Session._adopt(self._run(self._async.acquire(timeout)), self._loop)

    def release(self, session: Session) -> None:
        self._run(self._async.release(session._async))
        session._closed = True  # released sessions are destroyed; the wrapper says so from now on

    def wait_warm(self, count: int | None = None) -> None:
        self._run(self._async.wait_warm(count))

    @contextlib.contextmanager
    def session(self, timeout: float | None = None) -> Iterator[Session]:
        s = self.acquire(timeout)
        try:
            yield s
        finally:
            self.release(s)

    def close(self) -> None:
        if self._released:
            return
        try:
            self._loop.run(self._async.close())
        finally:
            self._release()

    def __enter__(self) -> SessionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
