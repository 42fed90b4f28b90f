"""The report's sections, one function each: ``section(doc, ctx)`` appends Markdown and figures to the document.
Every number a section prints comes from the run's statistics (``ctx.stats``, stats.json: report/numbers.py); the
sections format them and read the stages' own summaries, never the per-item predictions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from qtalign.report.format import (
    DASH, change, display_path, display_paths, flatten, md_table, num, pct, pval, side, signed, signed_num,
)
from qtalign.report.html import Doc
from qtalign.report.numbers import ENGLISH
from qtalign.report.paired import GROUPS
from qtalign.report.read import Run


@dataclass
class Ctx:
    run: Run  # read without its predictions: only the stages' summaries, configs and environment
    stats: dict  # stats.json

    @property
    def tasks(self) -> list[tuple[str, str]]:
        return [(t["task"], t["variant"]) for t in self.stats["tasks"]]

    def langs(self, t: str, v: str) -> list[dict]:
        return [e for e in self.stats["languages"] if (e["task"], e["variant"]) == (t, v)]

    def group(self, t: str, v: str, g: str) -> dict | None:
        return next((e for e in self.stats["groups"] if (e["task"], e["variant"], e["group"]) == (t, v, g)), None)

    @property
    def has_tuned(self) -> bool:
        return self.stats["has_tuned"]

    @property
    def figdir(self) -> Path:
        return self.run.dir / "report"

    def path(self, p) -> str:
        return display_path(p, [self.run.dir, self.run.config.get("out")], self.run.config.get("data_dir"))


def _triple(s: dict | None) -> tuple[dict, dict, dict]:
    """The raw, calibrated and AUC entries of a group ({} where absent)."""
    s = s or {}
    return s.get("raw") or {}, s.get("cal") or {}, s.get("auc") or {}


def _measures(s: dict | None, raw_p: tuple = ("p", "p_holm"), cal_p: tuple = ()) -> list:
    """A group's base, tuned and change of raw accuracy, calibrated accuracy and AUC, with the p values named in
    ``raw_p`` / ``cal_p`` ('p', 'p_holm') after the raw / calibrated change."""
    raw, cal, auc = _triple(s)
    return [pct(raw.get("base")), pct(raw.get("tuned")), change(raw), *(pval(raw.get(k)) for k in raw_p),
            pct(cal.get("base")), pct(cal.get("tuned")), change(cal), *(pval(cal.get(k)) for k in cal_p),
            num(auc.get("base")), num(auc.get("tuned")), change(auc, auc=True)]


def _summary_figures(doc: Doc, folder: Path) -> None:
    """The tables, figures and numbers of the summary.json of a stage's folder (named as the stage)."""
    from qtalign.io import read_json

    s = read_json(folder / "summary.json")
    if s is None:
        doc.md(f"_Stage `{folder.name}` has not run in this run dir (no `{folder.name}/summary.json`)._")
        return
    for t in s.get("tables", []):
        doc.md(f"**{t.get('title', '')}**\n\n{t.get('markdown', '')}")
    for f in s.get("figures", []):
        p = folder / f["path"]
        if p.exists():
            doc.img(p, f.get("caption", p.stem))
        else:
            doc.md(f"_missing figure `{p.name}`_")
    nums = flatten(s.get("numbers", {}))
    if nums and not s.get("tables"):  # the stage's tables already show its numbers
        doc.md(md_table(["number", "value"], [[k, v] for k, v in nums[:60]], "ll"))


# ------------------------------------------------------------------------------------------------------------------
# the headline (above the configuration)


