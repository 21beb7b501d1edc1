"""One session configuration in a process of its own, driven one command at a time by the parent.

Why a process per configuration: the engine endpoint is read once per process (``backend.docker.api.api()``), so a
remote engine needs its own environment, and giving every configuration the same kind of process keeps the
comparison fair (same event loop load, same interpreter state). The parent makes them take turns; only one
worker measures at any time, the others wait on their stdin without blocking their loop (the attach
transport's keepalives keep running).

Protocol: the configuration as JSON in ``argv[1]``; then one JSON command per line on stdin, one JSON reply
per line on the protocol fd (a copy of the original stdout; fd 1 itself goes to stderr, so nothing the
library might print can corrupt the protocol). Commands:

* ``{"op": "open"}``: start the long-lived session, run a few warm-up cells; reply ``{"transport": ...}``.
* ``{"op": "rt", "code": CODE, "n": N}``: N executions of CODE on that session; reply ``{"ms": [...]}``.
* ``{"op": "close"}``: close that session.
* ``{"op": "cold"}``: ``AsyncSession()`` to the result of ``1+1``, then close; reply ``{"s": ..., "transport": ...}``.
* ``{"op": "exit"}``: close what is open and exit.

A failed command replies ``{"error": "..."}`` and the worker goes on (the parent decides).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any, TextIO

from kernelexec import AsyncSession, Policy

WARMUP = 20


def _session(config: dict[str, Any]) -> AsyncSession:
    return AsyncSession(Policy(**config.get("policy", {})), audit_log=config.get("audit_log"))


async def _execute(session: AsyncSession, code: str) -> None:
    ex = await session.execute(code)
    if ex.status != "ok":
        raise RuntimeError(f"{code!r} failed: {ex.error}")


async def _handle(cmd: dict[str, Any], config: dict[str, Any], state: dict[str, AsyncSession]) -> dict[str, Any]:
    op = cmd["op"]
    if op == "open":
        s = _session(config)
        await s.start()
        state["session"] = s
        for _ in range(WARMUP):
            await _execute(s, "1+1")
        return {"transport": s.transport}
    if op == "rt":
        s = state["session"]
        code, out = cmd["code"], []
        for _ in range(WARMUP if cmd.get("warmup") else 0):
            await _execute(s, code)
        for _ in range(int(cmd["n"])):
            t = time.perf_counter()
            await _execute(s, code)
            out.append((time.perf_counter() - t) * 1000)
        return {"ms": out}
    if op == "close":
        s = state.pop("session")
        await s.close()
        return {}
    if op == "cold":
        t = time.perf_counter()
        async with _session(config) as s:
            ex = await s.execute("1+1")
            elapsed = time.perf_counter() - t
            transport = s.transport
        if ex.text != "2":
            raise RuntimeError(f"cold start: 1+1 gave {ex.text!r} ({ex.status}, {ex.error})")
        return {"s": elapsed, "transport": transport}
    raise ValueError(f"unknown command {op!r}")


async def serve(config: dict[str, Any], proto: TextIO) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    state: dict[str, AsyncSession] = {}
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["op"] == "exit":
                break
            try:
                reply = await _handle(cmd, config, state)
            except Exception as e:  # reported to the parent, which stops the run with it
                reply = {"error": f"{type(e).__name__}: {e}"}
            proto.write(json.dumps(reply) + "\n")
            proto.flush()
    finally:
        if "session" in state:
            await state.pop("session").close()


def main() -> None:
    config = json.loads(sys.argv[1])
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    asyncio.run(serve(config, proto))
    proto.write(json.dumps({"exited": True}) + "\n")
    proto.flush()


if __name__ == "__main__":
    main()
