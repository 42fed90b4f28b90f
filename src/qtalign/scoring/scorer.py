"""Scoring label words on top of the engine: first-token (the paper's constrained decoding), faithful (the
official decision rule, for exact comparison) and sequence (exact multi-token log-likelihood).

Every method returns, per item, raw per-class numbers, class probabilities normalised over the classes, and the
predicted class. Contextual calibration (Zhao et al., 2021) divides the class probabilities by those of
content-free queries rendered in the same prompt and renormalises.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from transformers import DynamicCache

from qtalign.engine.forward import Engine, Prompt, encode_prompts
from qtalign.errors import QtalignError
from qtalign.tasks.tokens import CandidateSets, candidate_sets, common_prefix, label_continuation

METHODS = ("first-token", "faithful", "sequence")
CONTENT_FREE = ("N/A", "", "[MASK]")


@dataclass
class ScoreRequest:
    key: Any
    group: str
    prefix: str  # shared demo block + newline
    question: str  # the query, ending with the answer cue
    words: list[str]  # label word per class (identical within a group)
    forced: str = ""  # text appended after the answer cue before scoring (common label prefix)


@dataclass
class ItemScore:
    key: Any
    raw: list[float]  # first-token: probability mass per class; sequence: summed log-prob per class
    probs: list[float]  # normalised over the classes
    pred: int
    extra: dict = field(default_factory=dict)


def normalise(xs: list[float]) -> list[float]:
    s = sum(xs)
    if s <= 0 or not math.isfinite(s):
        return [1.0 / len(xs)] * len(xs)
    return [x / s for x in xs]


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    if not math.isfinite(m):
        return [1.0 / len(xs)] * len(xs)
    e = [math.exp(x - m) for x in xs]
    return normalise(e)


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def calibrate(probs: list[float], content_free: list[float]) -> list[float]:
    """Contextual calibration: p_c / p_cf_c, renormalised."""
    return normalise([p / max(q, 1e-12) for p, q in zip(probs, content_free)])


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


class Scorer:
    def __init__(
        self,
        model,
        tokenizer,
        method: str = "first-token",
        batch_size: int = 8,
        prefix_cache: bool = True,
        length_norm: bool = False,
        seed: int = 0,
    ):
        if method not in METHODS:
            raise QtalignError(f"unknown scoring method '{method}' (choose from {', '.join(METHODS)})")
        self.tokenizer = tokenizer
        self.method = method
        self.length_norm = length_norm
        self.seed = seed  # the faithful rule's random tie-breaking (one generator per group)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.engine = Engine(model, pad_id=pad, batch_size=batch_size, prefix_cache=prefix_cache)
        self._sets: dict[tuple[str, ...], CandidateSets] = {}

    # -- candidate sets ---------------------------------------------------------------------------------
    def candidates(self, words: list[str]) -> CandidateSets:
        key = tuple(words)
        if key not in self._sets:
            self._sets[key] = candidate_sets(self.tokenizer, words)
        return self._sets[key]

    def plan(self, words: list[str]) -> tuple[str, list[str]]:
        return plan_words(self.candidates, words)

    # -- scoring -----------------------------------------------------------------------------------------
    def _prompts(self, reqs: list[ScoreRequest]) -> list[Prompt]:
        return [Prompt(r.key, r.group, r.prefix, r.prefix + r.question + r.forced) for r in reqs]

    def score(self, requests: Iterable[ScoreRequest], progress=None) -> Iterator[ItemScore]:
        reqs = list(requests)
        if not reqs:
            return
        if self.method == "first-token":
            planned = []
            for r in reqs:
                forced, words = self.plan(r.words)
                planned.append(dataclasses.replace(r, forced=r.forced + forced, words=words))
            yield from self._first_token(planned, progress)
        elif self.method == "sequence":
            yield from self._sequence(reqs, progress)
        else:
            from qtalign.scoring.faithful import faithful_scores

            yield from faithful_scores(self, reqs, progress)

    @torch.inference_mode()
    def _first_token(self, reqs: list[ScoreRequest], progress) -> Iterator[ItemScore]:
        by_key = {r.key: r for r in reqs}
        enc = encode_prompts(self.tokenizer, self._prompts(reqs))
        for b in self.engine.run(enc, progress=progress):
            logp = torch.log_softmax(self.engine.parts.unembed(b.last_hidden), dim=-1)
            for row, key in enumerate(b.keys):
                r = by_key[key]
                sets = self.candidates(r.words).sets
                mass = [float(logp[row, s].exp().sum()) if s else 0.0 for s in sets]
                yield ItemScore(key, mass, normalise(mass), argmax(mass), {"forced_prefix": r.forced} if r.forced else {})

    @torch.inference_mode()
    def _sequence(self, reqs: list[ScoreRequest], progress) -> Iterator[ItemScore]:
        """Exact log P(label | prompt) for every class: the prompt runs once (prefix from the group cache);
        every class's continuation is scored from that item's KV cache."""
        by_key = {r.key: r for r in reqs}
        prompts = self._prompts(reqs)
        enc = encode_prompts(self.tokenizer, prompts)
        text = {p.key: p.text for p in prompts}
        parts = self.engine.parts
        for b in self.engine.run(enc, keep_cache=True, progress=progress):
            logp_first = torch.log_softmax(parts.unembed(b.last_hidden), dim=-1)
            enc_by_key = {e.key: e for e in enc if e.key in set(b.keys)}
            rows = []
            for row, key in enumerate(b.keys):
                r, e = by_key[key], enc_by_key[key]
                conts = [label_continuation(self.tokenizer, e.ids, text[key], w) for w in r.words]
                rows.append((key, conts, [float(logp_first[row, c[0]]) for c in conts]))
            pairs = [(row, c) for row, (_, conts, _) in enumerate(rows) for c in conts if len(c) > 1]
            rest = iter(self._continuations(b, pairs) if pairs else [])
            for key, conts, lps in rows:
                lps = [lp + (next(rest) if len(c) > 1 else 0.0) for lp, c in zip(lps, conts)]
                raw = [lp / len(c) if self.length_norm else lp for lp, c in zip(lps, conts)]
                probs = softmax(raw)
                yield ItemScore(key, raw, probs, argmax(raw), {"label_tokens": [len(c) for c in conts]})

    def _continuations(self, b, pairs: list[tuple[int, list[int]]]) -> list[float]:
        """Sum of the log-probs of tokens 2..n of each (batch row, label tokens) pair, for all multi-token labels of
        a batch in one forward. Each pair's context (its row's cache without the pads) is right-aligned in a new
        cache, left pads masked, so the label tokens follow it contiguously (the sliding-window distances stay
        true); their positions are passed explicitly."""
        dev = self.engine.device
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
        ids = torch.full((R, T), self.engine.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((R, N + T), dtype=torch.long, device=dev)
        mask[:, :N] = (torch.arange(N, device=dev)[None, :] >= (N - n_ctx)[:, None]).long()
        for j, (_, c) in enumerate(pairs):
            ids[j, : len(c) - 1] = torch.tensor(c[:-1], device=dev)
            mask[j, N : N + len(c) - 1] = 1
        pos = n_ctx[:, None] + torch.arange(T, device=dev)[None, :]
        out = self.engine.parts.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        sel_row = torch.tensor([j for j, (_, c) in enumerate(pairs) for _ in c[1:]], device=dev)
        sel_pos = torch.tensor([t for _, c in pairs for t in range(len(c) - 1)], device=dev)
        target = torch.tensor([x for _, c in pairs for x in c[1:]], device=dev)
        lp = torch.log_softmax(self.engine.parts.unembed(out.last_hidden_state[sel_row, sel_pos]), dim=-1)
        tok_lp = lp[torch.arange(len(target), device=dev), target]
        sums = torch.zeros(R, dtype=tok_lp.dtype, device=dev).index_add_(0, sel_row, tok_lp)
        return [float(x) for x in sums]


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

