"""The report's statistics as data: ``<run dir>/stats.json``, computed once from the run's artifacts before the report
is rendered; report.md and report.html only format it (report/sections.py reads nothing else for a number). Keys:
schema, n_boot, n_perm, seed, perm_floor, has_tuned, unpaired, checkpoint, tasks, languages (per task x variant x
language), groups (per task x variant x group, 'english' being the English row alone), families (the Holm families
and their m), retrieval; docs/experiments.md ("stats.json") describes each field.
"""

from __future__ import annotations

import math

from qtalign.report.paired import GROUPS, N_BOOT, N_PERM, LangRow, compare, group_summary, unpaired
from qtalign.report.read import Run
from qtalign.stats import holm, perm_floor

STATS_SCHEMA = 1
KINDS = ("raw", "cal")  # the accuracies a report tests (AUC has intervals, no test)
ENGLISH = "english"  # the group of the English row alone


def by_task(rows: list[LangRow]) -> dict[tuple[str, str], list[LangRow]]:
    out: dict = {}
    for r in rows:
        out.setdefault((r.task, r.variant), []).append(r)
    return out


def paired_rows(run: Run, base: dict[str, dict] | None = None) -> dict[tuple[str, str], list[LangRow]]:
    """(task, variant) -> its per-language rows of base vs tuned (the items both evaluated; ``base``: of these base
    records only), in the run's language order."""
    rows = compare(run.base_preds if base is None else base, run.tuned_preds, run.resource, run.seen, run.clusters)
    order = {c: i for i, c in enumerate(run.order)}
    return by_task(sorted(rows, key=lambda r: (r.task, r.variant, order.get(r.lang, 999))))


def _accuracy(r: LangRow, kind: str) -> dict | None:
    cell = r.raw if kind == "raw" else r.cal
    if cell is None:
        return None
    b, c, _ = cell.mcnemar()
    _, lo, hi = r.boot(kind)
    return {"base": cell.acc("base"), "base_ci": list(cell.ci("base")), "tuned": cell.acc("tuned"),
            "tuned_ci": list(cell.ci("tuned")), "delta": cell.acc("tuned") - cell.acc("base"), "b": b, "c": c,
            "p": r.p(kind), "ci_low": lo, "ci_high": hi}


def language_entry(r: LangRow) -> dict:
    units = r.units()
    out = {"task": r.task, "variant": r.variant, "lang": r.lang, "resource": r.group, "seen": r.seen, "n": r.raw.n,
           "n_clusters": len(units), "test": "mcnemar" if all(len(u) == 1 for u in units) else "sign_flip",
           "majority": dict(r.majority), "raw": _accuracy(r, "raw"), "cal": _accuracy(r, "cal"), "auc": None}
    if r.scores is not None:
        d, lo, hi = r.boot("auc")
        out["auc"] = {"base": r.auc("base"), "tuned": r.auc("tuned"), "delta": d, "ci_low": lo, "ci_high": hi}
    return out


def group_entry(t: str, v: str, rs: list[LangRow], name: str, n_boot: int) -> dict | None:
    """group_summary of one group (name 'english': the English row alone, as one pooled group), with its keys, the
    number of clusters of item indices and the mean share of the most frequent prediction."""
    sel = [r for r in rs if r.lang == "en"] if name == ENGLISH else rs
    s = group_summary(sel, "all" if name == ENGLISH else name, n_boot=n_boot)
    if s is None:
        return None
    sel = [r for r in sel if r.lang in s["langs"]]
    clusters = {c for r in sel for c in (r.clusters or range(r.raw.n))}
    majority = {w: sum(r.majority.get(w, math.nan) for r in sel) / len(sel) for w in ("base", "tuned")}
    return {"task": t, "variant": v, **s, "group": name, "n_clusters": len(clusters), "majority": majority}


def holm_adjust(tests: list[dict]) -> int:
    """Holm-adjust one family of tests (entries with a 'p'), writing each adjusted p into its entry as p_holm; returns
    the family's m (the tests that were made)."""
    adj = holm([t.get("p") for t in tests])
    for t, p in zip(tests, adj):
        t["p_holm"] = p
    return sum(1 for p in adj if not math.isnan(p))


def _families(stats: dict) -> dict:
    """Holm-adjust every group test ('groups': tasks x GROUPS x raw/cal) and every per-language test ('langs'), writing
    p_holm into the entries; returns each family's m and keys."""
    out = {}
    for family, entries, key in (("groups", [g for g in stats["groups"] if g["group"] in GROUPS], "group"),
                                 ("langs", stats["languages"], "lang")):
        tests = [(e, k) for e in entries for k in KINDS if e.get(k) is not None]
        out[family] = {"m": holm_adjust([e[k] for e, k in tests]),
                       "keys": [[e["task"], e["variant"], e[key], k] for e, k in tests]}
    return out


