"""Experiment report: `report.md` and a self-contained `report.html` (plots embedded as base64) from a run dir.

The report only reads what the stages wrote (see docs/architecture.md, "Stage artifacts"):

    experiment.json         resolved config, seen languages, overlap check, environment (written by `qtalign run`)
    <stage>/stage.json      status, fingerprint and timing of each stage
    data/stats.json         question-translation data statistics (+ summary.json when present)
    train/summary.json      training summary (loss.png)
    eval/base, eval/tuned   results.json + predictions.jsonl (per-item `correct`, `cal_correct`), labels.md
    lens/, geometry/        summary.json (figures, tables, numbers)

Accuracy is compared per item: base and tuned predictions are paired by item key, the change is tested with the
exact McNemar test on the discordant pairs, intervals are Wilson 95 % intervals. The paper's raw decision rule is
the headline; contextual-calibrated accuracy is reported beside it everywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qtalign.stats import mcnemar, paired_counts, wilson

STAGE_ORDER = ("data", "train", "eval/base", "eval/tuned", "lens", "geometry", "report")
SECTIONS = ("Configuration", "Train/eval overlap check", "Accuracy: base vs tuned", "Summaries", "Per-language accuracy",
            "Training", "Logit lens", "Representation geometry", "Label tokenisation", "Question-translation data",
            "Environment and timings")
GROUPS = ("all", "seen", "unseen", "high", "low")


# ------------------------------------------------------------------------------------------------------------------
# reading


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_predictions(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if not Path(path).exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[r["key"]] = r
    return out


# ------------------------------------------------------------------------------------------------------------------
# statistics


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
class LangRow:
    task: str
    variant: str
    lang: str
    group: str  # resource group
    seen: bool
    raw: Cell
    cal: Cell | None

    @property
    def delta(self) -> float:
        return self.raw.acc("tuned") - self.raw.acc("base")


def compare(base: dict[str, dict], tuned: dict[str, dict], groups: dict[str, str], seen: set[str]) -> list[LangRow]:
    """Per (task, variant, lang) rows from per-item records; with a tuned run only items present in both count."""
    cells: dict[tuple[str, str, str], tuple[Cell, Cell | None]] = {}
    for key, rb in base.items():
        rt = tuned.get(key) if tuned else None
        if tuned and rt is None:
            continue
        g = (rb["task"], rb["variant"], rb["lang"])
        has_cal = "cal_correct" in rb and (rt is None or "cal_correct" in rt)
        if g not in cells:
            cells[g] = (Cell(), Cell() if has_cal else None)
        raw, cal = cells[g]
        raw.base.append(bool(rb["correct"]))
        if rt is not None:
            raw.tuned.append(bool(rt["correct"]))
        if cal is not None:
            cal.base.append(bool(rb["cal_correct"]))
            if rt is not None:
                cal.tuned.append(bool(rt["cal_correct"]))
    return [LangRow(t, v, lang, groups.get(lang, "?"), lang in seen, raw, cal) for (t, v, lang), (raw, cal) in cells.items()]


def _mean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def group_summary(rows: list[LangRow], name: str) -> dict | None:
    """Macro-average accuracies over the languages of a group and a pooled McNemar test over all their items."""
    sel = {"all": lambda r: True, "seen": lambda r: r.seen, "unseen": lambda r: not r.seen,
           "high": lambda r: r.group == "high", "low": lambda r: r.group == "low"}[name]
    rs = [r for r in rows if sel(r)]
    if not rs:
        return None
    out = {"group": name, "n_langs": len(rs), "langs": [r.lang for r in rs]}
    for kind in ("raw", "cal"):
        cells = [getattr(r, kind) for r in rs]
        if any(c is None for c in cells):
            continue
        pooled = Cell([x for c in cells for x in c.base], [x for c in cells for x in c.tuned])
        b, c, p = pooled.mcnemar()
        base, tuned = _mean(c.acc("base") for c in cells), _mean(c.acc("tuned") for c in cells)
        out[kind] = {"n_items": pooled.n, "base": base, "tuned": tuned, "delta": tuned - base, "b": b, "c": c, "p": p}
    return out


# ------------------------------------------------------------------------------------------------------------------
# formatting


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def signed(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.1f}"


def pval(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    s = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    return s + (" *" if p < 0.05 else "")


def cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def flatten(d, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out += flatten(v, f"{prefix}[{i}]")
    else:
        if isinstance(d, float):
            d = f"{d:.4g}"
        elif isinstance(d, list):
            d = ", ".join(map(str, d))
        out.append((prefix, d))
    return out


# ------------------------------------------------------------------------------------------------------------------
# plots


def bar_chart(rows: list[LangRow], title: str, path: Path) -> Path:
    """Per-language accuracy, base vs tuned, raw (and calibrated when present), with Wilson 95 % error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = ["raw"] + (["cal"] if all(r.cal is not None for r in rows) else [])
    has_tuned = any(r.raw.tuned for r in rows)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(6.0, 0.55 * len(rows) + 2), 3.2 * len(kinds)), squeeze=False)
    x = np.arange(len(rows))
    w = 0.4 if has_tuned else 0.7
    labels = [r.lang + ("*" if r.seen else "") for r in rows]
    for ax, kind in zip(axes[:, 0], kinds):
        series = [("base", "#9e9e9e")] + ([("tuned", "#1f77b4")] if has_tuned else [])
        for j, (which, colour) in enumerate(series):
            cells = [getattr(r, kind) for r in rows]
            acc = np.array([c.acc(which) for c in cells])
            ci = np.array([c.ci(which) for c in cells])
            err = np.clip(np.vstack([acc - ci[:, 0], ci[:, 1] - acc]) * 100, 0, None)
            off = (j - (len(series) - 1) / 2) * w
            ax.bar(x + off, acc * 100, w, yerr=err, color=colour, label=which, capsize=2, error_kw={"elinewidth": 0.8})
        ax.set_xticks(x, labels)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy %" if kind == "raw" else "calibrated acc %")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0, 0].set_title(title + "  (* = language seen in training)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------------
