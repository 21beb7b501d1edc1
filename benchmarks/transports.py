"""Round trip and cold start per transport and runtime, and the cost of the audit log: one interleaved run.

Each configuration is a session in a process of its own (see :mod:`.worker`): ipc/runc, attach/runc,
attach/runsc (when the engine has runsc), and attach over TCP+TLS to a second engine that shares no
filesystem with this process (the test harness in ``tests/remote/engine.py``, one copy for tests and
benchmarks). They take turns in ``ROUNDS`` rounds, round trips first (every configuration's session open),
then cold starts, so a burst of noise on the machine lands on all of them rather than on one, and their
ratios can be compared.

The remote engine runs on this host, in its own mount and network namespaces, reached through a loopback
byte relay (a small Python process): its figures are TLS plus that relay plus the attach transport, not a
network's latency. ``remote_ssh`` reaches the same engine through an sshd on loopback whose sessions run
``docker system dial-stdio`` (tests/remote/sshd.py): each Engine API call is an ssh session (multiplexed)
and a docker CLI on the far side; the execute path is the attach stream, one long-lived such connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernelexec.backend.docker.api import api

from .stats import summary

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 10
BLOCKS = {"1+1": "1+1", "print_100k": 'print("x" * 100_000)'}
COMMAND_TIMEOUT = 600.0  # a round of 50 gVisor print_100k, or one gVisor cold start on a loaded host
EXIT_TIMEOUT = 120.0

#: key, label, Policy fields, the transport the session must end up on
CONFIGS: list[tuple[str, str, dict[str, Any], str]] = [
    ("ipc_runc", "ipc / runc", {"transport": "ipc"}, "ipc"),
    ("attach_runc", "attach / runc", {"transport": "attach"}, "attach"),
    ("attach_runsc", "attach / runsc (gVisor)", {"runtime": "runsc"}, "attach"),
    ("remote_tls", "attach / runc, remote engine over TCP+TLS", {}, "attach"),
    ("remote_ssh", "attach / runc, the same engine over ssh:// (docker system dial-stdio)", {}, "attach"),
]

Log = Callable[[str], None]


class WorkerError(RuntimeError):
    """A configuration's worker failed a command or died."""


@dataclass
class Worker:
    """A running :mod:`.worker` process and the configuration it measures."""

    key: str
    process: asyncio.subprocess.Process
    samples: dict[str, list[float]] = field(default_factory=dict)
    cold: list[float] = field(default_factory=list)
    transport: str | None = None

    async def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), COMMAND_TIMEOUT)
        if not line:
            raise WorkerError(f"{self.key}: the worker exited during {cmd['op']!r} "
                              f"(status {await self.process.wait()}; its stderr is above)")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"{self.key}: {cmd['op']!r} failed: {reply['error']}")
        return reply


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    """This process's environment; with ``extra`` (a remote engine), no other DOCKER_* variable.

    ``KERNELEXEC_AUDIT_LOG`` is dropped: a configuration has an audit log only when it says so.
    """
    env = {k: v for k, v in os.environ.items() if k != "KERNELEXEC_AUDIT_LOG"}
    if extra is not None:
        env = {k: v for k, v in env.items() if not k.startswith("DOCKER_")} | extra
    return env


@contextlib.asynccontextmanager
async def workers(configs: dict[str, dict[str, Any]], envs: dict[str, dict[str, str] | None]
                  ) -> AsyncIterator[dict[str, Worker]]:
    """One worker per configuration; each is told to exit (closing its sessions) and waited for.

    A worker that does not exit in time is killed by its pid: its container is then the next start's
    garbage collection's (the owner is dead), which the caller is told about.
    """
    out: dict[str, Worker] = {}
    try:
        for key, config in configs.items():
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.worker", json.dumps(config), cwd=ROOT, env=_env(envs.get(key)),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            out[key] = Worker(key, process)
        yield out
    finally:
        stuck = []
        for w in out.values():
            assert w.process.stdin is not None
            with contextlib.suppress(ConnectionError):
                w.process.stdin.write(b'{"op": "exit"}\n')
                w.process.stdin.close()
        for w in out.values():
            try:
                await asyncio.wait_for(w.process.wait(), EXIT_TIMEOUT)
            except asyncio.TimeoutError:
                w.process.kill()
                await w.process.wait()
                stuck.append(w.key)
        if stuck:
            raise WorkerError(f"the workers of {', '.join(stuck)} did not exit within {EXIT_TIMEOUT:.0f} s and were "
                              "killed; their sandboxes are removed by the next session start's gc")


def _turns(ws: dict[str, Worker], i: int) -> list[Worker]:
    """Round ``i``'s order: rotated each round, so that no configuration always follows the same one."""
    order = list(ws.values())
    k = i % len(order)
    return order[k:] + order[:k]