def header(doc: Doc, ctx: Ctx) -> None:
    cfg, exp = ctx.run.config, ctx.run.exp
    doc.h(1, (cfg.get("report") or {}).get("title") or f"qtalign experiment: {cfg.get('name') or ctx.run.dir.name}")
    if (cfg.get("report") or {}).get("notes"):
        doc.md(cfg["report"]["notes"])
    b, t = (ctx.run.base or {}).get("covers", {}), (ctx.run.tuned or {}).get("covers", {})
    if b and t and b.get("data_sha256") != t.get("data_sha256"):
        doc.md("**Warning:** the base and the tuned evaluation read different data files (their content hashes differ): "
               "items are paired by task, language and index only.")
    left = ctx.stats["unpaired"]
    if left:
        doc.md(f"**Note:** {sum(left.values())} base items have no tuned record and are left out of every paired "
               "number below (" + ", ".join(f"{k}: {n}" for k, n in sorted(left.items())) + "); the base "
               "evaluation's own averages (eval/base/results.json) include them.")
    if exp.get("stale_stages"):
        doc.md(f"**Warning:** the outputs of {', '.join(exp['stale_stages'])} in this run dir were not produced with the "
               "configuration below (they were not rerun after it changed); rerun them for a consistent report.")
    intro = []
    if exp.get("seen_langs"):
        intro.append(f"Languages seen in question-translation training: {', '.join(exp['seen_langs'])} (marked * below).")
    intro.append("Accuracy uses the paper's decision rule (raw, the headline); contextual-calibrated accuracy and the AUC of "
                 "the raw class scores (class-prior free) are shown beside it. Δ = tuned − base in points (AUC: in AUC units). "
                 "Tests and intervals are paired and resample clusters: an item (or an SNLI premise triple) with all its "
                 f"translations. [lo, hi] = bootstrap 95 % interval ({ctx.stats['n_boot']} resamples of clusters; * = "
                 f"excludes 0); p = sign-flip permutation test over the same clusters ({ctx.stats['n_perm']} permutations, so "
                 f"the smallest it can show is < {ctx.stats['perm_floor']:.1e}; per language without clusters it is McNemar's exact test; * p < 0.05, "
                 "uncorrected); p Holm = the same p adjusted by Holm's method over its family, every group test "
                 "(tasks x language groups x raw/calibrated) or every per-language test of this report; accuracy "
                 "intervals are Wilson 95 %.")
    doc.md(" ".join(intro))
    if not ctx.tasks:
        return
    hl = []  # without a tuned run every tuned number is NaN, shown as "—"
    for t, v in ctx.tasks:
        s = ctx.group(t, v, "all")
        hl.append([f"{t} ({v})", s["n_langs"], _triple(s)[0].get("n_items"), *_measures(s)])
    doc.md("**Headline (macro average over languages)**\n\n" + md_table(
        ["task (labels)", "langs", "items", "base %", "tuned %", "Δ [95 % CI]", "p", "p Holm", "base cal %", "tuned cal %",
         "Δ cal [95 % CI]", "base AUC", "tuned AUC", "Δ AUC [95 % CI]"], hl))
    from qtalign.report.figures import headline_figure

    p = headline_figure({tv: ctx.langs(*tv) for tv in ctx.tasks}, ctx.figdir / "headline.png", ctx.has_tuned)
    doc.img(p, "Headline: per language, " + ("the change tuned − base in raw and calibrated accuracy (points, paired "
            "bootstrap 95 % intervals)" if ctx.has_tuned else "base accuracy") + "; * = seen in training.")


# ------------------------------------------------------------------------------------------------------------------
# configuration, overlap


def configuration(doc: Doc, ctx: Ctx) -> None:
    cfg = ctx.run.config
    shown = (display_paths(non_default(cfg, ctx.run.exp.get("config_defaults")), [ctx.run.dir, cfg.get("out")],
                           cfg.get("data_dir")) if cfg else None)
    doc.md("```yaml\n" + (yaml.safe_dump(shown, sort_keys=False, allow_unicode=True, default_flow_style=None) if cfg
                          else "# experiment.json not found\n") + "```")
    doc.md("Settings that differ from the defaults (paths relative to the run dir, `{data_dir}`, `$QTALIGN_CACHE` or "
           "`~`); the full resolved config is `config.yaml` in the run dir (`qtalign run <run dir>/config.yaml` repeats the "
           "experiment).")


