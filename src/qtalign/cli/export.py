"""`qtalign export RUN --out DIR`: a run's (or an evaluation dir's) per-item predictions as Hugging Face ``datasets``
parquet files, one per evaluation (``eval_base.parquet``, ``eval_tuned.parquet``; an `qtalign eval` dir gives
``eval.parquet``), readable with ``datasets.load_dataset("parquet", data_files=...)``."""

from __future__ import annotations

import os


def configure_parser(p, name: str) -> None:
    p.add_argument("run", metavar="RUN", help="a run dir of `qtalign run` (or its export), or an output dir of `qtalign eval`")
    p.add_argument("--out", required=True, type=os.path.expanduser, help="folder for the parquet files")


def evaluations(run) -> dict[str, "object"]:
    """{file stem: predictions path} of the evaluations under a run dir or an eval dir."""
    from pathlib import Path

    run = Path(run)
    if (run / "results.json").is_file():
        return {"eval": run / "predictions.jsonl"}
    return {f"eval_{w}": run / "eval" / w / "predictions.jsonl" for w in ("base", "tuned") if (run / "eval" / w / "results.json").is_file()}


def run_cli(args) -> int:
    from qtalign.errors import QtalignError
    from qtalign.eval.interop import write_parquet
    from qtalign.io import OutputDir, read_jsonl

    evals = evaluations(args.run)
    if not evals:
        raise QtalignError(f"{args.run}: no evaluation found (results.json, or eval/base/results.json in a run dir)")
    out = OutputDir(args.out, "export").claim()
    for stem, pred in evals.items():
        recs = list(read_jsonl(pred))
        if not recs:
            raise QtalignError(f"{pred}: no per-item records")
        out.record(f"{stem}.parquet")
        print(f"wrote {write_parquet(recs, out.path / f'{stem}.parquet')} ({len(recs)} rows)")
    return 0
