"""The bridge from synchronous code to the async core, in its two forms.

* :class:`LoopThread`: one loop thread per process, shared by every sync
  ``Session`` and pool and stopped when the last one closes, so an idle
  process keeps no extra thread and a leak check sees the thread count return
  to its baseline. Objects that live on it (sessions, their channels) are only
  ever used from it.
  Blocking work that talks to the engine (image builds) holds it with
  :meth:`LoopThread.held` for its duration and runs each engine call, or
  steps through each streamed response (:meth:`LoopThread.iterate`), on it.
* :func:`run_blocking`: one coroutine on a fresh loop in a fresh thread, for
  the places that cannot rely on any loop being usable: atexit, a signal
  handler that may interrupt the loop thread's own user, ``gc`` and the CLI's
  one-shot calls, from plain scripts and from inside a running loop alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Coroutine, Generator, Iterator
from typing import Any, TypeVar, cast

T = TypeVar("T")
log = logging.getLogger("kernelexec")


class LoopThread:
    _lock = threading.Lock()
    _instance: LoopThread | None = None
    _users = 0

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name="kernelexec-io", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    @classmethod
    def acquire(cls) -> LoopThread:
        with cls._lock:
            if cls._instance is None:
                cls._instance = LoopThread()
            cls._users += 1
            return cls._instance

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users > 0 or cls._instance is None:
                return
            inst, cls._instance = cls._instance, None
        inst.loop.call_soon_threadsafe(inst.loop.stop)
        if threading.current_thread() is not inst.thread:
            inst.thread.join()

    @classmethod
    @contextlib.contextmanager
    def held(cls) -> Iterator[LoopThread]:
        """The loop thread, kept running until the block ends (for a series of calls from blocking code)."""
        inst = cls.acquire()
        try:
            yield inst
        finally:
            cls.release()

    def iterate(self, items: AsyncIterator[T]) -> Generator[T, None, None]:
        """The items of an async iterator (a streamed response) on the loop, one by one, in the calling thread:
        what is done with each (progress callbacks, deadlines) runs here, never on the shared loop. Leaving
        early closes the iterator there (for a response: its connection)."""
        async def step() -> tuple[bool, T | None]:
            try:
                return True, await items.__anext__()
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self.run(step())
                if not more:
                    return
                yield cast(T, item)
        finally:
            close = getattr(items, "aclose", None)
            if close is not None:
                self.run(close())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it.

        Ctrl-C (KeyboardInterrupt in the waiting thread) cancels it there and
        waits for its cancellation to finish, so that an execution's cancel path
        (interrupt the kernel, keep the state) completes before the caller goes
        on, and the task's outcome is always retrieved; a second Ctrl-C stops
        waiting.
        """
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a sync Session cannot be used from its own callbacks; use AsyncSession")
        done = threading.Event()
        box: list[asyncio.Task[T]] = []

        def finished(task: asyncio.Task[T]) -> None:
            if not task.cancelled():
                task.exception()  # retrieved: raised below to a caller still waiting, logged otherwise
            done.set()

        def start() -> None:
            task = self.loop.create_task(coro)
            box.append(task)
            task.add_done_callback(finished)

        def cancel() -> None:
            if box:  # callbacks run in order: a scheduled `start` ran before this
                box[0].cancel()
            else:  # Ctrl-C came before `start` was scheduled: nothing ran
                coro.close()
                done.set()

        try:
            self.loop.call_soon_threadsafe(start)
            done.wait()
        except KeyboardInterrupt:
            # wherever it landed (even before `start` was scheduled), the work is cancelled and its
            # cancel path awaited: a caller that goes on must not find the session still busy
            self.loop.call_soon_threadsafe(cancel)
            done.wait()  # a second Ctrl-C leaves from here
            if box and not box[0].cancelled() and box[0].exception() is not None:
                log.warning("after Ctrl-C: %s", box[0].exception())
            raise
        return box[0].result()


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, whatever loop is running here.

    A fresh thread with its own loop works in a plain script, inside a
    running event loop, and inside a signal handler alike.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def main() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as e:  # handed to the caller below
            error.append(e)

    t = threading.Thread(target=main, name="kernelexec-blocking")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