def non_default(cfg: dict, defaults: dict | None) -> dict:
    """The config without the keys equal to the defaults (recorded by the run in experiment.json; a run that recorded
    none is shown whole)."""
    if not defaults:
        return cfg

    def strip(d, ref):
        if not isinstance(d, dict) or not isinstance(ref, dict):
            return d
        out = {}
        for k, v in d.items():
            if k in ref and ref[k] == v:
                continue
            out[k] = strip(v, ref.get(k)) if isinstance(v, dict) else v
        return {k: v for k, v in out.items() if v != {}}

    return strip(cfg, defaults) or cfg


def overlap(doc: Doc, ctx: Ctx) -> None:
    ov = ctx.run.exp.get("overlap")
    if not ov:
        doc.md("_No overlap check recorded (no data/train stage in this run)._")
        return
    verdict = "**overlap found**" if ov.get("overlap") else "no overlap"
    doc.md(f"Result: {verdict}. {ov.get('detail', '')}")
    if ov.get("tasks"):
        doc.md(md_table(["eval task", "training source", "train items", "eval items", "shared items", "note"],
                        [[x["task"], ctx.path(x.get("train_source", "")), x.get("n_train", "–"), x.get("n_eval", "–"),
                          x.get("n_shared", 0), x.get("note", "")] for x in ov["tasks"]], "llrrrl"))


# ------------------------------------------------------------------------------------------------------------------
# accuracy


def _lang_line(e: dict, has_tuned: bool, with_cal: bool, with_auc: bool) -> list:
    raw, cal, auc = e["raw"], e["cal"], e["auc"] or {}
    line = [e["lang"] + (" *" if e["seen"] else ""), e["resource"], e["n"],
            f"{pct(raw['base'])} [{pct(raw['base_ci'][0])}–{pct(raw['base_ci'][1])}]"]
    if has_tuned:
        line += [f"{pct(raw['tuned'])} [{pct(raw['tuned_ci'][0])}–{pct(raw['tuned_ci'][1])}]",
                 signed(raw["delta"]), f"{raw['b']}/{raw['c']}", pval(raw["p"]), pval(raw.get("p_holm"))]
    if with_cal:  # a language without calibration keeps its columns, as "—"
        line += [pct(cal["base"]) if cal else DASH]
        if has_tuned:
            line += ([pct(cal["tuned"]), signed(cal["delta"]), pval(cal["p"]), pval(cal.get("p_holm"))] if cal
                     else [DASH] * 4)
    if with_auc:
        line += [num(auc.get("base"))]
        if has_tuned:
            line += [num(auc.get("tuned")), change(auc, auc=True)]
    return line


def accuracy(doc: Doc, ctx: Ctx) -> None:
    if not ctx.tasks:
        doc.md("_No evaluation results (eval/base/results.json missing)._")
    tuned = ctx.has_tuned
    for t, v in ctx.tasks:
        rs = ctx.langs(t, v)
        doc.h(3, f"{t} ({v} labels)")
        head = ["lang", "resource", "n", "base % [95 % CI]"]
        if tuned:
            head += ["tuned % [95 % CI]", "Δ", "b/c", "p", "p Holm"]
        with_cal, with_auc = any(e["cal"] is not None for e in rs), any(e["auc"] is not None for e in rs)
        if with_cal:
            head += ["base cal %"] + (["tuned cal %", "Δ cal", "p cal", "p cal Holm"] if tuned else [])
        if with_auc:
            head += ["base AUC"] + (["tuned AUC", "Δ AUC [95 % CI]"] if tuned else [])
        doc.md(md_table(head, [_lang_line(e, tuned, with_cal, with_auc) for e in rs], "ll" + "r" * (len(head) - 2)))
    if ctx.tasks and tuned:
        doc.md("b/c = items right only in base / right only in tuned (the discordant pairs). p: McNemar's exact test; for "
               "a task whose items come in clusters (SNLI's premise triples) the sign-flip permutation test over the "
               f"clusters. p Holm: adjusted over every per-language test of this report (m = {ctx.stats['families']['langs']['m']}). "
               "AUC: of the raw class scores (binary for two classes, macro one-vs-rest for more); its interval "
               "is the paired bootstrap over the language's clusters of items.")


