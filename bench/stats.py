"""Numbers and tables for the benchmark: percentiles, units, ratios, markdown.

Rule 1: a statistic of no samples is NaN and prints as a dash, never as an error: a part
that timed out still leaves the rest of the report readable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


@dataclass(frozen=True)
class Timing:
    """Summary of a list of durations in seconds."""

    n: int
    median: float
    p99: float
    maximum: float
    per_s: float  # calls per second of time spent in calls (1 / mean)

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        if not samples:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        return cls(
            n=len(samples),
            median=percentile(samples, 50),
            p99=percentile(samples, 99),
            maximum=float(max(samples)),
            per_s=len(samples) / float(sum(samples)),
        )


def duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def rate(per_s: float) -> str:
    if math.isnan(per_s):
        return "-"
    return f"{per_s:,.0f}"


def ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or (a == 0 and b == 0):
        return "-"
    if b == 0:
        return "∞"
    value = a / b
    return f"{value:.3g}×" if value < 100 else f"{value:,.0f}×"


def number(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, columns padded so that it also reads well in a terminal."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])
