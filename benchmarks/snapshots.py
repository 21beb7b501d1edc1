"""Snapshots (issue 16): snapshot and restore time and size, pause and resume, and the memory a pause frees.

Two sessions side by side: one holding a DataFrame of 1,600,000 x 4 float64 (51.2 MB) plus a function,
a class and an instance of it, and an empty one as the baseline. Each is snapshotted ``runs`` times,
and each snapshot restored into a new sandbox (``AsyncSession.restore``: a new container, then the
state loaded into it), timed to the restored session, then to the result of its first ``execute``.
A second session of each kind is paused (its state written to a state directory of this run's own,
its container removed) and resumed by id, ``runs`` times in a row.

Memory is the engine's view of the container's cgroup (``docker stats``: usage minus the inactive
page cache), read one second after the session last ran code: the idle session, each restored and
each resumed one, and the container just before each pause. After a pause there is no container
(checked with the engine), so what it held is what the pause freed. The host keeps the snapshot, on
disk in the state directory (its size is given); the process that paused keeps nothing of it once it
drops the ``Snapshot`` that ``pause()`` returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kernelexec import AsyncSession, Policy
from kernelexec.backend.docker.api import NotFound, api
from kernelexec.snapshot import store

from .density import working_set
from .stats import summary
from .util import close_all

ROWS, COLUMNS = 1_600_000, 4
SETTLE_S = 1.0  # before a memory reading: the kernel's own work after a start or a call is done

DF_SETUP = f"""
import numpy as np, pandas as pd
df = pd.DataFrame(np.random.default_rng(0).standard_normal(({ROWS}, {COLUMNS})), columns=list("abcd"))
checksum = float(df.to_numpy().sum())  # no temporary copies: they would stay in the memory figures
def zscore(frame):
    return (frame - frame.mean()) / frame.std()
class Model:
    def __init__(self, k):
        self.k = k
    def predict(self, frame):
        return frame["a"] * self.k
