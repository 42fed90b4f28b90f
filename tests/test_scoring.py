"""The engine's exactness: prefix caching, batching and padding must not change any score."""

import copy

import pytest
import torch

from conftest import tiny_model
from qtalign.engine.forward import ModelParts
from qtalign.errors import QtalignError
from qtalign.scoring.scorer import ScoreRequest, Scorer
from qtalign.tasks.specs import load_specs


def _requests(task_name="snli", lang="de", variant="native", n=24):
    t = load_specs().task(task_name)
    words = t.label_words(lang, variant)
    reqs = []
    for i in range(n):
        # varied lengths so that batches are padded; long enough to cross Gemma3's sliding window (24)
        fields = {f: " ".join(["Ein Mann fährt Rad"] * (1 + i % 7)) + f" {i}" for f in t.item_fields}
        prefix, q = t.prompt_parts(lang, variant, fields)
        reqs.append(ScoreRequest(i, f"{task_name}/{lang}", prefix, q, list(words)))
    return reqs


def _run(model, tok, method, bs, cache, reqs):
    s = Scorer(model, tok, method, batch_size=bs, prefix_cache=cache)
    return {r.key: r for r in s.score(copy.deepcopy(reqs))}


@pytest.mark.parametrize("method", ["first-token", "sequence", "faithful"])
def test_cached_equals_uncached_and_batch_size_invariant(tiny, method):
    model, tok = tiny
    reqs = _requests()
    ref = _run(model, tok, method, 1, False, reqs)
    for bs, cache in [(1, True), (8, True), (32, True), (8, False)]:
        got = _run(model, tok, method, bs, cache, reqs)
        for k, r in ref.items():
            assert got[k].pred == r.pred, (bs, cache, k)
            tol = 1e-4 * max(1.0, max(abs(x) for x in r.raw))
            assert max(abs(a - b) for a, b in zip(got[k].raw, r.raw)) <= tol, (bs, cache, k)
            assert max(abs(a - b) for a, b in zip(got[k].probs, r.probs)) <= 1e-4


def test_sequence_scores_are_exact_log_likelihoods(tiny):
    """Brute force: one full forward per (item, class) over prompt + label tokens, no cache, no batching."""
    model, tok = tiny
    reqs = _requests(n=6)
    got = _run(model, tok, "sequence", 4, True, reqs)
    for r in reqs:
        prompt = r.prefix + r.question
        pids = tok(prompt)["input_ids"]
        for c, w in enumerate(r.words):
            full = tok(prompt + w)["input_ids"]
            assert full[: len(pids)] == pids
            cont = full[len(pids):]
            with torch.no_grad():
                logits = model(torch.tensor([full])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            ref = sum(float(lp[len(pids) - 1 + j, t]) for j, t in enumerate(cont))
            assert abs(got[r.key].raw[c] - ref) < 1e-3, (r.key, w)


def test_first_token_mass_matches_full_model_softmax(tiny):
    model, tok = tiny
    reqs = _requests(n=5)
    s = Scorer(model, tok, "first-token", batch_size=3)
    got = {r.key: r for r in s.score(copy.deepcopy(reqs))}
    for r in reqs:
        ids = tok(r.prefix + r.question)["input_ids"]
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        sets = s.candidates(r.words).sets
        assert [round(float(p[x].sum()), 5) for x in sets] == [round(m, 5) for m in got[r.key].raw]


def test_unmerged_adapter_uses_the_direct_head_product(spm_tokenizer):
    """Through peft the engine still finds the decoder and multiplies by the output weight directly, and the
    adapter changes the scores."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", spm_tokenizer)
    reqs = _requests(n=4)
    ref = _run(base, spm_tokenizer, "first-token", 4, True, reqs)
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    parts = ModelParts.of(peft_model)
    assert parts.decoder is peft_model.get_base_model().model
    got = _run(peft_model, spm_tokenizer, "first-token", 4, True, reqs)
    assert any(abs(got[k].raw[0] - ref[k].raw[0]) > 1e-6 for k in ref)
    merged = peft_model.merge_and_unload()
    again = _run(merged, spm_tokenizer, "first-token", 4, True, reqs)
    for k in got:
        assert max(abs(a - b) for a, b in zip(got[k].probs, again[k].probs)) < 1e-5


def test_unsupported_architecture_fails_clearly():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(2, 2)

    with pytest.raises(QtalignError, match="unsupported architecture Odd: cannot find"):
        ModelParts.of(Odd())
