"""Training throughput: qtalign's LoRA tuning vs TRL's SFTTrainer + peft (completion-only loss), side by side.

Same model, same rows (in the same order: both use the Trainer's seeded sampler), same LoRA init (the adapter is
created after the same seed on both sides), same effective batch, lr schedule, dtype and gradient-checkpointing
setting. Each side runs in its own subprocess, one after the other, so that its peak RSS is its own. Reported per
side: tokens/s (non-padding input tokens / Trainer train_runtime), peak RSS of the process (model load included),
the training loss per step, and the loss of the trained adapter on held-out rows, computed the same way on both
sides (the model's own full-logits loss over response tokens, fp32 cross-entropy, one row at a time).

    python benchmarks/train_throughput.py                     # Gemma 3 270M, zh+de SNLI question rows, 8 steps
    python benchmarks/train_throughput.py --model DIR --data a.jsonl --rows-per-file 16 --steps 2 --batch-size 8

Run it on an otherwise idle machine: the CPU is shared by both sides' threads only one at a time, but not by
anything else. Writes <out>.json and <out>.md (default benchmarks/results/train_throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QTALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_DATA = [SHARED / "official" / "snli" / f"snli_{lang}10k_train_question.json" for lang in ("zh", "de")]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m", help="embedded name, HF dir (default gemma-3-270m)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--data", nargs="+", default=[str(x) for x in DEFAULT_DATA], help="question-translation files")
    p.add_argument("--rows-per-file", type=int, default=64, help="training rows taken from each file")
    p.add_argument("--held-out-per-file", type=int, default=8, help="held-out rows per file for the equal-loss check")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps N")
    p.add_argument("--batch-size", type=int, default=16, help="effective batch")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--cutoff-len", type=int, default=2048)
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides (TRL's own default is on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="qtalign,trl")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput"), help="output path stem")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def held_out_loss(model, tok, rows: list[dict]) -> float:
    """Mean response-token loss with the model's own full-logits forward (independent of both trainers)."""
    import torch

    from qtalign.train.data import encode_example

    tot, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for r in rows:
            ex = encode_example(tok, r["prompt"], r["response"])
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor([ex["labels"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            tgt = labels[0, 1:]
            m = tgt != -100
            tot += float(torch.nn.functional.cross_entropy(logits[m], tgt[m], reduction="sum"))
            n += int(m.sum())
    return tot / n


def lora_config(args):
    from peft import LoraConfig

    from qtalign.train.config import TrainConfig

    d = TrainConfig()
    return LoraConfig(r=d.lora_r, lora_alpha=d.lora_alpha, lora_dropout=d.lora_dropout, target_modules=list(d.target_modules),
                      bias="none", task_type="CAUSAL_LM")


def child_qtalign(args, work: Path) -> dict:
    from qtalign.engine.models import ModelConfig, apply_adapter, load_model
    from qtalign.train.config import TrainConfig
    from qtalign.train.recipe import train
    from qtalign.train.trainer import read_log

    cfg = TrainConfig(model=ModelConfig(name=args.model, dtype=args.dtype, device="cpu"), batch_size=args.batch_size,
                      per_device_batch_size=args.micro_batch_size, max_steps=args.steps, eval_steps=args.steps,
                      learning_rate=args.lr, cutoff_len=args.cutoff_len, val_size=0, seed=args.seed,
                      gradient_checkpointing=args.gradient_checkpointing)
    out = work / "qtalign_run"
    lm = load_model(cfg.model)
    s = train(cfg, work / "train.jsonl", out, loaded=lm, overwrite=True)
    rss = _peak_rss_mb()
    losses = [r["loss"] for r in read_log(out / "trainer_log.jsonl") if "loss" in r]
    model = apply_adapter(lm.model, str(out / "adapter"))
    held = [json.loads(x) for x in (work / "held.jsonl").read_text().splitlines()]
    return {"tokens": s["numbers"]["train_tokens"], "train_runtime_s": s["numbers"]["train_runtime_s"],
            "tokens_per_s": s["numbers"]["tokens_per_s"], "peak_rss_mb": rss, "losses": losses,
            "held_out_loss": held_out_loss(model, lm.tokenizer, [{"prompt": r["input"], "response": r["output"]} for r in held])}


def child_trl(args, work: Path) -> dict:
    import datasets
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from qtalign.engine.models import ModelConfig, load_model

    lm = load_model(ModelConfig(name=args.model, dtype=args.dtype, device="cpu"))
    rows = [json.loads(x) for x in (work / "train.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"prompt": r["input"], "completion": r["output"]} for r in rows])
    set_seed(args.seed)
    model = get_peft_model(lm.model, lora_config(args))
    targs = SFTConfig(
        output_dir=str(work / "trl_run"), per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=1, gradient_checkpointing=args.gradient_checkpointing,
        bf16=False, fp16=False, max_length=args.cutoff_len, completion_only_loss=True, report_to="none",
        save_strategy="no", seed=args.seed, include_num_input_tokens_seen="non_padding", use_cpu=True,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=targs, train_dataset=ds, processing_class=lm.tokenizer)
    import torch

    torch.set_flush_denormal(True)  # as qtalign's train() does: a fair baseline, not one slowed by denormal floats
    res = trainer.train()
    rss = _peak_rss_mb()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    held = [json.loads(x) for x in (work / "held.jsonl").read_text().splitlines()]
    return {"tokens": trainer.state.num_input_tokens_seen, "train_runtime_s": round(res.metrics["train_runtime"], 1),
            "tokens_per_s": round(trainer.state.num_input_tokens_seen / res.metrics["train_runtime"], 1),
            "peak_rss_mb": rss, "losses": losses,
            "held_out_loss": held_out_loss(trainer.model, lm.tokenizer, [{"prompt": r["input"], "response": r["output"]} for r in held])}


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        work = Path(args.workdir)
        res = {"qtalign": child_qtalign, "trl": child_trl}[args.child](args, work)
        (work / f"{args.child}.json").write_text(json.dumps(res))
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    from qtalign.train.config import TrainConfig
    from qtalign.train.data import load_pairs

    need = args.steps * args.batch_size
    if args.batch_size % args.micro_batch_size:
        raise SystemExit("--batch-size must be a multiple of --micro-batch-size")
    for f in args.data:
        if not Path(f).exists():
            raise SystemExit(f"{f}: data file not found (set QTALIGN_SHARED_DATA or pass --data)")
    per = args.rows_per_file + args.held_out_per_file
    train_rows, held = [], []
    for f in args.data:
        pairs = load_pairs([f], per)
        train_rows += pairs[: args.rows_per_file]
        held += pairs[args.rows_per_file :]
    if len(train_rows) < need:
        raise SystemExit(f"{len(train_rows)} training rows < steps x batch = {need}: raise --rows-per-file")
    train_rows = train_rows[:need]  # exactly one epoch of N steps
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="qt_bench_") as td:
        work = Path(td)
        dump = lambda rows: "".join(json.dumps({"id": r["id"], "input": r["prompt"], "output": r["response"]}, ensure_ascii=False) + "\n" for r in rows)
        (work / "train.jsonl").write_text(dump(train_rows), encoding="utf-8")
        (work / "held.jsonl").write_text(dump(held), encoding="utf-8")
        for side in sides:
            t0 = time.time()
            cmd = [sys.executable, __file__, "--child", side, "--workdir", str(work), *(argv if argv is not None else sys.argv[1:])]
            r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            if r.returncode:
                raise SystemExit(f"side {side} failed ({r.returncode})")
            results[side] = json.loads((work / f"{side}.json").read_text())
            results[side]["wall_s"] = round(time.time() - t0, 1)
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "workdir")}, "rows": len(train_rows),
              "held_out_rows": len(held), "defaults": TrainConfig().model_dump(include={"lora_r", "lora_alpha", "target_modules"}),
              "results": results}
    lines = ["| side | tokens | train s | tokens/s | peak RSS MB | loss step 1 | loss step N | held-out loss |",
             "|---|---|---|---|---|---|---|---|"]
    for side, r in results.items():
        lines.append(f"| {side} | {r['tokens']} | {r['train_runtime_s']} | {r['tokens_per_s']} | {r['peak_rss_mb']} | "
                     f"{r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {r['held_out_loss']:.4f} |")
    if {"qtalign", "trl"} <= set(results):
        q, t = results["qtalign"], results["trl"]
        report["speedup"] = round(q["tokens_per_s"] / t["tokens_per_s"], 2)
        report["rss_ratio"] = round(q["peak_rss_mb"] / t["peak_rss_mb"], 3)
        report["max_step_loss_diff"] = round(max(abs(a - b) for a, b in zip(q["losses"], t["losses"])), 4)
        report["held_out_loss_diff"] = round(abs(q["held_out_loss"] - t["held_out_loss"]), 4)
        lines.append("")
        lines.append(f"speedup (tokens/s) {report['speedup']}x; peak RSS ratio {report['rss_ratio']}; max per-step train "
                     f"loss difference {report['max_step_loss_diff']}; held-out loss difference {report['held_out_loss_diff']}")
    md = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(f"# Training throughput ({args.model}, {args.dtype}, {args.steps} steps x batch "
                                      f"{args.batch_size})\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
