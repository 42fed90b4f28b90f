"""Long CPU training runs and the memory allocator: glibc's malloc vs jemalloc, side by side.

A study's LoRA run on Qwen2.5-Coder-0.5B (1 thread) slowed from ~150 to ~20 tokens/s between steps 50 and 120,
with no change in its work: sampled stacks sat in glibc's posix_memalign. Tensors of a few MB to 32 MB (activations
of batches whose lengths all differ) are carved from glibc's heap, which fragments until each allocation walks long
free lists. This benchmark reproduces that on a random model with the 0.5B model's widths (fewer layers, so that a
step takes seconds): the same `qtalign train` run, once per allocator, each in its own process, and reports tokens/s
per window of steps. The ratio that matters is the last window's against the first, per allocator, and jemalloc's
against glibc's in the same window.

    python benchmarks/allocator.py                      # 6 layers of Qwen 0.5B's widths, 160 steps per allocator
    python benchmarks/allocator.py --layers 4 --steps 60 --window 20

Needs libjemalloc (Debian/Ubuntu: apt install libjemalloc2). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QTALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))
DATA = [SHARED / "official" / "snli" / f"snli_{lang}10k_train_question.json" for lang in ("zh", "de")]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="qwen2.5-coder-0.5b", help="model whose config and tokenizer are used")
    p.add_argument("--layers", type=int, default=6, help="decoder layers of the random model")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--window", type=int, default=40, help="steps per reported window")
    p.add_argument("--allocators", default="glibc,jemalloc")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "allocator"))
    return p.parse_args(argv)


def build_model(source: str, layers: int, dst: Path) -> Path:
    """A random model with the source's widths and vocabulary, `layers` deep, saved with the source's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtalign.engine.models import ModelConfig, load_tokenizer, resolve_source

    src, gguf = resolve_source(ModelConfig(name=source))
    cfg = AutoConfig.from_pretrained(src)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).save_pretrained(dst)
    load_tokenizer(src, gguf).save_pretrained(dst)
    return dst


def jemalloc() -> str | None:
    for p in ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
              "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2"):
        if Path(p).is_file():
            return p
    return None


def run_side(name: str, model: Path, work: Path, steps: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "QTALIGN_ALLOCATOR": "system"}
    env.pop("LD_PRELOAD", None)
    if name == "jemalloc":
        env["LD_PRELOAD"] = jemalloc()
    out = work / name
    cmd = [sys.executable, "-m", "qtalign", "train", "--model", str(model), "--data", ",".join(map(str, DATA)),
           "--template", "raw", "--max-steps", str(steps), "--batch-size", "16", "--per-device-batch-size", "4",
           "--val-size", "0", "--learning-rate", "1e-3", "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines() if '"tokens_per_s"' in x]


def windows(log: list[dict], size: int) -> list[float]:
    """Tokens/s of each window of `size` steps: its tokens over its time."""
    out, prev_t, prev_n = [], 0.0, 0
    for r in log:
        if r["step"] % size == 0:
            out.append((r["tokens"] - prev_n) / (r["elapsed_s"] - prev_t))
            prev_t, prev_n = r["elapsed_s"], r["tokens"]
    return out


def main(argv=None) -> int:
    args = parse(argv)
    sides = args.allocators.split(",")
    if "jemalloc" in sides and jemalloc() is None:
        sys.exit("allocator.py: libjemalloc.so.2 not found (apt install libjemalloc2)")
    with tempfile.TemporaryDirectory(prefix="qtalign-alloc-") as tmp:
        model = build_model(args.source, args.layers, Path(tmp) / "model")
        res = {s: windows(run_side(s, model, Path(tmp), args.steps), args.window) for s in sides}
    head = ["allocator"] + [f"steps {k * args.window + 1}-{(k + 1) * args.window}" for k in range(len(res[sides[0]]))]
    lines = [f"# Allocator over a long run ({args.layers} layers of {args.source}'s widths, 1 thread, bf16, batch 16)", "",
             "tokens/s per window of steps, and the last window's over the first:", "",
             "| " + " | ".join(head + ["last / first"]) + " |", "|" + "---|" * (len(head) + 1)]
    for s, w in res.items():
        lines.append(f"| {s} | " + " | ".join(f"{x:.0f}" for x in w) + f" | {w[-1] / w[0]:.2f} |")
    if len(sides) == 2:
        a, b = res[sides[1]], res[sides[0]]
        lines.append(f"| {sides[1]} / {sides[0]} | " + " | ".join(f"{x / y:.2f}x" for x, y in zip(a, b)) + " | |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"args": vars(args), "tokens_per_s": res}, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
