"""Metrics of an evaluation from its per-item records, and its tables (table.md, table.csv).

Per task x variant x language: n, accuracy with its Wilson 95 % interval, calibrated accuracy, the share of the
most frequent prediction (a model that answers one class for a whole language shows here), the prediction counts
and the AUC of the raw class scores (binary AUC of the first class's score for two classes, macro one-vs-rest for
more: a class-prior-free measure of what the model knows). Averages over all / high / low-resource languages.
"""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict
from pathlib import Path

from qtalign.io import write_text
from qtalign.stats import class_auc, mean, wilson


def class_log_scores(r: dict) -> list[float]:
    """Per-class log probabilities of a record, normalised over the classes, from its least-rounded numbers (the
    first-token masses or the sequence log-likelihoods; the rounded probabilities only as a fallback): AUC needs the
    ranking of confident items too."""
    classes = list(r["scores"])
    if isinstance(r.get("mass"), dict):
        m = [max(float(r["mass"][c]), 1e-300) for c in classes]
        z = math.log(sum(m))
        return [math.log(x) - z for x in m]
    if isinstance(r.get("logprobs"), dict):
        lp = [float(r["logprobs"][c]) for c in classes]
        top = max(lp)
        z = top + math.log(sum(math.exp(x - top) for x in lp))
        return [x - z for x in lp]
    return [math.log(max(float(r["scores"][c]), 1e-300)) for c in classes]


def record_auc(rs: list[dict], classes: list[str]) -> float:
    """One-vs-rest macro AUC of the records' per-class scores (their least-rounded form: class_log_scores)."""
    scores = []
    for r in rs:
        lp = dict(zip(r["scores"], class_log_scores(r)))
        scores.append([lp[c] for c in classes])
    return class_auc(scores, [classes.index(r["gold"]) for r in rs], len(classes))


def compute_metrics(recs: list[dict], classes: dict[str, list[str]], resource: dict[str, str],
                    order: list[str] | None = None) -> dict:
    """metrics[task][variant] = {'langs': {lang: {...}}, 'avg': {'all','high','low'}}. ``classes``: task -> class
    names; ``resource``: language -> 'high' | 'low'."""
    by = defaultdict(list)
    for r in recs:
        by[(r["task"], r["variant"], r["lang"])].append(r)
    out: dict = {}
    for (t, v, lang), rs in by.items():
        n = len(rs)
        k = sum(r["correct"] for r in rs)
        lo, hi = wilson(k, n)
        preds = Counter(r["pred"] for r in rs)
        m = {"n": n, "acc": k / n, "ci_low": lo, "ci_high": hi, "majority_pred_share": preds.most_common(1)[0][1] / n,
             "pred_counts": dict(preds), "auc": record_auc(rs, classes[t])}
        if "official_correct" in rs[0]:
            m["official_acc"] = sum(r["official_correct"] for r in rs) / n
        if "cal_correct" in rs[0]:
            kc = sum(r["cal_correct"] for r in rs)
            m.update(cal_acc=kc / n, cal_ci_low=wilson(kc, n)[0], cal_ci_high=wilson(kc, n)[1])
        out.setdefault(t, {}).setdefault(v, {"langs": {}})["langs"][lang] = m
    rank = {c: i for i, c in enumerate(order or [])}
    for tv in out.values():
        for d in tv.values():
            langs = d["langs"]
            avg = {}
            for name in ("all", "high", "low"):
                codes = [c for c in langs if name == "all" or resource.get(c) == name]
                avg[name] = {"n_langs": len(codes), "acc": mean(langs[c]["acc"] for c in codes),
                             "cal_acc": mean(langs[c].get("cal_acc") for c in codes),
                             "auc": mean(langs[c].get("auc") for c in codes)}
            d["avg"] = avg
            d["langs"] = {c: langs[c] for c in sorted(langs, key=lambda c: rank.get(c, len(rank)))}
    return out


def pct(x) -> str:
    """A proportion as a percentage with one decimal; '—' when there is none."""
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def num(x, digits: int = 3) -> str:
    return "—" if x is None or x != x else f"{x:.{digits}f}"


def bold(s: str) -> str:
    return s if s == "—" else f"**{s}**"


def write_tables(metrics: dict, resource: dict[str, str], out: Path) -> None:
    md, rows = [], []
    for t, tv in metrics.items():
        for v, d in tv.items():
            md += [f"### {t} ({v})", "", "| lang | n | acc % | 95 % CI | calibrated acc % | AUC | majority-pred share % |",
                   "|---|---:|---:|---|---:|---:|---:|"]
            for lang, m in d["langs"].items():
                md.append(f"| {lang} | {m['n']} | {pct(m['acc'])} | {pct(m['ci_low'])}–{pct(m['ci_high'])} | "
                          f"{pct(m.get('cal_acc'))} | {num(m.get('auc'))} | {pct(m['majority_pred_share'])} |")
                rows.append({"task": t, "variant": v, "lang": lang, "group": resource.get(lang, ""), "n": m["n"],
                             "acc": m["acc"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "cal_acc": m.get("cal_acc"),
                             "auc": m.get("auc"), "majority_pred_share": m["majority_pred_share"]})
            for name, a in d["avg"].items():
                md.append(f"| **avg {name}** ({a['n_langs']}) | | {bold(pct(a['acc']))} | | {bold(pct(a['cal_acc']))} | "
                          f"{bold(num(a.get('auc')))} | |")
                rows.append({"task": t, "variant": v, "lang": f"avg_{name}", "group": name, "n": a["n_langs"], "acc": a["acc"],
                             "ci_low": None, "ci_high": None, "cal_acc": a["cal_acc"], "auc": a.get("auc"),
                             "majority_pred_share": None})
            md.append("")
    write_text(out / "table.md", "\n".join(md))
    import io as _io

    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(out / "table.csv", buf.getvalue())
