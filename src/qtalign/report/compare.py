"""`qtalign compare RUN ...`: any set of runs side by side (models, sizes, source mixes), from their artifacts only:
per task, the macro averages (all / high / low languages) of raw accuracy, calibrated accuracy and AUC, and per
language; Markdown, a self-contained HTML page, the numbers as JSON and a figure.

``--which change`` compares what tuning did instead (the study summary): per run with a tuned evaluation and per
task, the paired change tuned − base of raw accuracy, calibrated accuracy and AUC over all / seen / unseen / high /
low-resource languages, with the same cluster-bootstrap intervals and sign-flip tests as each run's report.

The same items must have been evaluated for a fair comparison: the table states each run's items per language, and a
language or task missing from a run is shown as '—'.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from qtalign.errors import QtalignError
from qtalign.io import OutputDir, read_json, write_json, write_text
from qtalign.report.format import DASH, change, display_path, md_table, num, pct, pval
from qtalign.report.html import Doc, md_to_html
from qtalign.report.numbers import KINDS, by_task, holm_adjust, paired_rows
from qtalign.report.paired import GROUPS, N_BOOT, compare, group_summary
from qtalign.report.read import Run, read_run


def _label(run: Run, given: str | None) -> str:
    if given:
        return given
    m = (run.base or {}).get("model", {}).get("name") or run.config.get("model", {}).get("name") or run.dir.name
    return Path(m).name if "/" in m else m


def _model_facts(run: Run) -> dict:
    from qtalign.engine.registry import embedded

    m = (run.base or {}).get("model", {})
    name = m.get("name") or run.config.get("model", {}).get("name", "")
    entry = embedded(name)
    shown = display_path(name, run.dir) if name.startswith("/") else name  # a hub id stays as it is
    if shown.startswith("/"):  # a model file outside the run dir, the cache and home: its name, not the machine's layout
        shown = Path(shown).name
    return {"model": shown, "params": entry.params if entry else (f"{m['num_parameters'] / 1e6:.0f}M" if m.get("num_parameters") else DASH),
            "kind": ("instruct" if entry.instruct else "base") if entry else DASH, "dtype": m.get("dtype", DASH),
            "trained on": ", ".join(run.exp.get("seen_langs") or []) or DASH}


def _training_facts(run: Run) -> str:
    s = run.summary("train")
    if s is None:
        return DASH
    n, cfg = s.get("numbers", {}), s.get("config", {})
    return f"{n.get('train_rows')} rows, {n.get('steps')} steps, lr {cfg.get('learning_rate')}"


def _where(run: Run, out: Path) -> str:
    """A compared run's folder relative to the comparison's own folder: a published comparison points at the exports
    beside it wherever the repository is checked out, not at the machine it was made on."""
    return Path(os.path.relpath(run.dir.resolve(), out.resolve())).as_posix()


def _preds(run: Run, which: str) -> dict[str, dict]:
    """The per-item records a column compares: one evaluation, or for a change the items both evaluations scored."""
    if which == "change":
        return {k: r for k, r in run.base_preds.items() if k in run.tuned_preds}
    return (run.base_preds if which == "base" else run.tuned_preds) or {}


def _group(rec: dict) -> tuple[str, str, str]:
    return rec["task"], rec["variant"], rec["lang"]


def data_identity(run: Run, which: str, task: str, lang: str) -> str | None:
    """The content of the data one evaluation read for a task and language (the sha256 of each file, as its
    results.json records them); for a change, None unless base and tuned read the same."""
    import json

    def one(res: dict | None) -> str | None:
        d = ((res or {}).get("covers") or {}).get("data_sha256", {}).get(f"{task}/{lang}")
        return json.dumps(d, sort_keys=True) if d else None

    if which == "change":
        b, t = one(run.base), one(run.tuned)
        return b if b == t else None
    return one(run.base if which == "base" else run.tuned)


def common_items(cols: list[tuple[str, Run, str]], excluded: list | None = None) -> dict[tuple, dict[str, set[str]]]:
    """Per task x variant x language, the items every column that evaluated it has — matched by the content of the
    data they read, not by index: the only fair comparison (runs of items 0-99 and 0-59 of the same files are compared
    on 0-59). Returns group -> column label -> its keys. A column whose data for a group differ from the first
    column's (other files under the same names, or none recorded) is left out of that group and listed in
    ``excluded`` as (label, 'task/variant/lang', why)."""
    ref: dict[tuple, str | None] = {}
    mine: dict[tuple, dict[str, set[str]]] = {}
    for label, run, w in cols:
        per: dict[tuple, set[str]] = {}
        for k, r in _preds(run, w).items():
            per.setdefault(_group(r), set()).add(k)
        for g, keys in per.items():
            ident = data_identity(run, w, g[0], g[2])
            if ident is None or ref.setdefault(g, ident) != ident:
                if excluded is not None:
                    excluded.append((label, "/".join(g), "its data content is not recorded (or base and tuned read "
                                     "different data)" if ident is None else "it read other data than the first run"))
                continue
            mine.setdefault(g, {})[label] = keys
    common: dict[tuple, dict[str, set[str]]] = {}
    for g, by in mine.items():
        shared = set.intersection(*by.values())
        common[g] = {label: shared for label in by}
    return common


def _restrict(preds: dict[str, dict], keep: dict, label: str) -> dict[str, dict]:
    """The records of ``keep`` (group -> column label -> keys; a column absent from a group keeps none of it)."""
    return {k: r for k, r in preds.items() if k in keep.get(_group(r), {}).get(label, ())}


def _unique_labels(cols: list[tuple[str, Run, str]]) -> list[tuple[str, Run, str]]:
    """Every column its own label: two runs of one model get their folder names, then a number, added."""
    counts = Counter(label for label, _, _ in cols)
    out, seen = [], set()
    for label, run, w in cols:
        name = f"{label} [{run.dir.name}]" if counts[label] > 1 else label
        k, base = 2, name
        while name in seen:
            name, k = f"{base} #{k}", k + 1
        seen.add(name)
        out.append((name, run, w))
    return out


COMPARE_SCHEMA = 1


def compare_runs(runs: list[str], out: str | Path, title: str | None = None, which: str = "base") -> Path:
    """Compute the comparison's numbers into compare.json, then render compare.md / compare.html from that file."""
    cols: list[tuple[str, Run, str]] = []
    for spec in runs:
        label, sep, path = spec.partition("=")
        if not sep or "/" in label:
            label, path = None, spec
        if not Path(path).is_dir():
            raise QtalignError(f"{path}: run dir not found")
        run = read_run(path)
        if run.base is None and run.summary("train") is None:
            raise QtalignError(f"{path}: nothing to compare (no eval/base/results.json and no train/summary.json)")
        if which == "change" and run.tuned is None:
            raise QtalignError(f"{path}: no tuned evaluation (eval/tuned/results.json) to take a change from")
        for w in (["base", "tuned"] if which == "both" else [which]):
            if w == "tuned" and run.tuned is None:
                continue
            cols.append((_label(run, label) + (f" ({w})" if which == "both" else ""), run, w))
    if not cols:
        raise QtalignError("compare: no evaluations to compare")
    cols = _unique_labels(cols)
    od = OutputDir(out, "compare").claim()
    od.record("compare.md", "compare.html", "compare.json", "compare.png")
    od.record("compare_training.png")
    numbers = {"schema": COMPARE_SCHEMA, "which": which, "title": title or "qtalign comparison",
               **(_change_numbers if which == "change" else _level_numbers)(cols, od.path)}
    trained = {label: run for label, run, _ in cols if run.summary("train") is not None}
    if trained:
        numbers["training"] = _training_numbers(trained)
    write_json(od.path / "compare.json", numbers)
    doc = render_compare(read_json(od.path / "compare.json"), od.path)  # rendered from the file, as a reader has it
    write_text(od.path / "compare.md", doc.render(embed=False))
    write_text(od.path / "compare.html", md_to_html(doc.render(embed=True), doc.title))
    return od.path


