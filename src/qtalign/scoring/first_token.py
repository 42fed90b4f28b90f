"""The paper's constrained decoding: the probability mass of each class's first-token candidate set at the answer
position (tasks/tokens.py builds the sets; labels sharing a common prefix are scored in two steps)."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from qtalign.engine.forward import encode_prompts
from qtalign.errors import QtalignError
from qtalign.scoring.base import ItemScore, ScoreRequest, argmax, normalise
from qtalign.tasks.tokens import common_prefix


def plan_words(candidates, words: list[str]) -> tuple[str, list[str]]:
    """(forced prefix, scored words). First-token scoring needs every class to own at least one token. When the label
    words share a common prefix (both Thai sentiment words start with 'เชิง'), that prefix is appended to the prompt
    and the remainders are scored: the paper's Thai two-step, derived for any language. ``candidates``: words ->
    CandidateSets."""
    cs = candidates(words)
    if not cs.empty_classes:
        return "", list(words)
    cp = common_prefix(words)
    rest = [w[len(cp) :] for w in words]
    if cp and all(rest) and not candidates(rest).empty_classes:
        return cp, rest
    bad = [words[i] for i in cs.empty_classes]
    raise QtalignError(
        f"label words {words}: no token can begin {bad} without also beginning another class's word; "
        "use --method sequence for these labels"
    )


@torch.inference_mode()
def first_token_scores(scorer, reqs: list[ScoreRequest], progress=None) -> Iterator[ItemScore]:
    planned = []
    for r in reqs:  # the caller's requests are left as they are
        forced, words = scorer.plan(r.words)
        planned.append(dataclasses.replace(r, forced=r.forced + forced, words=words))
    by_key = {r.key: r for r in planned}
    enc = encode_prompts(scorer.tokenizer, scorer.prompts(planned))
    for b in scorer.engine.run(enc, progress=progress):
        logp = torch.log_softmax(scorer.engine.parts.unembed(b.last_hidden), dim=-1)
        for row, key in enumerate(b.keys):
            r = by_key[key]
            sets = scorer.candidates(r.words).sets
            mass = [float(logp[row, s].exp().sum()) if s else 0.0 for s in sets]
            yield ItemScore(key, mass, normalise(mass), argmax(mass), {"forced_prefix": r.forced} if r.forced else {})
