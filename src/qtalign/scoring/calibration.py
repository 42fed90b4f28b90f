"""Contextual calibration (Zhao et al., 2021): class probabilities divided by those of content-free queries ('N/A',
'', '[MASK]' in every item field) rendered in the same prompt, renormalised."""

from __future__ import annotations

from qtalign.scoring.base import ItemScore, ScoreRequest, normalise

CONTENT_FREE = ("N/A", "", "[MASK]")


def calibrate(probs: list[float], content_free: list[float]) -> list[float]:
    """p_c / p_cf_c, renormalised."""
    return normalise([p / max(q, 1e-12) for p, q in zip(probs, content_free)])


def content_free_requests(task, lang: str, variant: str, group: str, words: list[str], forced: str = "") -> list[ScoreRequest]:
    """Content-free queries ('N/A', '', '[MASK]' in every item field) rendered in the same prompt."""
    reqs = []
    for j, cf in enumerate(CONTENT_FREE):
        prefix, q = task.prompt_parts(lang, variant, {f: cf for f in task.item_fields})
        reqs.append(ScoreRequest(key=("cf", j), group=group, prefix=prefix, question=q, words=list(words), forced=forced))
    return reqs


def mean_probs(scores: list[ItemScore]) -> list[float]:
    n = len(scores)
    return [sum(s.probs[c] for s in scores) / n for c in range(len(scores[0].probs))]
