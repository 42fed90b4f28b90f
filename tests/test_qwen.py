"""Integration tests on the real embedded Qwen2.5-Coder-0.5B-Instruct (a handful of items; CI installs its extra).

The first run assembles the GGUF from its six part packages, verifies it (size, sha256) and converts it to a cached
bf16 folder (about a minute); later runs load it in seconds. They check the byte-level BPE branch of both label rules
against the real 151,936-token vocabulary, the official decision rule against a re-implementation of the official
scripts' loop, the prefix cache, and the chat template training uses."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import PAPER_PROMPTS, assert_prefix_cache_exact, needs_shared
from qtalign.engine.models import ModelConfig, load_model
from qtalign.engine.registry import embedded
from qtalign.scoring.faithful import official_candidates
from qtalign.scoring.scorer import Scorer
from qtalign.tasks.items import DataSource, load_items
from qtalign.tasks.specs import load_specs
from qtalign.tasks.tokens import _is_byte_level, candidate_sets, label_continuation, prefix_tokens, token_bytes_table

NAME = "qwen2.5-coder-0.5b"
pytestmark = [pytest.mark.qwen, pytest.mark.skipif(not embedded(NAME).installed(),
                                                   reason=f"{NAME} not installed ({embedded(NAME).install_hint()})")]


@pytest.fixture(scope="module")
def qwen32():
    return load_model(ModelConfig(name=NAME, dtype="fp32", device="cpu"))


def _all_label_words(specs):
    for t in specs.tasks.values():
        for lang in specs.order:
            if lang in t.languages:
                for v in ("enout", "native", "irrelevant"):
                    yield t, lang, v, t.label_words(lang, v)


def test_the_model_is_qwen2_with_its_chat_template(qwen32):
    assert qwen32.info["class"] == "Qwen2ForCausalLM" and len(qwen32.tokenizer) >= 151_643
    assert qwen32.info["identity"]["sha256"] == embedded(NAME).sha256
    tok = qwen32.tokenizer
    assert _is_byte_level(tok) and tok.chat_template and tok.eos_token == "<|im_end|>"


def test_byte_table_reassembles_real_prompts(qwen32):
    tok = qwen32.tokenizer
    table = token_bytes_table(tok)
    specs = load_specs()
    for t in specs.tasks.values():
        for lang in t.languages:
            text = t.prompt(lang, "native", {f: "测试 тест δοκιμή ทดสอบ test" for f in t.item_fields})
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert b"".join(table[i] for i in ids) == text.encode("utf-8"), (t.name, lang)


def test_first_token_candidate_sets_on_the_real_byte_level_vocabulary(qwen32):
    """Every candidate's bytes begin the label; the token the tokenizer writes first after the answer cue is a
    candidate (or a token shared by two classes, which is removed); the classes' sets are disjoint."""
    tok = qwen32.tokenizer
    table = token_bytes_table(tok)
    specs = load_specs()
    for t, lang, v, words in _all_label_words(specs):
        cs = candidate_sets(tok, words)
        prompt = "x\n" + t.lang(lang).answer_cue
        pids = tok(prompt)["input_ids"]
        seen: set[int] = set()
        for w, s in zip(words, cs.sets):
            assert all(w.encode("utf-8").startswith(table[i]) for i in s), (t.name, lang, w)
            first = label_continuation(tok, pids, prompt, w)[0]
            assert first in s or first in cs.shared, (t.name, lang, v, w)
            assert not seen & set(s)
            seen |= set(s)


def test_faithful_candidate_sets_follow_the_official_qwen_rule(qwen32):
    """The official scripts' Qwen branch: vocabulary entries equal to a character prefix, plus the first token of every
    prefix tokenised alone. On a byte-level vocabulary every such token writes a prefix of the label's bytes, the
    label's own first token is one of them, and SentencePiece '▁' entries never match."""
    tok = qwen32.tokenizer
    vocab = tok.get_vocab()
    specs = load_specs()
    for _, lang, _, words in _all_label_words(specs):
        for w in words:
            got = set(official_candidates(tok, w))
            assert got <= set(prefix_tokens(tok, w)), (lang, w)
            assert tok(w, add_special_tokens=False)["input_ids"][0] in got, (lang, w)
            firsts = {tok(w[:i], add_special_tokens=False)["input_ids"][0] for i in range(1, len(w) + 1)}
            direct = {vocab[w[:i]] for i in range(1, len(w) + 1) if w[:i] in vocab}
            assert got == firsts | direct, (lang, w)
            assert not any(("▁" + w[:i]) in vocab for i in range(1, len(w) + 1))


def _requests(lang="de", n=3, method="first-token"):
    from qtalign.eval.run import build_requests

    task = load_specs().task("emotion")
    items = load_items(task, lang, DataSource.demo())[:n]
    return build_requests(task, lang, "native", items, method)


@pytest.mark.parametrize("method", ["first-token", "sequence"])
def test_prefix_cache_and_batching_are_exact_on_qwen(qwen32, method):
    reqs = _requests()
    assert_prefix_cache_exact(qwen32, reqs, method)


def test_faithful_rule_equals_the_official_loop_on_real_items(qwen32):
    """Our faithful scorer (batched, prefix-cached) against a re-implementation of the official scripts' loop (batch
    1, full logits, fp32 softmax over the vocabulary) on zh and de items: same decisions, masses within 1e-5."""
    import random
    import sys

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("eval_throughput", ROOT / "benchmarks" / "eval_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("eval_throughput", bench)
    spec.loader.exec_module(bench)
    for lang in ("zh", "de"):
        reqs = _requests(lang, 3, "faithful")
        official = bench.official_scores(qwen32.model, qwen32.tokenizer, reqs, random.Random(0))
        ours = {s.key: s for s in Scorer(qwen32.model, qwen32.tokenizer, "faithful", 3).score(reqs)}
        for k, (pred, mass) in official.items():
            assert ours[k].pred == pred
            assert max(abs(a - b) for a, b in zip(ours[k].raw, mass)) < 1e-5


def test_chat_template_masks_the_real_qwen_prompt(qwen32):
    from qtalign.train.data import encode_example

    tok = qwen32.tokenizer
    prompt = 'Prämisse: Ein Hund läuft.\nHypothese: Ein Tier läuft.\nAntwort: "\nTranslate the input from German to English:\n'
    response = 'Premise: A dog runs.\nHypothesis: An animal runs.\nAnswer: "'
    ex = encode_example(tok, prompt, response, template="chat")
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
    targets = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert tok.decode(targets) == response + "<|im_end|>\n"


@needs_shared
def test_a_few_real_items_evaluate_end_to_end(tmp_path):
    from qtalign.eval.config import EvalConfig
    from qtalign.eval.run import evaluate

    from conftest import OFFICIAL

    cfg = EvalConfig(model=ModelConfig(name=NAME), tasks=["emotion", "snli"], langs=["en", "zh"], limit=4,
                     data_dir=str(OFFICIAL), prompts=[str(PAPER_PROMPTS)], batch_size=4)
    res = evaluate(cfg, tmp_path / "run", progress=False)
    for t in ("emotion", "snli"):
        for lang in ("en", "zh"):
            m = res["metrics"][t]["enout"]["langs"][lang]
            assert m["n"] == 4 and 0 <= m["acc"] <= 1 and 0 <= m["auc"] <= 1
    assert res["model"]["identity"]["sha256"] == embedded(NAME).sha256
