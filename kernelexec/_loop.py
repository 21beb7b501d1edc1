"""The background event loop behind the synchronous API.

One loop thread per process, shared by every sync ``Session`` and stopped
when the last one closes, so an idle process keeps no extra thread and a
leak check sees the thread count return to its baseline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

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

        self.loop.call_soon_threadsafe(start)
        try:
            done.wait()
        except KeyboardInterrupt:
            self.loop.call_soon_threadsafe(lambda: box[0].cancel())  # `start` ran first: FIFO
            done.wait()  # a second Ctrl-C leaves from here
            task = box[0]
            if not task.cancelled() and task.exception() is not None:
                log.warning("after Ctrl-C: %s", task.exception())
            raise
        return box[0].result()
