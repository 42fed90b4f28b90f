"""Small statistics used in tables and reports."""

from __future__ import annotations

import math

from scipy.stats import binomtest


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # clamped so that lo <= p <= hi holds exactly despite rounding (e.g. p = 1)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def mcnemar(b: int, c: int) -> float:
    """Exact (binomial) McNemar p-value from the discordant counts: b = right only in A, c = right only in B."""
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5).pvalue)


def paired_counts(a: list[bool], b: list[bool]) -> tuple[int, int]:
    if len(a) != len(b):
        raise ValueError("paired lists differ in length")
    return sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))


def mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")
