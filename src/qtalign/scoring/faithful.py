"""The official evaluation scripts' decision rule, reproduced for exact comparison (``--method faithful``).

Differences from ``first-token`` (see docs/scoring.md):
- candidate sets are a vocabulary lookup of every character prefix of the label, with and without the
  SentencePiece ``▁``, plus the byte-fallback token of the label's first UTF-8 byte for non-ASCII labels, plus (for
  byte-level BPE tokenizers, the official 'Qwen' rule) the first token of every prefix tokenised alone. Tokens
  shared by two classes are kept in both sets;
- ties between classes are broken at random (seeded per item, so that the outcome of an item does not depend on
  which other items a run scores), and in an exact three-way tie neutral cannot win;
- a task's declared special case (Thai native emotion) appends ``tokenizer(prefix)`` with the default special
  tokens (a BOS in mid-sequence for tokenizers that add one) and scores the label remainders;
- correctness is the scripts' string comparison with the stored gold word (see :func:`official_correct`).
"""

from __future__ import annotations

import functools
import random
import weakref
from typing import Iterator

from qtalign.engine.forward import Prompt, encode_prompts
from qtalign.scoring.base import ItemScore, normalise
from qtalign.scoring.first_token import class_sums
from qtalign.tasks.tokens import _is_byte_level


_VOCABS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _vocab(tokenizer) -> dict[str, int]:
    """tokenizer.get_vocab(), cached per tokenizer (it rebuilds a dict every call: ~0.5 s for a 262k vocabulary)."""
    n = len(tokenizer)
    hit = _VOCABS.get(tokenizer)
    if hit is None or hit[0] != n:
        hit = (n, tokenizer.get_vocab())
        _VOCABS[tokenizer] = hit
    return hit[1]


def official_candidates(tokenizer, word: str) -> list[int]:
    vocab = _vocab(tokenizer)
    prefixes = [word[:i] for i in range(1, len(word) + 1)]
    ids = {vocab[t] for t in ["▁" + p for p in prefixes] + prefixes if t in vocab}
    if word and ord(word[0]) > 127:
        byte_tok = f"<0x{word[0].encode('utf-8')[0]:02X}>"
        if byte_tok in vocab:
            ids.add(vocab[byte_tok])
    if _is_byte_level(tokenizer):
        for p in prefixes:
            t = tokenizer(p, add_special_tokens=False)["input_ids"]
            if t:
                ids.add(t[0])
    return sorted(ids)


def official_decision(mass: list[float], rng: random.Random) -> int:
    """Strictly greatest class wins; pairwise ties by randint(0,1); a full 3-way tie never picks the middle class."""
    best = max(mass)
    tied = [i for i, m in enumerate(mass) if m == best]
    if len(tied) == 1:
        return tied[0]
    if len(tied) == 2:
        return tied[0] if rng.randint(0, 1) == 1 else tied[1]
    return 0 if rng.randint(0, 1) >= 2 / 3 else len(mass) - 1


def faithful_scores(scorer, reqs, progress=None) -> Iterator[ItemScore]:
    tok = scorer.tokenizer
    cands = functools.cache(functools.partial(official_candidates, tok))  # a word's candidate set, once per call
    prompts = [Prompt(r.key, r.group, r.prefix, r.prefix + r.question,
                      append_ids=tok(r.forced, add_special_tokens=True)["input_ids"] if r.forced else []) for r in reqs]
    by_key = {r.key: r for r in reqs}
    enc = encode_prompts(tok, prompts)
    flat = {r.key: [t for w in r.words for t in cands(w)] for r in reqs}
    for key, probs in scorer.backend.next_logprobs(enc, flat, probs=True, progress=progress):
        r = by_key[key]
        rng = random.Random(f"{scorer.seed}:{key}")
        mass = class_sums(probs, [cands(w) for w in r.words], exp=False)
        yield ItemScore(key, mass, normalise(mass), official_decision(mass, rng), {"forced_prefix": r.forced} if r.forced else {})


def special_case(task, lang: str, variant: str) -> dict | None:
    """The task's declared faithful special case for a language and variant (e.g. Thai native emotion)."""
    info = task.variants_info.get(variant) or task.variants_info.get({"irrelevant": "irrelative"}.get(variant, variant)) or {}
    return (info.get("special_cases") or {}).get(lang)


def official_correct(task, lang: str, variant: str, pred: int, gold_word: str | None) -> bool:
    """The official scripts' string test of a prediction against the stored gold word."""
    if gold_word is None:
        return False
    c = task.classes[pred]
    ls = task.lang(lang)
    if ls.data_label_words == {k: k for k in task.classes}:  # the data stores English class words (PAWS)
        return gold_word == c
    if variant == "native":
        return ls.label_words[c].startswith(gold_word)
    return gold_word == (ls.script_label_words.get(c) or "")
