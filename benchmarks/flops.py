"""FLOP accounting against the machine's measured peak, for the throughput benchmarks.

- ``matmul_peak(threads, shapes)``: the best bf16 GFLOP/s of ``torch.mm`` on the model's own shapes (hidden x FFN),
  measured now, at the thread count the benchmark uses (the denominator of every efficiency figure).
- ``model_shape(model)``: body parameters (the matrices of the decoder layers: what every computed token multiplies),
  layers, attention heads x head dim, hidden size.
- ``needed_flops(shape, computed, contexts, label_columns)``: what a method needs for the tokens it actually computes
  (pads excluded): 2 x body parameters per token, attention (4 x heads x head dim per query-key pair and layer: QKᵀ and
  AV), and 2 x hidden per label column of the head.

``tests/test_eval_throughput.py`` checks ``needed_flops`` against torch's own FlopCounterMode on a tiny model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    body_params: int  # parameters of the decoder layers' linear maps
    layers: int
    heads: int
    head_dim: int
    hidden: int
    ffn: int


def model_shape(model) -> Shape:
    from qtalign.engine.forward import ModelParts

    parts = ModelParts.of(model)
    cfg = parts.model.config.get_text_config() if hasattr(parts.model.config, "get_text_config") else parts.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Shape(_dedup_linear(parts), parts.num_layers, cfg.num_attention_heads, head_dim, cfg.hidden_size,
                 cfg.intermediate_size)


def _dedup_linear(parts) -> int:
    """Weights of the layers' linear maps, each counted once (a LoRA-wrapped layer by its base weight)."""
    seen, total = set(), 0
    for layer in parts.layers:
        for m in layer.modules():
            base = getattr(m, "base_layer", None)
            lin = base if base is not None else m
            if type(lin).__name__ != "Linear" or id(lin) in seen:
                continue
            seen.add(id(lin))
            total += lin.weight.numel()
    return total


def needed_flops(shape: Shape, computed: int, contexts: list[int], label_columns: int = 0) -> float:
    """FLOPs of ``computed`` tokens whose attention contexts (keys each query attends to, itself included) are
    ``contexts``, plus ``label_columns`` columns of the head at the scored positions."""
    body = 2.0 * shape.body_params * computed
    attn = 4.0 * shape.layers * shape.heads * shape.head_dim * float(sum(contexts))
    head = 2.0 * shape.hidden * label_columns
    return body + attn + head


def prompt_flops(shape: Shape, prefix: int, suffix: int, label_columns: int) -> float:
    """One prompt scored from a cached prefix of ``prefix`` tokens: its ``suffix`` tokens attend to the prefix and to
    each other (causal)."""
    return needed_flops(shape, suffix, [prefix + i + 1 for i in range(suffix)], label_columns)


def matmul_peak(threads: int, shapes: list[tuple[int, int, int]], reps: int = 5, seconds: float = 0.4,
                clock: str = "wall") -> float:
    """Best bf16 GFLOP/s of torch.mm over ``shapes`` (m, k, n) at ``threads`` threads, per second of wall time, or with
    ``clock='cpu'`` per second of this process's CPU time (the peak of a machine shared with other jobs: the time
    another process held the core is not counted, as it is not in the CPU-timed work it is compared with)."""
    import torch

    now = time.process_time if clock == "cpu" else time.perf_counter

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    try:
        for m, k, n in shapes:
            a = torch.randn(m, k, dtype=torch.bfloat16)
            b = torch.randn(k, n, dtype=torch.bfloat16)
            for _ in range(2):
                torch.mm(a, b)
            for _ in range(reps):
                count, t0 = 0, now()
                while now() - t0 < seconds:
                    torch.mm(a, b)
                    count += 1
                best = max(best, 2.0 * m * k * n * count / (now() - t0) / 1e9)
    finally:
        torch.set_num_threads(old)
    return best
