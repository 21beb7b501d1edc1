"""The results as a table (printed, and in Markdown for the README), the targets, and a chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

RT_CONFIGS = [
    ("local_stock", "local ipykernel, stock (no container)"),
    ("local_fast", "local ipykernel, kernelexec launcher"),
    ("sandbox_stock", "sandbox, stock launcher"),
    ("sandbox_fast", "sandbox (default)"),
    ("session_execute", "sandbox via AsyncSession.execute"),
    ("autogen_docker_jupyter", "AutoGen DockerJupyterCodeExecutor"),
    ("autogen_docker_cmdline", "AutoGen DockerCommandLineCodeExecutor"),
]
BLOCKS = ["1+1", "pass", "print_100k"]
TRANSPORT_BLOCKS = ["1+1", "print_100k"]
#: the figures issue 13 asks ipc/runc to keep ("no slower than today"): 1+1 p50 ms, cold start p50 s,
#: warm acquire p50 ms
BASELINE_DATE, BASELINE = "2026-12-01", {"roundtrip_ms": 1.4, "cold_s": 0.37, "warm_ms": 8.0}


def _rt(results: dict[str, Any], config: str, block: str, p: str = "p50") -> float | None:
    if config.startswith("autogen"):
        peer = (results.get("peers") or {}).get(config) or {}
        value = ((peer.get("roundtrip_ms") or {}).get(block) or {}).get(p)
    else:
        value = (((results.get("roundtrip") or {}).get(config) or {}).get(block) or {}).get(p)
    return float(value) if isinstance(value, (int, float)) else None


def _tr(r: dict[str, Any], config: str, block: str = "1+1", p: str = "p50") -> float | None:
    """A transport configuration's round trip (ms) via ``AsyncSession.execute``."""
    c = ((r.get("transports") or {}).get("configs") or {}).get(config) or {}
    value = ((c.get("roundtrip_ms") or {}).get(block) or {}).get(p)
    return float(value) if isinstance(value, (int, float)) else None


def _tr_cold(r: dict[str, Any], config: str, p: str = "p50") -> float | None:
    """A transport configuration's cold start to the first result (s)."""
    c = ((r.get("transports") or {}).get("configs") or {}).get(config) or {}
    value = (c.get("cold_start_s") or {}).get(p)
    return float(value) if isinstance(value, (int, float)) else None


def audit_cost_us(r: dict[str, Any]) -> dict[str, float] | None:
    """What ``audit_log`` adds to one ``execute``, in microseconds: the p50s' and the means' differences."""
    a = r.get("audit_log") or {}
    without, with_ = a.get("without_ms") or {}, a.get("with_ms") or {}
    if not all(isinstance(d.get(k), (int, float)) for d in (without, with_) for k in ("p50", "mean")):
        return None
    return {k: round((with_[k] - without[k]) * 1000, 1) for k in ("p50", "mean")}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None  # compared with its goal unrounded to 2 places


def _idle_per_session(r: dict[str, Any], level: dict[str, Any]) -> float | None:
    """The machine's busy share above its baseline, in one core's terms, divided among the sessions."""
    if not level:
        return None
    cores = (r.get("machine") or {}).get("cores") or 1
    base = (r.get("density") or {}).get("baseline_idle_cpu_pct") or 0.0
    return round(max(level["idle_cpu_pct_system"] - base, 0.0) * cores / level["n"], 4)


