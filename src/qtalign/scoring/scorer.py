"""The scorer: one object per model that scores label words on top of the engine, with a registry of scoring rules.

    first-token   the paper's constrained decoding (scoring/first_token.py)
    faithful      the official scripts' decision rule, for exact comparison (scoring/faithful.py)
    sequence      exact multi-token log-likelihood (scoring/sequence.py)

Rules ask the scorer's backend (engine/backend.py: the native torch engine, or a vLLM / SGLang server) for token-id
log-probs; tokenisation, candidate sets and the decision stay here. Every rule returns, per item, raw per-class numbers, class probabilities normalised over the classes, and the
predicted class; calibration is in scoring/calibration.py. A new rule is a function ``(scorer, requests, progress)
-> Iterator[ItemScore]`` added to ``METHOD_FUNCTIONS`` and to the ``method`` choices of eval/config.py.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from qtalign.engine.backend import TorchBackend
from qtalign.engine.forward import Engine, Prompt
from qtalign.tokenids import pad_id
from qtalign.engine.models import context_length
from qtalign.errors import NonFiniteError, QtalignError
from qtalign.scoring.base import ItemScore, ScoreRequest, usable
from qtalign.scoring.faithful import faithful_scores
from qtalign.scoring.first_token import first_token_scores, plan_words
from qtalign.scoring.sequence import sequence_scores
from qtalign.tasks.tokens import CandidateSets, candidate_sets

METHOD_FUNCTIONS: dict[str, Callable[..., Iterator[ItemScore]]] = {
    "first-token": first_token_scores,
    "faithful": faithful_scores,
    "sequence": sequence_scores,
}
METHODS = tuple(METHOD_FUNCTIONS)


class Scorer:
    """``model``: a (peft-wrapped) causal LM, scored by the native engine, or a backend object (engine/backend.py:
    ``next_logprobs`` / ``continuation_logprobs``), e.g. a vLLM server's client."""

    def __init__(self, model, tokenizer, method: str = "first-token", batch_size: int = 8, prefix_cache: bool = True,
                 length_norm: bool = False, seed: int = 0, batch_tokens: int | None = None):
        if method not in METHOD_FUNCTIONS:
            raise QtalignError(f"unknown scoring method '{method}' (choose from {', '.join(METHOD_FUNCTIONS)})")
        self.tokenizer = tokenizer
        self.method = method
        self.length_norm = length_norm  # sequence: mean instead of summed token log-prob
        self.seed = seed  # the faithful rule's random tie-breaking (one generator per group)
        if hasattr(model, "next_logprobs"):
            self.backend, self.engine = model, getattr(model, "engine", None)
            # the native engine's model, or what a server says of its own (vLLM: max_model_len)
            self.context = context_length(self.engine.parts.model) if self.engine is not None else getattr(model, "context", None)
        else:
            self.engine = Engine(model, pad_id=pad_id(tokenizer), batch_size=batch_size, prefix_cache=prefix_cache,
                                 batch_tokens=batch_tokens)
            self.backend = TorchBackend(self.engine)
            self.context = context_length(model)
        self._sets: dict[tuple[str, ...], CandidateSets] = {}

    def candidates(self, words: list[str]) -> CandidateSets:
        key = tuple(words)
        if key not in self._sets:
            self._sets[key] = candidate_sets(self.tokenizer, words)
        return self._sets[key]

    def plan(self, words: list[str]) -> tuple[str, list[str]]:
        return plan_words(self.candidates, words)

    def too_long(self, reqs: Iterable[ScoreRequest]) -> tuple[ScoreRequest, int] | None:
        """The first request whose prompt and longest label word need more positions than the model's context, with
        that number of tokens; None when all fit. A text of fewer UTF-8 bytes than the context (less a margin for
        special tokens) fits without being tokenized: a token covers at least one byte."""
        if not self.context:
            return None
        for r in reqs:
            text = r.prefix + r.question + r.forced
            if len(text.encode("utf-8")) + 64 < self.context:
                continue
            label = max((len(self.tokenizer(w, add_special_tokens=False)["input_ids"]) for w in r.words), default=0)
            n = len(self.tokenizer(text, add_special_tokens=True)["input_ids"]) + label
            if n > self.context:
                return r, n
        return None

    def prompts(self, reqs: list[ScoreRequest]) -> list[Prompt]:
        return [Prompt(r.key, r.group, r.prefix, r.prefix + r.question + r.forced) for r in reqs]

    def score(self, requests: Iterable[ScoreRequest], progress=None) -> Iterator[ItemScore]:
        """One ItemScore per request (in engine order: grouped, longest first); the requests are not modified."""
        reqs = list(requests)
        if not reqs:
            return
        for s in METHOD_FUNCTIONS[self.method](self, reqs, progress):
            if not usable(s.raw):  # host floats already: no device sync added
                group = next((r.group for r in reqs if r.key == s.key), "?")
                raise NonFiniteError(f"{group}: item {s.key}: the model produced non-finite class scores "
                                   f"({', '.join(f'{x:g}' for x in s.raw)}): its weights or activations are NaN/inf; "
                                   "evaluation stopped, nothing of it was recorded as a result")
            yield s
