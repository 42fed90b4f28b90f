"""`qtalign card CLAIMS.yaml --out docs/reproduction.md`: the reproduction card. One row per claim of the paper,
beside qtalign's nearest published measurement, recomputed from the result folders' per-item predictions (so the
card stays true: change a result and the card changes with it), and a verdict that follows from the intervals:

    reproduced            the claimed direction holds for raw accuracy (its 95 % interval excludes 0 on that side)
                          and, for a gain, for calibrated accuracy or AUC too (what the model knows changed)
    raw accuracy only     raw accuracy rose, calibrated accuracy and AUC did not: a shift of the label prior
    not reproduced        raw accuracy did not move in the claimed direction (a loss is said so)
    not testable here     no measurement; the claim file says what it would take

The claims file (YAML) lists, per claim: id, table, claim (the paper's words in short), paper (model, setting,
change), expect (gain | loss), measurements (each: run = a folder beside the claims file, task, group = all | seen
| unseen | high | low | a list of languages, note) and, without measurements, missing (what it would take).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from qtalign.errors import QtalignError
from qtalign.io import file_sha256, read_config, text_sha256, write_text
from qtalign.report.format import DASH, change, md_table, pval, side
from qtalign.report.paired import GROUPS, N_BOOT, group_summary
from qtalign.report.read import Run, read_run

VERDICTS = ("reproduced", "raw accuracy only (label-prior shift)", "not reproduced", "not testable here")


def verdict(expect: str, s: dict | None) -> str:
    """The verdict of one measurement (a group_summary with intervals) for a claimed gain or loss."""
    if not s:
        return VERDICTS[3]
    raw, cal, auc = side(s.get("raw")), side(s.get("cal")), side(s.get("auc"))
    if expect == "loss":
        return VERDICTS[0] if raw < 0 else VERDICTS[2] + (" (a gain)" if raw > 0 else "")
    if raw > 0:
        return VERDICTS[0] if cal > 0 or auc > 0 else VERDICTS[1]
    lost = [k for k, v in (("raw", raw), ("calibrated", cal), ("AUC", auc)) if v < 0]
    return VERDICTS[2] + (f" (a loss: {', '.join(lost)})" if lost else "")


def measure(run: Run, task: str, group, n_boot: int = N_BOOT) -> dict | None:
    """The paired change tuned − base of one run on one task over a language group (a name, or a list of
    languages pooled as one group), with intervals and the sign-flip test."""
    from qtalign.report.numbers import paired_rows

    rows = [r for (t, _v), rs in paired_rows(run).items() if t == task for r in rs]
    if isinstance(group, list):
        rows, group = [r for r in rows if r.lang in group], "all"
    elif group not in GROUPS:
        raise QtalignError(f"group {group!r}: expected one of {', '.join(GROUPS)} or a list of languages")
    return group_summary(rows, group, n_boot=n_boot)  # None without rows


def _facts(run: Run) -> tuple[str, str, str]:
    """(model, training, controls) of a run, from its artifacts."""
    from qtalign.report.compare import _model_facts, _training_facts

    m = _model_facts(run)
    data = run.config.get("data") or {}
    seeds = run.config.get("seeds") or [run.config.get("seed", 0)]
    control = data.get("control") or "none"
    return (f"{m['model']} ({m['kind']}, {m['params']})", f"{_training_facts(run)}; trained on {m['trained on']}; "
            f"seed {', '.join(map(str, seeds))}", control)


def inputs_digest(claims_path: Path, runs: list[str]) -> str:
    """sha256 of everything the card is computed from: the claims file and each run's results and predictions."""
    parts = [f"claims:{file_sha256(claims_path)}"]
    for name in sorted(set(runs)):
        for rel in ("eval/base/results.json", "eval/tuned/results.json", "eval/base/predictions.jsonl.gz",
                    "eval/tuned/predictions.jsonl.gz", "eval/base/predictions.jsonl", "eval/tuned/predictions.jsonl",
                    "experiment.json", "train/summary.json"):
            p = claims_path.parent / name / rel
            if p.is_file():
                parts.append(f"{name}/{rel}:{file_sha256(p)}")
    return text_sha256("\n".join(parts))