def summaries(doc: Doc, ctx: Ctx) -> None:
    for t, v in ctx.tasks:
        body = [[s["group"], s["n_langs"], _triple(s)[0].get("n_items"), *_measures(s, cal_p=("p", "p_holm"))]
                for g in GROUPS if (s := ctx.group(t, v, g)) is not None]
        doc.h(3, f"{t} ({v} labels)")
        doc.md(md_table(["languages", "langs", "items", "base %", "tuned %", "Δ [95 % CI]", "p", "p Holm", "base cal %",
                         "tuned cal %", "Δ cal [95 % CI]", "p cal", "p cal Holm", "base AUC", "tuned AUC", "Δ AUC [95 % CI]"], body))
    if ctx.tasks:
        doc.md("Accuracies and AUCs are macro averages over the group's languages. p is the sign-flip permutation test of "
               "the macro change over clusters of item indices (an item with all its translations flips together; "
               "translations are not independent items), and the intervals resample the same clusters. seen = languages "
               "in the question-translation data (sources and target)."
               + (f" p Holm: adjusted over every group test of this report (m = {ctx.stats['families']['groups']['m']}: tasks x "
                  "groups x raw/calibrated); a subgroup change is a finding only where it survives it." if ctx.has_tuned else ""))
    else:
        doc.md("_No evaluation results._")


def retention(doc: Doc, ctx: Ctx) -> None:
    """English and the other task before and after: a loss must be seen at once."""
    if not ctx.has_tuned or not ctx.tasks:
        doc.md("_No tuned run: nothing to retain._")
        return
    trained = ctx.run.trained_task
    body, losses = [], []
    for t, v in ctx.tasks:
        role = "tuned task" if t == trained else "other task"
        for scope, g in (("English", ENGLISH), ("all languages", "all")):
            s = ctx.group(t, v, g)
            if s is None:
                continue
            raw, cal, auc = _triple(s)
            # a loss: the bootstrap interval of the change (over clusters, with all their languages) lies below 0, or
            # its paired test rejects no change with the change negative
            lost = [k for k, d in (("raw", raw), ("cal", cal), ("AUC", auc))
                    if d and (d.get("ci_high", 1) < 0 or (d.get("p", 1) < 0.05 and d.get("delta", 0) < 0))]
            flag = f"⚠ loss ({', '.join(lost)})" if lost else ""
            if lost:
                losses.append(f"{t} {scope}: {', '.join(lost)}")
            body.append([f"{t} ({v})", role, scope, *_measures(s, ("p",)), flag])
    doc.md(("**Losses:** " + "; ".join(losses) + "." if losses else "No significant loss on English or on the other task.")
           + f" Tuned task: {trained or 'none recorded'}.")
    doc.md(md_table(["task", "role", "scope", "base %", "tuned %", "Δ [95 % CI]", "p", "base cal %", "tuned cal %", "Δ cal [95 % CI]",
                     "base AUC", "tuned AUC", "Δ AUC [95 % CI]", ""], body, "lll" + "r" * 10 + "l"))


