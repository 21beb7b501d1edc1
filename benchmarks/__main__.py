"""``python -m benchmarks``: every benchmark in one process, results to JSON, a table and a chart.

Side by side, in one run on one machine, so that ratios can be trusted. Speed
lives here, never as a timed assertion in the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kernelexec import __version__
from kernelexec.backend.docker.api import api

from . import concurrency, density, egress, report, roundtrip, snapshots, startup, transports
from .local_kernel import ipykernel_version

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent.parent / "README.md"
README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
SECTIONS = ["roundtrip", "startup", "warm", "transports", "audit", "density", "concurrency", "egress", "snapshots",
            "peers"]


def log(line: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _host() -> dict[str, Any]:
    """What the host is, from /proc and /etc (small files: read on a worker thread all the same)."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    os_name = next((ln.split("=", 1)[1].strip('"') for ln in Path("/etc/os-release").read_text().splitlines()
                    if ln.startswith("PRETTY_NAME=")), platform.system())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**20, 1), "os": os_name,
            "kernel": platform.release(), "python": platform.python_version(),
            "cgroup": "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"}


async def machine() -> dict[str, Any]:
    host = await asyncio.to_thread(_host)
    version = await api().version()
    runsc = shutil.which("runsc")
    if runsc:  # which gVisor the attach/runsc figures are of
        done = await asyncio.to_thread(subprocess.run, [runsc, "--version"], check=False, capture_output=True,
                                       text=True, timeout=30)
        runsc = done.stdout.split("\n")[0] or f"{runsc} (--version failed: {done.stderr.strip()})"
    return {**host, "docker": version.get("Version"), "ipykernel": ipykernel_version(), "kernelexec": __version__,
            "runsc": runsc}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    started = time.perf_counter()
    r: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "quick": quick,
        "machine": await machine(), "idle_window_s": 3.0 if quick else 10.0,
        "load_avg": {"start": [round(x, 2) for x in os.getloadavg()]},
    }
    wanted = set(args.only or SECTIONS)
    if "roundtrip" in wanted:
        r["roundtrip"] = await roundtrip.run(100 if quick else 500, log)
    if "startup" in wanted:
        r["startup"] = await startup.cold(3 if quick else 10, log)
    if "warm" in wanted:
        r["warm"] = await startup.warm(5 if quick else 20, log)
    if "transports" in wanted:
        r["transports"] = await transports.run(100 if quick else 500, 3 if quick else 10, log)
    if "audit" in wanted:
        r["audit_log"] = await transports.audit_cost(100 if quick else 500, log)
    if "density" in wanted:
        r["density"] = await density.run([5, 10] if quick else [10, 25, 50, 100], r["idle_window_s"], log)
    if "concurrency" in wanted:
        r["concurrency"] = await concurrency.run(8, 5.0 if quick else 20.0, log)
    if "egress" in wanted:
        r["egress"] = await egress.run(50, 3 if quick else 10, log)
        # sync sessions (a loop thread of their own), so off this loop
        r["egress"]["sessions"] = await asyncio.to_thread(egress.sessions, 50, 3, log)
    if "snapshots" in wanted:
        r["snapshots"] = await snapshots.run(3 if quick else 10, log)
    if "peers" in wanted:
        from . import peers

        # blocking Docker calls of AutoGen's executors run in their own loop, in a worker thread
        r["peers"] = await asyncio.to_thread(peers.run, quick=quick, log=log)
    r["load_avg"]["end"] = [round(x, 2) for x in os.getloadavg()]
    r["targets"] = report.targets(r)
    r["duration_s"] = round(time.perf_counter() - started)
    return r


def update_readme(table: str) -> bool:
    text = README.read_text()
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        return False
    README.write_text(pattern.sub(lambda _: f"{README_START}\n{table}{README_END}", text))
    return True


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer runs and levels (about 4 minutes)")
    p.add_argument("--only", nargs="+", choices=SECTIONS,
                   help="run only these")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/latest.json)")
    p.add_argument("--update-readme", action="store_true",
                   help=f"replace the table between {README_START} and {README_END} in README.md")
    args = p.parse_args()
    results = asyncio.run(main_async(args))
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / "latest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    table = report.markdown(results)
    (out.with_suffix(".md")).write_text(table)
    png = report.chart(results, out.with_suffix(".png"))
    print(table)
    log(f"wrote {out}, {out.with_suffix('.md')}"
        + (f", {png}" if png else " (no chart: matplotlib is missing; pip install -e '.[bench]')"))
    if args.update_readme:
        log("README.md table updated" if update_readme(table) else f"README.md has no {README_START} marker")


if __name__ == "__main__":
    main()
