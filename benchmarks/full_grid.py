"""The full paper grid as a benchmark: 18 languages x 3 tasks x every test item (28,800 prompts), enout labels, the
paper's prompts, through `qtalign eval` itself (one resumable segment per task x language, the store off so that every
item is computed). Reports the wall time of the scoring summed over the segments, items/s, the FLOPs needed
(benchmarks/flops.py: prefix once per group, every suffix, no pads) and the fraction of the bf16 matmul peak measured
in the same run, so that scale cannot hide a slowdown (batches that stop filling, caches that grow).

    python benchmarks/full_grid.py --model gemma-3-270m --out ../runs/full_grid            # about an hour on 2 cores
    python benchmarks/full_grid.py --model gemma-3-270m --compile --out ../runs/full_grid_compiled

A killed run resumes: finished segments are kept (their recorded times are summed), the current one resumes from its
predictions (its time is then the time of the resumed part only, flagged in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QTALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="the model's compile option (fused norms and MLPs)")
    p.add_argument("--tasks", default="emotion,snli,paws")
    p.add_argument("--langs", default="all")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data-dir", default=str(SHARED / "official"))
    p.add_argument("--out", required=True, help="folder for the segments and full_grid.json")
    return p.parse_args(argv)


def segment_flops(shape, cfg, lm) -> tuple[float, int]:
    """Needed FLOPs of one segment and its item count (the prefix once, every suffix, the label columns)."""
    from flops import prompt_flops

    from qtalign.engine.forward import encode_prompts
    from qtalign.eval.run import Plan, build_requests
    from qtalign.scoring.scorer import Scorer

    plan = Plan(cfg, lm.info["identity"])
    scorer = Scorer(lm.model, lm.tokenizer, "first-token")
    total, n = 0.0, 0
    for g, items in plan.items.items():
        task = plan.specs.task(g.task)
        reqs = build_requests(task, g.lang, g.variant, items, "first-token")
        cols = sum(len(s) for s in scorer.candidates(scorer.plan(reqs[0].words)[1]).sets)
        enc = encode_prompts(lm.tokenizer, scorer.prompts(reqs))
        total += prompt_flops(shape, 0, enc[0].prefix_len, 0)
        total += sum(prompt_flops(shape, e.prefix_len, len(e.ids) - e.prefix_len, cols) for e in enc)
        n += len(enc)
    return total, n


def main(argv=None) -> int:
    import torch
    from flops import matmul_peak, model_shape

    from qtalign.engine.models import ModelConfig, load_model
    from qtalign.eval.config import EvalConfig
    from qtalign.eval.run import evaluate
    from qtalign.io import OutputDir, read_json, write_json
    from qtalign.tasks.specs import load_specs

    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("QTALIGN_PROGRESS_INTERVAL", "120")
    out = OutputDir(a.out, "benchmark").claim(adopt=("full_grid.json",))
    mc = ModelConfig(name=a.model, dtype=a.dtype, compile=a.compile)
    lm = load_model(mc)
    shape = model_shape(lm.model)
    peak = matmul_peak(torch.get_num_threads(), [(512, shape.hidden, shape.ffn), (512, shape.ffn, shape.hidden)])
    specs = load_specs([str(SHARED / "paper_prompts.json")])
    segs, t_wall = [], time.time()
    for t in a.tasks.split(","):
        for lang in specs.resolve_langs(a.langs, t):
            cfg = EvalConfig(model=mc, tasks=[t], langs=[lang], variants=["enout"], data_dir=a.data_dir,
                             prompts=[str(SHARED / "paper_prompts.json")], batch_size=a.batch_size, store=False)
            if not cfg.source().exists(specs.task(t), lang):
                continue
            seg = f"{t}_{lang}"
            out.record(seg)
            prev = read_json(out.path / seg / "results.json")
            res = prev or evaluate(cfg, out.path / seg, loaded=lm, progress=True)
            flops, n = segment_flops(shape, cfg, lm)
            segs.append({"segment": seg, "items": n, "eval_s": res["timing"]["eval_s"], "needed_tflop": flops / 1e12,
                         "resumed": res["timing"]["items_scored_this_run"] < n, "kept_from_an_earlier_run": prev is not None})
            print(f"{seg}: {n} items in {res['timing']['eval_s']:.1f} s", flush=True)
    peak = max(peak, matmul_peak(torch.get_num_threads(), [(512, shape.hidden, shape.ffn), (512, shape.ffn, shape.hidden)]))
    items = sum(s["items"] for s in segs)
    secs = sum(s["eval_s"] for s in segs)
    tflop = sum(s["needed_tflop"] for s in segs)
    summary = {"model": a.model, "dtype": a.dtype, "compile": a.compile, "threads": torch.get_num_threads(),
               "batch_size": a.batch_size, "items": items, "scoring_s": round(secs, 1), "items_per_s": items / secs,
               "needed_tflop": tflop, "achieved_gflops": tflop / secs * 1e3, "peak_gflops": peak,
               "fraction_of_peak": tflop / secs * 1e3 / peak, "wall_s_this_run": round(time.time() - t_wall, 1),
               "segments": segs}
    write_json(out.path / "full_grid.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "segments"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
