"""A prepared check for a lent GPU, a few minutes long: does qtalign's engine agree with the CPU there, how fast is
it against a plain transformers loop, and how much memory does it take.

1. Agreement: tiny random fp32 models (Llama, Qwen2, Gemma 3 shapes) with identical weights on the CPU and on the
   device; every scoring rule (first-token, faithful, sequence) and the lens's per-layer last-token states: the same
   predictions, and the largest differences (TF32 off). ``--dry`` compares the CPU against itself (the suite runs it).
2. Throughput: a random-weight model with a real model's shapes (``--shape``), prompts of a shared demo block plus a
   query, first-token log-probs through the engine's backend (prefix cache, batches) against a plain transformers
   loop (one uncached forward per prompt, full logits).
3. Peak memory of the engine's run (CUDA: max allocated; CPU: the process's peak RSS).

    python benchmarks/gpu_check.py --json gpu_check.json                  # on the GPU (default shape qwen2.5-0.5b)
    python benchmarks/gpu_check.py --shape qwen1.5-7b --items 64          # a 7B-shaped random model
    python benchmarks/gpu_check.py --dry                                  # CPU against CPU, tiny shapes (seconds)

Exits 1 when an agreement check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import torch

# real models' shapes (hidden, layers, heads, kv heads, intermediate, vocab); "tiny" for --dry
SHAPES = {
    "tiny": (64, 2, 4, 2, 128, 2000),
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936),
    "qwen1.5-1.8b": (2048, 24, 16, 16, 5504, 151936),
    "qwen1.5-7b": (4096, 32, 32, 32, 11008, 151936),
    "qwen1.5-14b": (5120, 40, 40, 40, 13696, 152064),
}
RULES = ("first-token", "faithful", "sequence")


def _tokenizer(workdir: Path):
    """A byte-level BPE tokenizer trained here on the default specs' prompts (no download)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from qtalign.tasks.specs import load_specs

    specs = load_specs()
    lines = []
    for t in specs.tasks.values():
        for lang in t.languages:
            for v in ("enout", "native"):
                lines += t.prompt(lang, v, {f: "a man rides a bike" for f in t.item_fields}).splitlines()
    bt = ByteLevelBPETokenizer()
    bt.train_from_iterator(lines * 2, vocab_size=2000, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bt._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(workdir / "tok")
    return AutoTokenizer.from_pretrained(workdir / "tok")


def _config(arch: str, shape: str, vocab: int | None = None):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    h, n_layers, heads, kv, inter, v = SHAPES[shape]
    common = dict(vocab_size=vocab or v, hidden_size=h, intermediate_size=inter, num_hidden_layers=n_layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common, initializer_range=0.3)
    if arch == "qwen2":
        return Qwen2Config(**common, initializer_range=0.3 if shape == "tiny" else 0.02)
    return Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=16, sliding_window=24, initializer_range=0.3,
                            layer_types=["sliding_attention", "full_attention"] * (n_layers // 2))


def _requests(n: int):
    from qtalign.scoring.scorer import ScoreRequest
    from qtalign.tasks.specs import load_specs

    t = load_specs().task("snli")
    reqs = []
    for lang in ("de", "zh"):
        words = t.label_words(lang, "native")
        for i in range(n):
            fields = {f: " ".join(["Ein Mann fährt Rad"] * (1 + i % 5)) + f" {i}" for f in t.item_fields}
            prefix, q = t.prompt_parts(lang, "native", fields)
            reqs.append(ScoreRequest(f"{lang}{i}", f"snli/{lang}", prefix, q, list(words)))
    return reqs


def agreement(device: str, tok, items: int) -> list[dict]:
    """Per architecture and rule: predictions equal and the largest probability difference, device vs CPU."""
    from transformers import AutoModelForCausalLM

    from qtalign.engine.forward import Prompt, encode_prompts
    from qtalign.scoring.scorer import Scorer

    rows, reqs = [], _requests(items)
    for arch in ("llama", "qwen2", "gemma3"):
        torch.manual_seed(0)
        cpu = AutoModelForCausalLM.from_config(_config(arch, "tiny", len(tok)), dtype=torch.float32).eval()
        dev = copy.deepcopy(cpu).to(device)
        for rule in RULES:
            a = {s.key: s for s in Scorer(cpu, tok, rule, batch_size=4).score(copy.deepcopy(reqs))}
            b = {s.key: s for s in Scorer(dev, tok, rule, batch_size=4).score(copy.deepcopy(reqs))}
            diff = max(abs(x - y) for k in a for x, y in zip(a[k].probs, b[k].probs))
            same = all(a[k].pred == b[k].pred for k in a)
            rows.append({"arch": arch, "check": rule, "same_predictions": same, "max_prob_diff": diff,
                         "ok": same and diff < 1e-4})
        enc = encode_prompts(tok, [Prompt(r.key, r.group, r.prefix, r.prefix + r.question) for r in reqs])
        states = []
        for m in (cpu, dev):
            sc = Scorer(m, tok, batch_size=4)
            states.append({k: s.cpu() for b in sc.engine.run(enc, capture="last") for k, s in zip(b.keys, b.layer_last)})
        diff = max(float((states[0][k] - states[1][k]).abs().max()) for k in states[0])
        rows.append({"arch": arch, "check": "lens states", "same_predictions": True, "max_prob_diff": diff, "ok": diff < 1e-3})
    return rows


def _peak_memory(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)


def throughput(device: str, shape: str, items: int, batch_size: int, dtype: torch.dtype) -> dict:
    """first-token log-probs of ``items`` prompts (a 300-token demo block + a 30-60-token query): the engine's backend
    against one uncached full-logits forward per prompt. Random weights and ids: speed only."""
    from transformers import AutoModelForCausalLM

    from qtalign.engine.backend import TorchBackend
    from qtalign.engine.forward import Encoded, Engine

    torch.manual_seed(0)
    cfg = _config("qwen2", shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    demo = torch.randint(10, cfg.vocab_size, (300,), generator=g).tolist()
    enc = [Encoded(i, "g", demo + torch.randint(10, cfg.vocab_size, (30 + i % 31,), generator=g).tolist(), len(demo))
           for i in range(items)]
    ids = {e.key: list(range(100, 140)) for e in enc}
    backend = TorchBackend(Engine(model, batch_size=batch_size))
    list(backend.next_logprobs(enc[:2], ids))  # warm-up (kernels specialise per shape on first use)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ours = dict(backend.next_logprobs(enc, ids))
    t_ours = time.perf_counter() - t0
    peak = _peak_memory(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for e in enc:
            lp = torch.log_softmax(model(torch.tensor([e.ids], device=device)).logits[0, -1].float(), -1)
            lp[ids[e.key]].tolist()
    t_plain = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    return {"shape": shape, "params_M": round(n_params / 1e6, 1), "dtype": str(dtype).split(".")[-1], "items": len(ours),
            "batch_size": batch_size, "engine_items_per_s": round(items / t_ours, 2),
            "plain_items_per_s": round(items / t_plain, 2), "speedup": round(t_plain / t_ours, 2), "peak_memory_MiB": round(peak)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU against CPU, tiny shapes (what the test suite runs)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry)")
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="throughput model shape (default qwen2.5-0.5b; tiny with --dry)")
    ap.add_argument("--items", type=int, default=None, help="throughput prompts (default 128; 8 with --dry)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="throughput dtype (default bf16; fp32 with --dry)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    device = a.device or ("cpu" if a.dry else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry for the CPU-against-CPU check", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok = _tokenizer(Path(d))
    t0 = time.time()
    rows = agreement(device, tok, 3 if a.dry else 8)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype or ("fp32" if a.dry else "bf16")]
    speed = throughput(device, a.shape or ("tiny" if a.dry else "qwen2.5-0.5b"), a.items or (8 if a.dry else 128),
                       a.batch_size, dtype)
    from qtalign.environment import environment

    out = {"device": device if device == "cpu" else torch.cuda.get_device_name(device), "dry": a.dry, "agreement": rows,
           "throughput": speed, "seconds": round(time.time() - t0, 1), "environment": environment()}
    for r in rows:
        print(f"{r['arch']:7s} {r['check']:12s} same predictions: {r['same_predictions']}  max diff {r['max_prob_diff']:.2e}"
              f"  {'ok' if r['ok'] else 'FAIL'}")
    print(json.dumps(speed))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
