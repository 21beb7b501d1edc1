"""Percentiles and a summary shape shared by every benchmark (and by the peers)."""

from __future__ import annotations

import statistics
from typing import Any


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank on the sorted sample: the same rule for kernelexec and for the peers."""
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def summary(values: list[float], digits: int = 3) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "p50": round(percentile(values, 50), digits),
        "p90": round(percentile(values, 90), digits),
        "p99": round(percentile(values, 99), digits),
        "mean": round(statistics.fmean(values), digits),
        "min": round(min(values), digits),
        "n": len(values),
    }
