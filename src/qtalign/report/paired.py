"""Base vs tuned on the same items: paired per-item statistics.

Per task x variant x language and per group of languages: accuracy (Wilson 95 % intervals), its change with a paired
test, calibrated accuracy, and the AUC of the raw class scores (binary AUC for two classes, macro one-vs-rest for
more, from the per-class log probabilities), with paired bootstrap 95 % intervals of the changes.

The unit of every test and interval is a cluster of items: an item, or (where the evaluation recorded them, e.g.
SNLI's premise triples) all items sharing a premise; a pooled statistic treats an item index with all its
translations as one cluster (a translation is not an independent item). Per language, p is McNemar's exact test when
every item is its own cluster and the paired sign-flip permutation test over clusters otherwise (the same test,
made robust to clustering); pooled over languages, p is the sign-flip test over clusters of item indices. Pooled
accuracies are macro averages over languages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qtalign.eval.metrics import class_log_scores
from qtalign.errors import QtalignError
from qtalign.stats import bootstrap_change, class_auc, mcnemar, mean, paired_counts, sign_flip_p, wilson

GROUPS = ("all", "seen", "unseen", "high", "low")
N_BOOT = 1000
N_PERM = 10000


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
    """Per item, aligned with the Cells: the gold class and the per-class log scores of base and tuned (None for a
    record without scores), in the order of ``classes``."""

    classes: list[str] = field(default_factory=list)
    gold: list[int] = field(default_factory=list)
    base: list[list[float] | None] = field(default_factory=list)
    tuned: list[list[float] | None] = field(default_factory=list)

    def auc(self, which: str, rows: list[int] | None = None) -> float:
        probs = getattr(self, which)
        if not probs or len(probs) != len(self.gold):
            return float("nan")
        rows = [i for i in (range(len(self.gold)) if rows is None else rows) if probs[i] is not None]
        if not rows or not self.classes:
            return float("nan")
        return class_auc([probs[i] for i in rows], [self.gold[i] for i in rows], len(self.classes))


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
    clusters: list = field(default_factory=list)  # per row: its cluster (the item itself when none was recorded)
    _p: dict = field(default_factory=dict, repr=False, compare=False)  # p per kind, computed once

    def auc(self, which: str) -> float:
        return self.scores.auc(which) if self.scores else float("nan")

    def by_cluster(self) -> dict:
        """cluster -> its rows (each item its own cluster when none were recorded; a cluster id names the same items
        in every language)."""
        by: dict = {}
        for k, c in enumerate(self.clusters or range(self.raw.n)):
            by.setdefault(c, []).append(k)
        return by

    def units(self) -> list[list[int]]:
        """Rows grouped by cluster: the bootstrap's units."""
        return list(self.by_cluster().values())

    def p(self, kind: str = "raw") -> float:
        """Paired test of the change in raw or calibrated accuracy: McNemar's exact test when each item is its own
        cluster, else the sign-flip permutation test over the clusters (computed once: a report asks for each p in
        its tables and again in its Holm family)."""
        if kind not in self._p:
            cell = self.raw if kind == "raw" else self.cal
            if cell is None or not cell.tuned:
                self._p[kind] = float("nan")
            elif all(len(u) == 1 for u in self.units()):
                self._p[kind] = cell.mcnemar()[2]
            else:
                n = cell.n
                self._p[kind] = sign_flip_p([sum(cell.tuned[k] - cell.base[k] for k in u) / n for u in self.units()], N_PERM)
        return self._p[kind]

    def stat(self, kind: str):
        """stat(which, units) -> the statistic of 'raw' | 'cal' | 'auc' over the rows of the drawn units."""
        def f(which: str, draw: list[list[int]]) -> float:
            rows = [k for u in draw for k in u]
            if kind == "auc":
                return self.scores.auc(which, rows)
            xs = getattr(self.raw if kind == "raw" else self.cal, which)
            return sum(xs[k] for k in rows) / len(rows)
        return f

    def boot(self, kind: str, n_boot: int = N_BOOT) -> tuple[float, float, float]:
        """(Δ, lo, hi) for kind 'raw' | 'cal' | 'auc': the paired bootstrap over this language's clusters of items."""
        nan = (float("nan"),) * 3
        if not self.raw.tuned or (kind == "cal" and self.cal is None) or (kind == "auc" and not (self.scores and self.scores.tuned)):
            return nan
        return bootstrap_change(self.stat(kind), self.units(), n_boot)