def checkpoint(summary: dict | None) -> dict | None:
    n = (summary or {}).get("numbers", {})
    if not n.get("steps"):
        return None
    return {"steps": n["steps"], "best_step": n.get("best_step"), "best_eval_loss": n.get("best_eval_loss", math.nan)}


def build_stats(run: Run) -> dict:
    """Every statistic the report prints, from the run's per-item predictions (and its training and geometry
    summaries)."""
    tasks = paired_rows(run)
    has_tuned = run.tuned is not None
    n_boot = N_BOOT if has_tuned else 0
    stats = {"schema": STATS_SCHEMA, "n_boot": N_BOOT, "n_perm": N_PERM, "seed": 0, "perm_floor": perm_floor(N_PERM),
             "has_tuned": has_tuned, "unpaired": unpaired(run.base_preds, run.tuned_preds) if run.base and run.tuned else {},
             "checkpoint": checkpoint(run.summary("train")),
             "tasks": [{"task": t, "variant": v, "langs": [r.lang for r in rs]} for (t, v), rs in tasks.items()],
             "languages": [language_entry(r) for rs in tasks.values() for r in rs],
             "groups": [e for (t, v), rs in tasks.items() for g in (*GROUPS, ENGLISH)
                        if (e := group_entry(t, v, rs, g, n_boot)) is not None]}
    stats["families"] = _families(stats)
    stats["retrieval"] = retrieval(run, stats)
    return stats


def retrieval(run: Run, stats: dict) -> list[dict] | None:
    """Per task/variant of the geometry stage's retrieval (None when it recorded none)."""
    ret = (run.summary("geometry") or {}).get("retrieval")
    if not ret:
        return None
    return [_retrieval_task(tv, rec, stats) for tv, rec in ret.items() if any(isinstance(x, dict) for x in rec.values())]


def _mean_over(d: dict[str, list[float]], langs: list[str], layer: int) -> float:
    xs = [d[lang][layer] for lang in langs if lang in d]
    return sum(xs) / len(xs) if xs else float("nan")


def _retrieval_task(tv: str, rec: dict, stats: dict) -> dict:
    """Mean retrieval over the non-reference languages per layer and direction, and per layer the Spearman ρ over
    languages between retrieval (base, or its change; both directions averaged) and the accuracy change."""
    from qtalign.stats import spearman

    t, v = tv.split("/", 1)
    ref = rec["reference"]
    models = [k for k in rec if isinstance(rec[k], dict)]
    pool = "query" if "query" in rec[models[0]] else next(iter(rec[models[0]]))
    langs = [lang for lang in rec[models[0]][pool]["retrieval_to"] if lang != ref]
    out = {"task": t, "variant": v, "reference": ref, "pool": pool, "langs": langs, "n_items": rec.get("n_items"),
           "n_clusters": rec.get("n_clusters"), "curves": {}, "rho": {}}
    if not langs:
        return out
    n_layers = len(rec[models[0]][pool]["retrieval_to"][langs[0]])
    for m in models:
        d = rec[m][pool]
        out["curves"][f"{m}: {ref} → X"] = [_mean_over(d["retrieval_to"], langs, k) for k in range(n_layers)]
        out["curves"][f"{m}: X → {ref}"] = [_mean_over(d["retrieval_from"], langs, k) for k in range(n_layers)]
    rows = {e["lang"]: e for e in stats["languages"] if (e["task"], e["variant"]) == (t, v)}
    gain = {lang: rows[lang]["raw"]["delta"] for lang in langs if lang in rows}
    cal_gain = {lang: rows[lang]["cal"]["delta"] for lang in gain if rows[lang]["cal"] is not None}

    def at(model: str, lang: str, k: int) -> float:  # both directions averaged
        d = rec[model][pool]
        return (d["retrieval_to"][lang][k] + d["retrieval_from"][lang][k]) / 2

    def rho(x, gains: dict) -> list[list[float]]:
        return [list(spearman([x(g, k) for g in gains], list(gains.values()))) for k in range(n_layers)]

    if gain and "tuned" in models:
        delta = lambda g, k: at("tuned", g, k) - at("base", g, k)  # noqa: E731
        out["rho"]["base retrieval vs Δ accuracy"] = rho(lambda g, k: at("base", g, k), gain)
        out["rho"]["Δ retrieval vs Δ accuracy"] = rho(delta, gain)
        if cal_gain:
            out["rho"]["Δ retrieval vs Δ calibrated"] = rho(delta, cal_gain)
    return out
