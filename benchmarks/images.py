"""``python -m benchmarks.images``: the kernel image and the analysis flavour, side by side.

What the default-or-flag decision rests on (README, "Packages in the image"): each image's size, a
cold start (``Session()`` to the result of ``1+1``) on each, alternated so that the machine's drift
is shared, the first import of the analysis stack in a fresh session, and the flavour's build from a
warm wheelhouse. Builds the flavour when it is missing (CI never runs this).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kernelexec import AsyncSession, Policy
from kernelexec.backend.docker.api import api
from kernelexec.tools.image import image_tag
from kernelexec.tools.packages import FLAVOURS, build_packages

from .stats import summary

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent.parent / "README.md"
START, END = "<!-- images:start -->", "<!-- images:end -->"
IMPORTS = "import scipy, sklearn, seaborn, statsmodels.api, openpyxl, pyarrow"


def log(line: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


async def cold(image: str) -> float:
    t = time.perf_counter()
    async with AsyncSession(Policy(image=image)) as s:
        ex = await s.execute("1+1")
        elapsed = time.perf_counter() - t
    assert ex.text == "2", ex
    return elapsed


async def first_import(image: str) -> float:
    async with AsyncSession(Policy(image=image, memory="2g")) as s:
        ex = await s.execute(f"import time; t = time.perf_counter(); {IMPORTS}; print(time.perf_counter() - t)")
    assert ex.status == "ok", ex.error
    return float(ex.stdout.strip())


async def run(n: int, rebuild: bool) -> dict[str, Any]:
    base = image_tag()
    t = time.perf_counter()
    analysis = await asyncio.to_thread(build_packages, flavour="analysis", force=rebuild, progress=None)
    build_s = round(time.perf_counter() - t, 1) if rebuild else None
    sizes = {name: (await api().image_inspect(tag))["Size"]
             for name, tag in (("default", base), ("analysis", analysis))}
    log(f"cold start: {n} sessions on each image, alternated")
    starts: dict[str, list[float]] = {"default": [], "analysis": []}
    await cold(base)  # the first start after a build reads the layers from disk: not what is compared
    await cold(analysis)
    for _ in range(n):
        starts["default"].append(await cold(base))
        starts["analysis"].append(await cold(analysis))
    log("first import of the analysis stack in a fresh session")
    imports = [await first_import(analysis) for _ in range(max(3, n // 3))]
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg": [round(x, 2) for x in os.getloadavg()]},
        "images": {"default": base, "analysis": analysis},
        "analysis_packages": list(FLAVOURS["analysis"]),
        "size_mb": {k: round(v / 1e6) for k, v in sizes.items()},
        "added_mb": round((sizes["analysis"] - sizes["default"]) / 1e6),
        "cold_start_s": {k: summary(v) for k, v in starts.items()},
        "analysis_first_import_s": summary(imports),
        "analysis_build_s": build_s,
    }


def markdown(r: dict[str, Any]) -> str:
    c = r["cold_start_s"]
    rows = [
        "| image | size | cold start, median (p90) | first `import` of the analysis stack |",
        "|---|---|---|---|",
        f"| default (`{r['images']['default']}`) | {r['size_mb']['default']} MB | "
        f"{c['default']['p50']:.2f} s ({c['default']['p90']:.2f} s) | (not installed) |",
        f"| `--flavour analysis` | {r['size_mb']['analysis']} MB (+{r['added_mb']} MB) | "
        f"{c['analysis']['p50']:.2f} s ({c['analysis']['p90']:.2f} s) | "
        f"{r['analysis_first_import_s']['p50']:.2f} s |",
    ]
    tail = f"\nMeasured {r['date']}, {r['machine']['cores']} cores, {c['default']['n']} starts each"
    if r.get("analysis_build_s") is not None:
        tail += f"; building the flavour from a warm wheelhouse took {r['analysis_build_s']:.0f} s"
    return "\n".join(rows) + tail + ".\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.images", description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=10, help="cold starts per image (default 10)")
    p.add_argument("--rebuild", action="store_true", help="also time a forced rebuild of the flavour")
    p.add_argument("--update-readme", action="store_true", help=f"replace the table between {START} and {END}")
    args = p.parse_args()
    r = asyncio.run(run(args.n, args.rebuild))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "images.json").write_text(json.dumps(r, indent=2) + "\n")
    table = markdown(r)
    (RESULTS / "images.md").write_text(table)
    print(table)
    if args.update_readme:
        text = README.read_text()
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
        if pattern.search(text):
            README.write_text(pattern.sub(lambda _: f"{START}\n{table}{END}", text))
            log("README.md table updated")
        else:
            log(f"README.md has no {START} marker")


if __name__ == "__main__":
    main()
