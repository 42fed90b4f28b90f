"""The forward engine every stage stands on: batched, length-sorted, prefix-cached inference.

Prompts of one *group* (one task x language x variant) share their few-shot demonstration block. The engine
tokenizes every full prompt, takes the longest token prefix the group's prompts share with the tokenized
demo block, runs it once, and reuses its KV cache for every batch of the group. Suffixes are right-padded:
with the shared prefix in the cache, right padding keeps every real token at its true position (no position-id
shifts, no pads between prefix and query), and the padded tail is never attended to by real tokens. Logits are
never computed here: callers unembed only the positions they need (see :func:`ModelParts.unembed`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterable, Iterator

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from qtalign.errors import QtalignError
from qtalign.tokenids import lcp

# The version of the engine's numerics: part of every evaluation fingerprint. Bump it when a change to the forward
# pass (kernels, batching, caching, dtype handling) can change a score, so that stored results computed before are
# not mixed with new ones.
NUMERICS_VERSION = "1"


@dataclass
class Prompt:
    key: Any  # caller's identifier
    group: str  # prompts of one group share `prefix`
    prefix: str  # shared text (demonstrations + newline); may be ''
    text: str  # the full prompt (starts with prefix)
    append_ids: list[int] = field(default_factory=list)  # token ids appended after tokenisation (faithful mode)


@dataclass
class Encoded:
    key: Any
    group: str
    ids: list[int]
    prefix_len: int = 0  # tokens shared with the group's cached prefix


def by_group(encoded: Iterable[Encoded]) -> dict[str, list[Encoded]]:
    """Encoded prompts by group, the groups in order of first appearance, each in the caller's order."""
    groups: dict[str, list[Encoded]] = {}
    for e in encoded:
        groups.setdefault(e.group, []).append(e)
    return groups


def encode_prompts(tokenizer, prompts: Iterable[Prompt]) -> list[Encoded]:
    """Tokenize full prompts (with the tokenizer's default special tokens, as the paper) and find each group's
    shared token prefix. Tokenizing the full text keeps boundary tokens exactly as the model would see them."""
    prompts = list(prompts)
    enc = tokenizer([p.text for p in prompts], add_special_tokens=True)["input_ids"]
    out = [Encoded(p.key, p.group, list(ids) + list(p.append_ids)) for p, ids in zip(prompts, enc)]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.group, []).append(i)
    for g, idx in groups.items():
        prefix = prompts[idx[0]].prefix
        if not prefix:
            continue
        pids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
        n = len(pids)
        for i in idx:
            if prompts[i].prefix != prefix:
                raise ValueError(f"group {g} has prompts with different prefixes")
            n = min(n, lcp(pids, out[i].ids), len(out[i].ids) - 1)
        for i in idx:
            out[i].prefix_len = n
    return out