def _share(recs: list[dict]) -> float:
    from collections import Counter

    preds = [r["pred"] for r in recs if "pred" in r]
    return Counter(preds).most_common(1)[0][1] / len(preds) if preds else float("nan")


def compare(base: dict[str, dict], tuned: dict[str, dict], groups: dict[str, str], seen: set[str],
            clusters: dict[str, dict[int, int]] | None = None) -> list[LangRow]:
    """Per (task, variant, lang) rows from per-item records; with a tuned run only items present in both count
    (unpaired() says which were left out). ``clusters``: task -> item index -> cluster id (items tested together)."""
    cells: dict[tuple[str, str, str], list[tuple[dict, dict | None]]] = {}
    for key, rb in base.items():
        rt = tuned.get(key) if tuned else None
        if tuned and rt is None:
            continue
        cells.setdefault((rb["task"], rb["variant"], rb["lang"]), []).append((rb, rt))
    return [_row(g, pairs, groups, seen, (clusters or {}).get(g[0], {})) for g, pairs in cells.items()]


def unpaired(base: dict[str, dict], tuned: dict[str, dict]) -> dict[str, int]:
    """'task/variant/lang' -> how many of its base items have no tuned record (left out of every paired statistic)."""
    out: dict[str, int] = {}
    if tuned:
        for key, rb in base.items():
            if key not in tuned:
                g = f"{rb['task']}/{rb['variant']}/{rb['lang']}"
                out[g] = out.get(g, 0) + 1
    return out


def _row(g: tuple[str, str, str], pairs: list[tuple[dict, dict | None]], groups: dict[str, str], seen: set[str],
         clusters: dict[int, int]) -> LangRow:
    t, v, lang = g
    has_tuned = pairs[0][1] is not None
    raw = Cell([bool(rb["correct"]) for rb, _ in pairs], [bool(rt["correct"]) for _, rt in pairs] if has_tuned else [])
    recs = [r for pair in pairs for r in pair if r is not None]
    cal = None
    if all("cal_correct" in r for r in recs):  # calibration only where every record of the cell has it
        cal = Cell([bool(rb["cal_correct"]) for rb, _ in pairs], [bool(rt["cal_correct"]) for _, rt in pairs] if has_tuned else [])
    idx = [rb.get("index", k) for k, (rb, _) in enumerate(pairs)]
    return LangRow(t, v, lang, groups.get(lang, "?"), lang in seen, raw, cal, _scores(g, pairs),
                   {"base": _share([rb for rb, _ in pairs]), "tuned": _share([rt for _, rt in pairs]) if has_tuned else float("nan")},
                   [clusters.get(i, ("item", i)) for i in idx])


def _scores(g: tuple, pairs: list[tuple[dict, dict | None]]) -> Scores | None:
    """Per-class log scores in one class order (the first base record's), matched by class name; None when the
    records carry no scores. Records of one cell with different class sets are an error, not a silent mismatch."""
    first = next((rb for rb, _ in pairs if "scores" in rb and "gold" in rb), None)
    if first is None:
        return None
    sc = Scores(classes=list(first["scores"]))
    want = set(sc.classes)

    def ordered(r: dict | None) -> list[float] | None:
        if r is None or "scores" not in r:
            return None
        if set(r["scores"]) != want:
            raise QtalignError(f"{'/'.join(g)}: item {r.get('index')}: its classes {sorted(r['scores'])} differ from "
                               f"{sorted(want)} (base and tuned evaluated different label sets)")
        return [dict(zip(r["scores"], class_log_scores(r)))[c] for c in sc.classes]

    for rb, rt in pairs:
        sc.gold.append(sc.classes.index(rb["gold"]) if rb.get("gold") in want else -1)
        sc.base.append(ordered(rb))
        if rt is not None:
            sc.tuned.append(ordered(rt))
    return sc


