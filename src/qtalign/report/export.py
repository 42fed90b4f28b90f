"""`qtalign run --export DIR`: a run's report, its figures, the small result files and the per-item predictions
(gzip-compressed), keeping relative paths, and the trained LoRA adapter when it is small (``adapter/``: its config
and safetensors weights with a manifest of their sha256, checked whenever it is loaded; never a checkpoint, a
pickle or base-model weights). Small enough to commit; everything the report's numbers come from is in it, and
`qtalign report DIR` rebuilds the report from it; `--adapter DIR/adapter` reruns the tuned evaluation, lens and
geometry without retraining. The export's report.html links the figures it carries beside it instead of embedding
them a second time."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

from qtalign.errors import QtalignError
from qtalign.io import OutputDir, bytes_sha256, write_bytes, write_json, write_text
from qtalign.report.html import md_to_html

UNITS = ("data", "train", "eval/base", "eval/tuned", "lens", "geometry", "report")
SMALL = ["report.md", "report.html", "stats.json", "config.yaml", "experiment.json", "train/summary.json", "train/trainer_log.jsonl",
         "train/train_config.json", "lens/summary.json", "lens/lens_means.csv", "geometry/summary.json", "data/stats.json",
         "data/summary.json"]
EVAL_FILES = ("run.json", "results.json", "table.md", "table.csv", "labels.md", "labels.json")
ADAPTER_MAX_BYTES = 32 * 2**20  # a q/v LoRA of a sub-2B model is a few MB; anything larger stays out of a repository


def export_adapter(run_dir: Path, out: Path) -> str | None:
    """Copy train/adapter (config + safetensors) to out/adapter with its manifest; returns why not, if it is not."""
    from qtalign.engine.models import ADAPTER_MANIFEST, adapter_manifest

    src = run_dir / "train" / "adapter"
    names = ["adapter_config.json", "adapter_model.safetensors"]
    if not all((src / n).is_file() for n in names):
        return "no safetensors adapter in train/adapter"
    size = sum((src / n).stat().st_size for n in names)
    if size > ADAPTER_MAX_BYTES:
        return f"the adapter is {size / 2**20:.0f} MiB (more than {ADAPTER_MAX_BYTES // 2**20} MiB)"
    (out / "adapter").mkdir(exist_ok=True)
    for n in names:
        write_bytes(out / "adapter" / n, (src / n).read_bytes())
    write_json(out / "adapter" / ADAPTER_MANIFEST, adapter_manifest(out / "adapter"))
    return None


def export_files(run_dir: Path) -> list[str]:
    """The relative paths an export copies (predictions separately, compressed)."""
    md = run_dir / "report.md"
    keep = list(SMALL)
    if md.exists():
        keep += [m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text(encoding="utf-8")) if not m.startswith("data:")]
    keep += [f"eval/{w}/{n}" for w in ("base", "tuned") for n in EVAL_FILES]
    # the lm-evaluation-harness layouts' results files; their per-sample files repeat the predictions (28 MB for a
    # study's 8,100 items, uncompressed), which the export carries compressed
    keep += [p.relative_to(run_dir).as_posix() for w in ("base", "tuned")
             for p in (run_dir / "eval" / w / "lm_eval").rglob("results_*.json") if p.is_file()]
    keep += [f"{u}/stage.json" for u in UNITS]
    return [k for k in dict.fromkeys(keep) if (run_dir / k).is_file()]


def export_run(run_dir: str | Path, dest: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "report.md").is_file() and not (run_dir / "eval" / "base" / "results.json").is_file():
        raise QtalignError(f"{run_dir}: nothing to export (no report.md and no eval/base/results.json)")
    out = OutputDir(dest, "export", option="--export").claim()
    files = export_files(run_dir)
    out.record(*{f.split("/", 1)[0] for f in files}, "eval", "adapter")
    for rel in files:
        if rel == "report.html" and (run_dir / "report.md").is_file():
            continue  # rendered below from report.md, figures linked
        (out.path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run_dir / rel, out.path / rel)
    for which in ("base", "tuned"):
        pred = run_dir / "eval" / which / "predictions.jsonl"
        if pred.is_file():
            data = pred.read_bytes()
            write_bytes(out.path / "eval" / which / "predictions.jsonl.gz", gzip.compress(data, mtime=0))
            # the records' digest, checked by `qtalign store import` (a cut or edited export is refused)
            write_text(out.path / "eval" / which / "predictions.sha256",
                       bytes_sha256(data) + "  predictions.jsonl\n")
    md = run_dir / "report.md"
    if md.is_file():
        text = md.read_text(encoding="utf-8")
        title = next((line[2:] for line in text.splitlines() if line.startswith("# ")), "qtalign report")
        write_text(out.path / "report.html", md_to_html(text, title))
    if (run_dir / "train" / "summary.json").is_file():
        why = export_adapter(run_dir, out.path)
        if why:
            print(f"export: the adapter is not carried: {why}")
    return out.path
