"""Language logit lens: per layer, how much probability the model puts on the English vs the output-language
label word at the answer position (the paper's Fig. 5 analysis, for any architecture and any language).

For a task x language x variant, at the last prompt position (right after the answer cue ``: "``, plus the
forced common label prefix where evaluation appends one), the residual stream after every layer (index 0 = the
embedding output, 1..L = after each decoder layer) goes through the model's own final norm and LM head and a
softmax over the full vocabulary. Per item and layer we record the probability mass of

- ``latent``: the English label word of the gold class (its first-token candidate set, as in evaluation),
- ``out``: the output-language label word of the gold class,
- ``all_latent`` / ``all_out``: the union of all classes' English / output-language sets,
- ``overlap`` / ``all_overlap``: the tokens in both the English and the output-language set (gold / all classes),
- ``entropy`` of the whole distribution, in bits.

Items whose gold English and output-language sets share a token are dropped by default (the paper's rule, so that
``latent`` and ``out`` are disjoint); ``keep_overlap`` keeps them and the shared mass is then in ``overlap`` (it
is counted in both ``latent`` and ``out``). Languages whose label words are the English words (``en``, or the
``enout`` variant) are kept, with ``out == latent``.

Output folder (one per run):
    lens_means.csv                          per model x group x layer: n, mean and 95 % CI half-width per metric
    arrays/{model}/{task}_{variant}_{lang}.npz   per-item arrays (n_items, L+1) + item index and gold class
    lens_{task}_{variant}_{lang}.png        curves with 95 % CI bands + entropy strip, models overlaid
    lens_{task}_{variant}_overview.png      all languages of a task/variant as small multiples
    summary.json                            figures, tables, numbers (written last, atomically)
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator

from qtalign.errors import QtalignError
from qtalign.eval.config import TaskSelection
from qtalign.engine.models import LoadedModel, ModelConfig, load_model
from qtalign.scoring.scorer import ScoreRequest, Scorer
from qtalign.tasks.specs import TaskSpec, load_specs

METRICS = ("latent", "out", "all_latent", "all_out", "overlap", "all_overlap", "entropy")
BASE = "base"


class AnalysisConfig(TaskSelection):
    """What the analysis stages (lens, geometry) share with evaluation: model(s), tasks, languages, data."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model")
    compare: dict[str, str] = Field(
        default_factory=dict,
        description="label -> LoRA adapter dir: tuned models loaded on top of the base model and analysed beside it on the same items",
    )
    tasks: list[str] = Field(default_factory=lambda: ["emotion"], description="task names")
    variants: list[str] = Field(default_factory=lambda: ["native"], description="label variants (the paper's analyses use native prompts)")

    @field_validator("compare")
    @classmethod
    def _compare(cls, v):
        if BASE in v:
            raise ValueError(f"'{BASE}' names the base model; choose another label")
        return v


class LensConfig(AnalysisConfig):
    """Language logit lens settings (round-trips to YAML/JSON)."""

    keep_overlap: bool = Field(
        False, description="keep items whose English and output-language token sets overlap (default: drop them, the paper's rule); the shared mass is reported as 'overlap'"
    )
    max_plot_langs: int = Field(24, ge=1, description="at most this many languages in the overview figure")


def load_models(cfg: AnalysisConfig) -> dict[str, LoadedModel]:
    """{'base': the base model, label: base model + adapter for every entry of cfg.compare}."""
    models = {BASE: load_model(cfg.model)}
    for name, adapter in cfg.compare.items():
        models[name] = load_model(cfg.model.model_copy(update={"adapter": adapter}))
    return models


# --------------------------------------------------------------------------------------------------------
# token sets and the dropping rule


@dataclass
class LensSets:
    """First-token candidate sets of one task x language x variant, exactly as evaluation builds them."""

    words_en: list[str]
    words_out: list[str]  # as scored (after removing a forced common prefix)
    forced: str  # text appended after the answer cue (evaluation's forced common label prefix)
    en: list[list[int]]  # per class
    out: list[list[int]]
    identical: bool  # the output-language words are the English words: latent == out by definition

    @property
    def all_en(self) -> list[int]:
        return sorted(set().union(*map(set, self.en)))

    @property
    def all_out(self) -> list[int]:
        return sorted(set().union(*map(set, self.out)))

    def drop_reason(self, gold: int, keep_overlap: bool = False) -> str | None:
        """Why an item of gold class ``gold`` is dropped (None: kept)."""
        if not self.en[gold] or not self.out[gold]:
            return "empty"
        if self.identical or keep_overlap:
            return None
        return "overlap" if set(self.en[gold]) & set(self.out[gold]) else None