def _select(rows: list[LangRow], name: str) -> list[LangRow]:
    sel = {"all": lambda r: True, "seen": lambda r: r.seen, "unseen": lambda r: not r.seen,
           "high": lambda r: r.group == "high", "low": lambda r: r.group == "low"}[name]
    return [r for r in rows if sel(r)]


def _pooled_p(rs: list[LangRow], kind: str) -> float:
    """The sign-flip permutation test of the macro-average change: a cluster of item indices (with all its languages)
    contributes its languages' tuned − base, each weighted 1 / (languages x that language's items)."""
    cells = [getattr(r, kind) for r in rs]
    if not rs or any(c is None or not c.tuned for c in cells):
        return float("nan")
    contrib: dict = {}
    for cell, d in zip(cells, (r.by_cluster() for r in rs)):
        for c, ks in d.items():
            contrib[c] = contrib.get(c, 0.0) + sum(cell.tuned[k] - cell.base[k] for k in ks) / (cell.n * len(rs))
    return sign_flip_p(list(contrib.values()), N_PERM)


def _pooled_boot(rs: list[LangRow], kind: str, n_boot: int) -> tuple[float, float, float]:
    """Δ of the macro average over languages, with a bootstrap that resamples clusters of item indices (each with all
    its languages; only called for a kind every language has)."""
    if not rs or not rs[0].raw.tuned or (kind == "auc" and not all(r.scores and r.scores.tuned for r in rs)):
        return (float("nan"),) * 3
    per_lang = [r.by_cluster() for r in rs]
    universe = sorted(set().union(*[set(d) for d in per_lang]), key=str)
    stats = [r.stat(kind) for r in rs]

    def stat(which: str, draw: list) -> float:
        return mean(f(which, [d[c] for c in draw if c in d]) if any(c in d for c in draw) else float("nan")
                     for f, d in zip(stats, per_lang))

    return bootstrap_change(stat, universe, n_boot)


def group_summary(rows: list[LangRow], name: str, n_boot: int = 0) -> dict | None:
    """Macro-average accuracies (raw, calibrated) and AUC over the languages of a group, the paired test of each change
    (one language: LangRow.p; several: the sign-flip test over clusters of item indices with all their languages) and,
    with n_boot > 0, bootstrap intervals of the changes."""
    rs = _select(rows, name)
    out = None
    if rs:
        out = {"group": name, "n_langs": len(rs), "langs": [r.lang for r in rs]}
        for kind in ("raw", "cal"):
            cells = [getattr(r, kind) for r in rs]
            if any(c is None for c in cells):
                continue
            pooled = Cell([x for c in cells for x in c.base], [x for c in cells for x in c.tuned])
            b, c = paired_counts(pooled.base, pooled.tuned) if pooled.tuned else (0, 0)
            base, tuned = mean(c.acc("base") for c in cells), mean(c.acc("tuned") for c in cells)
            out[kind] = {"n_items": pooled.n, "base": base, "tuned": tuned, "delta": tuned - base, "b": b, "c": c,
                         "p": rs[0].p(kind) if len(rs) == 1 else _pooled_p(rs, kind)}
        if all(r.scores for r in rs):
            base, tuned = mean(r.auc("base") for r in rs), mean(r.auc("tuned") for r in rs)
            out["auc"] = {"base": base, "tuned": tuned, "delta": tuned - base}
        if n_boot:
            for kind in ("raw", "cal", "auc"):
                if kind in out:
                    _, lo, hi = _pooled_boot(rs, kind, n_boot)
                    out[kind].update(ci_low=lo, ci_high=hi)
    return out
