"""Where evaluation time goes: torch's profiler over qtalign's scorer on one task x language group, with every
matrix product's shape, so that each product's achieved GFLOP/s can be set beside the machine's bf16 peak measured
in the same run. Prints the share of time per operator, and per matrix-product shape its calls, time and GFLOP/s.

    python benchmarks/profile_eval.py --model gemma-3-270m --task emotion --lang de --n 32 --batch-size 16
    python benchmarks/profile_eval.py --model qwen2.5-coder-0.5b --task snli --compile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QTALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--compile", action="store_true", help="ModelConfig.compile (fused norms and MLPs)")
    p.add_argument("--task", default="emotion")
    p.add_argument("--lang", default="de")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the tables' numbers here")
    return p.parse_args(argv)


def mm_flops(name: str, shapes: list) -> float:
    """FLOPs of one matrix-product call from its input shapes."""
    if name in ("aten::mm",) and len(shapes) >= 2:
        (m, k), (_, n) = shapes[0][-2:], shapes[1][-2:]
        return 2.0 * m * k * n
    if name == "aten::addmm" and len(shapes) >= 3:
        (m, k), (_, n) = shapes[1][-2:], shapes[2][-2:]
        return 2.0 * m * k * n
    if name in ("aten::bmm", "aten::baddbmm"):
        a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
        return 2.0 * a[0] * a[1] * a[2] * b[2]
    return 0.0


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flops import matmul_peak, model_shape

    from qtalign.engine.models import ModelConfig, load_model
    from qtalign.eval.run import build_requests
    from qtalign.scoring.scorer import Scorer
    from qtalign.tasks.items import DataSource, load_items
    from qtalign.tasks.specs import load_specs

    specs = load_specs([str(SHARED / "paper_prompts.json")] if (SHARED / "paper_prompts.json").exists() else [])
    task = specs.task(args.task)
    items = load_items(task, args.lang, DataSource(data_dir=str(SHARED / "official")))[: args.n]
    lm = load_model(ModelConfig(name=args.model, compile=args.compile))
    scorer = Scorer(lm.model, lm.tokenizer, "first-token", batch_size=args.batch_size)
    reqs = build_requests(task, args.lang, "enout", items, "first-token")
    list(scorer.score(reqs[: args.batch_size]))  # warm-up: kernels are specialised per shape on first use
    list(scorer.score(reqs))
    shape = model_shape(lm.model)
    peak = matmul_peak(args.threads, [(512, shape.hidden, shape.ffn), (512, shape.ffn, shape.hidden)])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        list(scorer.score(reqs))
    ops, mms = defaultdict(float), defaultdict(lambda: [0, 0.0, 0.0])
    for ev in prof.key_averages(group_by_input_shape=True):
        ops[ev.key] += ev.self_cpu_time_total
        if ev.key in MATMULS:
            f = mm_flops(ev.key, [list(s) for s in ev.input_shapes if s])
            m = mms[(ev.key, str(ev.input_shapes))]
            m[0] += ev.count
            m[1] += ev.self_cpu_time_total
            m[2] += f * ev.count
    total = sum(ops.values())
    mm_time = sum(v[1] for v in mms.values())
    mm_flop = sum(v[2] for v in mms.values())
    print(f"{args.model}{' compiled' if args.compile else ''}, {args.task}/{args.lang}, {len(reqs)} items, batch "
          f"{args.batch_size}, {args.threads} thread(s); bf16 matmul peak {peak:.0f} GFLOP/s")
    print(f"matrix products: {100 * mm_time / total:.1f} % of the time at {mm_flop / mm_time / 1e3:.0f} GFLOP/s "
          f"({100 * mm_flop / mm_time / 1e3 / peak:.0f} % of peak)\n")
    print("| operator | share of time |\n|---|---:|")
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:14]
    for k, v in top:
        print(f"| {k} | {100 * v / total:.1f} % |")
    print("\n| product | input shapes | calls | share of time | GFLOP/s | of peak |\n|---|---|---:|---:|---:|---:|")
    rows = sorted(mms.items(), key=lambda kv: -kv[1][1])[:12]
    for (name, shp), (n, t, f) in rows:
        g = f / t / 1e3 if t else float("nan")
        print(f"| {name} | {shp} | {n} | {100 * t / total:.1f} % | {g:.0f} | {100 * g / peak:.0f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "peak_gflops": peak, "ops_us": ops,
                                               "matmuls": {f"{k[0]} {k[1]}": v for k, v in mms.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