def _head(cols: list[tuple[str, Run, str]], out: Path, tuned_task: bool = False) -> tuple[dict, dict]:
    """compare.json's entries for what each column is (model, training; the tuned task for a change) and the groups
    left out, and the items every column has."""
    runs = {label: {"facts": {**_model_facts(run), "training": _training_facts(run),
                              **({"tuned task": run.trained_task or DASH} if tuned_task else {})},
                    "dir": _where(run, out), "which": w} for label, run, w in cols}
    excluded: list = []
    keep = common_items(cols, excluded)
    return {"runs": runs, "not_compared": [{"run": a, "group": g, "why": w} for a, g, w in excluded]}, keep


def render_compare(numbers: dict, out: Path) -> Doc:
    """The comparison document (and its figures, into ``out``) from compare.json alone."""
    doc = Doc(out)
    doc.h(1, numbers["title"])
    facts = {label: r["facts"] for label, r in numbers["runs"].items()}
    keys = list(next(iter(facts.values())))
    doc.md(md_table(["run"] + keys, [[label] + [facts[label][k] for k in keys] for label in facts], "l" * (len(keys) + 1)))
    if numbers["not_compared"]:
        doc.md("**Not compared** (items are matched by the content of the data they read, not by index): "
               + "; ".join(f"{x['run']}: {x['group']} ({x['why']})" for x in numbers["not_compared"]) + ".")
    (_render_change if numbers["which"] == "change" else _render_levels)(doc, numbers, out)
    return doc


