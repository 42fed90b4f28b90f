"""What every scoring rule takes and returns: a request per item, a score per item, and the small arithmetic on
per-class numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScoreRequest:
    key: Any
    group: str
    prefix: str  # shared demo block + newline
    question: str  # the query, ending with the answer cue
    words: list[str]  # label word per class (identical within a group)
    forced: str = ""  # text appended after the answer cue before scoring (common label prefix)


@dataclass
class ItemScore:
    key: Any
    raw: list[float]  # first-token: probability mass per class; sequence: summed log-prob per class
    probs: list[float]  # normalised over the classes
    pred: int
    extra: dict = field(default_factory=dict)


def normalise(xs: list[float]) -> list[float]:
    s = sum(xs)
    if s <= 0 or not math.isfinite(s):
        return [1.0 / len(xs)] * len(xs)
    return [x / s for x in xs]


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    if not math.isfinite(m):
        return [1.0 / len(xs)] * len(xs)
    e = [math.exp(x - m) for x in xs]
    return normalise(e)


def usable(raw: list[float]) -> bool:
    """Whether an item's raw class numbers can decide it: none is NaN or +inf and at least one is finite (a
    log-probability may be -inf; a NaN is a broken model, never a tie)."""
    return not any(math.isnan(x) or x == math.inf for x in raw) and any(math.isfinite(x) for x in raw)


def argmax(xs: list[float]) -> int:
    """The first class with the greatest number (ties go to the lower class index)."""
    return max(range(len(xs)), key=lambda i: (xs[i], -i))
