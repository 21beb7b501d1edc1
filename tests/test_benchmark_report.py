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
        "transports": transports(ipc=(1.6, 0.40), attach=(2.0, 0.48), runsc=None, remote=(3.0, 0.7)),
        "audit_log": {"without_ms": summary([1.5] * 9 + [1.8]), "with_ms": summary([1.52] * 9 + [1.9]),
                      "records": 142, "rounds": 10},
    }


def transports(ipc: tuple[float, float], attach: tuple[float, float], runsc: tuple[float, float] | None,
               remote: tuple[float, float]) -> dict:
    """Configurations as ``transports.run`` reports them: (1+1 p50 ms, cold start p50 s), or None: not run."""
    def config(label: str, transport: str, figures: tuple[float, float] | None) -> dict:
        if figures is None:
            return {"label": label, "skipped": "runsc is not registered with the engine"}
        return {"label": label, "transport": transport,
                "roundtrip_ms": {"1+1": rt(figures[0]), "print_100k": rt(figures[0] * 2)},
                "cold_start_s": summary([figures[1]] * 10)}
    return {"rounds": 10, "remote_engine": "tcp://127.0.0.1:1 (DOCKER_HOST, TLS verified with client certificate)",
            "configs": {"ipc_runc": config("ipc / runc", "ipc", ipc),
                        "attach_runc": config("attach / runc", "attach", attach),
                        "attach_runsc": config("attach / runsc (gVisor)", "attach", runsc),
                        "remote_tls": config("attach / runc, remote engine over TCP+TLS", "attach", remote)}}


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


def test_transport_targets_are_ratios_to_ipc_and_the_baseline_figures():
    r = results(1.6, 4.0)
    t = by_name(report.targets(r))
    # 2.0 / 1.6 = 1.25 exactly: met; cold 0.48 / 0.40 = 1.2: met
    assert t["attach/runc / ipc/runc round trip via execute"]["measured"] == 1.25
    assert t["attach/runc / ipc/runc round trip via execute"]["met"] is True
    assert t["attach/runc / ipc/runc cold start to first result"]["measured"] == 1.2
    assert t["attach/runc / ipc/runc cold start to first result"]["met"] is True
    # ipc/runc against 2026-12-01: 1.6 ms > 1.4 ms and 0.40 s > 0.37 s are misses; 5 ms warm acquire <= 8 ms
    assert t["ipc/runc round trip via execute, no slower than on 2026-12-01"]["met"] is False
    assert t["ipc/runc cold start to first result, no slower than on 2026-12-01"]["measured"] == 0.4
    assert t["ipc/runc cold start to first result, no slower than on 2026-12-01"]["met"] is False
    assert t["warm-pool acquire, no slower than on 2026-12-01"]["met"] is True
    # runsc not registered: the gVisor figure is not measured, never "met"
    assert t["gVisor"]["measured"] is None and t["gVisor"]["met"] is None
    r["transports"] = transports(ipc=(1.4, 0.37), attach=(1.751, 0.445), runsc=(9.5, 1.2), remote=(3.0, 0.7))
    t = by_name(report.targets(r))
    assert t["attach/runc / ipc/runc round trip via execute"]["measured"] == 1.251
    assert t["attach/runc / ipc/runc round trip via execute"]["met"] is False  # a miss by 0.001 stays a miss
    assert t["attach/runc / ipc/runc cold start to first result"]["met"] is False  # 1.203
    assert t["gVisor"]["measured"] == 9.5 and t["gVisor"]["met"] is True
    assert t["ipc/runc round trip via execute, no slower than on 2026-12-01"]["met"] is True
    assert t["ipc/runc cold start to first result, no slower than on 2026-12-01"]["met"] is True


def test_audit_cost_is_the_difference_of_the_p50s_and_of_the_means_in_microseconds():
    r = results(1.6, 4.0)
    # p50 1.52 - 1.5 ms; means (9 * 1.52 + 1.9) / 10 - (9 * 1.5 + 1.8) / 10 = 0.028 ms
    assert report.audit_cost_us(r) == {"p50": 20.0, "mean": 28.0}
    assert report.audit_cost_us({}) is None
    assert report.audit_cost_us({"audit_log": {"without_ms": {"n": 0}, "with_ms": summary([1.0])}}) is None


def test_markdown_has_a_row_per_transport_a_reason_for_the_skipped_and_the_audit_cost():
    r = results(1.6, 4.0)
    r["targets"] = report.targets(r)
    md = report.markdown(r)
    assert "| attach / runc | 2.00 / 2.40 / 3.00 | 4.00 / 4.80 / 6.00 | 0.480 s (10 runs) | 1.25x / 1.20x |" in md
    assert "| ipc / runc | 1.60 / 1.92 / 2.40 | 3.20 / 3.84 / 4.80 | 0.400 s (10 runs) |  |" in md
    assert "| attach / runsc (gVisor) | not run: runsc is not registered with the engine |" in md
    assert "remote engine over TCP+TLS | 3.00 / 3.60 / 4.50 |" in md and "1.88x / 1.75x" in md
    assert "The remote engine is tcp://127.0.0.1:1" in md
    assert "+20.0 us per execute at p50, +28.0 us in the mean (10 runs each" in md
    rows = [ln for ln in md.splitlines() if ln.startswith(("| attach / runsc", "| ipc / runc"))]
    assert all(ln.count("|") == 6 for ln in rows)  # skipped rows keep the table's five columns