@dataclass
class ModelParts:
    """The pieces of a causal LM the engine and the lens need, found generically (Llama, Mistral, Qwen2,
    Gemma3, ... and any of them wrapped by peft)."""

    model: Any  # what was passed (maybe a PeftModel)
    decoder: Any  # the transformer body: embeddings, layers, final norm
    layers: Any
    norm: Any
    embed: Any
    head: Any  # output embedding module
    softcap: float | None
    # the adapter state this model's forwards run in: a context manager factory, for a model that shares its weights
    # with others (engine/models.py's ModelSet: base and tuned are one model, adapters switched); None for a model of
    # its own
    switch: Any = None

    @classmethod
    def of(cls, model) -> "ModelParts":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = getattr(base, "model", None)
        if decoder is not None and hasattr(decoder, "language_model") and not hasattr(decoder, "layers"):
            decoder = decoder.language_model  # multimodal wrappers (e.g. Gemma3ForConditionalGeneration)
        if decoder is None and hasattr(base, "get_decoder"):
            decoder = base.get_decoder()
        layers = getattr(decoder, "layers", None)
        norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        embed = getattr(decoder, "embed_tokens", None)
        missing = [n for n, v in (("decoder", decoder), ("decoder.layers", layers), ("final norm", norm), ("LM head", head), ("embed_tokens", embed)) if v is None]
        if missing:
            raise QtalignError(
                f"unsupported architecture {type(base).__name__}: cannot find its {', '.join(missing)} "
                "(supported: decoder-only models with model.layers, model.norm and an output embedding, e.g. Llama, Mistral, Qwen2, Gemma3)"
            )
        cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        return cls(model, decoder, layers, norm, embed, head, getattr(cfg, "final_logit_softcapping", None),
                   getattr(model, "adapter_context", None))

    def active(self):
        """The context every call into the model's modules runs in: its adapter state set on entry, the previous one
        restored on exit (also after an exception)."""
        return self.switch() if self.switch is not None else nullcontext()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (float32) for already-normalised hidden states. Multiplies by the output weight directly:
        through peft's wrapped lm_head module the same product ran ~7x slower on CPU."""
        head = self.head
        if type(head) is torch.nn.Linear or not hasattr(head, "base_layer"):
            w = head.weight  # on its own device when a model is spread over several (device_map)
            logits = torch.nn.functional.linear(h.to(w.device, w.dtype), w, getattr(head, "bias", None))
        else:  # the head itself is adapted (LoRA on lm_head): call the module, in this model's adapter state
            with self.active():
                logits = head(h.to(head.weight.device, head.weight.dtype))
        logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def lens(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + unembedding of a residual-stream state (the logit lens)."""
        return self.unembed(self.final_norm(h.to(self.norm.weight.device, self.norm.weight.dtype)))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm, in this model's adapter state where an adapter replaced it (peft modules_to_save)."""
        with self.active() if hasattr(self.norm, "modules_to_save") else nullcontext():
            return self.norm(h)


def compile_parts(parts: "ModelParts") -> None:
    """Fuse the element-wise work of every decoder layer's MLP and norms (activation, gating, RMSNorm's casts and
    scaling: about 40 % of a CPU forward) into compiled kernels with torch.compile, dynamic shapes (one graph for every
    batch shape). In place, once per model."""
    if getattr(parts.decoder, "_qtalign_compiled", False):
        return
    for layer in parts.layers:
        for name, child in layer.named_modules():
            # the MLP, and every norm of the layer (Gemma 3 and Qwen 3 also normalise q and k inside attention)
            if name == "mlp" or type(child).__name__.endswith(("RMSNorm", "LayerNorm")):
                child.compile(dynamic=True)  # nn.Module.compile: in place, parameter names unchanged
    parts.decoder._qtalign_compiled = True


@dataclass
class Batch:
    keys: list
    group: str
    ids: torch.Tensor  # (B, T) suffix ids, right-padded
    lengths: torch.Tensor  # (B,) real suffix lengths
    prefix_len: int
    last_hidden: torch.Tensor  # (B, d) final-normed hidden state at each row's last real token
    layer_last: torch.Tensor | None = None  # (B, L+1, d) residual stream at the last token: embeddings, layer 1..L
    layer_states: list[torch.Tensor] | None = None  # L+1 tensors (B, T, d): residual stream over the suffix
    prefix_states: list[torch.Tensor] | None = None  # L+1 tensors (P, d): residual stream over the shared prefix
    cache: Any = None  # the KV cache after the batch (prefix + padded suffix), when asked for
    sizes: list[int] = field(default_factory=list)  # the real suffix lengths on the host (no device read per row)


class Engine:
    """Runs encoded prompts through the model in length-sorted batches, caching each group's prefix. A batch holds
    ``batch_size`` prompts, or with ``batch_tokens`` as many as fit that many token positions (rows x (cached prefix +
    longest suffix): what its KV cache holds), at least one."""

    def __init__(self, model, pad_id: int = 0, batch_size: int = 8, prefix_cache: bool = True,
                 batch_tokens: int | None = None):
        self.parts = model if isinstance(model, ModelParts) else ModelParts.of(model)
        self.pad_id = pad_id
        self.batch_size = max(1, int(batch_size))
        self.batch_tokens = int(batch_tokens) if batch_tokens else None
        self.prefix_cache = prefix_cache
        p = next(self.parts.decoder.parameters())
        self.device = p.device

    # -- capture of per-layer residual streams via forward hooks -------------------------------------------
    def _hooks(self, store: list, select):
        def make(i):
            def hook(_mod, _args, out):
                h = out[0] if isinstance(out, tuple) else out
                store[i] = select(h)

            return hook

        mods = [self.parts.embed, *self.parts.layers]
        return [m.register_forward_hook(make(i)) for i, m in enumerate(mods)]

    def _forward(self, ids, mask, cache, capture: str | None, last_idx=None):
        n = self.parts.num_layers + 1
        store: list = [None] * n
        handles = []
        # captures come back to the engine's device (a spread model's layers live on several)
        if capture == "last":
            rows = torch.arange(ids.shape[0], device=ids.device)
            handles = self._hooks(store, lambda h: h[rows.to(h.device), last_idx.to(h.device)].float().to(self.device))
        elif capture == "all":
            handles = self._hooks(store, lambda h: h.float().to(self.device))
        try:
            with self.parts.active():
                out = self.parts.decoder(input_ids=ids, attention_mask=mask, cache=cache, use_cache=cache is not None)
        finally:
            for h in handles:
                h.remove()
        return out, (store if capture else None)

    def _prefix(self, ids: list[int], capture: str | None):
        cache = DynamicCache()
        t = torch.tensor([ids], device=self.device)
        _, store = self._forward(t, torch.ones_like(t), cache, "all" if capture == "all" else None)
        states = [s[0] for s in store] if store else None
        return cache, states

    @staticmethod
    def _expand(cache: DynamicCache, b: int) -> DynamicCache:
        """The group's prefix cache for a batch of b rows, as stride-0 views: the suffix's cache update (a concat)
        writes the one copy each row needs, instead of a copy of the prefix and then another of prefix + suffix."""
        new = DynamicCache()
        for i, layer in enumerate(cache.layers):
            new.update(layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1), i)
        return new

    def order(self, encoded: list[Encoded]) -> list[list[Encoded]]:
        """Batches: grouped by prefix group (first-appearance order), longest suffix first within a group."""
        batches = []
        for es in by_group(encoded).values():
            es = sorted(es, key=lambda e: -(len(e.ids) - (e.prefix_len if self.prefix_cache else 0)))
            if self.batch_tokens:
                batches += self._split(es)
            else:
                batches += [es[i : i + self.batch_size] for i in range(0, len(es), self.batch_size)]
        return batches

    def _split(self, es: list[Encoded]) -> list[list[Encoded]]:
        """A group's prompts (longest suffix first) packed into batches of at most ``batch_tokens`` positions: each
        row holds the prefix and the batch's longest suffix, its first prompt's length."""
        out: list[list[Encoded]] = []
        for e in es:
            if out and (len(out[-1]) + 1) * len(out[-1][0].ids) <= self.batch_tokens:
                out[-1].append(e)
            else:
                out.append([e])
        return out

    @torch.inference_mode()
    def run(
        self, encoded: list[Encoded], capture: str | None = None, keep_cache: bool = False, progress=None
    ) -> Iterator[Batch]:
        """Yield one :class:`Batch` per batch. ``capture``: None | 'last' (residual stream of every layer at the
        last token) | 'all' (every layer over the whole suffix, and the prefix once per group)."""
        current_group, prefix = None, None
        for batch in self.order(encoded):
            g = batch[0].group
            plen = batch[0].prefix_len if self.prefix_cache else 0
            if g != current_group:
                current_group = g
                prefix = self._prefix(batch[0].ids[:plen], capture) if plen else (None, None)
            suffixes = [e.ids[plen:] for e in batch]
            sizes = [len(s) for s in suffixes]
            T = max(sizes)
            # built on the host, then one copy each to the device (no per-row transfers)
            ids = pad_sequence([torch.tensor(s, dtype=torch.long) for s in suffixes], batch_first=True,
                               padding_value=self.pad_id)
            lengths = torch.tensor(sizes)
            mask = torch.cat([torch.ones((len(batch), plen), dtype=torch.long),
                              (torch.arange(T)[None, :] < lengths[:, None]).long()], dim=1)
            ids, lengths, mask = ids.to(self.device), lengths.to(self.device), mask.to(self.device)
            cache = self._expand(prefix[0], len(batch)) if plen else (DynamicCache() if keep_cache else None)
            last_idx = lengths - 1
            out, store = self._forward(ids, mask, cache, capture, last_idx)
            h = out.last_hidden_state  # on the last layer's device
            rows = torch.arange(len(batch), device=h.device)
            b = Batch(
                keys=[e.key for e in batch],
                group=g,
                ids=ids,
                lengths=lengths,
                prefix_len=plen,
                last_hidden=h[rows, last_idx.to(h.device)],
                cache=cache if keep_cache else None,
                sizes=sizes,
            )
            if capture == "last":
                b.layer_last = torch.stack(store, dim=1)
            elif capture == "all":
                b.layer_states = store
                b.prefix_states = prefix[1]
            yield b
            if progress is not None:
                progress.update(len(batch))

    @torch.inference_mode()
    def continuations(self, b: Batch, pairs: list[tuple[int, list[int]]]) -> list[list[float]]:
        """Log-probs of tokens 2..n of each (batch row, label tokens) pair, for all multi-token labels of a batch
        (run with ``keep_cache=True``) in one forward. Each pair's context (its row's cache without the pads) is
        right-aligned in a new cache, left pads masked, so the label tokens follow it contiguously (the sliding-window
        distances stay true); their positions are passed explicitly."""
        dev = self.device
        R = len(pairs)
        sizes = b.sizes or b.lengths.tolist()  # the host's lengths: no device read per pair
        ctx = [b.prefix_len + sizes[row] for row, _ in pairs]
        n_ctx = torch.tensor(ctx).to(dev)
        N = max(ctx)
        T = max(len(c) - 1 for _, c in pairs)
        src_rows = torch.tensor([row for row, _ in pairs]).to(dev)
        # source index of every slot of the right-aligned context (left pad slots read slot 0; they are masked)
        src = (torch.arange(N, device=dev)[None, :] - (N - n_ctx)[:, None]).clamp(min=0)  # (R, N)
        cache = DynamicCache()
        for i, layer in enumerate(b.cache.layers):
            kv = []
            for t in (layer.keys, layer.values):
                t = t[src_rows.to(t.device)]  # (R, H, L, D), on this layer's device
                idx = src.to(t.device)[:, None, :, None].expand(R, t.shape[1], N, t.shape[3])
                kv.append(t.gather(2, idx))
            cache.update(kv[0], kv[1], i)
        # the label tokens and the mask built on the host, then one copy each
        ids = pad_sequence([torch.tensor(c[:-1], dtype=torch.long) for _, c in pairs], batch_first=True,
                           padding_value=self.pad_id)
        n_lab = torch.tensor([len(c) - 1 for _, c in pairs])
        mask = torch.cat([(torch.arange(N)[None, :] >= (N - torch.tensor(ctx))[:, None]).long(),
                          (torch.arange(T)[None, :] < n_lab[:, None]).long()], dim=1)
        ids, mask = ids.to(dev), mask.to(dev)
        pos = n_ctx[:, None] + torch.arange(T, device=dev)[None, :]
        with self.parts.active():
            out = self.parts.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        h = out.last_hidden_state
        sel_row = torch.tensor([j for j, (_, c) in enumerate(pairs) for _ in c[1:]], device=h.device)
        sel_pos = torch.tensor([t for _, c in pairs for t in range(len(c) - 1)], device=h.device)
        lp = torch.log_softmax(self.parts.unembed(h[sel_row, sel_pos]), dim=-1)
        target = torch.tensor([x for _, c in pairs for x in c[1:]], device=lp.device)
        flat = iter(lp[torch.arange(len(target), device=lp.device), target].tolist())  # one copy back per batch
        return [list(islice(flat, len(c) - 1)) for _, c in pairs]
