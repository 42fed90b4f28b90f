"""Base vs tuned on the same items: paired per-item statistics.

Per task x variant x language and per group of languages: accuracy (Wilson 95 % intervals), its change with the
exact McNemar test on the discordant pairs, calibrated accuracy, and the AUC of the raw class scores (binary AUC for
two classes, macro one-vs-rest for more, from the per-class log probabilities), with paired bootstrap 95 % intervals
of the changes. The bootstrap resamples clusters of items: an item, or (where the evaluation recorded them, e.g. SNLI's
premise triples) all items sharing a premise; a pooled interval resamples a cluster with all its languages at once (a
translation is not an independent item). Pooled accuracies are macro averages over languages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qtalign.eval.metrics import class_log_scores
from qtalign.stats import bootstrap_change, class_auc, mcnemar, paired_counts, wilson

GROUPS = ("all", "seen", "unseen", "high", "low")
N_BOOT = 1000


@dataclass
class Cell:
    """Paired base/tuned correctness for one (task, variant, lang) or a pooled group."""

    base: list[bool] = field(default_factory=list)
    tuned: list[bool] = field(default_factory=list)  # empty when there is no tuned run

    @property
    def n(self) -> int:
        return len(self.base)

    def acc(self, which: str) -> float:
        xs = getattr(self, which)
        return sum(xs) / len(xs) if xs else float("nan")

    def ci(self, which: str) -> tuple[float, float]:
        xs = getattr(self, which)
        return wilson(sum(xs), len(xs))

    def mcnemar(self) -> tuple[int, int, float]:
        """(b, c, p): b = right only in base, c = right only in tuned."""
        if not self.tuned:
            return 0, 0, float("nan")
        b, c = paired_counts(self.base, self.tuned)
        return b, c, mcnemar(b, c)


@dataclass
class Scores:
    """Per item, aligned with the Cells: the gold class, the item index, its cluster, and the per-class log scores of
    base and tuned (None for a record without scores)."""

    n_classes: int = 0
    gold: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    cluster: list = field(default_factory=list)
    base: list[list[float] | None] = field(default_factory=list)
    tuned: list[list[float] | None] = field(default_factory=list)

    def auc(self, which: str, rows: list[int] | None = None) -> float:
        probs = getattr(self, which)
        if not probs or len(probs) != len(self.gold):
            return float("nan")
        rows = [i for i in (range(len(self.gold)) if rows is None else rows) if probs[i] is not None]
        if not rows or not self.n_classes:
            return float("nan")
        return class_auc([probs[i] for i in rows], [self.gold[i] for i in rows], self.n_classes)


@dataclass
class LangRow:
    task: str
    variant: str
    lang: str
    group: str  # resource group
    seen: bool
    raw: Cell
    cal: Cell | None
    scores: Scores | None = None
    majority: dict = field(default_factory=dict)  # which -> share of the most frequent prediction

    @property
    def delta(self) -> float:
        return self.raw.acc("tuned") - self.raw.acc("base")

    def auc(self, which: str) -> float:
        return self.scores.auc(which) if self.scores else float("nan")

    def units(self) -> list[list[int]]:
        """Rows grouped by cluster (each item its own cluster when none were recorded): the bootstrap's units."""
        by: dict = {}
        for k, c in enumerate(self.scores.cluster if self.scores else range(self.raw.n)):
            by.setdefault(c, []).append(k)
        return list(by.values())

    def stat(self, kind: str):
        """stat(which, units) -> the statistic of 'raw' | 'cal' | 'auc' over the rows of the drawn units."""
        def f(which: str, draw: list[list[int]]) -> float:
            rows = [k for u in draw for k in u]
            if kind == "auc":
                return self.scores.auc(which, rows)
            xs = getattr(self.raw if kind == "raw" else self.cal, which)
            return sum(xs[k] for k in rows) / len(rows)
        return f

    def boot(self, kind: str, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
        """(Δ, lo, hi) for kind 'raw' | 'cal' | 'auc': the paired bootstrap over this language's clusters of items."""
        nan = (float("nan"),) * 3
        if not self.raw.tuned or (kind == "cal" and self.cal is None) or (kind == "auc" and not (self.scores and self.scores.tuned)):
            return nan
        return bootstrap_change(self.stat(kind), self.units(), n_boot, seed)


def _mean(xs) -> float:
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _share(recs: list[dict]) -> float:
    from collections import Counter

    preds = [r["pred"] for r in recs if "pred" in r]
    return Counter(preds).most_common(1)[0][1] / len(preds) if preds else float("nan")


def compare(base: dict[str, dict], tuned: dict[str, dict], groups: dict[str, str], seen: set[str],
            clusters: dict[str, dict[int, int]] | None = None) -> list[LangRow]:
    """Per (task, variant, lang) rows from per-item records; with a tuned run only items present in both count.
    ``clusters``: task -> item index -> cluster id (items resampled together)."""
    cells: dict[tuple[str, str, str], dict] = {}
    for key, rb in base.items():
        rt = tuned.get(key) if tuned else None
        if tuned and rt is None:
            continue
        g = (rb["task"], rb["variant"], rb["lang"])
        has_cal = "cal_correct" in rb and (rt is None or "cal_correct" in rt)
        c = cells.setdefault(g, {"raw": Cell(), "cal": Cell() if has_cal else None, "sc": Scores(), "b": [], "t": []})
        c["raw"].base.append(bool(rb["correct"]))
        c["b"].append(rb)
        if rt is not None:
            c["raw"].tuned.append(bool(rt["correct"]))
            c["t"].append(rt)
        if c["cal"] is not None:
            c["cal"].base.append(bool(rb["cal_correct"]))
            if rt is not None:
                c["cal"].tuned.append(bool(rt["cal_correct"]))
        _add_scores(c["sc"], rb, rt, (clusters or {}).get(rb["task"], {}))
    rows = []
    for (t, v, lang), c in cells.items():
        sc = c["sc"] if c["sc"].n_classes else None
        rows.append(LangRow(t, v, lang, groups.get(lang, "?"), lang in seen, c["raw"], c["cal"], sc,
                            {"base": _share(c["b"]), "tuned": _share(c["t"]) if c["t"] else float("nan")}))
    return rows


def _add_scores(sc: Scores, rb: dict, rt: dict | None, clusters: dict[int, int]) -> None:
    """One entry per record (so that the scores stay aligned with the Cells), None where a record has no scores."""
    idx = rb.get("index", len(sc.index))
    sc.index.append(idx)
    sc.cluster.append(clusters.get(idx, ("item", idx)))
    if "scores" in rb and "gold" in rb:
        classes = list(rb["scores"])
        sc.n_classes = len(classes)
        sc.gold.append(classes.index(rb["gold"]))
        sc.base.append(class_log_scores(rb))
    else:
        sc.gold.append(-1)
        sc.base.append(None)
    if rt is not None:
        sc.tuned.append(class_log_scores(rt) if "scores" in rt else None)


def _select(rows: list[LangRow], name: str) -> list[LangRow]:
    sel = {"all": lambda r: True, "seen": lambda r: r.seen, "unseen": lambda r: not r.seen,
           "high": lambda r: r.group == "high", "low": lambda r: r.group == "low"}[name]
    return [r for r in rows if sel(r)]


def _pooled_boot(rs: list[LangRow], kind: str, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Δ of the macro average over languages, with a bootstrap that resamples clusters of item indices (each with all
    its languages)."""
    nan = (float("nan"),) * 3
    if not rs or not rs[0].raw.tuned or (kind == "auc" and not all(r.scores and r.scores.tuned for r in rs)):
        return nan
    if kind == "cal" and any(r.cal is None for r in rs):
        return nan
    per_lang = []  # per language: cluster -> its rows
    for r in rs:
        d: dict = {}
        for k, c in enumerate(r.scores.cluster if r.scores else range(r.raw.n)):
            d.setdefault(c, []).append(k)
        per_lang.append(d)
    universe = sorted(set().union(*[set(d) for d in per_lang]), key=str)
    stats = [r.stat(kind) for r in rs]

    def stat(which: str, draw: list) -> float:
        return _mean(f(which, [d[c] for c in draw if c in d]) if any(c in d for c in draw) else float("nan")
                     for f, d in zip(stats, per_lang))

    return bootstrap_change(stat, universe, n_boot, seed)


def group_summary(rows: list[LangRow], name: str, n_boot: int = 0, seed: int = 0) -> dict | None:
    """Macro-average accuracies (raw, calibrated) and AUC over the languages of a group, a pooled McNemar test over all
    their items (approximate: translations are not independent), and (n_boot > 0) bootstrap intervals of the changes."""
    rs = _select(rows, name)
    out = None
    if rs:
        out = {"group": name, "n_langs": len(rs), "langs": [r.lang for r in rs]}
        for kind in ("raw", "cal"):
            cells = [getattr(r, kind) for r in rs]
            if any(c is None for c in cells):
                continue
            pooled = Cell([x for c in cells for x in c.base], [x for c in cells for x in c.tuned])
            b, c, p = pooled.mcnemar()
            base, tuned = _mean(c.acc("base") for c in cells), _mean(c.acc("tuned") for c in cells)
            out[kind] = {"n_items": pooled.n, "base": base, "tuned": tuned, "delta": tuned - base, "b": b, "c": c, "p": p}
        if all(r.scores for r in rs):
            base, tuned = _mean(r.auc("base") for r in rs), _mean(r.auc("tuned") for r in rs)
            out["auc"] = {"base": base, "tuned": tuned, "delta": tuned - base}
        if n_boot:
            for kind in ("raw", "cal", "auc"):
                if kind in out:
                    _, lo, hi = _pooled_boot(rs, kind, n_boot, seed)
                    out[kind].update(ci_low=lo, ci_high=hi)
    return out
