"""Figures of the analyses: logit-lens curves (per language and overview) and geometry heatmaps, pair matrices and
PCA scatters."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qtalign.analysis.common import mean_ci
from qtalign.plots import pyplot, save

def plot_lens_group(path: Path, results: dict, lang: str, vocab: int) -> None:
    plt = pyplot()
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
    save(fig, path, dpi=130)


def plot_lens_overview(path: Path, by_lang: dict, title: str) -> None:
    plt = pyplot()

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
    save(fig, path, dpi=120)


def plot_geometry_layers(path: Path, res: dict, langs: list[str], ref: str, title: str) -> None:
    plt = pyplot()
    names = list(res)
    ri = langs.index(ref)
    cols = names + [f"{n} − {names[0]}" for n in names[1:]]
    rows = [("cos", f"cosine to {ref}"), ("cos_centred", f"cosine to {ref} (centred)"), ("pc1corr", f"PC1 corr. with {ref}"),
            ("cka", f"CKA with {ref}"), ("retrieval_from", f"retrieval → {ref}"), ("retrieval_to", f"retrieval {ref} →")]
    rows = [r for r in rows if r[0] in res[names[0]]]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.4 * len(cols) + 0.6, 0.22 * len(langs) * len(rows) + 1.8),
                             squeeze=False, sharex=True, sharey=True)
    for i, (metric, label) in enumerate(rows):
        mats = {}
        for n in names:
            a = res[n][metric]
            mats[n] = (a[:, :, ri] if a.ndim == 3 else a).T  # (n_lang, L+1)
        finite = [float(np.nanmin(m)) for m in mats.values() if np.isfinite(m).any()]
        # correlations on [-1, 1], CKA on [0, 1]; cosines (raw ones sit near 1) on [their minimum, 1]
        lo = {"pc1corr": -1.0, "cka": 0.0, "retrieval_from": 0.0, "retrieval_to": 0.0}.get(metric, min(finite + [1.0]) - 1e-3)
        diffs = {c: mats[c.split(" − ")[0]] - mats[names[0]] for c in cols[len(names):]}
        v = max([1e-6] + [float(np.nanmax(np.abs(d))) for d in diffs.values() if np.isfinite(d).any()])
        for j, c in enumerate(cols):
            ax = axes[i, j]
            if j < len(names):
                im = ax.imshow(mats[c], aspect="auto", cmap="RdBu_r" if metric == "pc1corr" else "viridis", vmin=lo, vmax=1,
                               interpolation="nearest")
            else:
                im = ax.imshow(diffs[c], aspect="auto", cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
            if j in (len(names) - 1, len(cols) - 1):  # one colour bar per scale
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            ax.set_yticks(range(len(langs)), langs, fontsize=6)
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(c, fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel("layer", fontsize=7)
    fig.suptitle(title, fontsize=9)
    save(fig, path, dpi=120)


def plot_geometry_pairs(path: Path, res: dict, langs: list[str], layers: list[int], title: str) -> None:
    plt = pyplot()
    names = list(res)
    cols = [(n, m) for n in names for m in ("pc1corr", "cka")]
    k = len(langs)
    size = max(1.8, 0.3 * k)
    fig, axes = plt.subplots(len(layers), len(cols), figsize=(size * len(cols) + 0.5, size * len(layers) + 0.6), squeeze=False)
    for i, layer in enumerate(layers):
        for j, (n, metric) in enumerate(cols):
            ax = axes[i, j]
            m = res[n][metric][layer]
            ax.imshow(m, cmap="RdBu_r" if metric == "pc1corr" else "viridis", vmin=-1 if metric == "pc1corr" else 0, vmax=1)
            if k <= 8:
                for a in range(k):
                    for b in range(k):
                        dark = abs(m[a, b]) > 0.6 if metric == "pc1corr" else m[a, b] < 0.5  # RdBu is dark at |r| -> 1, viridis at 0
                        ax.text(b, a, f"{m[a, b]:.2f}", ha="center", va="center", fontsize=5, color="w" if dark else "k")
            ax.set_xticks(range(k), langs, fontsize=5, rotation=90)
            ax.set_yticks(range(k), langs, fontsize=5)
            ax.set_title(f"{n}: {'PC1 corr.' if metric == 'pc1corr' else 'CKA'}, layer {layer}", fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path, dpi=120)


def plot_geometry_pca(path: Path, res: dict, langs: list[str], n_items: int, layers: list[int], title: str) -> None:
    plt = pyplot()
    names = list(res)
    fig, axes = plt.subplots(len(layers), 2 * len(names), figsize=(2.6 * 2 * len(names), 2.4 * len(layers) + 0.5), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(langs) <= 10 else "tab20")
    item_colour = np.tile(np.arange(n_items), len(langs))
    for i, layer in enumerate(layers):
        for j, n in enumerate(names):
            xy = res[n]["pca2"][layer]
            var = res[n]["pca2_var"][layer]
            ax = axes[i, 2 * j]
            for li, lang in enumerate(langs):
                s = slice(li * n_items, (li + 1) * n_items)
                ax.scatter(xy[s, 0], xy[s, 1], s=4, color=cmap(li % cmap.N), label=lang, alpha=0.7, lw=0)
            ax.set_title(f"{n}, layer {layer}: by language", fontsize=7)
            ax2 = axes[i, 2 * j + 1]
            ax2.scatter(xy[:, 0], xy[:, 1], s=4, c=item_colour, cmap="viridis", alpha=0.7, lw=0)
            ax2.set_title(f"{n}, layer {layer}: by item", fontsize=7)
            for a in (ax, ax2):
                a.set_xlabel(f"PC1 ({100 * var[0]:.0f} %)", fontsize=6)
                a.set_ylabel(f"PC2 ({100 * var[1]:.0f} %)", fontsize=6)
                a.tick_params(labelsize=5)
    axes[0, 0].legend(fontsize=5, markerscale=2, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path, dpi=120)


