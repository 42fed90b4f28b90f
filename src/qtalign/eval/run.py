"""Few-shot evaluation: tasks x languages x label variants, per-item records, resumable, data-parallel.

Output dir layout:
    run.json            config, fingerprint, versions (written first)
    predictions.jsonl   one record per item (appended as batches finish: an interrupted run resumes from it)
    results.json        metrics, timings, environment (written last: its presence means the run finished)
    table.md/.csv       per-language accuracy with Wilson CIs, calibrated accuracy, group averages
    labels.md/.json     label-tokenisation report
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qtalign import __version__
from qtalign.tasks.items import DataSource, load_items, parse_range, comma_list
from qtalign.errors import QtalignError
from qtalign.scoring.faithful import official_correct, special_case
from qtalign.engine.models import LoadedModel, ModelConfig, load_model
from qtalign.scoring.scorer import ScoreRequest, Scorer, calibrate, content_free_requests, mean_probs
from qtalign.tasks.specs import SpecSet, canonical_variant, load_specs
from qtalign.stats import mean, wilson


class TaskSelection(BaseModel):
    """Model, tasks, languages, label variants and data: what evaluation and the analyses (lens, geometry) share."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: list[str] = Field(default_factory=lambda: ["emotion", "snli", "paws"], description="task names")
    langs: list[str] = Field(default_factory=lambda: ["all"], description="language codes, 'all', 'high' or 'low'")
    variants: list[str] = Field(default_factory=lambda: ["enout"], description="label variants: enout, native, irrelevant")
    limit: int | None = Field(None, ge=1, description="first N items per language (after `items`)")
    items: str | None = Field(None, description="item range START:END (e.g. 0:250)")
    exclude_items: list[int] = Field(default_factory=list, description="item indices never used (e.g. training items)")
    data_dir: str | None = Field(None, description="folder with the official layout (or the base of data_files)")
    data_files: str | None = Field(None, description="path template with {task} and {lang} (.json/.jsonl), 'demo', or hf:<dataset>")
    split: str = Field("test", description="split for hf: datasets")
    prompts: list[str] = Field(default_factory=list, description="extra spec files merged over the defaults (e.g. paper_prompts.json)")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass (results do not depend on it)")
    seed: int = Field(0, description="seed for torch/numpy")

    @field_validator("variants")
    @classmethod
    def _variants(cls, v):
        return [canonical_variant(x) for x in v]

    @field_validator("tasks", "langs", "variants", "prompts", mode="before")
    @classmethod
    def _split(cls, v):
        return comma_list(v)

    def source(self) -> DataSource:
        return DataSource.from_options(self.data_dir, self.data_files, self.split)

    def fingerprint(self) -> str:
        d = self.model_dump(exclude={"batch_size"})  # results do not depend on the batch size
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class EvalConfig(TaskSelection):
    """Evaluation settings (round-trips to YAML/JSON)."""

    method: Literal["first-token", "faithful", "sequence"] = Field("first-token", description="scoring rule")
    length_norm: bool = Field(False, description="sequence method: mean instead of summed token log-prob")
    prefix_cache: bool = Field(True, description="compute each language's demo block once and reuse its KV cache")
    calibrate: bool = Field(True, description="also report contextual calibration (content-free queries)")


