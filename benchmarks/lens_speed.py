"""Logit-lens speed: qtalign's lens vs the official wrapper approach, same model, same items, one run.

qtalign (`qtalign.analysis.lens.lens_group`): batched prompts, each language's demo block computed once (prefix KV cache),
forward hooks keep only the last position of every layer's residual stream, and only those L+1 vectors per item
are unembedded.

Official approach (`llamawrapper.py` + `zsm_emotion_2shot.py`, docs/notes_research.md §2), re-implemented here:
batch 1, the full prompt every time, every decoder layer wrapped so that at **every position** it unembeds (final
norm + LM head) four streams: block output, attention output, attention output + residual, MLP output; the full
model forward (logits at every position); then the lens script unembeds the stacked block outputs at every
position again and keeps the last one. This re-implementation is, if anything, faster than the original: it takes
the MLP output from a hook instead of re-running the MLP, and it discards each unembedded tensor after use instead
of keeping all of them on the layers.

Both sides report, per item and layer, the probability mass of the gold English / output-language label words
(the evaluation's first-token sets) and the entropy; the script checks they agree on the block-output stream
(layers 1..L; the official lens has no embedding-layer entry) and prints the per-item times and their ratio.

    python benchmarks/lens_speed.py                        # Gemma 3 270M, emotion (native), zh+de, 5 demo items each
    python benchmarks/lens_speed.py --tiny --items 2       # smoke test: tiny random Gemma-3 body, real 262k vocabulary
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qtalign.tasks.items import DataSource, load_items
from qtalign.engine.forward import ModelParts
from qtalign.analysis.lens import METRICS, item_sets, lens_group, lens_sets
from qtalign.engine.models import LoadedModel, ModelConfig, embedded_model_dir, load_model, load_tokenizer
from qtalign.scoring.scorer import Scorer
from qtalign.tasks.specs import load_specs


class OfficialWrapper:
    """Forward hooks reproducing llamawrapper.BlockOutputWrapper's work at every position of every layer."""

    def __init__(self, model):
        self.model = model
        self.parts = ModelParts.of(model)
        self.handles = []
        self.block_out: list[torch.Tensor | None] = [None] * self.parts.num_layers
        self._resid: dict[int, torch.Tensor] = {}

    def install(self):
        """Wrap every layer (only while the official path runs: the hooks must not slow the other side down)."""
        for i, layer in enumerate(self.parts.layers):
            self.handles += [
                layer.register_forward_pre_hook(self._pre(i), with_kwargs=True),
                layer.self_attn.register_forward_hook(self._attn(i)),
                layer.mlp.register_forward_hook(self._mlp(i)),
                layer.register_forward_hook(self._block(i)),
            ]

    def unembed(self, h):  # the wrapper's unembed_matrix(norm(x)): the LM head at every position
        return self.parts.head(self.parts.norm(h))

    def _pre(self, i):
        def hook(_m, args, kwargs):
            self._resid[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _attn(self, i):
        def hook(_m, _a, out):
            attn = out[0] if isinstance(out, tuple) else out
            self.unembed(attn)  # attn_mech_output_unembedded
            self.unembed(attn + self._resid[i])  # intermediate_res_unembedded

        return hook

    def _mlp(self, i):
        def hook(_m, _a, out):
            self.unembed(out)  # mlp_output_unembedded

        return hook

    def _block(self, i):
        def hook(_m, _a, out):
            h = out[0] if isinstance(out, tuple) else out
            self.block_out[i] = h
            self.unembed(h)  # block_output_unembedded

        return hook

    @torch.inference_mode()
    def last_position_probs(self, ids: list[int]) -> torch.Tensor:
        """(L, V) per-layer distributions at the last position, as zsm_emotion_2shot.py computes them."""
        self.install()
        try:
            self.model(torch.tensor([ids]))  # get_logits: full forward, logits at every position
        finally:
            self.remove()
        latents = torch.stack([b[0] for b in self.block_out])  # (L, T, d)
        logits = self.unembed(latents)  # nn.Sequential(norm, lm_head)(latents): every position
        return logits[:, -1, :].float().softmax(-1)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def official_stats(wrapper: OfficialWrapper, ids: list[int], sets: dict[str, list[int]]) -> dict[str, np.ndarray]:
    p = wrapper.last_position_probs(ids)
    out = {m: p[:, s].sum(-1).double().numpy() if s else np.zeros(p.shape[0]) for m, s in sets.items()}
    out["entropy"] = (-(p * p.clamp_min(1e-45).log2()).sum(-1)).double().numpy()
    return out


def tiny_gemma() -> LoadedModel:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    tok = load_tokenizer(str(embedded_model_dir()))
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, sliding_window=32, layer_types=["sliding_attention", "full_attention"],
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return LoadedModel(model, tok, {"name": "tiny-gemma3 (random, 262k vocab)", "dtype": "bf16"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--tiny", action="store_true", help="tiny random Gemma-3 body with the real tokenizer (smoke test)")
    ap.add_argument("--task", default="emotion")
    ap.add_argument("--variant", default="native")
    ap.add_argument("--langs", default="zh,de")
    ap.add_argument("--items", type=int, default=5, help="items per language")
    ap.add_argument("--data-dir", help="official layout (default: the project's demo data)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)

    torch.manual_seed(0)
    lm = tiny_gemma() if a.tiny else load_model(ModelConfig(name=a.model, dtype=a.dtype))
    task = load_specs().task(a.task)
    src = DataSource(data_dir=a.data_dir) if a.data_dir else DataSource.demo()
    langs = [x for x in a.langs.split(",") if x]
    items = {lang: load_items(task, lang, src)[: a.items] for lang in langs}
    sc = Scorer(lm.model, lm.tokenizer, "first-token", a.batch_size)

    # warm-up (not timed): CPU kernels are specialised per tensor shape on first use (the first pass over new
    # shapes ran 5-10x slower here), so our side runs once over all items and the official side over one item
    w = OfficialWrapper(lm.model)
    lang0 = langs[0]
    for lang in langs:
        lens_group(lm, task, lang, a.variant, items[lang], a.batch_size, True, sc)
    from qtalign.engine.forward import encode_prompts

    def ids_of(lang, it, forced):
        return encode_prompts(lm.tokenizer, sc.prompts([_req(task, lang, a.variant, it, forced)]))[0].ids

    s0 = lens_sets(sc, task, lang0, a.variant)
    official_stats(w, ids_of(lang0, items[lang0][0], s0.forced), item_sets(s0, items[lang0][0].gold))

    t_ours = t_off = c_ours = c_off = 0.0
    n = 0
    max_diff = {m: 0.0 for m in METRICS}
    tokens = []
    for lang in langs:
        its = items[lang]
        t, c = time.perf_counter(), time.process_time()
        r = lens_group(lm, task, lang, a.variant, its, a.batch_size, True, sc)
        t_ours += time.perf_counter() - t
        c_ours += time.process_time() - c
        sets = lens_sets(sc, task, lang, a.variant)
        by = {it.index: it for it in its}
        for row, idx in enumerate(r.index):
            it = by[int(idx)]
            ids = ids_of(lang, it, sets.forced)
            tokens.append(len(ids))
            t, c = time.perf_counter(), time.process_time()
            o = official_stats(w, ids, item_sets(sets, it.gold))
            t_off += time.perf_counter() - t
            c_off += time.process_time() - c
            for m in METRICS:
                max_diff[m] = max(max_diff[m], float(np.abs(r.arrays[m][row, 1:] - o[m]).max()))
            n += 1
    ours, off = t_ours / n, t_off / n
    parts = ModelParts.of(lm.model)
    res = {
        "model": lm.info.get("name"), "dtype": lm.info.get("dtype"), "layers": parts.num_layers, "vocab": int(parts.head.weight.shape[0]),
        "task": a.task, "variant": a.variant, "langs": langs, "items": n, "mean_prompt_tokens": round(float(np.mean(tokens)), 1),
        "batch_size": a.batch_size, "ours_s_per_item": round(ours, 4), "official_s_per_item": round(off, 4),
        "speedup": round(off / ours, 1), "ours_cpu_s_per_item": round(c_ours / n, 4), "official_cpu_s_per_item": round(c_off / n, 4),
        "speedup_cpu_time": round(c_off / max(c_ours, 1e-9), 1), "max_abs_diff_block_output": {m: float(f"{v:.3g}") for m, v in max_diff.items()},
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    print(f"model {res['model']} ({res['dtype']}), {parts.num_layers} layers, vocab {res['vocab']}; {n} items "
          f"({', '.join(langs)}), {res['mean_prompt_tokens']} prompt tokens on average")
    print("                    wall s/item   CPU s/item (all threads)")
    print(f"  qtalign lens      {ours:11.3f}   {c_ours / n:10.3f}")
    print(f"  official wrapper  {off:11.3f}   {c_off / n:10.3f}")
    print(f"  speedup           {off / ours:10.1f}x   {c_off / max(c_ours, 1e-9):9.1f}x")
    print("  max |difference| on the block-output stream, layers 1..L: "
          + ", ".join(f"{m} {v:.2g}" for m, v in max_diff.items()))
    tol = 5e-2 if res["dtype"] == "bf16" else 1e-4
    ok = all(v <= tol * (20 if m == "entropy" else 1) for m, v in max_diff.items())
    print("  agreement:", "OK" if ok else f"MISMATCH (tolerance {tol})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0 if ok else 1


def _req(task, lang, variant, it, forced):
    from qtalign.scoring.scorer import ScoreRequest

    prefix, q = task.prompt_parts(lang, variant, it.fields)
    return ScoreRequest(it.index, f"{task.name}/{variant}/{lang}", prefix, q, [], forced=forced)


if __name__ == "__main__":
    sys.exit(main())