def _level_numbers(cols: list[tuple[str, Run, str]], out: Path) -> dict:
    """Per task: each column's macro averages (all / high / low) and its per-language accuracies, AUC and items."""
    numbers, keep = _head(cols, out)
    # each column as a 'base' column (the comparison is across runs), on the items every column has
    per_run = {label: by_task(compare(_restrict(_preds(run, w), keep, label), {}, run.resource, run.seen))
               for label, run, w in cols}
    tasks = sorted({tv for d in per_run.values() for tv in d})
    numbers["tasks"], numbers["languages"] = {}, {}
    for tv in tasks:
        key = "/".join(tv)
        numbers["tasks"][key], numbers["languages"][key] = {}, {}
        for label, d in per_run.items():
            rs = d.get(tv, [])
            numbers["tasks"][key][label] = {g: _level(group_summary(rs, g) if rs else None) for g in ("all", "high", "low")}
            numbers["languages"][key][label] = {r.lang: {"n": r.raw.n, "acc": r.raw.acc("base"),
                                                         "cal_acc": r.cal.acc("base") if r.cal else None,
                                                         "auc": r.auc("base")} for r in rs}
    return numbers


def _level(s: dict | None) -> dict:
    raw, cal, auc = (s or {}).get("raw", {}), (s or {}).get("cal", {}), (s or {}).get("auc", {})
    return {"acc": raw.get("base"), "cal_acc": cal.get("base"), "auc": auc.get("base"), "n_langs": (s or {}).get("n_langs", 0)}


def _render_levels(doc: Doc, numbers: dict, out: Path) -> None:
    tasks = numbers["tasks"]
    if tasks:
        fig = _figure(tasks, out / "compare.png")
        doc.img(fig, "Macro averages over languages: raw accuracy, calibrated accuracy and AUC (x100) per run and task.")
    for tv, per in tasks.items():
        _task_section(doc, tv, per, numbers["languages"][tv])
    if "training" in numbers:
        _training_section(doc, numbers["training"], out)
    doc.md("Accuracy and AUC are macro averages over the languages each run evaluated (all / high / low-resource); AUC is "
           "of the raw class scores (binary, or macro one-vs-rest for SNLI). Every run is compared on the items all runs "
           "evaluated in that task and language (runs of items 0-99 and 0-59 on 0-59); the items per language are shown.")