def _verdict(raw: dict, cal: dict, auc: dict) -> str:
    """What the intervals support; a change whose interval covers 0 is 'no detectable change', never evidence of
    its absence."""
    r, c, a = side(raw), side(cal), side(auc)
    moved = f"raw accuracy {'rose' if r > 0 else 'fell'}" if r else "raw accuracy did not change detectably"
    if not auc:
        return f"{moved}; no AUC (the records carry no class scores)"
    if a > 0:
        return "the tuned model ranks the classes better (AUC interval above 0): a gain in what it knows, not only in its label prior"
    if a < 0:
        return "the tuned model ranks the classes worse (AUC interval below 0): a loss in what it knows"
    if not cal:
        return (f"{moved}; AUC did not change detectably (no calibrated accuracy to tell a prior shift apart)" if r
                else "no detectable change (every interval covers 0)")
    if r and not c:
        return (f"{moved} while neither AUC nor calibrated accuracy changed detectably: consistent with a shift of the "
                "label prior rather than a change in what the model knows")
    if c:
        return f"calibrated accuracy {'rose' if c > 0 else 'fell'} while AUC did not change detectably: weak evidence"
    return "no detectable change (every interval covers 0)"


def alignment(doc: Doc, ctx: Ctx) -> None:
    """Is a change alignment (the model knows more) or a shift of the label prior (it answers another class more)?"""
    if not ctx.has_tuned or not ctx.tasks:
        doc.md("_No tuned run._")
        return
    body = []
    for t, v in ctx.tasks:
        s = ctx.group(t, v, "all")
        raw, cal, auc = _triple(s)
        body.append([f"{t} ({v})", change(raw), change(cal), change(auc, auc=True),
                     f"{pct(s['majority']['base'])} → {pct(s['majority']['tuned'])}", _verdict(raw, cal, auc)])
    doc.md("A gain in raw accuracy can come from a better grasp of the task in the other languages (alignment) or only from "
           "answering one class more often (a label-prior shift). Calibration removes the prior the prompt induces, and AUC "
           "ignores the prior altogether; the share of the most frequent prediction shows a model collapsing onto one class.")
    doc.md(md_table(["task", "Δ raw [95 % CI]", "Δ calibrated [95 % CI]", "Δ AUC [95 % CI]", "majority-prediction share %",
                     "reading"], body, "lrrrrl"))


def per_language(doc: Doc, ctx: Ctx) -> None:
    from qtalign.report.figures import bar_chart

    for t, v in ctx.tasks:
        p = bar_chart(ctx.langs(t, v), f"{t} ({v} labels)", ctx.figdir / f"accuracy_{t}_{v}.png")
        doc.img(p, f"{t} ({v} labels): per-language accuracy, base vs tuned, raw and calibrated, Wilson 95 % intervals")
    if not ctx.tasks:
        doc.md("_No evaluation results._")


# ------------------------------------------------------------------------------------------------------------------
# training, analyses


# the paper's tuning (LLaMA-Factory SFT, docs/notes_research.md §3): every row of the question files, 5 % held out
PAPER_TUNING = {"epochs": 3, "batch_size": 16, "learning_rate": 5e-5, "val_size": 0.05}


