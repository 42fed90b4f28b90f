"""Exact multi-token label log-likelihood: log P(label | prompt) for every class, the prompt run once (its prefix from
the group's cache) and every class's remaining label tokens scored from that item's KV cache in one batched forward."""

from __future__ import annotations

from typing import Iterator

import torch
from transformers import DynamicCache

from qtalign.engine.forward import encode_prompts
from qtalign.scoring.base import ItemScore, ScoreRequest, argmax, softmax
from qtalign.tasks.tokens import label_continuation


@torch.inference_mode()
def sequence_scores(scorer, reqs: list[ScoreRequest], progress=None) -> Iterator[ItemScore]:
    """Exact log P(label | prompt) for every class: the prompt runs once (prefix from the group cache);
    every class's continuation is scored from that item's KV cache."""
    by_key = {r.key: r for r in reqs}
    prompts = scorer.prompts(reqs)
    enc = encode_prompts(scorer.tokenizer, prompts)
    text = {p.key: p.text for p in prompts}
    parts = scorer.engine.parts
    for b in scorer.engine.run(enc, keep_cache=True, progress=progress):
        logp_first = torch.log_softmax(parts.unembed(b.last_hidden), dim=-1)
        enc_by_key = {e.key: e for e in enc if e.key in set(b.keys)}
        rows = []
        for row, key in enumerate(b.keys):
            r, e = by_key[key], enc_by_key[key]
            conts = [label_continuation(scorer.tokenizer, e.ids, text[key], w) for w in r.words]
            rows.append((key, conts, [float(logp_first[row, c[0]]) for c in conts]))
        pairs = [(row, c) for row, (_, conts, _) in enumerate(rows) for c in conts if len(c) > 1]
        rest = iter(_continuations(scorer.engine, b, pairs) if pairs else [])
        for key, conts, lps in rows:
            lps = [lp + (next(rest) if len(c) > 1 else 0.0) for lp, c in zip(lps, conts)]
            raw = [lp / len(c) if scorer.length_norm else lp for lp, c in zip(lps, conts)]
            probs = softmax(raw)
            yield ItemScore(key, raw, probs, argmax(raw), {"label_tokens": [len(c) for c in conts]})

def _continuations(engine, b, pairs: list[tuple[int, list[int]]]) -> list[float]:
    """Sum of the log-probs of tokens 2..n of each (batch row, label tokens) pair, for all multi-token labels of
    a batch in one forward. Each pair's context (its row's cache without the pads) is right-aligned in a new
    cache, left pads masked, so the label tokens follow it contiguously (the sliding-window distances stay
    true); their positions are passed explicitly."""
    dev = engine.device
    R = len(pairs)
    n_ctx = torch.tensor([b.prefix_len + int(b.lengths[row]) for row, _ in pairs], device=dev)
    N = int(n_ctx.max())
    T = max(len(c) - 1 for _, c in pairs)
    src_rows = torch.tensor([row for row, _ in pairs], device=dev)
    # source index of every slot of the right-aligned context (left pad slots read slot 0; they are masked)
    src = (torch.arange(N, device=dev)[None, :] - (N - n_ctx)[:, None]).clamp(min=0)  # (R, N)
    cache = DynamicCache()
    for i, layer in enumerate(b.cache.layers):
        kv = []
        for t in (layer.keys, layer.values):
            t = t[src_rows]  # (R, H, L, D)
            idx = src[:, None, :, None].expand(R, t.shape[1], N, t.shape[3])
            kv.append(t.gather(2, idx))
        cache.update(kv[0], kv[1], i)
    ids = torch.full((R, T), engine.pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros((R, N + T), dtype=torch.long, device=dev)
    mask[:, :N] = (torch.arange(N, device=dev)[None, :] >= (N - n_ctx)[:, None]).long()
    for j, (_, c) in enumerate(pairs):
        ids[j, : len(c) - 1] = torch.tensor(c[:-1], device=dev)
        mask[j, N : N + len(c) - 1] = 1
    pos = n_ctx[:, None] + torch.arange(T, device=dev)[None, :]
    out = engine.parts.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    sel_row = torch.tensor([j for j, (_, c) in enumerate(pairs) for _ in c[1:]], device=dev)
    sel_pos = torch.tensor([t for _, c in pairs for t in range(len(c) - 1)], device=dev)
    target = torch.tensor([x for _, c in pairs for x in c[1:]], device=dev)
    lp = torch.log_softmax(engine.parts.unembed(out.last_hidden_state[sel_row, sel_pos]), dim=-1)
    tok_lp = lp[torch.arange(len(target), device=dev), target]
    sums = torch.zeros(R, dtype=tok_lp.dtype, device=dev).index_add_(0, sel_row, tok_lp)
    return [float(x) for x in sums]
