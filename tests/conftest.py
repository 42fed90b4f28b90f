"""Shared fixtures: tiny tokenizers of both families trained here, tiny random models built from configs, and
the paths of the shared third-party data (tests that need it skip with a reason when it is absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# the shared result store of the whole test session: a temporary folder, never the user's store
os.environ["QTALIGN_STORE"] = str(Path(__import__("tempfile").mkdtemp(prefix="qtalign-test-store-")))

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QTALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))
OFFICIAL = SHARED / "official"
PAPER_PROMPTS = SHARED / "paper_prompts.json"

needs_shared = pytest.mark.skipif(not PAPER_PROMPTS.exists(), reason=f"shared data not found at {SHARED} (set QTALIGN_SHARED_DATA)")


def pytest_collection_modifyitems(config, items):
    """Real-model tests are slow: `-m "not slow"` runs the fast suite."""
    for item in items:
        if item.get_closest_marker("gemma") or item.get_closest_marker("qwen"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_for_tiny_models():
    """The tiny models run fastest on one thread, and far faster than on two when the CPU is shared; the real-model
    tests (marked gemma / qwen) set their own."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _private_store(tmp_path, monkeypatch):
    """Each test gets its own empty result store (runs and tests never see each other's stored results)."""
    monkeypatch.setenv("QTALIGN_STORE", str(tmp_path / "qtalign-store"))
    monkeypatch.setenv("QTALIGN_PROGRESS", "0")


def _corpus() -> list[str]:
    """Text covering every default spec (fields, label words, demos) and the demo data."""
    from qtalign.tasks.items import demo_data_dir
    from qtalign.tasks.specs import load_specs

    specs = load_specs()
    lines = []
    for t in specs.tasks.values():
        for lang in t.languages:
            for v in ("enout", "native", "irrelevant"):
                lines += t.prompt(lang, v, {f: "" for f in t.item_fields}).splitlines()
            lines += list(t.lang(lang).label_words.values())
    for p in sorted(demo_data_dir().glob("*/*.jsonl")):
        lines += [json.loads(x)["input"] for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [x for x in lines if x.strip()] * 2


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="session")
def spm_tokenizer(tok_dir):
    """SentencePiece BPE with byte fallback (the Llama/Gemma family), as transformers loads it."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    corpus = tok_dir / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    prefix = tok_dir / "spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=2000, model_type="bpe", byte_fallback=True,
        character_coverage=0.98, pad_id=3, bos_id=1, eos_id=2, unk_id=0, num_threads=1, minloglevel=2,
    )
    model_dir = tok_dir / "spm_model"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes(Path(str(prefix) + ".model").read_bytes())
    tok = LlamaTokenizer.from_pretrained(model_dir, add_bos_token=True, pad_token="<pad>")
    out = tok_dir / "spm_hf"
    tok.save_pretrained(out)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="session")
def bpe_tokenizer(tok_dir):
    """Byte-level BPE (the GPT-2/Qwen2 family)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bt = ByteLevelBPETokenizer()
    bt.train_from_iterator(_corpus(), vocab_size=2000, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bt._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    out = tok_dir / "bpe_hf"
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def tiny_config(arch: str, vocab_size: int):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.3, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma3":
        # a short sliding window so that prompts cross it: the cache must stay exact over sliding layers
        return Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=16, sliding_window=24,
                                layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2, pad_token_id=3)
    raise ValueError(arch)


def tiny_model(arch: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)), dtype=torch.float32)
    return model.eval()


ARCH_TOKENIZER = {"llama": "spm_tokenizer", "qwen2": "bpe_tokenizer", "gemma3": "spm_tokenizer"}


@pytest.fixture(params=list(ARCH_TOKENIZER))
def tiny(request):
    """(model, tokenizer) for each tiny architecture with its tokenizer family."""
    tok = request.getfixturevalue(ARCH_TOKENIZER[request.param])
    return tiny_model(request.param, tok), tok


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, spm_tokenizer) -> Path:
    """A tiny Llama saved as a HF folder, for CLI and multi-process tests."""
    d = tmp_path_factory.mktemp("tiny_llama")
    m = tiny_model("llama", spm_tokenizer)
    m.save_pretrained(d)
    spm_tokenizer.save_pretrained(d)
    return d


def assert_prefix_cache_exact(lm, reqs, method: str) -> None:
    """Scores from batches of 3 over the cached prefix equal batch-1 uncached scores (fp32 models)."""
    import copy

    from qtalign.scoring.scorer import Scorer

    ref = {r.key: r for r in Scorer(lm.model, lm.tokenizer, method, 1, False).score(copy.deepcopy(reqs))}
    got = {r.key: r for r in Scorer(lm.model, lm.tokenizer, method, 3, True).score(copy.deepcopy(reqs))}
    assert ref.keys() == got.keys()
    for k in ref:
        assert got[k].pred == ref[k].pred
        assert max(abs(a - b) for a, b in zip(got[k].probs, ref[k].probs)) < 1e-4