def git_hash() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def environment() -> dict:
    import torch
    import transformers

    import peft

    return {
        "qtalign": __version__,
        "git": git_hash(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def plan_groups(cfg: EvalConfig, specs: SpecSet, source: DataSource) -> tuple[list[tuple[str, str, str]], list[dict]]:
    groups, skipped = [], []
    explicit = cfg.langs not in (["all"], ["high"], ["low"])
    for t in cfg.tasks:
        task = specs.task(t)
        for lang in specs.resolve_langs(cfg.langs, t):
            if not source.exists(task, lang):
                if explicit:
                    raise QtalignError(f"{source.path(task, lang)}: no data for task '{t}' language '{lang}'")
                skipped.append({"task": t, "lang": lang, "reason": "no data file"})
                continue
            for v in cfg.variants:
                task.label_words(lang, v)  # validates the variant for this task
                groups.append((t, v, lang))
    if not groups:
        raise QtalignError(f"nothing to evaluate: no data found under {source.describe()} for tasks {cfg.tasks}")
    return groups, skipped


def _read_done(paths: list[Path]) -> dict[str, dict]:
    done = {}
    for p in paths:
        if not p.exists():
            continue
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: recomputed
                done[r["key"]] = r
    return done


def item_key(task: str, variant: str, lang: str, index: int) -> str:
    return f"{task}/{variant}/{lang}/{index}"


def group_name(task: str, variant: str, lang: str) -> str:
    return f"{task}/{variant}/{lang}"


def scored_words(task, lang: str, variant: str, method: str) -> tuple[str, list[str]]:
    """(forced text after the answer cue, label words scored per class) for a task x language x variant: the
    label words, except for a faithful special case (the Thai two-step), which forces the common prefix."""
    if method == "faithful" and (case := special_case(task, lang, variant)):
        return case["forced_prefix"], [case["continuation_label_words"][c] for c in task.classes]
    return "", list(task.label_words(lang, variant))


def build_requests(task, lang: str, variant: str, items: list, method: str) -> list[ScoreRequest]:
    """The score requests of one task x language x variant, one per item, in item order (what `evaluate` scores;
    also used by benchmarks/eval_throughput.py)."""
    forced, scored = scored_words(task, lang, variant, method)
    gname = group_name(task.name, variant, lang)
    reqs = []
    for it in items:
        prefix, q = task.prompt_parts(lang, variant, it.fields)
        reqs.append(ScoreRequest(item_key(task.name, variant, lang, it.index), gname, prefix, q, list(scored), forced=forced))
    return reqs


def evaluate(cfg: EvalConfig, out: str | Path, loaded: LoadedModel | None = None, overwrite: bool = False,
             progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from qtalign.engine.parallel import distributed_state

    state = distributed_state()
    out = Path(out)
    specs = load_specs(cfg.prompts)
    source = cfg.source()
    groups, skipped = plan_groups(cfg, specs, source)
    fp = cfg.fingerprint()
    run_json, results_json = out / "run.json", out / "results.json"
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if run_json.exists() and not overwrite:
            prev = json.loads(run_json.read_text())
            if prev.get("fingerprint") != fp:
                raise QtalignError(f"{out}: holds a run with a different config (fingerprint {prev.get('fingerprint')} != {fp}); use another --out or --overwrite")
            if results_json.exists():
                return json.loads(results_json.read_text())
        if overwrite:
            for name in ("predictions.jsonl", "results.json", "table.md", "table.csv"):
                (out / name).unlink(missing_ok=True)
            for p in out.glob("predictions.rank*.jsonl"):
                p.unlink()
        run_json.write_text(json.dumps({"fingerprint": fp, "config": cfg.model_dump(), "started": time.time()}, indent=1))
    state.wait_for_everyone()

    t_load = time.time()
    loaded = loaded or load_model(cfg.model)
    t_load = time.time() - t_load
    scorer = Scorer(loaded.model, loaded.tokenizer, cfg.method, cfg.batch_size, cfg.prefix_cache, cfg.length_norm)
    rank, world = state.process_index, state.num_processes
    shard = out / (f"predictions.rank{rank}.jsonl" if world > 1 else "predictions.jsonl")
    done = _read_done([out / "predictions.jsonl", *out.glob("predictions.rank*.jsonl")])
    rng_items = parse_range(cfg.items)
    excl = set(cfg.exclude_items)

    todo: list[tuple[tuple[str, str, str], list]] = []
    for g in groups:
        task = specs.task(g[0])
        items = load_items(task, g[2], source, rng_items, exclude=excl)
        if cfg.limit:
            items = items[: cfg.limit]
        mine = [it for k, it in enumerate(items) if k % world == rank]
        todo.append((g, [it for it in mine if item_key(*g, it.index) not in done]))
    total = sum(len(x) for _, x in todo)
    timings: dict[str, float] = {}
    bar = tqdm(total=total, desc=f"eval[{rank}]" if world > 1 else "eval", unit="item", disable=not progress or None, dynamic_ncols=True)
    if shard.exists():  # a kill can leave a cut last line: drop it, so that appended records start on a new line
        tail = shard.read_bytes()
        if tail and not tail.endswith(b"\n"):
            shard.write_bytes(tail[: tail.rfind(b"\n") + 1])
    with open(shard, "a", encoding="utf-8") as f:
        for (t, v, lang), items in todo:
            if not items:
                continue
            t0 = time.time()
            task = specs.task(t)
            gname = group_name(t, v, lang)
            forced, scored = scored_words(task, lang, v, cfg.method)
            cf = None
            if cfg.calibrate:
                cf = mean_probs(list(scorer.score(content_free_requests(task, lang, v, gname, scored, forced))))
            reqs = build_requests(task, lang, v, items, cfg.method)
            by_key = {r.key: it for r, it in zip(reqs, items)}
            for s in scorer.score(reqs, progress=None):
                it = by_key[s.key]
                rec = {
                    "key": s.key, "task": t, "variant": v, "lang": lang, "index": it.index, "id": it.id,
                    "gold": task.classes[it.gold], "pred": task.classes[s.pred], "correct": s.pred == it.gold,
                    "scores": dict(zip(task.classes, [round(x, 6) for x in s.probs])),
                    ("logprobs" if cfg.method == "sequence" else "mass"): dict(zip(task.classes, [float(f"{x:.6g}") for x in s.raw])),
                }
                if cf is not None:
                    cal = calibrate(s.probs, cf)
                    cp = max(range(len(cal)), key=lambda i: (cal[i], -i))
                    rec.update(cal_scores=dict(zip(task.classes, [round(x, 6) for x in cal])), cal_pred=task.classes[cp], cal_correct=cp == it.gold)
                if cfg.method == "faithful":
                    rec["official_correct"] = official_correct(task, lang, v, s.pred, it.gold_word)
                if s.extra:
                    rec.update(s.extra)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                bar.update(1)
            f.flush()
            timings[gname] = round(time.time() - t0, 3)
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    records = _read_done([out / "predictions.jsonl", *sorted(out.glob("predictions.rank*.jsonl"))])
    order = {g: i for i, g in enumerate(groups)}
    recs = sorted((r for r in records.values() if (r["task"], r["variant"], r["lang"]) in order),
                  key=lambda r: (order[(r["task"], r["variant"], r["lang"])], r["index"]))
    tmp = out / "predictions.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "predictions.jsonl")
    for p in out.glob("predictions.rank*.jsonl"):
        p.unlink()
    metrics = compute_metrics(recs, specs)
    from qtalign.eval.labels import label_report, write_label_report

    write_label_report(label_report(scorer, specs, cfg.tasks, sorted({g[2] for g in groups}, key=specs.order.index), cfg.variants), out)
    results = {
        "config": cfg.model_dump(),
        "fingerprint": fp,
        "model": loaded.info,
        "environment": environment(),
        "seed": cfg.seed,
        "processes": world,
        "skipped": skipped,
        "timing": {"model_load_s": round(t_load, 2), "groups_s": timings, "items_scored_this_run": total,
                   "eval_s": round(sum(timings.values()), 2)},
        "metrics": metrics,
    }
    write_tables(metrics, specs, out)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    os.replace(tmp, results_json)
    return results


def compute_metrics(recs: list[dict], specs: SpecSet) -> dict:
    """metrics[task][variant] = {'langs': {lang: {...}}, 'avg': {'all','high','low'}}."""
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
             "pred_counts": dict(preds)}
        if "official_correct" in rs[0]:
            m["official_acc"] = sum(r["official_correct"] for r in rs) / n
        if "cal_correct" in rs[0]:
            kc = sum(r["cal_correct"] for r in rs)
            m.update(cal_acc=kc / n, cal_ci_low=wilson(kc, n)[0], cal_ci_high=wilson(kc, n)[1])
        out.setdefault(t, {}).setdefault(v, {"langs": {}})["langs"][lang] = m
    for t, tv in out.items():
        for v, d in tv.items():
            langs = d["langs"]
            avg = {}
            for name, sel in (("all", lambda c: True), ("high", lambda c: specs.language(c).resource_group == "high"),
                              ("low", lambda c: specs.language(c).resource_group == "low")):
                codes = [c for c in langs if sel(c)]
                avg[name] = {"n_langs": len(codes), "acc": mean(langs[c]["acc"] for c in codes),
                             "cal_acc": mean(langs[c].get("cal_acc") for c in codes)}
            d["avg"] = avg
            d["langs"] = {c: langs[c] for c in specs.order if c in langs}
    return out


def _pct(x) -> str:
    return "" if x is None or x != x else f"{100 * x:.1f}"


def write_tables(metrics: dict, specs: SpecSet, out: Path) -> None:
    md = []
    rows = []
    for t, tv in metrics.items():
        for v, d in tv.items():
            md += [f"### {t} ({v})", "", "| lang | n | acc % | 95 % CI | calibrated acc % | majority-pred share % |", "|---|---:|---:|---|---:|---:|"]
            for lang, m in d["langs"].items():
                md.append(f"| {lang} | {m['n']} | {_pct(m['acc'])} | {_pct(m['ci_low'])}–{_pct(m['ci_high'])} | "
                          f"{_pct(m.get('cal_acc'))} | {_pct(m['majority_pred_share'])} |")
                rows.append({"task": t, "variant": v, "lang": lang, "group": specs.language(lang).resource_group, "n": m["n"],
                             "acc": m["acc"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "cal_acc": m.get("cal_acc"),
                             "majority_pred_share": m["majority_pred_share"]})
            for name, a in d["avg"].items():
                md.append(f"| **avg {name}** ({a['n_langs']}) | | **{_pct(a['acc'])}** | | **{_pct(a['cal_acc'])}** | |")
                rows.append({"task": t, "variant": v, "lang": f"avg_{name}", "group": name, "n": a["n_langs"], "acc": a["acc"],
                             "ci_low": None, "ci_high": None, "cal_acc": a["cal_acc"], "majority_pred_share": None})
            md.append("")
    (out / "table.md").write_text("\n".join(md), encoding="utf-8")
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
