"""Integration tests on the real embedded Gemma 3 270M (a handful of items).

The first run converts the GGUF from the PyPI package into a cached bf16 folder (~1-2 min); later runs load it in
seconds."""


import pytest

from conftest import assert_prefix_cache_exact

from qtalign.tasks.items import DataSource, load_items
from qtalign.engine.models import ModelConfig, embedded_model_dir, load_model
from qtalign.scoring.scorer import ScoreRequest, Scorer
from qtalign.tasks.specs import load_specs
from qtalign.tasks.tokens import candidate_sets, label_continuation, token_bytes_table

pytestmark = pytest.mark.gemma


@pytest.fixture(scope="module")
def gemma32():
    return load_model(ModelConfig(dtype="fp32"))


def test_embedded_model_is_cached_as_a_bf16_folder(gemma32):
    d = embedded_model_dir()
    assert (d / "config.json").exists() and any(d.glob("*.safetensors"))
    assert gemma32.info["source"] == str(d) and gemma32.info["class"] == "Gemma3ForCausalLM"
    assert len(gemma32.tokenizer) >= 262144


def test_candidate_sets_on_the_real_sentencepiece_vocabulary(gemma32):
    tok = gemma32.tokenizer
    table = token_bytes_table(tok)
    specs = load_specs()
    for t in specs.tasks.values():
        for lang in specs.order:
            words = t.label_words(lang, "native")
            cs = candidate_sets(tok, words)
            prompt = "x\n" + t.lang(lang).answer_cue
            pids = tok(prompt)["input_ids"]
            for w, s in zip(words, cs.sets):
                assert all(w.encode().startswith(table[i]) for i in s)
                first = label_continuation(tok, pids, prompt, w)[0]
                assert first in s or first in cs.shared, (t.name, lang, w)


def _reqs(lang="de", n=3):
    t = load_specs().task("emotion")
    items = load_items(t, lang, DataSource.demo())[:n]
    out = []
    for it in items:
        prefix, q = t.prompt_parts(lang, "native", it.fields)
        out.append(ScoreRequest(it.index, f"emotion/{lang}", prefix, q, t.label_words(lang, "native")))
    return out


@pytest.mark.parametrize("method", ["first-token", "sequence"])
def test_prefix_cache_and_batching_are_exact_on_gemma(gemma32, method):
    reqs = _reqs()
    assert_prefix_cache_exact(gemma32, reqs, method)


def test_bf16_model_scores_a_few_items():
    lm = load_model()  # the default: embedded model in bf16
    reqs = _reqs("zh", 2)
    res = list(Scorer(lm.model, lm.tokenizer).score(reqs))
    assert len(res) == 2 and all(abs(sum(r.probs) - 1) < 1e-6 for r in res)
    assert all(r.raw[0] > 0 and r.raw[1] > 0 for r in res)  # both classes get probability mass
