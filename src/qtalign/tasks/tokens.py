"""Label-word candidate token sets, built the same way for SentencePiece and byte-level BPE tokenizers.

The rule (documented in docs/scoring.md): every vocabulary entry is mapped to the exact bytes it contributes to
the text (SentencePiece ``▁`` = space, ``<0xNN>`` byte-fallback pieces = that byte; byte-level BPE pieces are
mapped back through the GPT-2 byte alphabet). A token *can begin* label word ``w`` when its bytes are a
non-empty prefix of ``w``'s UTF-8 bytes. Because the label directly follows the opening quote of the answer
cue, tokens with a leading space do not qualify. Tokens that can begin the label words of two or more classes
do not tell the classes apart and are removed from every set (they are reported as collisions).
"""

from __future__ import annotations

import re
import weakref
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from qtalign.errors import QtalignError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _gpt2_byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return False
    comps = (getattr(backend, "decoder", None), getattr(backend, "pre_tokenizer", None))
    return any(c is not None and "ByteLevel" in repr(c) for c in comps)


def token_bytes_table(tokenizer) -> list[bytes | None]:
    """For every token id, the bytes it adds to decoded text (None for special/control tokens)."""
    cached = _TABLES.get(tokenizer)
    if cached is not None:
        return cached
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})  # a property that rebuilds a dict: read once
    byte_level = _is_byte_level(tokenizer)
    dec = _gpt2_byte_decoder()
    table: list[bytes | None] = []
    for i, p in enumerate(pieces):
        if p is None or i in special:
            table.append(None)
            continue
        if byte_level:
            try:
                table.append(bytes(dec[ch] for ch in p))
            except KeyError:  # added tokens stored as plain text
                table.append(p.encode("utf-8"))
            continue
        m = _BYTE_PIECE.match(p)
        if m:
            table.append(bytes([int(m.group(1), 16)]))
        elif i in added and p.startswith("<") and p.endswith(">"):
            table.append(None)
        else:
            table.append(p.replace("▁", " ").encode("utf-8"))
    _TABLES[tokenizer] = table
    return table


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prefix_tokens(tokenizer, word: str) -> list[int]:
    """Ids of all tokens whose bytes are a non-empty prefix of ``word``."""
    target = word.encode("utf-8")
    if not target:
        raise QtalignError("empty label word")
    table = token_bytes_table(tokenizer)
    # tokens indexed by their first byte: a 262k vocabulary is scanned once, not once per word
    idx = _FIRST_BYTE.get(tokenizer)
    if idx is None:
        idx = {}
        for i, b in enumerate(table):
            if b:
                idx.setdefault(b[0], []).append(i)
        _FIRST_BYTE[tokenizer] = idx
    return [i for i in idx.get(target[0], []) if target.startswith(table[i])]


_FIRST_BYTE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class CandidateSets:
    words: list[str]
    sets: list[list[int]]  # per class, after removing shared tokens
    shared: list[int]  # tokens that could begin two or more classes' words (removed)

    @property
    def empty_classes(self) -> list[int]:
        return [i for i, s in enumerate(self.sets) if not s]


def candidate_sets(tokenizer, words: list[str]) -> CandidateSets:
    raw = [set(prefix_tokens(tokenizer, w)) for w in words]
    counts = Counter(t for s in raw for t in s)
    shared = sorted(t for t, c in counts.items() if c > 1)
    sets = [sorted(s.difference(shared)) for s in raw]
    return CandidateSets(words=list(words), sets=sets, shared=shared)


def label_continuation(tokenizer, prompt_ids: list[int], prompt: str, label: str) -> list[int]:
    """Token ids of ``label`` as the tokenizer writes it right after ``prompt``."""
    full = tokenizer(prompt + label, add_special_tokens=True)["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids) :]
    return tokenizer(label, add_special_tokens=False)["input_ids"]


def describe_tokens(tokenizer, ids: list[int]) -> list[str]:
    table = token_bytes_table(tokenizer)
    return [(table[i] or b"").decode("utf-8", errors="backslashreplace") for i in ids]
