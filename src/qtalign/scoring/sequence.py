"""Exact multi-token label log-likelihood: log P(label | prompt) for every class. The backend scores every label
token given the prompt and the label tokens before it (the torch engine: the prompt once, its prefix from the group's
cache, every class's remaining tokens from that item's KV cache in one batched forward)."""

from __future__ import annotations

from typing import Iterator

import torch

from qtalign.engine.forward import encode_prompts
from qtalign.scoring.base import ItemScore, ScoreRequest, argmax, softmax
from qtalign.tasks.tokens import label_continuation


def _sum_f32(xs: list[float]) -> float:
    """The float32 sum of tokens 2..n's log-probs, accumulated in order (as the scores were always computed)."""
    t = torch.tensor(xs, dtype=torch.float32)
    return float(torch.zeros(1, dtype=torch.float32).index_add_(0, torch.zeros(len(xs), dtype=torch.long), t)[0])


def sequence_scores(scorer, reqs: list[ScoreRequest], progress=None) -> Iterator[ItemScore]:
    """Exact log P(label | prompt) for every class: the first label token's log-prob plus the float32 sum of the
    others'."""
    by_key = {r.key: r for r in reqs}
    prompts = scorer.prompts(reqs)
    enc = encode_prompts(scorer.tokenizer, prompts)
    text = {p.key: p.text for p in prompts}
    conts = {e.key: [label_continuation(scorer.tokenizer, e.ids, text[e.key], w) for w in by_key[e.key].words]
             for e in enc}
    for key, tok_lps in scorer.backend.continuation_logprobs(enc, conts, progress=progress):
        lps = [t[0] + (_sum_f32(t[1:]) if len(t) > 1 else 0.0) for t in tok_lps]
        cs = conts[key]
        raw = [lp / len(c) if scorer.length_norm else lp for lp, c in zip(lps, cs)]
        yield ItemScore(key, raw, softmax(raw), argmax(raw), {"label_tokens": [len(c) for c in cs]})
