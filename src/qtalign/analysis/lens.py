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
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qtalign.analysis.common import mean_ci, prepare_analysis, write_summary
from qtalign.analysis.config import LensConfig  # noqa: F401 - the lens stage's config
from qtalign.engine.models import LoadedModel
from qtalign.errors import NonFiniteError, QtalignError
from qtalign.scoring.scorer import ScoreRequest, Scorer
from qtalign.tasks.specs import TaskSpec

OUR_FILES = ("lens_means.csv", "arrays", "summary.json", "lens_*.png")

METRICS = ("latent", "out", "all_latent", "all_out", "overlap", "all_overlap", "entropy")


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
    zero = torch.zeros((), device=h.device)
    for start in range(0, B * n_layers, chunk_rows):
        rows = slice(start, min(start + chunk_rows, B * n_layers))
        z = parts.lens(flat[rows])  # float32 logits (r, V)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        p = (z - lse).exp_()
        ent = (lse[:, 0] - (p * z).sum(-1)) / math.log(2)  # H = log Z - E_p[z], in bits
        where = [divmod(r, n_layers) for r in range(rows.start, rows.stop)]
        # each set's mass summed on the device as before, then read back once per chunk (no sync per row and metric)
        mass = {m: torch.stack([p[k, ids[b]].sum() if ids[b].numel() else zero
                                for k, (b, _) in enumerate(where)]).tolist() for m, ids in idx.items()}
        ent_host = ent.tolist()
        for k, (b, layer) in enumerate(where):
            out["entropy"][b, layer] = ent_host[k]
            for m in idx:
                out[m][b, layer] = mass[m][k]
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
        enc = encode_prompts(lm.tokenizer, scorer.prompts(reqs))
        for b in scorer.engine.run(enc, capture="last"):
            st = lens_stats(scorer.engine.parts, b.layer_last, [per_item[k][1] for k in b.keys])
            for m in METRICS:
                for row, k in enumerate(b.keys):
                    res[m][k] = st[m][row]
    order = sorted(per_item)
    arrays = {m: (np.stack([res[m][k] for k in order]) if order else np.zeros((0, L1))) for m in METRICS}
    for m, a in arrays.items():  # host arrays already: no device sync added
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        if bad.size:
            raise NonFiniteError(f"{gname}: item {order[bad[0]]}: the model's lens numbers ({m}) are NaN/inf: its weights "
                                 "or activations are broken; stopped, nothing of it was written")
    return GroupResult(task.name, variant, lang, np.array(order, dtype=int), np.array([per_item[k][0] for k in order], dtype=int),
                       arrays, dropped, len(items), sets.forced, sets.identical)


def _run_models(cfg: LensConfig, models: dict, specs, groups, items, out: Path, skipped: list, progress: bool):
    """The lens of every model over every group: {group: {model: GroupResult}}, per-model seconds, items, vocab size."""
    from qtalign.progress import Progress

    results: dict = {g: {} for g in groups}
    timing, n_items, vocab = {}, 0, 0
    with Progress("lens", len(groups) * len(models), unit="groups", enabled=progress) as bar:
        for name, lm in models.items():
            scorer = Scorer(lm.model, lm.tokenizer, "first-token", cfg.batch_size, batch_tokens=cfg.batch_tokens)
            vocab = vocab or scorer.engine.parts.head.weight.shape[0]
            t1 = time.time()
            for t, v, lang in groups:
                try:
                    r = lens_group(lm, specs.task(t), lang, v, items[(t, lang)], cfg.batch_size, cfg.keep_overlap, scorer)
                except NonFiniteError:
                    raise
                except QtalignError as e:  # e.g. label words no first token can tell apart: skipped, as in evaluation
                    skipped.append({"task": t, "variant": v, "lang": lang, "model": name, "reason": str(e)})
                else:
                    results[(t, v, lang)][name] = r
                    n_items += len(r.index)
                    (out / "arrays" / name).mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(out / "arrays" / name / f"{t}_{v}_{lang}.npz", index=r.index, gold=r.gold, **r.arrays)
                bar.advance(1)
            timing[name] = round(time.time() - t1, 2)
    return {g: by for g, by in results.items() if len(by) == len(models)}, timing, n_items, vocab


def _write_means(results: dict, out: Path) -> None:
    """lens_means.csv: per model x group x layer, n and the mean and 95 % CI half-width of every metric."""
    import io as _io

    from qtalign.io import write_text

    rows = []
    for (t, v, lang), by_model in results.items():
        for name, r in by_model.items():
            stats = {m: mean_ci(r.arrays[m]) for m in METRICS}
            for layer in range(r.arrays["latent"].shape[1]):
                row = {"model": name, "task": t, "variant": v, "lang": lang, "layer": layer, "n": len(r.index)}
                for m, (mu, ci) in stats.items():
                    row[m], row[f"{m}_ci"] = float(mu[layer]), float(ci[layer])
                rows.append(row)
    if rows:
        buf = _io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        write_text(out / "lens_means.csv", buf.getvalue())