def _change_numbers(cols: list[tuple[str, Run, str]], out: Path) -> dict:
    """Per run: the paired changes of every task x group, their Holm-adjusted p (p_holm; the family's m under
    'families') and the seed aggregation of runs labelled <arm>-seed<k>."""
    numbers, keep = _head(cols, out, tuned_task=True)
    changes, families = {}, {}
    for label, run, _ in cols:  # 'task/variant' -> group -> the paired changes (group_summary with intervals)
        rows = paired_rows(run, _restrict(run.base_preds, keep, label))
        changes[label] = {"/".join(tv): {g: s for g in GROUPS if (s := group_summary(rs, g, n_boot=N_BOOT)) is not None}
                          for tv, rs in rows.items()}
        tests = [s[k] for d in changes[label].values() for s in d.values() for k in KINDS if k in s]
        families[label] = {"m": holm_adjust(tests)}  # the run's family: every task x group x raw/calibrated change
    numbers["changes"], numbers["families"] = changes, families
    seeds = seed_numbers(changes)
    if seeds is not None:
        numbers["seeds"] = seeds
    return numbers


def _render_change(doc: Doc, numbers: dict, out: Path) -> None:
    changes = numbers["changes"]
    tasks = sorted({tv for d in changes.values() for tv in d})
    if tasks:
        fig = _change_figure(changes, tasks, out / "compare.png")
        doc.img(fig, "Change tuned − base over all languages (macro average): raw accuracy, calibrated accuracy (points) and "
                "AUC (x100), with cluster-bootstrap 95 % intervals, per run and task.")
    for tv in tasks:
        doc.h(2, f"{tv.replace('/', ' (')} labels)")
        body = []
        for label, ch in changes.items():
            tuned_task = numbers["runs"][label]["facts"]["tuned task"] == tv.split("/")[0]
            for g, s in (ch.get(tv) or {}).items():
                raw, cal, auc = s.get("raw", {}), s.get("cal", {}), s.get("auc", {})
                body.append([label if g == "all" else "", "yes" if tuned_task and g == "all" else "", g, s["n_langs"],
                             pct(raw.get("base")), pct(raw.get("tuned")), change(raw), pval(raw.get("p")),
                             pval(raw.get("p_holm")), change(cal), pval(cal.get("p")), pval(cal.get("p_holm")),
                             change(auc, auc=True)])
        doc.md(md_table(["run", "tuned task", "languages", "langs", "base %", "tuned %", "Δ [95 % CI]", "p", "p Holm",
                         "Δ cal [95 % CI]", "p cal", "p cal Holm", "Δ AUC [95 % CI]"], body, "lll" + "r" * 10))
    if "seeds" in numbers:
        _seed_section(doc, numbers["seeds"])
    if "training" in numbers:
        _training_section(doc, numbers["training"], out)
    doc.md("Δ = tuned − base of the macro average over the group's languages, on the items both evaluations scored. The "
           "intervals resample clusters of item indices with all their languages (SNLI: premise triples), p is the "
           "sign-flip permutation test over the same clusters (McNemar's exact test for one language of independent "
           "items); * marks an interval that excludes 0 or p < 0.05; p Holm = p adjusted by Holm's method over each "
           "run's family of tests (every task x group x raw/calibrated of that run). seen = the "
           "languages of each run's question-translation data. Every run is compared on the items all runs evaluated "
           "(base and tuned) in that task and language.")


SEED_LABEL = re.compile(r"^(?:(.*?)[-_: ])?seed(-?\d+)$")
ONE_ARM = "(one arm)"  # the arm of runs labelled seed<k> alone


def seed_arms(labels: list[str]) -> dict[str, list[str]]:
    """Runs that differ only in their training seed, by label: 'copy-seed1', 'copy-seed2' -> {'copy': [...]} ('seed0',
    'seed1' -> {'': [...]}); arms with fewer than two seeds are left out."""
    arms: dict[str, list[str]] = {}
    for label in labels:
        m = SEED_LABEL.match(label)
        if m:
            arms.setdefault(m.group(1) or "", []).append(label)
    return {a: ls for a, ls in arms.items() if len(ls) > 1}


