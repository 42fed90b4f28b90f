"""The report's own figures: per-language accuracy (base vs tuned), the headline change per language, and
cross-lingual retrieval per layer with its correlation with the accuracy change."""

from __future__ import annotations

from pathlib import Path

from qtalign.plots import pyplot, save


def bar_chart(rows: list[dict], title: str, path: Path) -> Path:
    """Per-language accuracy, base vs tuned, raw (and calibrated when present), with Wilson 95 % error bars, from the
    language entries of stats.json."""
    import numpy as np

    plt = pyplot()
    kinds = ["raw"] + (["cal"] if all(r["cal"] is not None for r in rows) else [])
    has_tuned = any(r["raw"]["tuned"] == r["raw"]["tuned"] for r in rows)  # NaN without a tuned run
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(6.0, 0.55 * len(rows) + 2), 3.2 * len(kinds)), squeeze=False)
    x = np.arange(len(rows))
    w = 0.4 if has_tuned else 0.7
    labels = [r["lang"] + ("*" if r["seen"] else "") for r in rows]
    for ax, kind in zip(axes[:, 0], kinds):
        series = [("base", "#9e9e9e")] + ([("tuned", "#1f77b4")] if has_tuned else [])
        for j, (which, colour) in enumerate(series):
            acc = np.array([r[kind][which] for r in rows])
            ci = np.array([r[kind][f"{which}_ci"] for r in rows])
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
    return save(fig, path, dpi=110, tight=False)


def headline_figure(tasks: dict[tuple[str, str], list[dict]], path: Path, has_tuned: bool) -> Path:
    """One panel per task: per language, the change tuned − base (raw and calibrated accuracy, points, paired
    bootstrap 95 % intervals); without a tuned run, the base accuracy."""
    import numpy as np

    plt = pyplot()
    n = len(tasks)
    fig, axes = plt.subplots(n, 1, figsize=(max(6.5, 0.45 * max(len(r) for r in tasks.values()) + 2), 2.6 * n), squeeze=False)
    for ax, ((t, v), rows) in zip(axes[:, 0], tasks.items()):
        x = np.arange(len(rows))
        labels = [r["lang"] + ("*" if r["seen"] else "") for r in rows]
        if has_tuned:
            for j, (kind, colour) in enumerate((("raw", "#1f77b4"), ("cal", "#ff7f0e"))):
                if kind == "cal" and any(r["cal"] is None for r in rows):
                    continue
                b = [(r[kind]["delta"], r[kind]["ci_low"], r[kind]["ci_high"]) for r in rows]
                d = np.array([x_[0] for x_ in b]) * 100
                err = np.clip(np.array([[x_[0] - x_[1], x_[2] - x_[0]] for x_ in b]).T * 100, 0, None)
                ax.bar(x + (j - 0.5) * 0.4, d, 0.4, yerr=np.nan_to_num(err), color=colour, capsize=2,
                       label="Δ accuracy" if kind == "raw" else "Δ calibrated", error_kw={"elinewidth": 0.8})
            ax.axhline(0, color="k", lw=0.8)
            ax.set_ylabel("tuned − base (points)")
        else:
            ax.bar(x, [r["raw"]["base"] * 100 for r in rows], 0.7, color="#9e9e9e", label="base accuracy")
            ax.set_ylim(0, 100)
            ax.set_ylabel("accuracy %")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_title(f"{t} ({v} labels)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save(fig, path, dpi=110, tight=False)


def retrieval_figure(curves: dict[str, list[float]], rho: dict[str, list[tuple[float, float]]], title: str, path: Path) -> Path:
    """Left: mean retrieval accuracy per layer (non-reference languages; one line per model and direction). Right:
    Spearman correlation over languages, per layer, between retrieval and the accuracy change (filled markers:
    p < 0.05)."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, ys in curves.items():
        a1.plot(range(len(ys)), ys, "--" if "tuned" in name else "-", lw=1.4, label=name)
    a1.set_xlabel("layer")
    a1.set_ylabel("retrieval accuracy")
    a1.set_ylim(0, 1)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=7)
    for name, vals in rho.items():
        xs = list(range(len(vals)))
        line, = a2.plot(xs, [r for r, _ in vals], lw=1.2, label=name)
        sig = [(i, r) for i, (r, p) in enumerate(vals) if p == p and p < 0.05]
        if sig:
            a2.plot(*zip(*sig), "o", color=line.get_color(), ms=4)
    a2.axhline(0, color="k", lw=0.8)
    a2.set_ylim(-1, 1)
    a2.set_xlabel("layer")
    a2.set_ylabel("Spearman ρ over languages")
    a2.grid(alpha=0.3)
    if rho:
        a2.legend(fontsize=7)
    else:
        a2.text(0.5, 0.5, "no tuned model / no accuracy change to correlate", ha="center", va="center",
                transform=a2.transAxes, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path, dpi=110, tight=False)