def load_claims(path: str | Path) -> list[dict]:
    path = Path(path)
    doc = read_config(path)
    claims = doc.get("claims") if isinstance(doc, dict) else None
    if not isinstance(claims, list) or not claims:
        raise QtalignError(f"{path}: field 'claims': expected a list of claims")
    for k, c in enumerate(claims):
        for f in ("id", "table", "claim", "paper", "expect"):
            if f not in c:
                raise QtalignError(f"{path}: claim {k}: field '{f}': missing")
        if c["expect"] not in ("gain", "loss"):
            raise QtalignError(f"{path}: claim {k} ({c['id']}): field 'expect': 'gain' or 'loss', not {c['expect']!r}")
        if not c.get("measurements") and not c.get("missing"):
            raise QtalignError(f"{path}: claim {k} ({c['id']}): give measurements, or 'missing' (what it would take)")
        for j, m in enumerate(c.get("measurements") or []):
            if not (path.parent / str(m.get("run", ""))).is_dir():
                raise QtalignError(f"{path}: claim {k} ({c['id']}): measurements[{j}]: run folder "
                                   f"{path.parent / str(m.get('run'))} not found")
    return claims


def _row(c: dict, m: dict | None, runs: dict[str, Run]) -> tuple[list, str]:
    """A claim's row of the card for one of its measurements (None: not testable here), and its verdict."""
    p = c["paper"]
    if m is None:
        v = VERDICTS[3]
        return [c["table"], c["claim"], p.get("model", ""), p.get("change", ""), DASH, DASH, DASH, DASH, DASH,
                f"**{v}**: {c['missing']}"], v
    run = runs[m["run"]]
    s = measure(run, m["task"], m.get("group", "all")) or {}
    model, setting, control = _facts(run)
    v, raw = verdict(c["expect"], s), s.get("raw", {})
    group = ", ".join(m["group"]) if isinstance(m.get("group"), list) else m.get("group", "all")
    cells = [c["table"], c["claim"], p.get("model", ""), p.get("change", ""),
             f"[{m['run']}]({m['run']}/report.md): {model}; {m['task']}, {group}; {setting}", control,
             change(raw) + f" (p {pval(raw.get('p'))})", change(s.get("cal")), change(s.get("auc"), auc=True),
             f"**{v}**" + (f": {m['note']}" if m.get("note") else "")]
    return cells, v


def write_card(claims_path: str | Path, out: str | Path) -> Path:
    """Render the reproduction card from the claims file and the runs it names (beside it)."""
    claims_path = Path(claims_path)
    claims = load_claims(claims_path)
    names = [m["run"] for c in claims for m in c.get("measurements") or []]
    runs = {n: read_run(claims_path.parent / n) for n in dict.fromkeys(names)}
    body, counts = [], Counter()
    for c in claims:
        for m in c.get("measurements") or [None]:
            cells, v = _row(c, m, runs)
            body.append(cells)
            counts[v.split(" (a")[0]] += 1
    rel = lambda p: Path(os.path.relpath(Path(p).resolve(), Path.cwd())).as_posix()  # noqa: E731 - as the command was given
    lines = [
        "# Reproduction card: the paper's claims against qtalign's measurements",
        "",
        f"Generated by `qtalign card {rel(claims_path)} --out {rel(out)}` from the published result folders "
        "(every number recomputed from their per-item predictions; edit the claims file, not this page). The paper's "
        "numbers: `../shared/paper/README.md` (arXiv 2405.13816 v1; base models, one training run each, raw accuracy "
        "only).",
        "",
        "Δ = tuned − base, macro average over the group's languages, in points (AUC in AUC units), with paired "
        f"cluster-bootstrap 95 % intervals ({N_BOOT} resamples; * = excludes 0) and the sign-flip test. Verdicts follow "
        "from the intervals alone: **reproduced** = raw accuracy moved the claimed way and, for a gain, calibrated "
        "accuracy or AUC rose too; **raw accuracy only** = raw accuracy rose while calibrated accuracy and AUC did "
        "not (a shift of the label prior, not of what the model knows); **not reproduced**; **not testable here** "
        "(with what it would take). A measurement on another model or budget than the paper's is the nearest one "
        "qtalign has, not a replication of the paper's exact setting: the model column says which.",
        "",
        "Verdicts: " + "; ".join(f"{k}: {n}" for k, n in counts.items()) + ".",
        "",
        md_table(["paper", "claim", "paper's model", "paper's Δ", "qtalign's measurement (model; task, languages; "
                  "training)", "control", "Δ raw [95 % CI] (p)", "Δ calibrated", "Δ AUC", "verdict"], body,
                 "llllllrrrl"),
        "",
        f"Inputs (claims file and every run's results and predictions) sha256: `{inputs_digest(claims_path, names)}`",
        "",
    ]
    if Path(out).exists() and Path(out).read_text(encoding="utf-8").splitlines()[:1] != [lines[0]]:
        # one file, not a folder: it is qtalign's only if it is a card qtalign wrote (its first line)
        raise QtalignError(f"--out {out}: exists and is not a reproduction card qtalign wrote; choose another --out")
    write_text(out, "\n".join(lines))
    return Path(out)
