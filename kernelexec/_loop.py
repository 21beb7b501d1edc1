"""The background event loop behind the synchronous API.

One loop thread per process, shared by every sync ``Session`` and stopped
when the last one closes, so an idle process keeps no extra thread and a
leak check sees the thread count return to its baseline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")


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
        """Run ``coro`` on the loop and wait for it; Ctrl-C cancels it there."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a sync Session cannot be used from its own callbacks; use AsyncSession")
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise
