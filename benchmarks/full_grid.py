"""The full paper grid as a benchmark: 18 languages x 3 tasks x every test item (28,800 prompts), enout labels, the
paper's prompts, through `qtalign eval` itself (one resumable segment per task x language, the store off so that every
item is computed), with the small benchmark's item set scored in the same process before and after it.

Reported: items per second and the fraction of the bf16 matmul peak, for the grid and for the small set side by side,
so that scale cannot hide a slowdown (batches that stop filling, caches that grow). Needed FLOPs come from
benchmarks/flops.py (the prefix once per group, every suffix, the label columns; no pads). Every rate is per second of
this process's CPU time, and the peak too (`matmul_peak(clock='cpu')`): on a machine shared with other jobs, the time
another process held the core is counted by neither side. Wall time is recorded beside it. One thread by default.

    python benchmarks/full_grid.py --model gemma-3-270m --out ../runs/full_grid            # about an hour of one core
    python benchmarks/full_grid.py --model gemma-3-270m --compile --out ../runs/full_grid_compiled

A killed run resumes: finished segments are kept (their recorded times are summed); the segment that was cut resumes
from its predictions, and its time is then that of the resumed part only (flagged as "resumed" in full_grid.json), so
the rates count the segments timed whole ("items_timed"). Rerunning a finished grid scores only the small set again.
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
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    p.add_argument("--small-langs", default="en,de,zh", help="languages of the small set (default: the small benchmark's)")
    p.add_argument("--small-n", type=int, default=64, help="items per task x language of the small set (default 64)")
    p.add_argument("--data-dir", default=str(SHARED / "official"))
    p.add_argument("--out", required=True, help="folder for the segments and full_grid.json")
    return p.parse_args(argv)


def segment_flops(shape, cfg, lm) -> tuple[float, int]:
    """Needed FLOPs of one segment and its item count (the prefix once, every suffix, the label columns)."""
    from flops import prompt_flops

    from qtalign.engine.forward import encode_prompts
    from qtalign.eval.run import build_requests
    from qtalign.scoring.scorer import Scorer

    plan = cfg.plan(lm.info["identity"])
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


def small_set(lm, specs, a) -> dict:
    """The small benchmark's items (eval_throughput.py: first-token rule, prefix cache, the same batch size), scored
    once untimed and once CPU-timed: items per CPU second and needed TFLOP."""
    from eval_throughput import efficiency, load_groups, ours_scores

    from qtalign.eval.run import build_requests
    from qtalign.scoring.scorer import Scorer
    from qtalign.tasks.items import DataSource

    groups = load_groups(specs, DataSource(data_dir=a.data_dir), a.tasks.split(","), a.small_langs.split(","), "enout",
                         a.small_n)
    scorer = Scorer(lm.model, lm.tokenizer, "first-token", batch_size=a.batch_size, prefix_cache=True)
    reqs = [build_requests(g.task, g.lang, g.variant, g.items, "first-token") for g in groups]
    for r in reqs:  # untimed: per-shape kernel specialisation, candidate sets
        ours_scores(scorer, r[:2])
    preds, w0, c0 = {}, time.perf_counter(), time.process_time()
    for r in reqs:
        preds.update(ours_scores(scorer, r))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    res = {"predictions": {"ours": list(preds)}, "seconds": {"ours": cpu}}
    eff = efficiency(lm.model, lm.tokenizer, groups, res, 1, 1.0, cached=("ours",))["methods"]["ours"]
    return {"items": len(preds), "cpu_s": cpu, "wall_s": wall, "needed_tflop": eff["needed_tflop"]}


def run_grid(a, lm, mc, shape, specs, out) -> list[dict]:
    from qtalign.eval.config import EvalConfig
    from qtalign.eval.run import evaluate
    from qtalign.io import read_json

    segs = []
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
            tm = res["timing"]
            segs.append({"segment": seg, "items": n, "eval_s": tm["eval_s"], "eval_cpu_s": tm.get("eval_cpu_s"),
                         "needed_tflop": flops / 1e12, "resumed": tm["items_scored_this_run"] < n,
                         "kept_from_an_earlier_run": prev is not None})
            print(f"{seg}: {n} items in {tm['eval_s']:.1f} s ({tm.get('eval_cpu_s', float('nan')):.1f} s CPU)", flush=True)
    return segs


def rates(items: int, tflop: float, cpu_s: float, peak: float) -> dict:
    gflops = tflop * 1e3 / cpu_s
    return {"items_per_cpu_s": items / cpu_s, "achieved_gflops_per_cpu_s": gflops, "fraction_of_peak": gflops / peak}


def totals(segs: list[dict], peak: float) -> dict:
    """Items, times and rates of a set of segments. The rates count only segments timed whole: a segment resumed after
    a kill records the time of its resumed part only, so it would inflate them (its items still count in `items`)."""
    timed = [s for s in segs if not s["resumed"]]
    cpu = sum(s["eval_cpu_s"] if s["eval_cpu_s"] is not None else s["eval_s"] for s in timed)
    tflop = sum(s["needed_tflop"] for s in timed)
    return {"items": sum(s["items"] for s in segs), "items_timed": sum(s["items"] for s in timed),
            "scoring_cpu_s": round(cpu, 1), "scoring_wall_s": round(sum(s["eval_s"] for s in timed), 1),
            "needed_tflop": tflop, **rates(sum(s["items"] for s in timed), tflop, cpu, peak)}


def main(argv=None) -> int:
    import torch
    from flops import matmul_peak, model_shape

    from qtalign.engine.models import ModelConfig, load_model
    from qtalign.io import OutputDir, write_json
    from qtalign.tasks.specs import load_specs

    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("QTALIGN_PROGRESS_INTERVAL", "120")
    out = OutputDir(a.out, "benchmark").claim()
    mc = ModelConfig(name=a.model, dtype=a.dtype, compile=a.compile)
    lm = load_model(mc)
    shape = model_shape(lm.model)
    mm = [(512, shape.hidden, shape.ffn), (512, shape.ffn, shape.hidden)]
    threads = torch.get_num_threads()
    peaks = [matmul_peak(threads, mm, clock="cpu")]
    specs = load_specs([str(SHARED / "paper_prompts.json")])
    t_wall = time.time()
    small = [small_set(lm, specs, a)]
    segs = run_grid(a, lm, mc, shape, specs, out)
    small.append(small_set(lm, specs, a))
    peaks.append(matmul_peak(threads, mm, clock="cpu"))
    peak = max(peaks)
    grid = totals(segs, peak)
    per_task = {t: totals([s for s in segs if s["segment"].startswith(t + "_")], peak) for t in a.tasks.split(",")}
    sm = {"items": small[0]["items"], "cpu_s": [round(s["cpu_s"], 2) for s in small],
          "wall_s": [round(s["wall_s"], 2) for s in small], "needed_tflop": small[0]["needed_tflop"],
          **rates(small[0]["items"], small[0]["needed_tflop"], min(s["cpu_s"] for s in small), peak)}
    summary = {"model": a.model, "dtype": a.dtype, "compile": a.compile, "threads": threads, "batch_size": a.batch_size,
               "peak_gflops_per_cpu_s": peak, "peaks_before_after": peaks, "grid": grid, "per_task": per_task,
               "small_set": sm,
               "grid_over_small": {"items_per_cpu_s": grid["items_per_cpu_s"] / sm["items_per_cpu_s"],
                                   "fraction_of_peak": grid["fraction_of_peak"] / sm["fraction_of_peak"]},
               "load_avg_1min_at_end": os.getloadavg()[0], "wall_s_this_run": round(time.time() - t_wall, 1),
               "segments": segs}
    write_json(out.path / "full_grid.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "segments"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