model = Model(2.0)
"""
#: after a restore or resume: the state is all there and works (not timed)
DF_CHECK = ("print(float(df.to_numpy().sum()) == checksum, zscore(df.head(100)).shape, "
            "float(model.predict(df.head(1)).iloc[0]) == 2 * float(df.a.iloc[0]), isinstance(model, Model))")
DF_CHECKED = "True (100, 4) True True"

#: label, code run in the session first, the first execute after a restore and its result, the check
KINDS: dict[str, tuple[str, str, str, str, str, str]] = {
    "dataframe": (f"{ROWS:,} x {COLUMNS} float64 DataFrame, a function, a class and an instance",
                  DF_SETUP, "len(df)", str(ROWS), DF_CHECK, DF_CHECKED),
    "empty": ("empty session", "", "1+1", "2", "print('x' in dir())", "False"),
}


@contextlib.contextmanager
def private_state_dir() -> Iterator[Path]:
    """``KERNELEXEC_STATE_DIR`` pointed at a temporary directory for the run, then removed (and reset)."""
    before = os.environ.get("KERNELEXEC_STATE_DIR")
    with tempfile.TemporaryDirectory(prefix="kernelexec-bench-state-") as tmp:
        os.environ["KERNELEXEC_STATE_DIR"] = tmp
        try:
            yield Path(tmp)
        finally:
            if before is None:
                os.environ.pop("KERNELEXEC_STATE_DIR", None)
            else:
                os.environ["KERNELEXEC_STATE_DIR"] = before


async def memory(s: AsyncSession) -> dict[str, int]:
    """The container's memory now: the working set (as ``docker stats`` shows it) and the cgroup's usage."""
    assert s.container_id is not None
    await asyncio.sleep(SETTLE_S)
    stats = await api().stats(s.container_id)
    return {"working_set": working_set(stats), "usage": int((stats.get("memory_stats") or {}).get("usage", 0))}


async def gone(cid: str) -> bool:
    try:
        await api().inspect(cid)
    except NotFound:
        return True
    return False


async def started(setup: str) -> AsyncSession:
    s = AsyncSession(Policy())
    try:
        if setup:
            ran = await s.execute(setup)
            if ran.status != "ok":
                raise RuntimeError(f"the benchmark's state did not build: {ran.error}")
        else:
            await s.start()
    except BaseException:
        await s.close()
        raise
    return s


async def first_execute(s: AsyncSession, code: str, expected: str) -> float:
    """The first ``execute`` on a restored or resumed session, timed (ms)."""
    t = time.perf_counter()
    ex = await s.execute(code)
    elapsed = (time.perf_counter() - t) * 1000
    if ex.text != expected:
        raise RuntimeError(f"the first execute after a restore gave {ex.text!r} ({ex.error}), expected {expected!r}")
    return elapsed


async def check(s: AsyncSession, code: str, expected: str) -> None:
    """The state is the state snapshotted (after the memory reading: what it computes is not counted)."""
    got = (await s.execute(code)).stdout.strip()
    if got != expected:
        raise RuntimeError(f"the restored state is not the state snapshotted: {got!r}, expected {expected!r}")


def _mib(values: list[int]) -> dict[str, Any]:
    return summary([v / 2**20 for v in values], 1)


async def snapshot_restore(kind: str, runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    _, setup, first, expected, check_code, checked_text = KINDS[kind]
    times: dict[str, list[float]] = {"snapshot_s": [], "restore_s": [], "first_execute_ms": []}
    mem: list[int] = []
    s = await started(setup)
    try:
        idle = await memory(s)
        for i in range(runs):
            t = time.perf_counter()
            snap = await s.snapshot()
            times["snapshot_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            r = await AsyncSession.restore(snap, Policy())
            try:
                times["restore_s"].append(time.perf_counter() - t)
                times["first_execute_ms"].append(await first_execute(r, first, expected))
                mem.append((await memory(r))["working_set"])
                await check(r, check_code, checked_text)
            finally:
                await r.close()
            log(f"snapshots: {kind}: snapshot {times['snapshot_s'][-1]:.3f} s, {snap.size / 2**20:.1f} MiB; "
                f"restore {times['restore_s'][-1]:.3f} s, first execute {times['first_execute_ms'][-1]:.1f} ms "
                f"({i + 1}/{runs})")
    finally:
        await s.close()
    return {
        **{k: summary(v, 4 if k.endswith("_s") else 2) for k, v in times.items()},
        "snapshot_bytes": snap.size, "sections": dict(snap.sizes), "variables": len(snap.variables),
        "lost": [x.name for x in snap.lost],
        "idle_mem_mib": round(idle["working_set"] / 2**20, 1), "idle_usage_mib": round(idle["usage"] / 2**20, 1),
        "restored_mem_mib": _mib(mem),
    }


async def pause_resume(kind: str, runs: int, state: Path, log: Callable[[str], None]) -> dict[str, Any]:
    _, setup, first, expected, check_code, checked_text = KINDS[kind]
    times: dict[str, list[float]] = {"pause_s": [], "resume_s": [], "first_execute_ms": []}
    before: list[dict[str, int]] = []
    resumed: list[int] = []
    all_gone, files = True, []
    s = await started(setup)
    sessions = [s]
    try:
        for i in range(runs):
            before.append(await memory(s))
            cid = s.container_id
            assert cid is not None
            t = time.perf_counter()
            snap = await s.pause()
            times["pause_s"].append(time.perf_counter() - t)
            all_gone = all_gone and s.container_id is None and await gone(cid)
            files.append((store.session_dir(s.id, state) / store.SNAPSHOT).stat().st_size)
            size, sizes = snap.size, dict(snap.sizes)
            del snap
            t = time.perf_counter()
            s = await AsyncSession.resume(sessions[-1].id)
            sessions.append(s)
            times["resume_s"].append(time.perf_counter() - t)
            times["first_execute_ms"].append(await first_execute(s, first, expected))
            resumed.append((await memory(s))["working_set"])
            await check(s, check_code, checked_text)
            log(f"snapshots: {kind}: pause {times['pause_s'][-1]:.3f} s (freed "
                f"{before[-1]['working_set'] / 2**20:.1f} MiB, container gone: {all_gone}), resume "
                f"{times['resume_s'][-1]:.3f} s, first execute {times['first_execute_ms'][-1]:.1f} ms ({i + 1}/{runs})")
    finally:
        await close_all(sessions)  # the last one owns the paused state: closing it removes it
    return {
        **{k: summary(v, 4 if k.endswith("_s") else 2) for k, v in times.items()},
        "snapshot_bytes": size, "sections": sizes, "state_file_bytes": max(files),
        "freed_mem_mib": _mib([b["working_set"] for b in before]),
        "freed_usage_mib": _mib([b["usage"] for b in before]),
        "container_gone_after_pause": all_gone, "mem_after_pause_mib": 0.0 if all_gone else None,
        "idle_mem_mib": round(before[0]["working_set"] / 2**20, 1),
        "resumed_mem_mib": _mib(resumed),
    }


async def run(runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs, "rows": ROWS, "columns": COLUMNS, "dataframe_bytes": ROWS * COLUMNS * 8,
                           "settle_s": SETTLE_S, "kinds": {}}
    with private_state_dir() as state:
        for kind, (label, *_) in KINDS.items():
            log(f"snapshots: {kind}: {runs} snapshots, each restored into a new sandbox")
            figures = {"label": label, **await snapshot_restore(kind, runs, log)}
            log(f"snapshots: {kind}: pause and resume, {runs} times in a row")
            figures["pause"] = await pause_resume(kind, runs, state, log)
            out["kinds"][kind] = figures
        left = [p.id for p in store.paused(state)]
    if left:
        raise RuntimeError(f"paused sessions left in the state directory: {left}")
    return out


def _t(v: dict[str, Any], unit: str = "s") -> str:
    digits = 3 if unit == "s" else 1
    return f"{v['p50']:.{digits}f} {unit} ({v['p90']:.{digits}f} / {v['min']:.{digits}f})"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def markdown(r: dict[str, Any]) -> list[str]:
    """Lines for the benchmark report."""
    kinds = r.get("kinds") or {}
    df, empty = kinds.get("dataframe"), kinds.get("empty")
    if not df or not empty:
        return []
    cols = [df, empty]

    def row(what: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {what} | " + " | ".join(cell(k) for k in cols) + " |"

    def sections(k: dict[str, Any]) -> str:
        return ", ".join(f"{name} {_size(n)}" for name, n in k["sections"].items() if n)

    p = [k["pause"] for k in cols]
    return [
        "", f"Snapshots: a session holding a {r['rows']:,} x {r['columns']} float64 DataFrame "
            f"({r['dataframe_bytes'] / 1e6:.1f} MB), a function, a class and an instance, and an empty session; "
            f"{r['runs']} runs each. Times are p50 (p90 / min); restore is `AsyncSession.restore` (a new container, "
            "the state loaded into it); pause writes to the state directory on disk and removes the container. "
            "Memory is the container's working set (engine stats), MiB p50, read "
            f"{r['settle_s']:.0f} s after the last call.",
        "",
        "| | 50 MB DataFrame | empty session |",
        "|---|---|---|",
        row("`snapshot()`", lambda k: _t(k["snapshot_s"])),
        row("snapshot size", lambda k: f"{_size(k['snapshot_bytes'])} ({sections(k)})"),
        row("`AsyncSession.restore(snapshot)`", lambda k: _t(k["restore_s"])),
        row("first `execute` after restore", lambda k: _t(k["first_execute_ms"], "ms")),
        row("`pause()`", lambda k: _t(k["pause"]["pause_s"])),
        row("paused state on disk", lambda k: _size(k["pause"]["state_file_bytes"])),
        row("`AsyncSession.resume(id)`", lambda k: _t(k["pause"]["resume_s"])),
        row("first `execute` after resume", lambda k: _t(k["pause"]["first_execute_ms"], "ms")),
        row("memory: idle / restored / resumed",
            lambda k: f"{k['idle_mem_mib']} / {k['restored_mem_mib']['p50']} / {k['pause']['resumed_mem_mib']['p50']}"
                      " MiB"),
        row("memory freed by `pause()` (container gone after it)",
            lambda k: f"{k['pause']['freed_mem_mib']['p50']} MiB"
                      + ("" if k["pause"]["container_gone_after_pause"] else " (**a container was left**)")),
    ] + ([] if all(x["container_gone_after_pause"] for x in p) else
         ["", "**A paused session's container was still there after `pause()`.**"])


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.snapshots", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "snapshots.json")
    args = p.parse_args()

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = asyncio.run(run(args.runs, say))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(markdown(results)).strip())


if __name__ == "__main__":
    main()