def _budget(doc: Doc, ctx: Ctx) -> None:
    """This run's training budget beside the paper's on the same question files (all their rows, 3 epochs)."""
    from qtalign.io import read_json

    s, stats = ctx.run.summary("train"), read_json(ctx.run.dir / "data" / "stats.json")
    if not s:
        return
    n, cfg = s.get("numbers", {}), s.get("config", {})
    rows, steps, tokens = n.get("train_rows") or 0, n.get("steps") or 0, n.get("train_tokens") or 0
    epochs = steps * cfg.get("batch_size", 16) / rows if rows else float("nan")
    ours = [rows, steps, f"{epochs:.2f}", f"{tokens:,}", cfg.get("learning_rate"), cfg.get("batch_size")]
    available = sum(d.get("available", 0) for d in ((stats or {}).get("per_source") or {}).values())
    if available:
        p_rows = int(available * (1 - PAPER_TUNING["val_size"]))
        p_steps = -(-p_rows // PAPER_TUNING["batch_size"]) * PAPER_TUNING["epochs"]
        p_tokens = f"≈ {round(tokens / max(steps, 1) * p_steps, -4):,.0f}" if tokens else DASH
        paper = [p_rows, p_steps, PAPER_TUNING["epochs"], p_tokens, PAPER_TUNING["learning_rate"], PAPER_TUNING["batch_size"]]
    else:
        paper = [DASH] * 6
    doc.md("**Training budget** (the paper's: every row of the same question files, 5 % held out, 3 epochs; its tokens "
           "estimated at this run's mean tokens per step)\n\n" + md_table(
               ["", "training rows", "optimizer steps", "epochs", "training tokens", "learning rate", "batch"],
               [["this run", *ours], ["the paper", *paper]], "l" + "r" * 6))


def evaluated_checkpoint(ck: dict | None) -> str:
    """Which training step the tuned evaluation used, and why (every report states it), from stats.json's checkpoint."""
    if not ck:
        return ""
    steps, best = ck["steps"], ck["best_step"]
    if best is not None:
        why = ("the last step" if best == steps else f"not the last: {steps - best} more steps raised the held-out loss")
        return (f"**Evaluated checkpoint:** the adapter of step {best} of {steps} — the lowest held-out loss "
                f"({ck['best_eval_loss']:.4f}), kept by the Trainer's best-checkpoint rule ({why}).")
    return f"**Evaluated checkpoint:** the adapter of the last step, {steps} of {steps} (no held-out rows: nothing to choose by)."


def training(doc: Doc, ctx: Ctx) -> None:
    from qtalign.io import read_json

    tdir = ctx.run.dir / "train"
    line = evaluated_checkpoint(ctx.stats["checkpoint"])
    if line:
        doc.md(line)
    _budget(doc, ctx)
    listed = {f["path"] for f in (read_json(tdir / "summary.json") or {}).get("figures", [])}
    if (tdir / "loss.png").exists() and "loss.png" not in listed:
        doc.img(tdir / "loss.png", "training loss")
    _summary_figures(doc, tdir)


def lens(doc: Doc, ctx: Ctx) -> None:
    _summary_figures(doc, ctx.run.dir / "lens")


def geometry(doc: Doc, ctx: Ctx) -> None:
    _summary_figures(doc, ctx.run.dir / "geometry")


def _retrieval_task(doc: Doc, ctx: Ctx, e: dict) -> None:
    from qtalign.report.figures import retrieval_figure

    t, v, ref, pool, curves, rho = e["task"], e["variant"], e["reference"], e["pool"], e["curves"], e["rho"]
    if not e["langs"]:
        doc.md(f"_{t}/{v}: no language besides the reference {ref}._")
        return
    n_layers = len(next(iter(curves.values())))
    doc.h(3, f"{t} ({v} prompts), {pool} pooling, {e['n_items']} parallel items ({e['n_clusters']} clusters)")
    p = retrieval_figure(curves, rho, f"cross-lingual retrieval: {t} ({v}), {pool} pooling", ctx.figdir / f"retrieval_{t}_{v}.png")
    doc.img(p, f"{t} ({v}): left, mean retrieval accuracy over the {len(e['langs'])} non-{ref} languages per layer (is an item's "
            f"nearest cosine neighbour among the other language's items the same item{' or one of its cluster' if e['n_clusters'] != e['n_items'] else ''}?), "
            "both directions; right, Spearman ρ over the languages between retrieval and the accuracy change (dots: p < 0.05).")
    picks = sorted({0, n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers - 1})
    head = ["layer"] + list(curves) + [f"ρ: {k} (p)" for k in rho]
    body = [[k] + [num(c[k]) for c in curves.values()] + [f"{signed_num(r[k][0], 2)} ({pval(r[k][1])})" for r in rho.values()]
            for k in picks]
    doc.md(md_table(head, body))


def cross_lingual_retrieval(doc: Doc, ctx: Ctx) -> None:
    ret = ctx.stats["retrieval"]
    if ret is None:
        doc.md("_No retrieval results (the geometry stage did not run, or ran before retrieval was measured)._")
        return
    doc.md("Per layer, on each language's pooled hidden states of parallel items: the share of items whose nearest "
           "neighbour (cosine) among the other language's items is the same item (or, for SNLI, an item of the same premise "
           "triple), from the reference language into each language and back. The correlation asks whether the languages "
           "whose representations align better with English (before tuning, or more after it) are the ones that gained.")
    for e in ret:
        _retrieval_task(doc, ctx, e)


# ------------------------------------------------------------------------------------------------------------------
# labels, data, environment


def labels(doc: Doc, ctx: Ctx) -> None:
    lab = ctx.run.dir / "eval" / "base" / "labels.md"
    if lab.exists():
        doc.md("How each scored label word is tokenised by this model, the size of each class's first-token candidate set, "
               "collisions between classes and the overlap with the English labels' sets (same tokenizer for base and tuned).")
        doc.md(lab.read_text(encoding="utf-8").strip())
    else:
        doc.md("_No label report (eval/base/labels.md missing)._")


def data(doc: Doc, ctx: Ctx) -> None:
    from qtalign.io import read_json

    stats = read_json(ctx.run.dir / "data" / "stats.json")
    if stats is None:
        doc.md("_Stage `data` has not run in this run dir._")
        return
    keys = ("rows", "rows_per_source", "index_min", "index_max", "duplicates_removed", "excluded", "out_of_range",
            "dataset_name", "warnings")
    doc.md(md_table(["statistic", "value"], [[k, v] for k, v in flatten({k: stats.get(k) for k in keys if k in stats})], "ll"))
    if (ctx.run.dir / "data" / "summary.json").exists():
        _summary_figures(doc, ctx.run.dir / "data")


def environment(doc: Doc, ctx: Ctx) -> None:
    run = ctx.run
    env = dict(run.exp.get("environment") or (run.base or {}).get("environment") or {})
    env["seed"] = run.config.get("seed", (run.base or {}).get("seed"))
    if run.base:
        m = run.base.get("model", {})
        env.update(model=m.get("name"), model_source=ctx.path(m.get("source", "")), model_dtype=m.get("dtype"),
                   model_sha256=((m.get("identity") or {}).get("sha256") or "")[:16] or None)
        env["engine_numerics"] = (run.base.get("covers") or {}).get("numerics")
    doc.md(md_table(["", "value"], [[k, v] for k, v in flatten(env) if v is not None], "ll"))
    trows = []
    for st in ("data", "train", "eval/base", "eval/tuned", "lens", "geometry", "report"):
        sj = run.stage(st)
        if sj and st == "report":
            trows.append([st, "this report", "–", sj.get("fingerprint", "")[:12], "–"])
        elif sj:
            trows.append([st, sj.get("status", "?"), f"{sj['timing_s']:.1f}" if sj.get("timing_s") is not None else "–",
                          sj.get("fingerprint", "")[:12], "yes" if sj.get("skipped_last_run") else "no"])
    if trows:
        doc.md(md_table(["stage", "status", "time s", "fingerprint", "skipped in last run"], trows, "llrll"))
    for res, name in ((run.base, "base"), (run.tuned, "tuned")):
        if res:
            tm = res.get("timing", {})
            cpu = f" ({tm['eval_cpu_s']} s CPU)" if "eval_cpu_s" in tm else ""
            doc.md(f"eval/{name}: model load {tm.get('model_load_s', '–')} s, scoring {tm.get('eval_s', '–')} s{cpu}, "
                   f"{tm.get('items_scored_this_run', '–')} items scored in the last run, "
                   f"{tm.get('items_from_store', 0)} from the shared result store.")