def seed_summary(deltas: list[float]) -> dict:
    """Mean change over seeds and its between-seed spread (sample SD; min, max)."""
    import statistics

    xs = [d for d in deltas if d is not None and d == d]
    return {"n_seeds": len(xs), "mean": statistics.fmean(xs) if xs else float("nan"),
            "sd": statistics.stdev(xs) if len(xs) > 1 else float("nan"),
            "min": min(xs) if xs else float("nan"), "max": max(xs) if xs else float("nan")}


def seed_numbers(changes: dict) -> dict | None:
    """Per arm with several training seeds, task, group and measure: the mean change over seeds with the
    between-seed SD, and each seed's own change and item-level interval (None without such an arm)."""
    arms = seed_arms(list(changes))
    if not arms:
        return None
    tasks = sorted({tv for d in changes.values() for tv in d})
    out: dict = {}
    for arm, labels in arms.items():
        for tv in tasks:
            for g in GROUPS:
                for kind in ("raw", "cal", "auc"):
                    per = [((changes[lab].get(tv) or {}).get(g) or {}).get(kind) or {} for lab in labels]
                    if any(per):
                        out.setdefault(arm or ONE_ARM, {}).setdefault(tv, {}).setdefault(g, {})[kind] = {
                            **seed_summary([d.get("delta") for d in per]), "per_seed": dict(zip(labels, per))}
    return out


def _seed_section(doc: Doc, seeds: dict) -> None:
    """Per arm with several training seeds: the mean change over seeds with the between-seed SD, beside each seed's
    item-level bootstrap interval (items vary within a run; the seed varies training)."""
    body = []
    for arm, per_task in seeds.items():
        for tv, by_group in per_task.items():
            for g in ("all", "seen", "unseen"):
                for kind, sm in (by_group.get(g) or {}).items():
                    scale, digits = (1, 3) if kind == "auc" else (100, 1)
                    body.append([DASH if arm == ONE_ARM else arm, tv.replace("/", " (") + ")", g, kind, sm["n_seeds"],
                                 f"{scale * sm['mean']:+.{digits}f}" if sm["mean"] == sm["mean"] else DASH,
                                 f"{scale * sm['sd']:.{digits}f}" if sm["sd"] == sm["sd"] else DASH,
                                 "; ".join(change(d, auc=kind == "auc") for d in sm["per_seed"].values())])
    doc.h(2, "Across training seeds")
    doc.md("Per arm, the change tuned − base averaged over its training seeds, the standard deviation between seeds (what "
           "training randomness moves) and each seed's own item-level 95 % interval (what the choice of items moves). A "
           "change is reproducible only where every seed's interval excludes 0 on the same side; the item-level "
           "intervals of one seed do not cover training randomness.")
    doc.md(md_table(["arm", "task", "languages", "measure", "seeds", "mean Δ", "SD between seeds", "per seed: Δ [95 % CI]"],
                    body, "llllrrrl"))


