"""The benchmark report's arithmetic (pure logic; the benchmarks themselves run with `python -m benchmarks`)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import report
from benchmarks.stats import percentile, summary


def rt(p50: float) -> dict:
    return {"p50": p50, "p90": p50 * 1.2, "p99": p50 * 1.5, "n": 500}


def results(sandbox_fast: float, local_stock: float) -> dict:
    blocks = lambda v: {b: rt(v) for b in report.BLOCKS}  # noqa: E731
    return {
        "date": "2026-01-01 00:00 UTC", "quick": False, "duration_s": 1, "idle_window_s": 10.0,
        "machine": {"cores": 2, "cpu": "test", "docker": "x"},
        "roundtrip": {"local_stock": blocks(local_stock), "local_fast": blocks(1.5), "sandbox_stock": blocks(4.2),
                      "sandbox_fast": blocks(sandbox_fast), "session_execute": blocks(1.7)},
        "startup": {"sandbox_s": summary([0.5] * 10), "local_stock_s": summary([0.3] * 10)},
        "warm": {"acquire_to_result_ms": summary([5.0] * 20)},
        "density": {"baseline_idle_cpu_pct": 0.5, "start_concurrency": 4, "levels": [
            {"n": 100, "start_wall_s": 30.0, "start_per_session_s": 0.3, "start_latency_s": summary([1.0]),
             "container_mem_mb": summary([37.0] * 100), "host_process_rss_mb_per_session": 0.2,
             "shim_rss_mb_per_session": 13.0, "idle_cpu_pct_system": 4.5, "idle_cpu_pct_host_process": 0.0,
             "idle_cpu_pct_containers": 1.6, "alive": 100}]},
        "peers": {"skipped": "autogen-ext is not installed"},
    }


def by_name(targets: list[dict]) -> dict[str, dict]:
    return {t["target"].split(" (")[0].split(" at N")[0]: t for t in targets}


def test_percentiles_are_nearest_rank():
    xs = [float(x) for x in range(1, 101)]
    assert percentile(xs, 50) == 51 and percentile(xs, 99) == 100 and percentile([3.0], 90) == 3.0
    assert summary([]) == {"n": 0}


def test_targets_report_a_miss_as_a_miss_without_rounding_it_away():
    t = by_name(report.targets(results(sandbox_fast=1.62, local_stock=4.0)))
    stretch = t["sandbox / stock local ipykernel"]
    assert stretch["measured"] == 0.405 and stretch["met"] is False
    assert t["memory per idle session"]["measured"] == 50.2 and t["memory per idle session"]["met"] is True
    # (4.5 - 0.5) % of 2 cores over 100 sessions = 0.08 % of one core each
    assert t["idle CPU per session"]["measured"] == 0.08
    assert t["AutoGen Docker Jupyter / kernelexec execute"]["met"] is None  # not measured, not "met"
    t = by_name(report.targets(results(sandbox_fast=1.6, local_stock=4.0)))
    assert t["sandbox / stock local ipykernel"]["met"] is True


def test_markdown_names_the_machine_the_skipped_peers_and_every_target():
    r = results(1.6, 4.0)
    r["targets"] = report.targets(r)
    md = report.markdown(r)
    assert "Measured 2026-01-01 00:00 UTC on test (2 cores" in md
    assert "not run: autogen-ext is not installed" in md
    assert md.count("| met |") + md.count("**missed**") + md.count("not measured") == len(r["targets"])


def test_the_committed_results_have_every_section():
    latest = json.loads((Path(report.__file__).parent / "results" / "latest.json").read_text())
    for key in ("machine", "roundtrip", "startup", "warm", "density", "concurrency", "peers", "targets"):
        assert key in latest, key
    assert [lv["n"] for lv in latest["density"]["levels"]] == [10, 25, 50, 100]
    assert all(latest["roundtrip"][k]["1+1"]["n"] >= 500 for k in ("local_stock", "sandbox_fast"))