def lens_sets(scorer: Scorer, task: TaskSpec, lang: str, variant: str) -> LensSets:
    words = task.label_words(lang, variant)
    forced, scored = scorer.plan(words)
    en_words = list(task.classes)
    en = scorer.candidates(en_words).sets
    out = scorer.candidates(scored).sets
    identical = not forced and list(scored) == en_words
    return LensSets(en_words, list(scored), forced, [list(s) for s in en], [list(s) for s in out], identical)


def item_sets(sets: LensSets, gold: int) -> dict[str, list[int]]:
    """The token ids whose probability mass is recorded for an item of class ``gold``."""
    en, out = set(sets.en[gold]), set(sets.out[gold])
    all_en, all_out = set(sets.all_en), set(sets.all_out)
    return {
        "latent": sorted(en),
        "out": sorted(out),
        "all_latent": sorted(all_en),
        "all_out": sorted(all_out),
        "overlap": sorted(en & out),
        "all_overlap": sorted(all_en & all_out),
    }


# --------------------------------------------------------------------------------------------------------
# the lens itself


@torch.inference_mode()
def lens_stats(parts, h: torch.Tensor, sets: list[dict[str, list[int]]], chunk_rows: int = 64) -> dict[str, np.ndarray]:
    """Per-layer lens statistics of a batch.

    ``h``: (B, L+1, d) residual stream at the scored position; ``sets[b]``: {metric: token ids} for row b.
    Returns {metric: (B, L+1) float64} for every metric in ``METRICS``.
    """
    B, n_layers, d = h.shape
    flat = h.reshape(B * n_layers, d)
    out = {m: np.zeros((B, n_layers)) for m in METRICS}
    idx = {m: [torch.tensor(s[m], dtype=torch.long, device=h.device) for s in sets] for m in METRICS if m != "entropy"}
    for start in range(0, B * n_layers, chunk_rows):
        rows = slice(start, min(start + chunk_rows, B * n_layers))
        z = parts.lens(flat[rows])  # float32 logits (r, V)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        p = (z - lse).exp_()
        ent = (lse[:, 0] - (p * z).sum(-1)) / math.log(2)  # H = log Z - E_p[z], in bits
        for k, r in enumerate(range(rows.start, rows.stop)):
            b, layer = divmod(r, n_layers)
            out["entropy"][b, layer] = float(ent[k])
            for m, ids in idx.items():
                t = ids[b]
                out[m][b, layer] = float(p[k, t].sum()) if t.numel() else 0.0
    return out


@dataclass
class GroupResult:
    task: str
    variant: str
    lang: str
    index: np.ndarray  # kept items' indices
    gold: np.ndarray
    arrays: dict[str, np.ndarray]  # metric -> (n_kept, L+1)
    dropped: dict[str, int]  # reason -> count
    n_total: int
    forced: str
    identical: bool


def lens_group(lm: LoadedModel, task: TaskSpec, lang: str, variant: str, items: list, batch_size: int = 8,
               keep_overlap: bool = False, scorer: Scorer | None = None) -> GroupResult:
    """The lens over one task x language x variant for one model."""
    scorer = scorer or Scorer(lm.model, lm.tokenizer, "first-token", batch_size)
    sets = lens_sets(scorer, task, lang, variant)
    gname = f"{task.name}/{variant}/{lang}"
    dropped: dict[str, int] = {}
    reqs, per_item = [], {}
    for it in items:
        if it.gold is None:
            raise QtalignError(f"{task.name}/{lang}: item {it.index} has no gold label (the lens needs the gold class)")
        why = sets.drop_reason(it.gold, keep_overlap)
        if why:
            dropped[why] = dropped.get(why, 0) + 1
            continue
        prefix, q = task.prompt_parts(lang, variant, it.fields)
        reqs.append(ScoreRequest(it.index, gname, prefix, q, list(sets.words_out), forced=sets.forced))
        per_item[it.index] = (it.gold, item_sets(sets, it.gold))
    from qtalign.engine.forward import encode_prompts

    L1 = scorer.engine.parts.num_layers + 1
    res = {m: {} for m in METRICS}
    if reqs:
        enc = encode_prompts(lm.tokenizer, scorer._prompts(reqs))
        for b in scorer.engine.run(enc, capture="last"):
            st = lens_stats(scorer.engine.parts, b.layer_last, [per_item[k][1] for k in b.keys])
            for m in METRICS:
                for row, k in enumerate(b.keys):
                    res[m][k] = st[m][row]
    order = sorted(per_item)
    arrays = {m: (np.stack([res[m][k] for k in order]) if order else np.zeros((0, L1))) for m in METRICS}
    return GroupResult(task.name, variant, lang, np.array(order, dtype=int), np.array([per_item[k][0] for k in order], dtype=int),
                       arrays, dropped, len(items), sets.forced, sets.identical)


