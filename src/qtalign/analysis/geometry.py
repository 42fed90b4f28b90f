"""Cross-lingual representation geometry: how close the hidden states of parallel items in different languages are,
layer by layer, before vs after tuning (the paper's PCA analysis, plus cosine and CKA).

Hidden states (the residual stream; index 0 = embedding output, 1..L = after each decoder layer; layer L is passed
through the final norm by default, as in HF's ``hidden_states`` that the paper used) of every parallel item in
every language are pooled three ways:

- ``prompt``: mean over all prompt tokens, demonstrations and BOS included (the paper's pooling; the shared demo
  text is identical for every item of a language, which pulls the vectors of one language together),
- ``query``: mean over the item's own tokens only (the tokens after the demo block's token prefix),
- ``last``: the last prompt token (right after the answer cue), the position the model answers from.

Per model x pooling x layer: a joint 2-D PCA of all languages' vectors (scatter by language and by item); the PC1
Pearson correlation between every pair of languages over parallel items (the paper's number); the mean cosine
similarity of each language's item vectors to the reference language's vectors of the same items (raw, and after
removing the layer's global mean); linear CKA between every pair of languages.

Output folder:
    geometry_{task}_{variant}.npz      all metrics per model/pool (+ PCA coordinates; + vectors with save_vectors)
    geom_{task}_{variant}_{pool}_layers.png  languages x layers heatmaps (models side by side, + tuned - base)
    geom_{task}_{variant}_{pool}_pairs.png   language x language PC1-correlation and CKA at selected layers
    geom_{task}_{variant}_{pool}_pca.png     PCA scatter at selected layers, by language and by item
    summary.json
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from qtalign.analysis.common import prepare_analysis, write_summary
from qtalign.analysis.config import BASE, GeometryConfig  # noqa: F401 - the geometry stage's config
from qtalign.engine.forward import Engine, Prompt, encode_prompts
from qtalign.tokenids import lcp, pad_id
from qtalign.engine.models import LoadedModel
from qtalign.errors import NonFiniteError, QtalignError
from qtalign.tasks.items import cluster_ids

OUR_FILES = ("geometry_*.npz", "geom_*.png", "summary.json")



# --------------------------------------------------------------------------------------------------------
# metrics on (n_items, d) blocks of parallel items


def _centre(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(0, keepdims=True)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al., 2019) of two representations of the same n items (rows), features centred:
    ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F), computed through n x n Gram matrices when that is the smaller side."""
    x, y = _centre(x), _centre(y)
    if x.shape[0] <= x.shape[1] + y.shape[1]:
        kx, ky = x @ x.T, y @ y.T
        num = (kx * ky).sum()
    else:
        kx, ky = x.T @ x, y.T @ y
        num = np.linalg.norm(y.T @ x) ** 2
    den = np.linalg.norm(kx) * np.linalg.norm(ky)
    return float(num / den) if den > 0 else float("nan")


def cka_matrix(blocks: list[np.ndarray]) -> np.ndarray:
    """Linear CKA between every pair of blocks (NaN where a block has no variance)."""
    grams = []
    for b in blocks:
        c = _centre(b)
        g = c @ c.T
        nrm = np.linalg.norm(g)
        grams.append(g / nrm if nrm > 0 else None)
    n = len(blocks)
    m = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i, n):
            if grams[i] is not None and grams[j] is not None:
                m[i, j] = m[j, i] = float((grams[i] * grams[j]).sum())
    return m


def paired_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over items of cos(x_i, y_i)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    num = (x * y).sum(1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-300)))


