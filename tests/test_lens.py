"""Language logit lens: hooks, last-layer identity, token sets and the dropping rule, invariances, stage output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from analysis_data import write_data
from conftest import tiny_config, tiny_model
from qtalign.tasks.items import DataSource, load_items
from qtalign.engine.forward import Engine, ModelParts, Prompt, encode_prompts
from qtalign.errors import QtalignError
from qtalign.analysis.lens import METRICS, LensConfig, item_sets, lens_group, lens_sets, run_lens
from qtalign.engine.models import LoadedModel
from qtalign.scoring.scorer import Scorer
from qtalign.tasks.specs import load_specs


def _mistral(tok):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    common = {k: v for k, v in tiny_config("llama", len(tok)).to_dict().items()
              if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "max_position_embeddings", "initializer_range")}
    return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()


ARCHS = ["llama", "qwen2", "gemma3", "mistral"]


@pytest.fixture(params=ARCHS)
def arch_model(request):
    tok = request.getfixturevalue("bpe_tokenizer" if request.param == "qwen2" else "spm_tokenizer")
    model = _mistral(tok) if request.param == "mistral" else tiny_model(request.param, tok)
    return request.param, model, tok


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("lens_data"))


def _prompts(task, lang, n=5):
    items = load_items(task, lang, DataSource.demo())[:n]
    out = []
    for it in items:
        prefix, q = task.prompt_parts(lang, "native", it.fields)
        out.append(Prompt(it.index, f"emotion/native/{lang}", prefix, prefix + q))
    return out


def test_hooks_capture_the_residual_stream(arch_model):
    """capture='last' and capture='all' equal HF's output_hidden_states (layer L: the final norm applied), for every
    supported architecture, with the prefix cache and right-padded batches."""
    name, model, tok = arch_model
    task = load_specs().task("emotion")
    prompts = _prompts(task, "de") + _prompts(task, "zh", 3)
    enc = encode_prompts(tok, prompts)
    eng = Engine(model, pad_id=tok.pad_token_id, batch_size=3)
    parts = eng.parts
    L = parts.num_layers
    ref = {}
    with torch.no_grad():
        for e in enc:
            ref[e.key, e.group] = model(torch.tensor([e.ids]), output_hidden_states=True).hidden_states
    seen = 0
    for b in eng.run(enc, capture="last"):
        assert b.layer_last.shape[1:] == (L + 1, model.config.hidden_size)
        for row, key in enumerate(b.keys):
            hs = ref[key, b.group]
            for layer in range(L):
                torch.testing.assert_close(b.layer_last[row, layer], hs[layer][0, -1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(parts.norm(b.layer_last[row, L]), hs[L][0, -1], atol=1e-4, rtol=1e-4)
            seen += 1
    assert seen == len(enc)
    for b in eng.run(enc, capture="all"):
        P = b.prefix_len
        assert P > 0
        for row, key in enumerate(b.keys):
            hs = ref[key, b.group]
            n = int(b.lengths[row])
            for layer in (0, 1, L - 1):
                torch.testing.assert_close(b.layer_states[layer][row, :n], hs[layer][0, P:], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(b.prefix_states[layer], hs[layer][0, :P], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(parts.norm(b.layer_states[L][row, :n]), hs[L][0, P:], atol=1e-4, rtol=1e-4)


def test_last_layer_lens_is_the_model_output(arch_model, data):
    """The final layer's lens statistics equal those of the model's own next-token distribution."""
    name, model, tok = arch_model
    specs = load_specs(data["spec"])
    task = specs.task("emotion")
    src = DataSource(data_dir=data["data_dir"], files=data["files"])
    lm = LoadedModel(model, tok, {})
    for lang in ("zh", "xx"):
        items = load_items(task, lang, src)[:5]
        r = lens_group(lm, task, lang, "native", items, batch_size=4, keep_overlap=True)
        assert len(r.index) == len(items)
        sc = Scorer(model, tok)
        sets = lens_sets(sc, task, lang, "native")
        by = {it.index: it for it in items}
        for row, idx in enumerate(r.index):
            it = by[int(idx)]
            prefix, q = task.prompt_parts(lang, "native", it.fields)
            ids = encode_prompts(tok, [Prompt(0, "g", "", prefix + q + sets.forced)])[0].ids
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].float()
            p = torch.softmax(logits, -1)
            s = item_sets(sets, it.gold)
            for m in ("latent", "out", "all_latent", "all_out", "overlap"):
                assert r.arrays[m][row, -1] == pytest.approx(float(p[s[m]].sum()), abs=1e-5)
            ent = float(-(p * torch.log2(p.clamp_min(1e-45))).sum())
            assert r.arrays["entropy"][row, -1] == pytest.approx(ent, abs=1e-3)
        # intermediate layers differ from the output (the lens is not constant over depth)
        assert not np.allclose(r.arrays["entropy"][:, 0], r.arrays["entropy"][:, -1])


def test_lens_equals_logits_directly(arch_model):
    name, model, tok = arch_model
    task = load_specs().task("emotion")
    enc = encode_prompts(tok, _prompts(task, "en", 3))
    eng = Engine(model, pad_id=tok.pad_token_id, batch_size=2)
    for b in eng.run(enc, capture="last"):
        with torch.no_grad():
            for row, key in enumerate(b.keys):
                e = next(x for x in enc if x.key == key)
                ref = model(torch.tensor([e.ids])).logits[0, -1].float()
                torch.testing.assert_close(eng.parts.lens(b.layer_last[row, -1]), ref, atol=1e-4, rtol=1e-4)


def test_dropping_rule_counts(spm_tokenizer, data):
    """xx's positive label is the English word: every positive item is dropped, no negative one; zh drops none;
    en (identical labels) keeps all. keep_overlap keeps all and the overlap mass is the whole gold mass."""
    model = tiny_model("llama", spm_tokenizer)
    lm = LoadedModel(model, spm_tokenizer, {})
    specs = load_specs(data["spec"])
    task = specs.task("emotion")
    src = DataSource(data_dir=data["data_dir"], files=data["files"])
    n, n_pos = data["n"], data["n_pos"]
    assert 0 < n_pos < n
    xx = load_items(task, "xx", src)
    r = lens_group(lm, task, "xx", "native", xx, batch_size=4)
    assert r.dropped == {"overlap": n_pos}
    assert len(r.index) == n - n_pos and set(r.gold.tolist()) == {1}
    assert np.all(r.arrays["overlap"] == 0)
    for lang in ("zh", "en"):
        rr = lens_group(lm, task, lang, "native", load_items(task, lang, src), batch_size=4)
        assert rr.dropped == {} and len(rr.index) == n
    assert lens_group(lm, task, "en", "native", load_items(task, "en", src)).identical
    k = lens_group(lm, task, "xx", "native", xx, batch_size=4, keep_overlap=True)
    assert k.dropped == {} and len(k.index) == n
    pos = k.gold == 0
    np.testing.assert_allclose(k.arrays["overlap"][pos], k.arrays["latent"][pos], atol=1e-7)
    np.testing.assert_allclose(k.arrays["out"][pos], k.arrays["latent"][pos], atol=1e-7)
    assert np.all(k.arrays["overlap"][~pos] == 0)
    # kept items have the same numbers whether or not the overlapping ones are dropped
    keep = np.isin(k.index, r.index)
    np.testing.assert_allclose(k.arrays["latent"][keep], r.arrays["latent"], atol=1e-6)


def test_every_language_has_sets(spm_tokenizer, bpe_tokenizer):
    """All 20 default languages of every task get sets from the specs (no hard-coded language maps), exactly
    where evaluation's first-token plan works, with the same forced common prefix."""
    specs = load_specs()
    n_ok = 0
    for tok, arch in ((spm_tokenizer, "llama"), (bpe_tokenizer, "qwen2")):
        sc = Scorer(tiny_model(arch, tok), tok)
        for tname in ("emotion", "snli", "paws"):
            task = specs.task(tname)
            assert len(task.languages) == 20
            for lang in task.languages:
                try:
                    forced, _ = sc.plan(task.label_words(lang, "native"))
                except QtalignError:
                    with pytest.raises(QtalignError, match="no token can begin"):
                        lens_sets(sc, task, lang, "native")
                    continue
                s = lens_sets(sc, task, lang, "native")
                assert s.forced == forced
                assert all(s.out) and all(s.en)
                assert s.identical == (task.label_words(lang, "native") == task.classes)
                n_ok += 1
    assert n_ok >= 100