def mean_ci(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and 95 % CI half-width (1.96 sd / sqrt n) of an (n, L+1) array."""
    n = x.shape[0]
    if n == 0:
        nan = np.full(x.shape[1], np.nan)
        return nan, nan
    m = x.mean(0)
    sd = x.std(0, ddof=1) if n > 1 else np.zeros(x.shape[1])
    return m, 1.96 * sd / math.sqrt(n)


# --------------------------------------------------------------------------------------------------------
# plots


def _plot_group(path: Path, results: dict[str, GroupResult], lang: str, vocab: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(results)
    styles = ["-", "--", ":", "-."]
    L1 = next(iter(results.values())).arrays["entropy"].shape[1]
    x = np.arange(L1)
    fig = plt.figure(figsize=(6.5, 4.2 + 0.3 * len(names)))
    gs = fig.add_gridspec(len(names) + 1, 2, height_ratios=[0.25] * len(names) + [3], width_ratios=[40, 1], hspace=0.08, wspace=0.03, top=0.93)
    ax = fig.add_subplot(gs[-1, 0])
    vmax = math.log2(vocab)
    im = None
    for i, name in enumerate(names):
        sax = fig.add_subplot(gs[i, 0], sharex=ax)
        ent, _ = mean_ci(results[name].arrays["entropy"])
        im = sax.imshow(ent[None, :], aspect="auto", cmap="plasma", vmin=0, vmax=vmax, extent=(-0.5, L1 - 0.5, 0, 1))
        sax.set_yticks([0.5], [name])
        sax.tick_params(labelbottom=False, length=0)
    if im is not None:
        cax = fig.add_subplot(gs[: len(names), 1])
        fig.colorbar(im, cax=cax).set_label("entropy\n(bits)", fontsize=7)
        cax.tick_params(labelsize=6)
    r0 = results[names[0]]
    curves = [("latent", "en (gold)", "tab:orange"), ("out", f"{lang} (gold)", "tab:blue"),
              ("all_out", f"{lang} (all labels)", "tab:cyan"), ("all_latent", "en (all labels)", "tab:gray")]
    if r0.identical:
        curves = [("latent", "en (gold)", "tab:orange"), ("all_latent", "en (all labels)", "tab:gray")]
    for i, name in enumerate(names):
        r = results[name]
        for metric, label, color in curves:
            m, ci = mean_ci(r.arrays[metric])
            ax.plot(x, m, styles[i % len(styles)], color=color, label=f"{label} [{name}]" if len(names) > 1 else label, lw=1.5)
            ax.fill_between(x, np.clip(m - ci, 0, 1), np.clip(m + ci, 0, 1), color=color, alpha=0.15, lw=0)
    for v in range(5, L1, 5):
        ax.axvline(v, color="k", ls=":", lw=0.5, alpha=0.4)
    ax.set_xlim(-0.5, L1 - 0.5)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("probability")
    n = r0.arrays["latent"].shape[0]
    drop = sum(r0.dropped.values())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"logit lens: {r0.task} ({r0.variant} prompts), {lang}: n = {n}" + (f" ({drop} dropped)" if drop else ""), fontsize=9, y=0.98)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def _plot_overview(path: Path, by_lang: dict[str, dict[str, GroupResult]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(by_lang)
    ncol = min(5, len(langs))
    nrow = math.ceil(len(langs) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.0 * nrow), sharex=True, sharey=True, squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, lang in zip(axes.flat, langs):
        for i, (name, r) in enumerate(by_lang[lang].items()):
            x = np.arange(r.arrays["latent"].shape[1])
            for metric, color in (("latent", "tab:orange"), ("out", "tab:blue")):
                if metric == "out" and r.identical:
                    continue
                m, ci = mean_ci(r.arrays[metric])
                ax.plot(x, m, styles[i % len(styles)], color=color, lw=1.2, label=f"{'en' if metric == 'latent' else 'out'} [{name}]")
                ax.fill_between(x, np.clip(m - ci, 0, 1), np.clip(m + ci, 0, 1), color=color, alpha=0.15, lw=0)
        r = next(iter(by_lang[lang].values()))
        ax.set_title(f"{lang} (n={r.arrays['latent'].shape[0]}/{r.n_total})", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(langs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=5, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.supxlabel("layer", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# stage


def analysis_summary(stage: str, cfg: AnalysisConfig, models: dict, t0: float, **fields) -> dict:
    """The summary.json record every analysis stage writes (docs/architecture.md), with stage-specific `fields`."""
    from qtalign.io import fingerprint

    return {"stage": stage, "fingerprint": fingerprint(cfg.result_config()), "config": cfg.model_dump(mode="json"),
            "models": {n: lm.info for n, lm in models.items()}, **fields, "timing_s": round(time.time() - t0, 2)}


def write_summary(out: Path, summary: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out / "summary.json")


def _fmt(x: float) -> str:
    return "" if x is None or x != x else f"{x:.3f}"


def prepare_analysis(cfg: AnalysisConfig, out_dir: str | Path):
    """What every analysis run starts with: seeds, the output dir, the specs, the data source and the task x variant x
    language groups that have data -> (out, specs, source, groups, skipped)."""
    from qtalign.environment import seed_everything

    seed_everything(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = load_specs(cfg.prompts)
    source = cfg.source()
    groups, skipped = cfg.plan(specs)
    return out, specs, source, groups, skipped


def run_lens(cfg: LensConfig, out_dir: str | Path, models: dict[str, LoadedModel] | None = None, progress: bool = True) -> dict:
    """Run the lens for every task x variant x language of ``cfg`` and every model (``{'base': ..., 'tuned': ...}``;
    loaded from ``cfg`` when None). Returns the summary dict (also written to ``out_dir/summary.json``)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    out, specs, source, groups, skipped = prepare_analysis(cfg, out_dir)
    models = models or load_models(cfg)
    items = {}
    for t, _, lang in groups:
        if (t, lang) not in items:
            items[(t, lang)] = cfg.select(specs.task(t), lang, source)
    results: dict[tuple[str, str, str], dict[str, GroupResult]] = {g: {} for g in groups}
    timing: dict[str, float] = {}
    n_items = 0
    bar = tqdm(total=len(groups) * len(models), desc="lens", unit="group", disable=not progress or None, dynamic_ncols=True)
    vocab = {}
    for name, lm in models.items():
        scorer = Scorer(lm.model, lm.tokenizer, "first-token", cfg.batch_size)
        vocab[name] = scorer.engine.parts.head.weight.shape[0]
        t1 = time.time()
        for t, v, lang in groups:
            try:
                r = lens_group(lm, specs.task(t), lang, v, items[(t, lang)], cfg.batch_size, cfg.keep_overlap, scorer)
            except QtalignError as e:  # e.g. label words no first token can tell apart: skipped, as in evaluation
                skipped.append({"task": t, "variant": v, "lang": lang, "model": name, "reason": str(e)})
                bar.update(1)
                continue
            results[(t, v, lang)][name] = r
            n_items += len(r.index)
            np.savez_compressed(_arr_path(out, name, t, v, lang), index=r.index, gold=r.gold, **r.arrays)
            bar.update(1)
        timing[name] = round(time.time() - t1, 2)
    bar.close()
    results = {g: by for g, by in results.items() if len(by) == len(models)}

    # tables, csv, figures
    rows = []
    figures = []
    tables = []
    numbers: dict[str, float] = {}
    names = list(models)
    for (t, v, lang), by_model in results.items():
        for name, r in by_model.items():
            for layer in range(r.arrays["latent"].shape[1]):
                row = {"model": name, "task": t, "variant": v, "lang": lang, "layer": layer, "n": len(r.index)}
                for m in METRICS:
                    mu, ci = mean_ci(r.arrays[m])
                    row[m] = float(mu[layer])
                    row[f"{m}_ci"] = float(ci[layer])
                rows.append(row)
    if rows:
        with open(out / "lens_means.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    for t in cfg.tasks:
        for v in cfg.variants:
            sel = {lang: results[(tt, vv, lang)] for (tt, vv, lang) in results if tt == t and vv == v}
            if not sel:
                continue
            md = ["| lang | kept | dropped (overlap / empty) | forced prefix | "
                  + " | ".join(f"{n}: en max (layer) | {n}: out max (layer) | {n}: out last | {n}: entropy last" for n in names) + " |",
                  "|---|---:|---|---|" + "---:|---:|---:|---:|" * len(names)]
            for lang, by_model in sel.items():
                r0 = by_model[names[0]]
                cells = []
                for n in names:
                    r = by_model[n]
                    lat, _ = mean_ci(r.arrays["latent"])
                    o, _ = mean_ci(r.arrays["out"])
                    e, _ = mean_ci(r.arrays["entropy"])
                    if len(r.index):
                        il, io = int(np.argmax(lat)), int(np.argmax(o))
                        cells += [f"{lat[il]:.3f} ({il})", f"{o[io]:.3f} ({io})" if not r.identical else "= en", _fmt(o[-1]), f"{e[-1]:.2f}"]
                        key = f"{n}/{t}/{v}/{lang}"
                        numbers[f"{key}/latent_max"] = float(lat[il])
                        numbers[f"{key}/latent_argmax_layer"] = il
                        numbers[f"{key}/out_last"] = float(o[-1])
                        numbers[f"{key}/entropy_last_bits"] = float(e[-1])
                    else:
                        cells += ["–"] * 4
                numbers[f"{t}/{v}/{lang}/kept"] = len(r0.index)
                numbers[f"{t}/{v}/{lang}/dropped"] = sum(r0.dropped.values())
                md.append(f"| {lang} | {len(r0.index)}/{r0.n_total} | {r0.dropped.get('overlap', 0)} / {r0.dropped.get('empty', 0)} | "
                          f"{r0.forced or '–'} | " + " | ".join(cells) + " |")
                fig = f"lens_{t}_{v}_{lang}.png"
                _plot_group(out / fig, by_model, lang, vocab[names[0]])
                figures.append({"path": fig, "caption": (
                    f"Logit lens, {t} ({v} prompts), {lang}: mean probability (±95 % CI) of the gold English label word (orange) "
                    f"and of the {lang} label word (blue) per layer" + (", " + " vs ".join(f"{n} ({s})" for n, s in zip(names, ['solid', 'dashed', 'dotted', 'dash-dot'])) if len(names) > 1 else "")
                    + f"; strip: mean entropy (bits). n = {len(r0.index)} of {r0.n_total} items.")})
            ov = f"lens_{t}_{v}_overview.png"
            _plot_overview(out / ov, dict(list(sel.items())[: cfg.max_plot_langs]), f"logit lens: {t} ({v} prompts); orange = English gold label, blue = output-language gold label")
            figures.insert(0, {"path": ov, "caption": f"Logit lens overview, {t} ({v} prompts): English (orange) vs output-language (blue) gold-label probability per layer, every language."})
            tables.append({"title": f"Logit lens: {t} ({v} prompts)", "markdown": "\n".join(md)})
    summary = analysis_summary(
        "lens", cfg, models, t0, figures=figures, tables=tables, numbers=numbers,
        dropped={f"{t}/{v}/{lang}": by[names[0]].dropped for (t, v, lang), by in results.items()},
        skipped=skipped, timing_per_model_s=timing, items_per_s=round(n_items / max(sum(timing.values()), 1e-9), 3),
    )
    write_summary(out, summary)
    return summary


def _arr_path(out: Path, model: str, task: str, variant: str, lang: str) -> Path:
    d = out / "arrays" / model
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{task}_{variant}_{lang}.npz"