def test_the_committed_results_have_every_section():
    latest = json.loads((Path(report.__file__).parent / "results" / "latest.json").read_text())
    for key in ("machine", "roundtrip", "startup", "warm", "transports", "audit_log", "density", "concurrency",
                "peers", "targets", "load_avg"):
        assert key in latest, key
    assert [lv["n"] for lv in latest["density"]["levels"]] == [10, 25, 50, 100]
    assert all(latest["roundtrip"][k]["1+1"]["n"] >= 500 for k in ("local_stock", "sandbox_fast"))
    configs = latest["transports"]["configs"]
    assert set(configs) == {"ipc_runc", "attach_runc", "attach_runsc", "remote_tls", "remote_ssh"}
    for key, c in configs.items():  # measured in full, or not run with the reason said
        assert c.get("skipped") or (c["roundtrip_ms"]["1+1"]["n"] >= 500 and c["cold_start_s"]["n"] >= 10), key
    assert latest["audit_log"]["with_ms"]["n"] >= 500 and latest["audit_log"]["without_ms"]["n"] >= 500


def snapshots(gone: bool = True) -> dict:
    """``snapshots.run``'s shape: the DataFrame session and the empty one."""
    def kind(label: str, size: int, seconds: float, mem: float) -> dict:
        return {"label": label, "snapshot_s": summary([seconds] * 9 + [seconds * 2], 4),
                "restore_s": summary([seconds * 4] * 10, 4), "first_execute_ms": summary([8.0] * 10, 2),
                "snapshot_bytes": size, "sections": {"namespace": size - 10240, "work": 10240}, "variables": 4,
                "lost": [], "idle_mem_mib": mem, "idle_usage_mib": mem + 3,
                "restored_mem_mib": summary([mem + 1] * 10, 1),
                "pause": {"pause_s": summary([seconds * 1.1] * 10, 4), "resume_s": summary([seconds * 3] * 10, 4),
                          "first_execute_ms": summary([6.5] * 10, 2), "snapshot_bytes": size + 60000,
                          "sections": {"namespace": size - 10240, "work": 10240, "home": 0, "tmp": 60000},
                          "state_file_bytes": size + 61000, "freed_mem_mib": summary([mem] * 10, 1),
                          "freed_usage_mib": summary([mem + 3] * 10, 1), "container_gone_after_pause": gone,
                          "mem_after_pause_mib": 0.0 if gone else None, "idle_mem_mib": mem,
                          "resumed_mem_mib": summary([mem + 1] * 10, 1)}}
    return {"runs": 10, "rows": 1_600_000, "columns": 4, "dataframe_bytes": 51_200_000, "settle_s": 1.0,
            "kinds": {"dataframe": kind("DataFrame", 51_210_240, 0.5, 117.4),
                      "empty": kind("empty", 10_650, 0.05, 37.6)}}


def test_markdown_has_the_snapshot_table_with_both_sessions_side_by_side():
    r = results(1.6, 4.0)
    assert "Snapshots:" not in report.markdown(r)  # no snapshot run: no table, nothing invented
    r["snapshots"] = snapshots()
    md = report.markdown(r)
    assert "a 1,600,000 x 4 float64 DataFrame (51.2 MB)" in md and "10 runs each" in md
    assert "| `snapshot()` | 0.500 s (1.000 / 0.500) | 0.050 s (0.100 / 0.050) |" in md  # p50 (p90 / min)
    assert ("| snapshot size | 48.8 MiB (namespace 48.8 MiB, work 10.0 KiB) | "
            "10.4 KiB (namespace 0.4 KiB, work 10.0 KiB) |") in md
    assert "| `AsyncSession.restore(snapshot)` | 2.000 s (2.000 / 2.000) | 0.200 s (0.200 / 0.200) |" in md
    assert "| first `execute` after restore | 8.0 ms (8.0 / 8.0) | 8.0 ms (8.0 / 8.0) |" in md
    assert "| `AsyncSession.resume(id)` | 1.500 s (1.500 / 1.500) | 0.150 s (0.150 / 0.150) |" in md
    assert "| memory: idle / restored / resumed | 117.4 / 118.4 / 118.4 MiB | 37.6 / 38.6 / 38.6 MiB |" in md
    assert "| memory freed by `pause()` (container gone after it) | 117.4 MiB | 37.6 MiB |" in md
    lines = md.splitlines()
    start = lines.index("| | 50 MB DataFrame | empty session |")
    rows = lines[start:lines.index("", start)]
    assert len(rows) == 12 and all(ln.count("|") == 4 for ln in rows)  # what, DataFrame, empty
    assert "a container was left" not in md
    r["snapshots"] = snapshots(gone=False)
    md = report.markdown(r)
    assert md.count("(**a container was left**)") == 2 and "still there after `pause()`" in md