def _change_figure(changes: dict, tasks: list[str], path: Path) -> Path:
    import numpy as np

    from qtalign.plots import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 0.9 + 0.45 * len(changes) * 3), squeeze=False)
    kinds = (("raw", "accuracy", 100), ("cal", "calibrated", 100), ("auc", "AUC x100", 100))
    labels = list(changes)
    for ax, tv in zip(axes[0], tasks):
        for j, (kind, name, scale) in enumerate(kinds):
            ys = np.arange(len(labels)) * (len(kinds) + 1) + j
            for y, label in zip(ys, labels):
                s = (changes[label].get(tv, {}).get("all") or {}).get(kind, {})
                d, lo, hi = (scale * s[k] if s.get(k) is not None else np.nan for k in ("delta", "ci_low", "ci_high"))
                if np.isnan(d):
                    continue
                err = None if np.isnan(lo) else [[d - lo], [hi - d]]
                ax.errorbar(d, y, xerr=err, fmt="o", ms=4, capsize=2, color=f"C{j}", label=name if y == ys[0] else None)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(np.arange(len(labels)) * (len(kinds) + 1) + 1, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("tuned − base (points; AUC x100)")
        ax.set_title(tv.replace("/", " (") + ")", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path, dpi=110, tight=False)


def _training_numbers(runs: dict[str, Run]) -> dict:
    """The runs' LoRA tuning: settings, final and best validation loss, and the validation curve [[step, loss], ...]."""
    from qtalign.io import read_jsonl

    nums = {}
    for label, run in runs.items():
        s = run.summary("train")
        n, cfg = s.get("numbers", {}), s.get("config", {})
        ev = [[r["step"], r["eval_loss"]] for r in read_jsonl(run.dir / "train" / "trainer_log.jsonl") if "eval_loss" in r]
        nums[label] = {"learning_rate": cfg.get("learning_rate"), "steps": n.get("steps"), "train_rows": n.get("train_rows"),
                       "train_tokens": n.get("train_tokens"), "final_eval_loss": ev[-1][1] if ev else None,
                       "best_eval_loss": n.get("best_eval_loss"), "template": cfg.get("template", "raw"),
                       "best_step": n.get("best_step"), "eval_curve": ev}
    return nums


def _training_section(doc: Doc, nums: dict, out: Path) -> None:
    """The runs' LoRA tuning side by side: settings, final and best validation loss, and the curves overlaid."""
    from qtalign.plots import pyplot, save

    doc.h(2, "Training")
    body = [[label, n["learning_rate"], n["template"], n["steps"], n["train_rows"], n["train_tokens"],
             num(n["final_eval_loss"], 4), num(n["best_eval_loss"], 4), n["best_step"]] for label, n in nums.items()]
    doc.md(md_table(["run", "lr", "template", "steps", "rows", "tokens", "final val loss", "best val loss", "best step"], body))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, n in nums.items():
        if n["eval_curve"]:
            ax.plot(*zip(*n["eval_curve"]), "o-", ms=3, lw=1.3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats / response token)")
    ax.grid(alpha=0.3)
    if any(n["eval_curve"] for n in nums.values()):
        ax.legend(fontsize=8)
    doc.img(save(fig, out / "compare_training.png", dpi=110, tight=False), "Validation loss per evaluation step, each run.")


def _task_section(doc: Doc, tv: str, per: dict, langs: dict) -> None:
    """One task's table: per column its languages, items per language and macro averages; then per language."""
    t, v = tv.split("/", 1)
    doc.h(2, f"{t} ({v} labels)")
    body = []
    for label, d in per.items():
        ns = sorted({x["n"] for x in langs[label].values()})
        row = [label, len(langs[label]), (str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}") if ns else DASH]
        for g in ("all", "high", "low"):
            row += [pct(d[g]["acc"]), pct(d[g]["cal_acc"]), num(d[g]["auc"])]
        body.append(row)
    head = ["run", "langs", "items/lang"] + [f"{g} {m}" for g in ("all", "high", "low") for m in ("acc %", "cal %", "AUC")]
    doc.md(md_table(head, body))
    lang_rows = []
    for lang in dict.fromkeys(lg for d in langs.values() for lg in d):
        cells = [lang]
        for d in langs.values():
            x = d.get(lang)
            cells.append(DASH if x is None else f"{pct(x['acc'])} / {pct(x['cal_acc'])} / {num(x['auc'], 2)}")
        lang_rows.append(cells)
    doc.md("Per language (raw % / calibrated % / AUC):\n\n" + md_table(["lang", *per], lang_rows))


def _figure(tasks: dict, path: Path) -> Path:
    import numpy as np

    from qtalign.plots import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 3.4), squeeze=False)
    labels = list(next(iter(tasks.values()))) if tasks else []
    w = 0.8 / max(1, len(labels))
    for ax, (tv, per) in zip(axes[0], tasks.items()):
        x = np.arange(3)
        for j, label in enumerate(labels):
            s = per[label]["all"]
            vals = [s["acc"], s["cal_acc"], s["auc"]]
            ax.bar(x + (j - (len(labels) - 1) / 2) * w, [100 * v if v is not None else 0 for v in vals], w, label=label)
        ax.set_xticks(x, ["accuracy", "calibrated", "AUC x100"])
        ax.set_ylim(0, 100)
        t, v = tv.split("/", 1)
        ax.set_title(f"{t} ({v})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path, dpi=110, tight=False)