def test_batch_size_does_not_change_results(spm_tokenizer, data):
    model = tiny_model("gemma3", spm_tokenizer)
    lm = LoadedModel(model, spm_tokenizer, {})
    specs = load_specs(data["spec"])
    task = specs.task("emotion")
    items = load_items(task, "zh", DataSource(data_dir=data["data_dir"], files=data["files"]))
    a = lens_group(lm, task, "zh", "native", items, batch_size=1)
    b = lens_group(lm, task, "zh", "native", items, batch_size=7)
    for m in METRICS:
        np.testing.assert_allclose(a.arrays[m], b.arrays[m], atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_fails_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(QtalignError, match="unsupported architecture GPT2LMHeadModel.*final norm"):
        ModelParts.of(m)


def test_run_lens_stage_base_vs_tuned(spm_tokenizer, data, tmp_path):
    base = LoadedModel(tiny_model("llama", spm_tokenizer, seed=0), spm_tokenizer, {"name": "tiny"})
    tuned = LoadedModel(tiny_model("llama", spm_tokenizer, seed=1), spm_tokenizer, {"name": "tiny2"})
    cfg = LensConfig(langs="en,zh,xx", data_dir=data["data_dir"], data_files=data["files"], prompts=[data["spec"]], batch_size=4)
    assert LensConfig(**yaml.safe_load(yaml.safe_dump(cfg.model_dump()))) == cfg
    s = run_lens(cfg, tmp_path, {"base": base, "tuned": tuned}, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert s["stage"] == "lens" and s["dropped"]["emotion/native/xx"] == {"overlap": data["n_pos"]}
    for f in s["figures"]:
        assert (tmp_path / f["path"]).stat().st_size > 1000
    assert {f["path"] for f in s["figures"]} >= {"lens_emotion_native_overview.png", "lens_emotion_native_xx.png"}
    L1 = base.model.config.num_hidden_layers + 1
    a = np.load(tmp_path / "arrays" / "base" / "emotion_native_zh.npz")
    t = np.load(tmp_path / "arrays" / "tuned" / "emotion_native_zh.npz")
    assert a["latent"].shape == (data["n"], L1) and list(a["index"]) == list(t["index"])
    assert not np.allclose(a["out"], t["out"])  # a different model gives different numbers
    lines = (tmp_path / "lens_means.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 2 * 3 * L1
    assert "| xx |" in s["tables"][0]["markdown"]
    assert s["numbers"]["emotion/native/xx/dropped"] == data["n_pos"]
    assert s["numbers"]["base/emotion/native/zh/out_last"] == pytest.approx(float(a["out"].mean(0)[-1]))


def test_cli_with_compare_adapter(tiny_llama_dir, data, tmp_path):
    """`qtalign lens --compare DIR` loads base + LoRA adapter and analyses both on the same items."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qtalign.cli import main

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    pm = get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    args = ["lens", "--model", str(tiny_llama_dir), "--dtype", "fp32", "--data-dir", data["data_dir"], "--data-files", data["files"],
            "--prompts", data["spec"], "--langs", "zh,xx", "--limit", "4", "--batch-size", "3", "--compare", str(tmp_path / "adapter"),
            "--out", str(out)]
    assert main(args + ["--save-config", str(tmp_path / "c.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["lens"]["compare"] == {"tuned": str(tmp_path / "adapter")}
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["models"]) == {"base", "tuned"} and s["models"]["tuned"]["adapter"] == str(tmp_path / "adapter")
    a, t = (np.load(out / "arrays" / n / "emotion_native_zh.npz") for n in ("base", "tuned"))
    assert a["latent"].shape == t["latent"].shape == (4, 3)
    assert not np.allclose(a["entropy"], t["entropy"])
    assert main(["lens", "--out", str(out), "--compare", "base=x"]) == 2  # reserved label: a one-line error


@pytest.mark.gemma
def test_gemma_lens_final_layer(tmp_path):
    """Real Gemma 3 270M, 2 zh demo items: the final-layer lens equals a plain forward's output distribution."""
    from qtalign.engine.models import load_model

    lm = load_model()
    task = load_specs().task("emotion")
    items = load_items(task, "zh", DataSource.demo())[:2]
    r = lens_group(lm, task, "zh", "native", items, batch_size=2)
    sc = Scorer(lm.model, lm.tokenizer)
    sets = lens_sets(sc, task, "zh", "native")
    for row, it in enumerate(items):
        ids = encode_prompts(lm.tokenizer, [Prompt(0, "g", "", task.prompt("zh", "native", it.fields))])[0].ids
        with torch.no_grad():
            p = torch.softmax(lm.model(torch.tensor([ids])).logits[0, -1].float(), -1)
        s = item_sets(sets, it.gold)
        assert r.arrays["out"][row, -1] == pytest.approx(float(p[s["out"]].sum()), abs=0.03)
        assert r.arrays["latent"][row, -1] == pytest.approx(float(p[s["latent"]].sum()), abs=0.03)
    assert r.arrays["latent"].shape == (2, 19)
    # the real tokenizer gives usable sets for all 20 languages of every task (the official script covered 16)
    for tname in ("emotion", "snli", "paws"):
        task = load_specs().task(tname)
        for lang in task.languages:
            s = lens_sets(sc, task, lang, "native")
            assert all(s.out) and all(s.en), (tname, lang)


def test_lens_stats_read_back_per_chunk_equal_the_per_item_reads(spm_tokenizer):
    """lens_stats reads each chunk's numbers back at once (no device read per row and metric): every number equals,
    bit for bit, the per-item computation (each set's mass a float32 sum, the entropy in bits), empty sets 0."""
    import math

    from qtalign.analysis.lens import lens_stats

    model = tiny_model("llama", spm_tokenizer)
    parts = ModelParts.of(model)
    torch.manual_seed(3)
    h = torch.randn(5, parts.num_layers + 1, model.config.hidden_size)
    V = parts.head.weight.shape[0]
    rng = np.random.default_rng(0)
    sets = [{m: sorted(rng.choice(V, size=int(rng.integers(0, 6)), replace=False).tolist()) for m in METRICS if m != "entropy"}
            for _ in range(5)]
    sets[1]["latent"] = []
    got = lens_stats(parts, h, sets, chunk_rows=4)  # chunks that cut rows of one item apart
    L1 = parts.num_layers + 1
    flat = h.reshape(5 * L1, -1)
    with torch.inference_mode():
        for start in range(0, 5 * L1, 4):  # the same chunks, each number read back on its own (as before)
            z = parts.lens(flat[start : start + 4])
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            p = (z - lse).exp_()
            ent = (lse[:, 0] - (p * z).sum(-1)) / math.log(2)
            for k in range(z.shape[0]):
                b, layer = divmod(start + k, L1)
                assert got["entropy"][b, layer] == float(ent[k])
                for m, ids in sets[b].items():
                    want = float(p[k, torch.tensor(ids, dtype=torch.long)].sum()) if ids else 0.0
                    assert got[m][b, layer] == want, (b, layer, m)
    assert got["latent"][1].tolist() == [0.0] * L1 and (got["entropy"] > 0).all()
