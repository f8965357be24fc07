"""Summary figures the benchmarks report."""

from __future__ import annotations

import statistics


def p95(values: list[float]) -> float:
    """The 95th percentile, interpolated; a single value is its own."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[-1]
