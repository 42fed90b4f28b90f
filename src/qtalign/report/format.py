"""Formatting numbers, tables and paths for the report (Markdown)."""

from __future__ import annotations

import math
import os
from pathlib import Path

DASH = "—"


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x: float | None, digits: int = 1) -> str:
    return DASH if _nan(x) else f"{100 * x:.{digits}f}"


def signed(x: float | None) -> str:
    return DASH if _nan(x) else f"{100 * x:+.1f}"


def num(x: float | None, digits: int = 3) -> str:
    return DASH if _nan(x) else f"{x:.{digits}f}"


def signed_num(x: float | None, digits: int = 3) -> str:
    return DASH if _nan(x) else f"{x:+.{digits}f}"


def side(d: dict | None) -> int:
    """+1 / -1 when the bootstrap interval of a change (an entry's ci_low, ci_high) lies above / below 0; 0 when it
    covers 0 or is missing."""
    lo, hi = (d or {}).get("ci_low"), (d or {}).get("ci_high")
    if lo is None or hi is None or lo != lo or hi != hi:
        return 0
    return 1 if lo > 0 else (-1 if hi < 0 else 0)


def change(d: dict | None, auc: bool = False) -> str:
    """A statistics entry's change ({delta, ci_low, ci_high}) as '+3.2 [+0.4, +6.1]', in points (an AUC's in AUC
    units); a star when the interval excludes 0."""
    d = d or {}
    x, lo, hi = d.get("delta"), d.get("ci_low"), d.get("ci_high")
    scale, digits = (1, 3) if auc else (100.0, 1)
    if _nan(x):
        return DASH
    if _nan(lo):
        return f"{scale * x:+.{digits}f}"
    star = " *" if lo > 0 or hi < 0 else ""
    return f"{scale * x:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]{star}"


def pval(p: float | None) -> str:
    """A p-value; one at the floor of the report's sign-flip test (the smallest p its N_PERM permutations can return)
    is shown as '< floor': the resampling only bounds it."""
    if _nan(p):
        return DASH
    from qtalign.report.paired import N_PERM
    from qtalign.stats import perm_floor

    floor = perm_floor(N_PERM)
    if math.isclose(p, floor, rel_tol=1e-9):  # a permutation p is never below its floor; an exact test's can be
        return f"< {floor:.1e} *"
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


def display_path(p, run_dir: Path | list | None = None, data_dir: str | None = None) -> str:
    """A path as a reader should see it: relative to the run dir, '{data_dir}/…', '$QTALIGN_CACHE/…', 'qtalign/…'
    (package resources) or '~/…', never the machine's absolute layout. ``run_dir`` may be several paths that all are
    the run dir (where it is now, and the `out` it was run with: an export shows the same report as its run)."""
    from qtalign.io import cache_root

    s = str(p)
    if not s or "/" not in s:
        return s
    path = Path(s)
    anchors = [(Path(d), ".") for d in (run_dir if isinstance(run_dir, list) else [run_dir]) if d]
    if data_dir:
        anchors.append((Path(data_dir), "{data_dir}"))
    anchors += [(cache_root(), "$QTALIGN_CACHE"), (Path(__file__).resolve().parents[1], "qtalign"), (Path.home(), "~")]
    for base, label in anchors:
        try:
            rel = os.path.relpath(path.resolve() if path.is_absolute() else path, base.resolve())
        except ValueError:
            continue
        if not rel.startswith(".."):
            return label if rel == "." else (rel if label == "." else f"{label}/{rel}")
        if label == "{data_dir}" and rel.startswith("../") and not rel.startswith("../.."):
            return f"{label}/{rel}"  # beside the data dir, as configs write it: {data_dir}/../paper_prompts.json
    return s


def display_paths(obj, run_dir: Path | list | None = None, data_dir: str | None = None):
    """Every string that looks like an absolute path, inside a nested config, shown with display_path."""
    if isinstance(obj, dict):
        return {k: display_paths(v, run_dir, data_dir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [display_paths(v, run_dir, data_dir) for v in obj]
    if isinstance(obj, str) and obj.startswith(("/", "~")):
        return display_path(obj, run_dir, data_dir)
    return obj