# report


class _Doc:
    """Markdown blocks; images are kept as paths so that the HTML can embed them."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.blocks: list[tuple[str, object]] = []

    def md(self, text: str) -> None:
        self.blocks.append(("md", text))

    def h(self, level: int, text: str) -> None:
        self.md("#" * level + " " + text)

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (Path(path), caption)))

    def render(self, embed: bool) -> str:
        out = []
        for kind, v in self.blocks:
            if kind == "md":
                out.append(v)
                continue
            path, caption = v
            if embed:
                src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
            else:
                src = path.relative_to(self.run_dir).as_posix() if path.is_relative_to(self.run_dir) else str(path)
            cap = caption.replace("[", "(").replace("]", ")").replace("\n", " ")
            out.append(f"![{cap}]({src})\n\n*{cap}*")
        return "\n\n".join(out) + "\n"


def _stage_summary(doc: _Doc, folder: Path, name: str, skip_figures: set[str] = frozenset()) -> bool:
    s = read_json(folder / "summary.json")
    if s is None:
        doc.md(f"_Stage `{name}` has not run in this run dir (no `{folder.name}/summary.json`)._")
        return False
    for t in s.get("tables", []):
        doc.md(f"**{t.get('title', '')}**\n\n{t.get('markdown', '')}")
    for f in s.get("figures", []):
        p = folder / f["path"]
        if p.name in skip_figures:
            continue
        if p.exists():
            doc.img(p, f.get("caption", p.stem))
        else:
            doc.md(f"_missing figure `{p.name}`_")
    nums = flatten(s.get("numbers", {}))
    if nums and not s.get("tables"):  # the stage's tables already show its numbers
        doc.md(md_table(["number", "value"], [[k, v] for k, v in nums[:60]], "ll"))
    return True


def _eval_rows(run_dir: Path, exp: dict) -> tuple[list[LangRow], dict | None, dict | None]:
    base_res = read_json(run_dir / "eval" / "base" / "results.json")
    tuned_res = read_json(run_dir / "eval" / "tuned" / "results.json")
    if base_res is None:
        return [], None, tuned_res
    from qtalign.tasks.specs import load_specs

    specs = load_specs(base_res.get("config", {}).get("prompts") or None)
    groups = {c: specs.languages[c].resource_group for c in specs.languages}
    base = read_predictions(run_dir / "eval" / "base" / "predictions.jsonl")
    tuned = read_predictions(run_dir / "eval" / "tuned" / "predictions.jsonl") if tuned_res else {}
    rows = compare(base, tuned, groups, set(exp.get("seen_langs", [])))
    order = {c: i for i, c in enumerate(specs.order)}
    rows.sort(key=lambda r: (r.task, r.variant, order.get(r.lang, 999)))
    return rows, base_res, tuned_res


def _by_task(rows: list[LangRow]) -> dict[tuple[str, str], list[LangRow]]:
    out: dict[tuple[str, str], list[LangRow]] = {}
    for r in rows:
        out.setdefault((r.task, r.variant), []).append(r)
    return out


def non_default(cfg: dict) -> dict:
    """The experiment config without the values that equal the defaults (falls back to all of it)."""
    try:
        from qtalign.experiment.runner import ExperimentConfig

        return ExperimentConfig.model_validate(cfg).model_dump(mode="json", exclude_defaults=True)
    except Exception:  # noqa: BLE001 - a config from another version: show it whole
        return cfg


def build_report(run_dir: str | Path) -> tuple[_Doc, dict]:
    run_dir = Path(run_dir)
    exp = read_json(run_dir / "experiment.json") or {}
    cfg = exp.get("config", {})
    title = (cfg.get("report") or {}).get("title") or f"qtalign experiment: {cfg.get('name') or run_dir.name}"
    doc = _Doc(run_dir)
    facts: dict = {"sections": []}
    rows, base_res, tuned_res = _eval_rows(run_dir, exp)
    tasks = _by_task(rows)
    has_tuned = tuned_res is not None

    doc.h(1, title)
    if (cfg.get("report") or {}).get("notes"):
        doc.md(cfg["report"]["notes"])
    if exp.get("stale_stages"):
        doc.md(f"**Warning:** the outputs of {', '.join(exp['stale_stages'])} in this run dir were not produced with the "
               "configuration below (they were not rerun after it changed); rerun them for a consistent report.")
    intro = [f"Run dir `{run_dir}`."]
    if exp.get("seen_langs"):
        intro.append(f"Languages seen in question-translation training: {', '.join(exp['seen_langs'])} (marked * below).")
    intro.append("Accuracy uses the paper's decision rule (raw, the headline); contextual-calibrated accuracy is shown beside it. "
                 "Δ = tuned − base in points; p = exact McNemar test on per-item paired correctness (* p < 0.05, uncorrected); "
                 "intervals are Wilson 95 %.")
    doc.md(" ".join(intro))
    if tasks:
        hl = []
        for (t, v), rs in tasks.items():
            s = group_summary(rs, "all")
            raw, cal = s.get("raw", {}), s.get("cal", {})
            hl.append([f"{t} ({v})", s["n_langs"], raw.get("n_items"), pct(raw.get("base")), pct(raw.get("tuned")) if has_tuned else "–",
                       signed(raw.get("delta")) if has_tuned else "–", pval(raw.get("p")),
                       pct(cal.get("base")), pct(cal.get("tuned")) if has_tuned else "–", signed(cal.get("delta")) if has_tuned else "–",
                       pval(cal.get("p"))])
        doc.md("**Headline (macro average over languages)**\n\n" + md_table(
            ["task (labels)", "langs", "items", "base %", "tuned %", "Δ", "p", "base cal %", "tuned cal %", "Δ cal", "p cal"], hl))

    # -- configuration
    doc.h(2, "Configuration")
    facts["sections"].append("Configuration")
    doc.md("```yaml\n" + (yaml.safe_dump(non_default(cfg), sort_keys=False, allow_unicode=True, default_flow_style=None) if cfg else "# experiment.json not found\n") + "```")
    doc.md("Settings that differ from the defaults; the full resolved config is `config.yaml` in the run dir "
           "(`qtalign run <run dir>/config.yaml` repeats the experiment).")

    # -- overlap
    doc.h(2, "Train/eval overlap check")
    facts["sections"].append("Train/eval overlap check")
    ov = exp.get("overlap")
    if ov:
        verdict = "**overlap found**" if ov.get("overlap") else "no overlap"
        doc.md(f"Result: {verdict}. {ov.get('detail', '')}")
        if ov.get("tasks"):
            doc.md(md_table(["eval task", "training source", "train items", "eval items", "shared items", "note"],
                            [[x["task"], x.get("train_source", ""), x.get("n_train", "–"), x.get("n_eval", "–"), x.get("n_shared", 0),
                              x.get("note", "")] for x in ov["tasks"]], "llrrrl"))
    else:
        doc.md("_No overlap check recorded (no data/train stage in this run)._")

    # -- accuracy tables
    doc.h(2, "Accuracy: base vs tuned")
    facts["sections"].append("Accuracy: base vs tuned")
    if not rows:
        doc.md("_No evaluation results (eval/base/results.json missing)._")
    for (t, v), rs in tasks.items():
        doc.h(3, f"{t} ({v} labels)")
        body = []
        for r in rs:
            b, c, p = r.raw.mcnemar()
            line = [r.lang + (" *" if r.seen else ""), r.group, r.raw.n,
                    f"{pct(r.raw.acc('base'))} [{pct(r.raw.ci('base')[0])}–{pct(r.raw.ci('base')[1])}]"]
            if has_tuned:
                line += [f"{pct(r.raw.acc('tuned'))} [{pct(r.raw.ci('tuned')[0])}–{pct(r.raw.ci('tuned')[1])}]",
                         signed(r.delta), f"{b}/{c}", pval(p)]
            if r.cal is not None:
                line += [pct(r.cal.acc("base"))]
                if has_tuned:
                    line += [pct(r.cal.acc("tuned")), signed(r.cal.acc("tuned") - r.cal.acc("base")), pval(r.cal.mcnemar()[2])]
            body.append(line)
        head = ["lang", "resource", "n", "base % [95 % CI]"]
        if has_tuned:
            head += ["tuned % [95 % CI]", "Δ", "b/c", "p"]
        if rs[0].cal is not None:
            head += ["base cal %"] + (["tuned cal %", "Δ cal", "p cal"] if has_tuned else [])
        doc.md(md_table(head, body, "ll" + "r" * (len(head) - 2)))
    if rows and has_tuned:
        doc.md("b/c = items right only in base / right only in tuned (the discordant pairs McNemar tests).")

    # -- summaries
    doc.h(2, "Summaries")
    facts["sections"].append("Summaries")
    summaries = {}
    for (t, v), rs in tasks.items():
        body = []
        for g in GROUPS:
            s = group_summary(rs, g)
            if s is None:
                continue
            summaries[f"{t}/{v}/{g}"] = s
            raw, cal = s.get("raw", {}), s.get("cal", {})
            body.append([g, s["n_langs"], raw.get("n_items"), pct(raw.get("base")), pct(raw.get("tuned")) if has_tuned else "–",
                         signed(raw.get("delta")) if has_tuned else "–", pval(raw.get("p")), pct(cal.get("base")),
                         pct(cal.get("tuned")) if has_tuned else "–", signed(cal.get("delta")) if has_tuned else "–", pval(cal.get("p"))])
        doc.h(3, f"{t} ({v} labels)")
        doc.md(md_table(["languages", "langs", "items", "base %", "tuned %", "Δ", "pooled p", "base cal %", "tuned cal %", "Δ cal",
                         "pooled p cal"], body))
    if tasks:
        doc.md("Accuracies are macro averages over the group's languages; the pooled p pools the group's items into one McNemar "
               "test (translations of the same items are not independent, so treat it as approximate). seen = languages in the "
               "question-translation data (sources and target).")
    else:
        doc.md("_No evaluation results._")
    facts["summaries"] = summaries

    # -- bar charts
    doc.h(2, "Per-language accuracy")
    facts["sections"].append("Per-language accuracy")
    for (t, v), rs in tasks.items():
        p = bar_chart(rs, f"{t} ({v} labels)", run_dir / "report" / f"accuracy_{t}_{v}.png")
        doc.img(p, f"{t} ({v} labels): per-language accuracy, base vs tuned, raw and calibrated, Wilson 95 % intervals")
    if not tasks:
        doc.md("_No evaluation results._")

    # -- training
    doc.h(2, "Training")
    facts["sections"].append("Training")
    tdir = run_dir / "train"
    listed = {f["path"] for f in (read_json(tdir / "summary.json") or {}).get("figures", [])}
    if (tdir / "loss.png").exists() and "loss.png" not in listed:
        doc.img(tdir / "loss.png", "training loss")
    _stage_summary(doc, tdir, "train")

    # -- lens / geometry
    doc.h(2, "Logit lens")
    facts["sections"].append("Logit lens")
    _stage_summary(doc, run_dir / "lens", "lens")
    doc.h(2, "Representation geometry")
    facts["sections"].append("Representation geometry")
    _stage_summary(doc, run_dir / "geometry", "geometry")

    # -- labels
    doc.h(2, "Label tokenisation")
    facts["sections"].append("Label tokenisation")
    lab = run_dir / "eval" / "base" / "labels.md"
    if lab.exists():
        doc.md("How each scored label word is tokenised by this model, the size of each class's first-token candidate set, "
               "collisions between classes and the overlap with the English labels' sets (same tokenizer for base and tuned).")
        doc.md(lab.read_text(encoding="utf-8").strip())
    else:
        doc.md("_No label report (eval/base/labels.md missing)._")

    # -- data
    doc.h(2, "Question-translation data")
    facts["sections"].append("Question-translation data")
    stats = read_json(run_dir / "data" / "stats.json")
    if stats is None:
        doc.md("_Stage `data` has not run in this run dir._")
    else:
        keys = ("rows", "rows_per_source", "index_min", "index_max", "duplicates_removed", "excluded", "out_of_range",
                "dataset_name", "warnings")
        doc.md(md_table(["statistic", "value"], [[k, v] for k, v in flatten({k: stats.get(k) for k in keys if k in stats})], "ll"))
        if (run_dir / "data" / "summary.json").exists():
            _stage_summary(doc, run_dir / "data", "data")

    # -- environment and timings
    doc.h(2, "Environment and timings")
    facts["sections"].append("Environment and timings")
    env = dict(exp.get("environment") or (base_res or {}).get("environment") or {})
    env["seed"] = cfg.get("seed", (base_res or {}).get("seed"))
    if base_res:
        env["model"] = base_res.get("model", {}).get("name")
        env["model_source"] = base_res.get("model", {}).get("source")
        env["model_dtype"] = base_res.get("model", {}).get("dtype")
    doc.md(md_table(["", "value"], [[k, v] for k, v in flatten(env)], "ll"))
    trows = []
    for st in STAGE_ORDER:
        sj = read_json(run_dir / st / "stage.json")
        if sj and st == "report":
            trows.append([st, "this report", "–", sj.get("fingerprint", "")[:12], "–"])
        elif sj:
            trows.append([st, sj.get("status", "?"), f"{sj['timing_s']:.1f}" if sj.get("timing_s") is not None else "–",
                          sj.get("fingerprint", "")[:12], "yes" if sj.get("skipped_last_run") else "no"])
    if trows:
        doc.md(md_table(["stage", "status", "time s", "fingerprint", "skipped in last run"], trows, "llrll"))
    for res, name in ((base_res, "base"), (tuned_res, "tuned")):
        if res:
            tm = res.get("timing", {})
            doc.md(f"eval/{name}: model load {tm.get('model_load_s', '–')} s, scoring {tm.get('eval_s', '–')} s, "
                   f"{tm.get('items_scored_this_run', '–')} items scored in the last run.")
    facts["rows"] = rows
    return doc, facts


HTML_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:0.25em 0.55em;vertical-align:top}
th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;border:1px solid #eee}
pre{background:#f6f8fa;padding:0.8em;overflow-x:auto;font-size:0.85em}code{background:#f6f8fa;padding:0 0.2em}
h1{border-bottom:2px solid #1f77b4}h2{border-bottom:1px solid #ddd;margin-top:2em}
"""


def md_to_html(md: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"<style>{HTML_CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write run_dir/report.md (images linked) and run_dir/report.html (self-contained); returns both paths."""
    run_dir = Path(run_dir)
    doc, _ = build_report(run_dir)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    md_path.write_text(doc.render(embed=False), encoding="utf-8")
    title = next((v[2:] for k, v in doc.blocks if k == "md" and str(v).startswith("# ")), "qtalign report")
    html_path.write_text(md_to_html(doc.render(embed=True), title), encoding="utf-8")
    return md_path, html_path
