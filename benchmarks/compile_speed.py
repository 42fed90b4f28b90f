"""Eager vs compiled evaluation (`model.compile: true`): items/s, fraction of the bf16 matmul peak, and agreement.

The same model is loaded twice, once eager and once with `ModelConfig(compile=True)` (torch.compile of every norm and
MLP of the decoder layers, `engine.forward.compile_parts`). Both score the same items with qtalign's scorer
(first-token rule, prefix cache) group by group; within each group the order of the two alternates from group to
group, so that load changes on a shared machine hit both alike. Every group is first scored once untimed by both
(compilation and the CPU kernels' per-shape specialisation happen there), then timed. Printed: items/s, the ratio
compiled ÷ eager, the FLOPs each needs (the same: benchmarks/flops.py) and the fraction of the machine's bf16
matmul peak measured in this run at the same thread count, and how often the predictions agree (bf16: the fused
kernels round differently, so near-ties may flip; the report gives the largest difference of the class scores).

    python benchmarks/compile_speed.py --model gemma-3-270m --tasks emotion,snli,paws --langs de,zh,hi --n 48
    python benchmarks/compile_speed.py --model qwen2.5-coder-0.5b --tasks emotion,snli --langs de,zh --n 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from eval_throughput import SHARED, efficiency, load_groups, ours_scores  # noqa: E402
from qtalign.eval.run import build_requests  # noqa: E402
from qtalign.scoring.scorer import Scorer  # noqa: E402

SIDES = ("eager", "compiled")


def build_parser() -> argparse.ArgumentParser:
    from qtalign.cli.options import add_model_options

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--tasks", default="emotion,snli,paws")
    g.add_argument("--langs", default="de,zh,hi")
    g.add_argument("--variant", default="enout")
    g.add_argument("--n", type=int, default=48, help="items per task x language (default 48)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    g.add_argument("--data-dir", default=str(SHARED / "official"))
    g.add_argument("--json", help="write the results (with per-item predictions) here")
    return p


def time_side(scorer: Scorer, reqs: list) -> tuple[float, dict]:
    t = time.perf_counter()
    scored = ours_scores(scorer, reqs)
    return time.perf_counter() - t, scored


def run(models: dict, tokenizer, groups: list, batch_size: int) -> dict:
    scorers = {s: Scorer(m, tokenizer, "first-token", batch_size=batch_size, prefix_cache=True) for s, m in models.items()}
    seconds = {s: 0.0 for s in SIDES}
    scored = {s: {} for s in SIDES}
    per_group = {}
    for gi, g in enumerate(groups):
        reqs = build_requests(g.task, g.lang, g.variant, g.items, "first-token")
        for s in SIDES:  # untimed: compilation and per-shape kernel specialisation
            ours_scores(scorers[s], reqs)
        order = SIDES if gi % 2 == 0 else SIDES[::-1]
        per_group[g.name] = {}
        for s in order:
            dt, out = time_side(scorers[s], reqs)
            seconds[s] += dt
            scored[s].update(out)
            per_group[g.name][s] = len(reqs) / dt
        print(f"{g.name}: " + ", ".join(f"{s} {per_group[g.name][s]:.2f} items/s" for s in SIDES), flush=True)
    keys = list(scored["eager"])
    agree = sum(scored["eager"][k][0] == scored["compiled"][k][0] for k in keys)
    diff = max(max(abs(a - b) for a, b in zip(scored["eager"][k][1], scored["compiled"][k][1])) for k in keys)
    n = len(keys)
    return {"items": n, "seconds": seconds, "items_per_s": {s: n / seconds[s] for s in SIDES},
            "ratio_compiled_over_eager": seconds["eager"] / seconds["compiled"], "per_group_items_per_s": per_group,
            "agreement": {"agree": agree, "n": n, "rate": agree / n, "max_abs_diff": diff},
            "predictions": {s: {k: v[0] for k, v in scored[s].items()} for s in SIDES}}


def main(argv: list[str] | None = None) -> int:
    from flops import matmul_peak, model_shape
    from qtalign.cli.options import model_values
    from qtalign.engine.models import ModelConfig, load_model
    from qtalign.tasks.items import DataSource
    from qtalign.tasks.specs import load_specs

    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [str(SHARED / "paper_prompts.json")] if (SHARED / "paper_prompts.json").exists() else []
    specs = load_specs(prompts)
    groups = load_groups(specs, DataSource(data_dir=args.data_dir), args.tasks.split(","), args.langs.split(","),
                         args.variant, args.n)
    cfg = ModelConfig(**{**model_values(args), "compile": False})
    eager = load_model(cfg)
    compiled = load_model(cfg.model_copy(update={"compile": True}))
    models = {"eager": eager.model, "compiled": compiled.model}
    shape = model_shape(eager.model)
    mm_shapes = [(512, shape.hidden, shape.ffn), (512, shape.ffn, shape.hidden)]
    peak0 = matmul_peak(torch.get_num_threads(), mm_shapes)
    res = run(models, eager.tokenizer, groups, args.batch_size)
    peak = max(peak0, matmul_peak(torch.get_num_threads(), mm_shapes))
    res["efficiency"] = efficiency(eager.model, eager.tokenizer, groups, res, torch.get_num_threads(), peak, cached=SIDES)
    res["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    res["torch_threads"] = torch.get_num_threads()
    print(f"\nmodel {cfg.name} ({cfg.dtype}), {res['items']} items, {torch.get_num_threads()} thread(s), "
          f"bf16 matmul peak {peak:.0f} GFLOP/s\n")
    print("| side | items/s | achieved GFLOP/s | fraction of peak |\n|---|---:|---:|---:|")
    for s in SIDES:
        e = res["efficiency"]["methods"][s]
        print(f"| {s} | {res['items_per_s'][s]:.2f} | {e['achieved_gflops']:.0f} | {100 * e['fraction_of_peak']:.1f} % |")
    a = res["agreement"]
    print(f"\ncompiled ÷ eager: {res['ratio_compiled_over_eager']:.2f}×; predictions agree on {a['agree']}/{a['n']} "
          f"({100 * a['rate']:.1f} %), largest class-score difference {a['max_abs_diff']:.2g}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