async def interleave(ws: dict[str, Worker], n: int, cold: int, log: Log, blocks: dict[str, str] = BLOCKS) -> None:
    """Round trips (``n`` per block, in ``ROUNDS`` rounds), then ``cold`` cold starts each, one per round."""
    for w in ws.values():
        w.transport = (await w.call(op="open"))["transport"]
    for block, code in blocks.items():
        log(f"transports: {block!r}, {n} runs on each of {', '.join(ws)}")
        for w in ws.values():
            await w.call(op="rt", code=code, n=0, warmup=True)
        for i in range(ROUNDS):
            for w in _turns(ws, i):
                w.samples.setdefault(block, []).extend((await w.call(op="rt", code=code, n=max(n // ROUNDS, 1)))["ms"])
    for w in ws.values():
        await w.call(op="close")
    if cold:
        log(f"transports: {cold} cold starts on each of {', '.join(ws)}")
    for i in range(cold):
        for w in _turns(ws, i):
            reply = await w.call(op="cold")
            w.cold.append(reply["s"])
            if reply["transport"] != w.transport:
                raise WorkerError(f"{w.key}: a cold start went over {reply['transport']}, not {w.transport}")


async def _runsc_registered() -> bool:
    info = await api().call("GET", "/info", what="engine info")
    return "runsc" in (info.get("Runtimes") or {})


def _start_remote(log: Log) -> Any:
    """The remote test engine with the kernel image on it (blocking: run in a thread)."""
    from kernelexec.kernel.image import default_image

    # the harness lives with the tests (one copy for both): `python -m benchmarks` runs from the checkout
    from tests.remote import engine as remote

    image = default_image()
    log(f"transports: starting the remote test engine (TLS, own namespaces) and copying {image} onto it")
    return remote.start(image)


def _start_sshd(engine: Any) -> Any:
    from tests.remote import sshd

    return sshd.start(engine, Path(tempfile.mkdtemp(prefix="kx-bench-sshd-")) / "d")


def _stop_remote(engine: Any, front: Any) -> list[str]:
    import shutil

    from tests.remote import engine as remote
    from tests.remote import sshd

    if front is not None:
        sshd.stop(front)
        shutil.rmtree(front.dir.parent, ignore_errors=True)
    return list(remote.stop(engine))


async def run(n: int, cold: int, log: Log) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": ROUNDS}
    results: dict[str, Any] = {}
    configs: dict[str, dict[str, Any]] = {}
    envs: dict[str, dict[str, str] | None] = {}
    skipped: dict[str, str] = {}
    for key, _, policy, _ in CONFIGS:
        configs[key] = {"policy": policy}
    if not await _runsc_registered():
        skipped["attach_runsc"] = ("runsc is not registered with the engine (scripts/setup.sh installs Debian's "
                                   "runsc and registers it)")
    engine = front = None
    if os.geteuid() != 0:
        skipped["remote_tls"] = skipped["remote_ssh"] = ("the remote test engine needs root (its own dockerd in "
                                                         "its own namespaces)")
    else:
        try:
            engine = await asyncio.to_thread(_start_remote, log)
        except Exception as e:  # said in the report; the other configurations still run
            skipped["remote_tls"] = skipped["remote_ssh"] = (f"the remote test engine did not start: "
                                                             f"{type(e).__name__}: {e}")
            log(skipped["remote_tls"])
    if engine is not None:
        try:
            front = await asyncio.to_thread(_start_sshd, engine)
        except Exception as e:  # no sshd here (scripts/setup.sh installs it): the others still run
            skipped["remote_ssh"] = f"the test sshd did not start: {type(e).__name__}: {e}"
            log(skipped["remote_ssh"])
    try:
        if engine is not None:
            envs["remote_tls"] = dict(engine.env)
            out["remote_engine"] = engine.endpoint.describe()
        if front is not None:
            envs["remote_ssh"] = dict(front.env)
        async with workers({k: c for k, c in configs.items() if k not in skipped}, envs) as ws:
            await interleave(ws, n, cold, log)
    finally:
        if engine is not None:
            left = await asyncio.to_thread(_stop_remote, engine, front)
            if left:
                out["remote_left"] = left  # a leak of kernelexec's; the report shows it
                log(f"transports: left on the remote engine (removed now): {left}")
    for key, label, _, want in CONFIGS:
        if key in skipped:
            results[key] = {"label": label, "skipped": skipped[key]}
            continue
        w = ws[key]
        if w.transport != want:
            raise WorkerError(f"{key}: the session went over {w.transport}, expected {want}")
        results[key] = {
            "label": label, "transport": w.transport,
            "roundtrip_ms": {b: summary(v) for b, v in w.samples.items()},
            "cold_start_s": summary(w.cold),
        }
    out["configs"] = results
    return out


async def audit_cost(n: int, log: Log) -> dict[str, Any]:
    """``execute("1+1")`` with and without ``audit_log`` (ipc/runc), interleaved: what one audit record costs."""
    with tempfile.TemporaryDirectory(prefix="kernelexec-bench-audit-") as tmp:
        path = Path(tmp) / "audit.jsonl"
        configs: dict[str, dict[str, Any]] = {"without": {"policy": {"transport": "ipc"}},
                                             "with": {"policy": {"transport": "ipc"}, "audit_log": str(path)}}
        log(f"audit log: {n} runs of '1+1' with and without Session(audit_log=...)")
        async with workers(configs, {}) as ws:
            await interleave(ws, n, 0, log, {"1+1": "1+1"})
        lines = path.read_text().count("\n")
    return {
        "without_ms": summary(ws["without"].samples["1+1"]), "with_ms": summary(ws["with"].samples["1+1"]),
        "records": lines, "rounds": ROUNDS,
    }
