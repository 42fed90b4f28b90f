"""The paper's constrained decoding: the probability mass of each class's first-token candidate set at the answer
position (tasks/tokens.py builds the sets; labels sharing a common prefix are scored in two steps)."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import torch

from qtalign.engine.forward import encode_prompts
from qtalign.errors import QtalignError
from qtalign.scoring.base import ItemScore, ScoreRequest, argmax, normalise


def plan_words(candidates, words: list[str]) -> tuple[str, list[str]]:
    """(forced prefix, scored words). First-token scoring needs every class to own at least one token. When the label
    words share a common prefix (both Thai sentiment words start with 'เชิง'), that prefix is appended to the prompt
    and the remainders are scored: the paper's Thai two-step, derived for any language. ``candidates``: words ->
    CandidateSets."""
    cs = candidates(words)
    if not cs.empty_classes:
        return "", list(words)
    cp = os.path.commonprefix(words)
    rest = [w[len(cp) :] for w in words]
    if cp and all(rest) and not candidates(rest).empty_classes:
        return cp, rest
    bad = [words[i] for i in cs.empty_classes]
    raise QtalignError(
        f"label words {words}: no token can begin {bad} without also beginning another class's word; "
        "use --method sequence for these labels"
    )


def class_sums(values: list[float], sets: list[list[int]], exp: bool) -> list[float]:
    """Per class, the float32 sum over its candidate set (``values`` holds the sets' entries one after another) of the
    probabilities, or of exp(log-prob) with ``exp``: the arithmetic the scores were always computed with."""
    out, k = [], 0
    for s in sets:
        t = torch.tensor(values[k : k + len(s)], dtype=torch.float32)
        out.append(float((t.exp() if exp else t).sum()) if s else 0.0)
        k += len(s)
    return out


def first_token_scores(scorer, reqs: list[ScoreRequest], progress=None) -> Iterator[ItemScore]:
    planned = []
    for r in reqs:  # the caller's requests are left as they are
        forced, words = scorer.plan(r.words)
        planned.append(dataclasses.replace(r, forced=r.forced + forced, words=words))
    by_key = {r.key: r for r in planned}
    enc = encode_prompts(scorer.tokenizer, scorer.prompts(planned))
    flat = {r.key: [t for s in scorer.candidates(r.words).sets for t in s] for r in planned}
    for key, lps in scorer.backend.next_logprobs(enc, flat, progress=progress):
        r = by_key[key]
        mass = class_sums(lps, scorer.candidates(r.words).sets, exp=True)
        yield ItemScore(key, mass, normalise(mass), argmax(mass), {"forced_prefix": r.forced} if r.forced else {})