def joint_pca(blocks: list[np.ndarray], k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """PCA fitted on all blocks stacked: (coordinates (sum n, k), explained variance ratio (k,)). Signs are fixed
    so that each component's largest-magnitude loading is positive. A layer whose vectors are all identical (e.g.
    the embedding of a shared last token) has zero coordinates and zero explained variance."""
    x = np.concatenate([np.asarray(b, dtype=np.float64) for b in blocks])
    x = x - x.mean(0, keepdims=True)
    k = min(k, x.shape[0], x.shape[1])
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    u, s, vt = u[:, :k], s[:k], vt[:k]
    sign = np.sign(vt[np.arange(k), np.abs(vt).argmax(1)])
    sign[sign == 0] = 1
    total = float((x**2).sum())
    if total <= 1e-12 * max(1.0, x.shape[0]):
        return np.zeros((x.shape[0], k)), np.zeros(k)
    return u * (s * sign), s**2 / total


def pc1_correlations(blocks: list[np.ndarray], coords: np.ndarray | None = None) -> np.ndarray:
    """Pearson correlation, over parallel items, of the items' first principal component (fitted jointly on all
    languages) between every pair of languages (the paper's number)."""
    if coords is None:
        coords, _ = joint_pca(blocks, 1)
    n = blocks[0].shape[0]
    pc1 = coords[:, 0].reshape(len(blocks), n)
    pc1 = pc1 - pc1.mean(1, keepdims=True)
    sd = np.linalg.norm(pc1, axis=1)
    ok = sd > 1e-12 * max(1.0, float(sd.max()))
    out = np.full((len(blocks), len(blocks)), np.nan)
    z = pc1[ok] / sd[ok, None]
    out[np.ix_(ok, ok)] = np.clip(z @ z.T, -1, 1)
    return out


def retrieval_accuracy(query: np.ndarray, keys: np.ndarray, clusters: np.ndarray | None = None) -> float:
    """Cross-lingual retrieval over parallel items: the share of rows i of ``query`` whose nearest row of ``keys`` by
    cosine similarity is item i itself, or (with ``clusters``) any item of i's cluster. Ties go to the lowest index."""
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
    k = k / np.maximum(np.linalg.norm(k, axis=1, keepdims=True), 1e-300)
    nearest = (q @ k.T).argmax(1)
    c = np.arange(len(q)) if clusters is None else np.asarray(clusters)
    return float(np.mean(c[nearest] == c))


def retrieval_metrics(blocks: list[np.ndarray], ref: int, clusters: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per language: retrieval accuracy from the reference language into it ('to') and from it into the reference
    ('from'), on the raw vectors and with each language's mean removed ('_centred')."""
    out = {}
    for centred in (False, True):
        bs = [b - b.mean(0, keepdims=True) for b in blocks] if centred else list(blocks)
        sfx = "_centred" if centred else ""
        out[f"retrieval_to{sfx}"] = np.array([retrieval_accuracy(bs[ref], b, clusters) for b in bs])
        out[f"retrieval_from{sfx}"] = np.array([retrieval_accuracy(b, bs[ref], clusters) for b in bs])
    return out


def layer_metrics(blocks: list[np.ndarray], ref: int, clusters: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """All metrics of one layer: blocks[i] = (n_items, d) vectors of language i, rows parallel."""
    with threadpool_limits(1):  # tiny matrices: BLAS threads only spin (10-50x slower on a busy CPU)
        return {**_layer_metrics(blocks, ref), **retrieval_metrics(blocks, ref, clusters)}


def _layer_metrics(blocks: list[np.ndarray], ref: int) -> dict[str, np.ndarray]:
    coords, var = joint_pca(blocks, 2)
    allx = np.concatenate(blocks).astype(np.float64)
    mu = allx.mean(0)
    return {
        "pc1corr": pc1_correlations(blocks, coords),
        "cka": cka_matrix(blocks),
        "cos": np.array([paired_cosine(b, blocks[ref]) for b in blocks]),
        "cos_centred": np.array([paired_cosine(b - mu, blocks[ref] - mu) for b in blocks]),
        "pca2": coords[:, :2] if coords.shape[1] >= 2 else np.pad(coords, ((0, 0), (0, 2 - coords.shape[1]))),
        "pca2_var": np.pad(var, (0, 2 - len(var))),
    }


# --------------------------------------------------------------------------------------------------------
# hidden states


@torch.inference_mode()
def pooled_states(lm: LoadedModel, prompts: list[Prompt], pools: list[str], batch_size: int = 8,
                  normed_last: bool = True, batch_tokens: int | None = None) -> dict[str, dict]:
    """{pool: {prompt key: (L+1, d) float32 array}} for prompts that share their group's prefix."""
    tok = lm.tokenizer
    eng = Engine(lm.model, pad_id=pad_id(tok), batch_size=batch_size, batch_tokens=batch_tokens)
    parts = eng.parts
    enc = encode_prompts(tok, prompts)
    # where the item's own tokens begin: after the longest token prefix shared with the tokenized demo block
    pids: dict[str, list[int]] = {}
    qstart = {}
    for p, e in zip(prompts, enc):
        if p.group not in pids:
            pids[p.group] = tok(p.prefix, add_special_tokens=True)["input_ids"] if p.prefix else []
        qstart[e.key] = min(lcp(pids[p.group], e.ids), len(e.ids) - 1)
    out: dict[str, dict] = {p: {} for p in pools}

    def norm(h):
        return parts.final_norm(h.to(parts.norm.weight.dtype)).float()

    for b in eng.run(enc, capture="all"):
        states = list(b.layer_states)
        pre = list(b.prefix_states) if b.prefix_states is not None else None
        if normed_last:
            states[-1] = norm(states[-1])
            if pre is not None:
                pre[-1] = norm(pre[-1])
        S = torch.stack(states, 1)  # (B, L+1, T, d)
        plen = b.prefix_len
        for row, key in enumerate(b.keys):
            n = b.sizes[row]  # host lengths: no device read per row
            if "last" in out:  # a copy: a view would keep the whole batch's states alive (48 GB over 1,800 prompts)
                out["last"][key] = S[row, :, n - 1].cpu().numpy().copy()
            if "prompt" in out:
                s = S[row, :, :n].sum(1)
                if pre is not None and plen:
                    s = s + torch.stack([p_.sum(0) for p_ in pre])
                out["prompt"][key] = (s / (plen + n)).cpu().numpy()
            if "query" in out:
                q0 = max(qstart[key] - plen, 0)
                out["query"][key] = S[row, :, q0:n].mean(1).cpu().numpy()
    bad = next((k for by in out.values() for k, v in by.items() if not np.isfinite(v).all()), None)
    if bad is not None:  # host arrays already: no device sync added
        raise NonFiniteError(f"item {bad}: the model's hidden states are NaN/inf: its weights or activations are broken; "
                             "stopped, nothing of it was written")
    return out


# --------------------------------------------------------------------------------------------------------
# stage


def retrieval_record(res: dict, names: list[str], pools: list[str], langs: list[str], ref: str, n_items: int,
                     clusters) -> dict:
    """summary.json's per-layer retrieval accuracies: {"reference", "n_items", "clusters", model: {pool: {metric:
    {lang: [per layer]}}}} (the report correlates them with accuracy changes)."""
    out: dict = {"reference": ref, "n_items": n_items, "n_clusters": int(len(set(clusters))) if clusters is not None else n_items}
    for n in names:
        for pool in pools:
            d = res[f"{n}/{pool}"]
            out.setdefault(n, {})[pool] = {m: {lang: [round(float(x), 4) for x in d[m][:, li]] for li, lang in enumerate(langs)}
                                           for m in d if m.startswith("retrieval")}
    return out


def _check(cfg: GeometryConfig, groups) -> None:
    """Configuration errors before the (slow) model loading."""
    for t in cfg.tasks:
        for v in cfg.variants:
            langs = [lang for (tt, vv, lang) in groups if tt == t and vv == v]
            if langs and cfg.reference not in langs:
                raise QtalignError(f"geometry {t}/{v}: reference language '{cfg.reference}' is not among the analysed languages "
                                   f"{langs} (add it to --langs or choose --reference)")
            if langs and len(langs) < 2:
                raise QtalignError(f"geometry {t}/{v}: needs at least two languages with data, got {langs}")


def _parallel(cfg: GeometryConfig, items: dict, t: str, langs: list[str]) -> tuple[dict, list[int]]:
    """Items present in every language (then the limit): {lang: {index: item}}, the common indices."""
    per_lang = {lang: {it.index: it for it in items[(t, lang)]} for lang in langs}
    common = sorted(set.intersection(*(set(d) for d in per_lang.values())))
    if cfg.limit:
        common = common[: cfg.limit]
    if len(common) < 3:
        raise QtalignError(f"geometry {t}: only {len(common)} items are present in every language of {langs}; need >= 3")
    return per_lang, common


def _metrics(cfg: GeometryConfig, models: dict, prompts: list, langs: list[str], common: list[int], clusters,
             timing: dict, bar) -> tuple[dict, dict]:
    """Per model x pool, every metric per layer: ({'model/pool': {metric: (L+1, ...)}}, saved vectors)."""
    res, vectors = {}, {}
    ref = langs.index(cfg.reference)
    for name, lm in models.items():
        t1 = time.time()
        states = pooled_states(lm, prompts, cfg.pools, cfg.batch_size, cfg.normed_last, cfg.batch_tokens)
        for pool in cfg.pools:
            arr = np.stack([np.stack([states[pool][(lang, i)] for i in common]) for lang in langs])  # (n_lang, n, L+1, d)
            arr = arr.transpose(2, 0, 1, 3)  # (L+1, n_lang, n, d)
            per_layer = [layer_metrics(list(arr[layer]), ref, clusters) for layer in range(arr.shape[0])]
            res[f"{name}/{pool}"] = {k: np.stack([m[k] for m in per_layer]) for k in per_layer[0]}
            if cfg.save_vectors:
                vectors[f"{name}/{pool}/vectors"] = arr.astype(np.float16)
            bar.advance(1)
        timing[name] += time.time() - t1
    return res, vectors


def _table(cfg, t: str, v: str, pool: str, by_model: dict, langs: list[str], n_layers: int, numbers: dict) -> dict:
    names, mid, ri = list(by_model), n_layers // 2, langs.index(cfg.reference)
    hdr = [f"{n}: PC1 r (L{n_layers})" for n in names] + [f"{n}: PC1 r (L{mid})" for n in names] \
        + [f"{n}: CKA (L{mid})" for n in names] + [f"{n}: cos (L{mid})" for n in names] \
        + [f"{n}: retrieval → {cfg.reference} (L{mid})" for n in names]
    md = [f"| lang | {' | '.join(hdr)} |", "|---|" + "---:|" * len(hdr)]
    for li, lang in enumerate(langs):
        if li == ri:
            continue
        cells = []
        for metric, layer in (("pc1corr", n_layers), ("pc1corr", mid), ("cka", mid), ("cos", mid), ("retrieval_from", mid)):
            for n in names:
                a = by_model[n][metric][layer]
                x = float(a[li, ri] if a.ndim == 2 else a[li])
                cells.append(f"{x:.3f}")
                numbers[f"{n}/{t}/{v}/{pool}/{lang}/{metric}_L{layer}"] = x
        md.append(f"| {lang} | {' | '.join(cells)} |")
    return {"title": f"Geometry vs {cfg.reference}: {t} ({v} prompts), {pool} pooling", "markdown": "\n".join(md)}


def _figures(cfg, t: str, v: str, pool: str, by_model: dict, langs: list[str], n_items: int, layers: list[int], out: Path) -> list[dict]:
    from qtalign.analysis.plots import plot_geometry_layers, plot_geometry_pairs, plot_geometry_pca

    names = list(by_model)
    title = f"{t} ({v} prompts), pooling: {pool}, n = {n_items} parallel items"
    f1, f2, f3 = (f"geom_{t}_{v}_{pool}_{s}.png" for s in ("layers", "pairs", "pca"))
    plot_geometry_layers(out / f1, by_model, langs, cfg.reference, title)
    plot_geometry_pairs(out / f2, by_model, langs, layers, title)
    plot_geometry_pca(out / f3, by_model, langs, n_items, layers, title)
    vs = " vs ".join(names) + (" with the difference" if len(names) > 1 else "")
    return [
        {"path": f1, "caption": f"{t}/{v}, {pool} pooling: per layer and language, cosine similarity to {cfg.reference} (raw and "
         f"centred), PC1 correlation with {cfg.reference}, linear CKA with {cfg.reference} and cross-lingual retrieval "
         f"accuracy from and to {cfg.reference}; {vs}."},
        {"path": f2, "caption": f"{t}/{v}, {pool} pooling: language x language PC1 correlation and CKA at layers {layers}."},
        {"path": f3, "caption": f"{t}/{v}, {pool} pooling: joint 2-D PCA of all languages' item vectors at layers {layers}, "
         "coloured by language and by item."},
    ]


def _prompts(task, t: str, v: str, langs: list[str], common: list[int], per_lang: dict) -> list[Prompt]:
    out = []
    for lang in langs:
        for i in common:
            prefix, q = task.prompt_parts(lang, v, per_lang[lang][i].fields)
            out.append(Prompt((lang, i), f"{t}/{v}/{lang}", prefix, prefix + q))
    return out


def run_geometry(cfg: GeometryConfig, out_dir: str | Path, models: dict[str, LoadedModel] | None = None, progress: bool = True,
                 plan=None) -> dict:
    """Representation geometry for every task x variant of ``cfg`` and every model (``{'base': ..., 'tuned': ...}``;
    loaded from ``cfg`` when None; ``plan``: cfg's plan with every item of the range, eval/plan.py). Returns the
    summary dict (also written to ``out_dir/summary.json``)."""
    from qtalign.progress import Progress

    t0 = time.time()
    out, plan, models = prepare_analysis(cfg, out_dir, "geometry", OUR_FILES, check=lambda gs: _check(cfg, gs),
                                         apply_limit=False, plan=plan, models=models)
    specs, groups, skipped, items = plan.specs, plan.groups, plan.skipped, plan.by_lang
    names = list(models)
    figures, tables, numbers, retrieval = [], [], {}, {}
    timing: dict[str, float] = {n: 0.0 for n in names}
    tv = [(t, v, [lang for (tt, vv, lang) in groups if tt == t and vv == v]) for t in cfg.tasks for v in cfg.variants]
    tv = [x for x in tv if x[2]]
    with Progress("geometry", len(tv) * len(names) * len(cfg.pools), unit="model×pool", enabled=progress) as bar:
        for t, v, langs in tv:
            task = specs.task(t)
            per_lang, common = _parallel(cfg, items, t, langs)
            ids = cluster_ids(task, [per_lang[cfg.reference][i] for i in common])  # from the reference language's items
            clusters = None if ids is None else np.array(ids)
            res, vectors = _metrics(cfg, models, _prompts(task, t, v, langs, common, per_lang), langs, common, clusters, timing, bar)
            n_layers = next(iter(res.values()))["cka"].shape[0] - 1
            layers = cfg.layers if cfg.layers is not None else sorted({int(round(x)) for x in np.linspace(0, n_layers, 5)})
            bad = [x for x in layers if not 0 <= x <= n_layers]
            if bad:
                raise QtalignError(f"geometry: layers {bad} out of range 0..{n_layers}")
            gold = [per_lang[cfg.reference][i].gold for i in common]
            np.savez_compressed(out / f"geometry_{t}_{v}.npz", langs=np.array(langs), index=np.array(common), layers=np.array(layers),
                                gold=np.array([-1 if g is None else g for g in gold]),
                                **{f"{k}/{m}": a for k, d in res.items() for m, a in d.items()}, **vectors)
            for pool in cfg.pools:
                by_model = {n: res[f"{n}/{pool}"] for n in names}
                figures += _figures(cfg, t, v, pool, by_model, langs, len(common), layers, out)
                tables.append(_table(cfg, t, v, pool, by_model, langs, n_layers, numbers))
            numbers[f"{t}/{v}/items"] = len(common)
            retrieval[f"{t}/{v}"] = retrieval_record(res, names, cfg.pools, langs, cfg.reference, len(common), clusters)
    return write_summary(
        out, "geometry", plan, models, t0, figures=figures, tables=tables, numbers=numbers, skipped=skipped,
        timing_per_model_s={n: round(x, 2) for n, x in timing.items()}, base=BASE, retrieval=retrieval,
    )