def _mem_per_session(level: dict[str, Any]) -> float | None:
    if not level:
        return None
    return round(level["container_mem_mb"]["mean"] + level["shim_rss_mb_per_session"]
                 + level["host_process_rss_mb_per_session"], 1)


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue, measured; a miss is shown as a miss."""
    cold = ((r.get("startup") or {}).get("sandbox_s") or {}).get("p50")
    warm = ((r.get("warm") or {}).get("acquire_to_result_ms") or {}).get("p50")
    levels = (r.get("density") or {}).get("levels") or []
    top = levels[-1] if levels else {}
    rows = [
        ("sandbox / local round trip, same kernel (1+1, p50)", _ratio(_rt(r, "sandbox_fast", "1+1"), _rt(r, "local_fast", "1+1")), "<=", 1.10),
        ("sandbox / local round trip, stock kernel (1+1, p50)", _ratio(_rt(r, "sandbox_stock", "1+1"), _rt(r, "local_stock", "1+1")), "<=", 1.10),
        ("sandbox / stock local ipykernel (1+1, p50), stretch", _ratio(_rt(r, "sandbox_fast", "1+1"), _rt(r, "local_stock", "1+1")), "<=", 0.4),
        ("AutoGen Docker Jupyter / kernelexec execute (1+1, p50)", _ratio(_rt(r, "autogen_docker_jupyter", "1+1"), _rt(r, "session_execute", "1+1")), ">=", 10),
        ("cold start to first result, p50 (s)", cold, "<=", 0.6),
        ("warm-pool acquire to first result, p50 (ms)", warm, "<=", 10),
        ("attach/runc / ipc/runc round trip via execute (1+1, p50)",
         _ratio(_tr(r, "attach_runc"), _tr(r, "ipc_runc")), "<=", 1.25),
        ("attach/runc / ipc/runc cold start to first result (p50)",
         _ratio(_tr_cold(r, "attach_runc"), _tr_cold(r, "ipc_runc")), "<=", 1.2),
        ("gVisor (attach/runsc) round trip via execute, the aim on this host (1+1, p50, ms)",
         _tr(r, "attach_runsc"), "<=", 10),
        (f"ipc/runc round trip via execute, no slower than on {BASELINE_DATE} (1+1, p50, ms)",
         _tr(r, "ipc_runc"), "<=", BASELINE["roundtrip_ms"]),
        (f"ipc/runc cold start to first result, no slower than on {BASELINE_DATE} (p50, s)",
         _tr_cold(r, "ipc_runc"), "<=", BASELINE["cold_s"]),
        (f"warm-pool acquire, no slower than on {BASELINE_DATE} (p50, ms)", warm, "<=", BASELINE["warm_ms"]),
        (f"memory per idle session at N={top.get('n')}: container + shim + host process (MB)", _mem_per_session(top), "<=", 60),
        (f"idle CPU per session at N={top.get('n')}, everything on the host included (% of one core)",
         _idle_per_session(r, top), "<=", 0.1),
    ]
    out = []
    for name, value, op, goal in rows:
        met = None if value is None else (value <= goal if op == "<=" else value >= goal)
        out.append({"target": name, "measured": value, "goal": f"{op} {goal}", "met": met})
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 0.1 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown(r: dict[str, Any]) -> str:
    m = r.get("machine") or {}
    lines = [
        f"Measured {r.get('date')} on {m.get('cpu')} ({m.get('cores')} cores, {m.get('memory_gb')} GiB), "
        f"{m.get('os')}, Docker {m.get('docker')} (cgroup {m.get('cgroup')}), Python {m.get('python')}, "
        f"ipykernel {m.get('ipykernel')}; `python -m benchmarks{' --quick' if r.get('quick') else ''}` "
        f"in {r.get('duration_s')} s{_load(r)}.",
        "",
        "Round trip, request to idle, ms (p50 / p90 / p99):",
        "",
        "| kernel | " + " | ".join(f"`{b}`" for b in BLOCKS) + " |",
        "|---|" + "---|" * len(BLOCKS),
    ]
    for key, label in RT_CONFIGS:
        cells = []
        for b in BLOCKS:
            p50, p90, p99 = (_rt(r, key, b, p) for p in ("p50", "p90", "p99"))
            cells.append("n/a" if p50 is None else f"{p50:.2f} / {p90:.2f} / {p99:.2f}")
        if all(c == "n/a" for c in cells):
            reason = (r.get("peers") or {}).get("skipped") or ((r.get("peers") or {}).get(key) or {}).get("error")
            cells = [f"not run: {reason}" if reason else "not run"] + [""] * (len(BLOCKS) - 1)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    st, warm = r.get("startup") or {}, r.get("warm") or {}
    peers = r.get("peers") or {}
    starts = [("sandbox cold start (`AsyncSession()`)", st.get("sandbox_s"), "s"),
              ("local ipykernel start (no container)", st.get("local_stock_s"), "s"),
              ("warm pool `acquire()`, back to back (a removal and a refill in flight)", warm.get("acquire_to_result_ms"),
               "ms"),
              ("warm pool `acquire()`, pool settled", warm.get("acquire_to_result_settled_ms"), "ms")]
    starts += [(f"{label} cold start", (peers.get(key) or {}).get("cold_start_s"), "s") for key, label in RT_CONFIGS[5:]]
    starts = [(what, v, unit) for what, v, unit in starts if v and v.get("p50") is not None]
    if starts:
        lines += ["", "Start, to the first result of `1+1` (p50):", "", "| what | p50 | runs |", "|---|---|---|"]
        lines += [f"| {what} | {_fmt(v['p50'])} {unit} | {v.get('n')} |" for what, v, unit in starts]
    d = r.get("density") or {}
    if d.get("levels"):
        lines += ["", f"Idle sessions (started {d.get('start_concurrency')} at a time; idle CPU sampled over "
                      f"{r.get('idle_window_s')} s; machine baseline {d.get('baseline_idle_cpu_pct')}%):", "",
                  "| N | start per session | container memory p50 / p99 | host process RSS per session | "
                  "shim RSS per session | total per session | idle CPU: system / host process / containers |",
                  "|---|---|---|---|---|---|---|"]
        for lv in d["levels"]:
            cm = lv["container_mem_mb"]
            lines.append(f"| {lv['n']} | {lv['start_per_session_s']} s | {cm['p50']} / {cm.get('p99')} MB | "
                         f"{lv['host_process_rss_mb_per_session']} MB | {lv['shim_rss_mb_per_session']} MB | "
                         f"{_mem_per_session(lv)} MB | "
                         f"{lv['idle_cpu_pct_system']}% / {lv['idle_cpu_pct_host_process']}% / "
                         f"{lv['idle_cpu_pct_containers']}% |")
    c = r.get("concurrency") or {}
    if c:
        lines += ["", f"Concurrency: {c['sessions']} sessions running a pandas groupby in parallel: "
                      f"{c['executions_per_s']} executions/s in total, {c['latency_ms']['p50']} ms p50 each "
                      f"({c['alone_latency_ms']['p50']} ms alone)."]
    lines += _transports_md(r)
    cost = audit_cost_us(r)
    if cost is not None:
        a = r["audit_log"]
        lines += ["", f"Audit log: `execute(\"1+1\")` (ipc/runc) p50 {a['without_ms']['p50']:.3f} ms without, "
                      f"{a['with_ms']['p50']:.3f} ms with `Session(audit_log=...)`: {cost['p50']:+.1f} us per execute "
                      f"at p50, {cost['mean']:+.1f} us in the mean ({a['with_ms']['n']} runs each, interleaved in "
                      f"{a.get('rounds')} rounds; {a.get('records')} records written)."]
    if r.get("egress"):
        from .egress import markdown as egress_md

        lines += egress_md(r["egress"])
    if r.get("snapshots"):
        from .snapshots import markdown as snapshots_md

        lines += snapshots_md(r["snapshots"])
    lines += ["", "Targets:", "", "| target | measured | goal | |", "|---|---|---|---|"]
    for t in r.get("targets") or []:
        mark = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['measured'])} | {t['goal']} | {mark} |")
    return "\n".join(lines) + "\n"


def _load(r: dict[str, Any]) -> str:
    la = r.get("load_avg") or {}
    if not la.get("start") or not la.get("end"):
        return ""
    return (f"; load average (1 / 5 / 15 min) {' / '.join(f'{x:.2f}' for x in la['start'])} at the start, "
            f"{' / '.join(f'{x:.2f}' for x in la['end'])} at the end")


def _cells(r: dict[str, Any], key: str, blocks: list[str]) -> list[str]:
    out = []
    for b in blocks:
        p50, p90, p99 = (_tr(r, key, b, p) for p in ("p50", "p90", "p99"))
        out.append("n/a" if p50 is None or p90 is None or p99 is None else f"{p50:.2f} / {p90:.2f} / {p99:.2f}")
    return out


def _transports_md(r: dict[str, Any]) -> list[str]:
    t = r.get("transports") or {}
    configs = t.get("configs") or {}
    if not configs:
        return []
    lines = ["", f"Transports and runtimes, one interleaved run: each configuration is a session in a process of its "
                 f"own, taking turns in {t.get('rounds')} rounds. Round trip via `AsyncSession.execute`, ms "
                 f"(p50 / p90 / p99); cold start is `AsyncSession()` to the result of `1+1`, p50."
                 + (f" The remote engine is {t['remote_engine']}: a second dockerd on this host in its own mount and "
                    "network namespaces, behind a loopback byte relay (TLS end to end), so no network latency is "
                    "in its figures." if t.get("remote_engine") else ""),
             "",
             "| transport / runtime | " + " | ".join(f"`{b}`" for b in TRANSPORT_BLOCKS)
             + " | cold start | vs ipc/runc: `1+1` p50, cold start |",
             "|---|" + "---|" * (len(TRANSPORT_BLOCKS) + 2)]
    for key, c in configs.items():
        if c.get("skipped"):
            lines.append(f"| {c.get('label', key)} | not run: {c['skipped']} |" + " |" * (len(TRANSPORT_BLOCKS) + 1))
            continue
        cold = _tr_cold(r, key)
        cold_cell = "n/a" if cold is None else f"{cold:.3f} s ({c['cold_start_s'].get('n')} runs)"
        ratios = (_ratio(_tr(r, key), _tr(r, "ipc_runc")), _ratio(cold, _tr_cold(r, "ipc_runc")))
        ratio_cell = "" if key == "ipc_runc" else " / ".join("n/a" if x is None else f"{x:.2f}x" for x in ratios)
        lines.append(f"| {c.get('label', key)} | " + " | ".join(_cells(r, key, TRANSPORT_BLOCKS))
                     + f" | {cold_cell} | {ratio_cell} |")
    if t.get("remote_left"):
        lines += ["", f"**Left on the remote engine after the run** (removed by the harness): {', '.join(t['remote_left'])}."]
    return lines


def chart(r: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(3, 2, figsize=(13, 15))
    ax = axes[0][0]
    configs = [(k, label) for k, label in RT_CONFIGS if _rt(r, k, "1+1") is not None]
    width = 0.8 / max(len(configs), 1)
    for i, (key, label) in enumerate(configs):
        values = [_rt(r, key, b) or 0 for b in BLOCKS]
        ax.bar([x + i * width for x in range(len(BLOCKS))], values, width, label=label)
    ax.set_xticks([x + width * (len(configs) - 1) / 2 for x in range(len(BLOCKS))], BLOCKS)
    ax.set_yscale("log")
    ax.set_ylabel("round trip p50, ms (log)")
    ax.set_title("Round trip per code block")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.08), ncol=2)

    ax = axes[0][1]
    st, peers = r.get("startup") or {}, r.get("peers") or {}
    bars = [("kernelexec\ncold", (st.get("sandbox_s") or {}).get("p50")),
            ("local\nipykernel", (st.get("local_stock_s") or {}).get("p50")),
            ("kernelexec\nwarm pool", ((r.get("warm") or {}).get("acquire_to_result_ms") or {}).get("p50", 0) / 1000)]
    for key, short in (("autogen_docker_jupyter", "AutoGen\nDocker Jupyter"), ("autogen_docker_cmdline", "AutoGen\ncommand line")):
        bars.append((short, ((peers.get(key) or {}).get("cold_start_s") or {}).get("p50")))
    bars = [(n, v) for n, v in bars if v is not None]
    ax.bar([n for n, _ in bars], [v for _, v in bars], color="tab:orange")
    ax.set_ylabel("seconds to first result (p50)")
    ax.set_title("Start")
    ax.tick_params(axis="x", labelsize=7)

    levels = (r.get("density") or {}).get("levels") or []
    if levels:
        ns = [lv["n"] for lv in levels]
        ax = axes[1][0]
        ax.plot(ns, [lv["container_mem_mb"]["p50"] for lv in levels], "o-", label="container working set")
        ax.plot(ns, [lv["host_process_rss_mb_per_session"] for lv in levels], "o-", label="host process RSS")
        ax.plot(ns, [lv["shim_rss_mb_per_session"] for lv in levels], "o-", label="containerd shim RSS")
        ax.set_xlabel("idle sessions")
        ax.set_ylabel("MB per session")
        ax.set_title("Memory per idle session")
        ax.legend(fontsize=8)
        ax = axes[1][1]
        ax.plot(ns, [lv["idle_cpu_pct_system"] for lv in levels], "o-", label="system CPU while idle, %")
        ax.plot(ns, [lv["start_per_session_s"] for lv in levels], "s-", label="start, s per session")
        ax.set_xlabel("idle sessions")
        ax.set_title("Idle CPU and start time as N grows")
        ax.legend(fontsize=8)
    configs = [(k, c.get("label", k)) for k, c in ((r.get("transports") or {}).get("configs") or {}).items()
               if _tr(r, k) is not None]
    if configs:
        ax = axes[2][0]
        width = 0.8 / len(configs)
        for i, (key, label) in enumerate(configs):
            ax.bar([x + i * width for x in range(len(TRANSPORT_BLOCKS))],
                   [_tr(r, key, b) or 0 for b in TRANSPORT_BLOCKS], width, label=label)
        ax.set_xticks([x + width * (len(configs) - 1) / 2 for x in range(len(TRANSPORT_BLOCKS))], TRANSPORT_BLOCKS)
        ax.set_yscale("log")
        ax.set_ylabel("execute round trip p50, ms (log)")
        ax.set_title("Round trip per transport and runtime")
        ax.legend(fontsize=7)
        ax = axes[2][1]
        ax.bar([label.replace(", ", ",\n") for _, label in configs], [_tr_cold(r, k) or 0 for k, _ in configs],
               color="tab:green")
        ax.set_ylabel("cold start to first result, s (p50)")
        ax.set_title("Cold start per transport and runtime")
        ax.tick_params(axis="x", labelsize=7)
    else:
        axes[2][0].set_axis_off()
        axes[2][1].set_axis_off()
    m = r.get("machine") or {}
    fig.suptitle(f"kernelexec benchmarks, {r.get('date')}, {m.get('cores')} cores, Docker {m.get('docker')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
