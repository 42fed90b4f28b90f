"""Small statistics used in tables and reports."""

from __future__ import annotations

import math


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
    from scipy.stats import binomtest

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


def auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for the positives in ``labels``: the probability that a random
    positive scores above a random negative, ties counting one half (Mann-Whitney U with average ranks). NaN when a
    class is absent."""
    import numpy as np
    from scipy.stats import rankdata

    y = np.asarray(labels, dtype=bool)
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))  # average ranks for ties
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def class_auc(probs: list[list[float]], gold: list[int], n_classes: int) -> float:
    """Class-prior-free accuracy of per-class scores: binary AUC of class 0's score for two classes, the macro
    average of one-vs-rest AUCs for more (classes absent from ``gold`` left out)."""
    if n_classes == 2:
        return auc([p[0] for p in probs], [g == 0 for g in gold])
    per = [auc([p[c] for p in probs], [g == c for g in gold]) for c in range(n_classes)]
    per = [x for x in per if not math.isnan(x)]
    return sum(per) / len(per) if per else float("nan")


def bootstrap_change(stat, units: list, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
                     min_usable: float = 0.95) -> tuple[float, float, float]:
    """(observed change, lo, hi): ``stat(which, draw)`` for which in 'base' | 'tuned' computes a statistic over a list
    of units (items, or clusters of items); the change is stat(tuned) - stat(base), and the percentile interval comes
    from ``n_boot`` draws of the units with replacement, the same draw for base and tuned (the data are paired).
    A draw whose statistic is undefined (an AUC of a resample with one class) is left out; when fewer than
    ``min_usable`` of the draws are usable, the interval is NaN (shown as "—") rather than one of a biased subset."""
    import numpy as np

    if not units:
        return float("nan"), float("nan"), float("nan")
    obs = stat("tuned", units) - stat("base", units)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        draw = [units[i] for i in rng.integers(0, len(units), len(units))]
        d = stat("tuned", draw) - stat("base", draw)
        if not math.isnan(d):
            diffs.append(d)
    if not diffs or len(diffs) < min_usable * n_boot:
        return obs, float("nan"), float("nan")
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return obs, float(lo), float(hi)


def sign_flip_p(contributions: list[float], n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided p of a paired permutation test of a change that is a sum of per-unit contributions (a unit's tuned
    minus base, weighted as the statistic weights it). Under the null hypothesis a unit's base and tuned outcomes are
    exchangeable, so each contribution's sign is flipped at random; units are clusters (an item with its translations,
    or an SNLI premise triple), so correlated items are flipped together. With one item per unit and unit weights this
    is McNemar's exact test, by Monte Carlo. p = (1 + #{|Δ*| >= |Δ|}) / (1 + n_perm)."""
    import numpy as np

    w = np.asarray([c for c in contributions if c != 0], dtype=float)  # a zero contribution's sign changes nothing
    if not len(w):
        return 1.0
    obs = abs(w.sum()) * (1 - 1e-12)
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < n_perm:
        k = min(4096, n_perm - done)
        signs = rng.integers(0, 2, (k, len(w)), dtype=np.int8) * 2 - 1
        hits += int((np.abs(signs @ w) >= obs).sum())
        done += k
    return (1 + hits) / (1 + n_perm)


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values of one family of tests, in the input order: the k-th smallest p (k from 0)
    becomes max over j <= k of min(1, (m - j) p_(j)). A missing p (None or NaN: no test was made) stays NaN and does
    not count in m. Rejecting where the adjusted p < alpha controls the family-wise error rate at alpha."""
    idx = [i for i, p in enumerate(ps) if p is not None and not math.isnan(p)]
    out = [float("nan")] * len(ps)
    running = 0.0
    for k, i in enumerate(sorted(idx, key=lambda i: ps[i])):
        running = max(running, min(1.0, (len(idx) - k) * ps[i]))
        out[i] = running
    return out


def perm_floor(n_perm: int) -> float:
    """The smallest p a permutation test with ``n_perm`` permutations can return (sign_flip_p's (1 + 0) / (1 + n))."""
    return 1 / (1 + n_perm)


def spearman(x: list[float], y: list[float]) -> tuple[float, float]:
    """(Spearman rank correlation, two-sided p) over the pairs where both are finite; NaN with fewer than 3, or where
    either side is constant (no ranking to correlate: a layer that tuning leaves untouched, such as the embeddings)."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return float("nan"), float("nan")
    r = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
    return float(r.statistic), float(r.pvalue)