def _lang_cells(r: GroupResult, key: str, numbers: dict) -> list[str]:
    """The table cells of one model x language (and its numbers for summary.json)."""
    if not len(r.index):
        return ["–"] * 4
    lat, _ = mean_ci(r.arrays["latent"])
    o, _ = mean_ci(r.arrays["out"])
    e, _ = mean_ci(r.arrays["entropy"])
    il, io = int(np.argmax(lat)), int(np.argmax(o))
    numbers.update({f"{key}/latent_max": float(lat[il]), f"{key}/latent_argmax_layer": il, f"{key}/out_last": float(o[-1]),
                    f"{key}/entropy_last_bits": float(e[-1])})
    return [f"{lat[il]:.3f} ({il})", f"{o[io]:.3f} ({io})" if not r.identical else "= en",
            "—" if o[-1] != o[-1] else f"{o[-1]:.3f}", f"{e[-1]:.2f}"]


def _task_outputs(t: str, v: str, sel: dict, names: list[str], out: Path, vocab: int, max_langs: int, numbers: dict):
    """The table, per-language figures and overview figure of one task x variant -> (table, figures)."""
    from qtalign.analysis.plots import plot_lens_group, plot_lens_overview

    md = ["| lang | kept | dropped (overlap / empty) | forced prefix | "
          + " | ".join(f"{n}: en max (layer) | {n}: out max (layer) | {n}: out last | {n}: entropy last" for n in names) + " |",
          "|---|---:|---|---|" + "---:|---:|---:|---:|" * len(names)]
    figures = []
    styles = " vs ".join(f"{n} ({s})" for n, s in zip(names, ["solid", "dashed", "dotted", "dash-dot"]))
    for lang, by_model in sel.items():
        r0 = by_model[names[0]]
        cells = [c for n in names for c in _lang_cells(by_model[n], f"{n}/{t}/{v}/{lang}", numbers)]
        numbers[f"{t}/{v}/{lang}/kept"] = len(r0.index)
        numbers[f"{t}/{v}/{lang}/dropped"] = sum(r0.dropped.values())
        md.append(f"| {lang} | {len(r0.index)}/{r0.n_total} | {r0.dropped.get('overlap', 0)} / {r0.dropped.get('empty', 0)} | "
                  f"{r0.forced or '–'} | " + " | ".join(cells) + " |")
        fig = f"lens_{t}_{v}_{lang}.png"
        plot_lens_group(out / fig, by_model, lang, vocab)
        figures.append({"path": fig, "caption": (
            f"Logit lens, {t} ({v} prompts), {lang}: mean probability (±95 % CI) of the gold English label word (orange) "
            f"and of the {lang} label word (blue) per layer" + (f", {styles}" if len(names) > 1 else "")
            + f"; strip: mean entropy (bits). n = {len(r0.index)} of {r0.n_total} items.")})
    ov = f"lens_{t}_{v}_overview.png"
    plot_lens_overview(out / ov, dict(list(sel.items())[:max_langs]),
                       f"logit lens: {t} ({v} prompts); orange = English gold label, blue = output-language gold label")
    figures.insert(0, {"path": ov, "caption": f"Logit lens overview, {t} ({v} prompts): English (orange) vs output-language "
                       "(blue) gold-label probability per layer, every language."})
    return {"title": f"Logit lens: {t} ({v} prompts)", "markdown": "\n".join(md)}, figures


def run_lens(cfg: LensConfig, out_dir: str | Path, models: dict[str, LoadedModel] | None = None, progress: bool = True,
             plan=None) -> dict:
    """Run the lens for every task x variant x language of ``cfg`` and every model (``{'base': ..., 'tuned': ...}``;
    loaded from ``cfg`` when None; ``plan``: cfg's plan, eval/plan.py). Returns the summary dict (also written to
    ``out_dir/summary.json``)."""
    t0 = time.time()
    out, plan, models = prepare_analysis(cfg, out_dir, "lens", OUR_FILES, plan=plan, models=models)
    specs, groups, skipped, items = plan.specs, plan.groups, plan.skipped, plan.by_lang
    results, timing, n_items, vocab = _run_models(cfg, models, specs, groups, items, out, skipped, progress)
    _write_means(results, out)
    names = list(models)
    figures, tables, numbers = [], [], {}
    for t in cfg.tasks:
        for v in cfg.variants:
            sel = {lang: by for (tt, vv, lang), by in results.items() if tt == t and vv == v}
            if sel:
                table, figs = _task_outputs(t, v, sel, names, out, vocab, cfg.max_plot_langs, numbers)
                tables.append(table)
                figures += figs
    return write_summary(
        out, "lens", plan, models, t0, figures=figures, tables=tables, numbers=numbers,
        dropped={f"{t}/{v}/{lang}": by[names[0]].dropped for (t, v, lang), by in results.items()},
        skipped=skipped, timing_per_model_s=timing, items_per_s=round(n_items / max(sum(timing.values()), 1e-9), 3),
    )
