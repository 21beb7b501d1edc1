"""The host's side of egress connections: one task per connection, none left behind.

A transport hands each connection its sandbox's code opened to the egress port to
:meth:`HandlerTasks.spawn` as a :class:`~.base.ByteStream`; the session's handler (the egress
proxy) runs in a task that closes the stream when it returns. ``close()`` cancels and awaits
every task, so a sandbox's destroy leaves no task, socket or fd of its connections.
"""

from __future__ import annotations

import asyncio
import logging

from .base import ByteStream, EgressHandler, StreamPair

log = logging.getLogger("kernelexec")

__all__ = ["HandlerTasks"]


class HandlerTasks:
    """The running handlers of one sandbox's egress connections."""

    def __init__(self, handler: EgressHandler, name: str) -> None:
        self.handler = handler
        self.name = name
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, stream: ByteStream) -> None:
        """Run the handler on ``stream`` (closed when the handler returns, or at :meth:`close`)."""
        if self._closed:
            task = asyncio.get_running_loop().create_task(stream.close())
        else:
            task = asyncio.get_running_loop().create_task(self._run(stream), name=f"{self.name}-egress")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """For ``asyncio.start_server``/``start_unix_server``: the connection as a stream."""
        self.spawn(StreamPair(reader, writer))

    async def _run(self, stream: ByteStream) -> None:
        try:
            await self.handler(stream)
        finally:
            await stream.close()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # the proxy answers every failure of a connection itself; what reaches here is a bug of ours,
            # and it ends one connection of the code, not the session
            log.error("%s: an egress connection's handler failed", self.name, exc_info=task.exception())

    async def close(self) -> None:
        """Cancel every handler and wait for each to close its stream. Idempotent."""
        self._closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
