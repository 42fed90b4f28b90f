"""Token-id helpers shared by the engine, training and the analyses (the bottom layer: no torch, no model)."""

from __future__ import annotations


def pad_id(tokenizer) -> int:
    """The id right-padded batches are filled with (never attended to): the pad token, else EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def lcp(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
