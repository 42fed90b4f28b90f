"""LoRA tuning (qtalign.train) on tiny random models: masking, response-only loss, loss falls, resume after a kill,
seeding, merge equivalence, 2-process data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, tiny_model
from qtalign.data import demo_data_dir
from qtalign.engine import ModelParts
from qtalign.errors import QtalignError
from qtalign.models import ModelConfig, load_model
from qtalign.train import (
    Collator,
    TrainConfig,
    encode_example,
    install_response_loss,
    read_log,
    response_loss_sum,
    train,
)


def _toy_records(n: int = 48) -> list[dict]:
    """de/zh -> en question-translation pairs rendered from the demo emotion items (the specs' formats)."""
    from qtalign.qtdata import render_pair
    from qtalign.specs import load_specs

    specs = load_specs()
    task = specs.task("emotion")
    items = {lang: [json.loads(x) for x in (demo_data_dir() / "emotion" / f"{lang}.jsonl").read_text().splitlines() if x.strip()]
             for lang in ("en", "de", "zh")}
    recs = []
    for i in range(n):
        src = ("de", "zh")[i % 2]
        inp, outp = render_pair(task, specs, src, "en", {"input": items[src][i]["input"]}, {"input": items["en"][i]["input"]})
        recs.append({"id": f"toy-{i}", "task": "emotion", "index": i, "src": src, "tgt": "en", "input": inp, "output": outp})
    return recs


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("toy") / "toy.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _toy_records()), encoding="utf-8")
    return p


def _cfg(model_dir, **kw) -> TrainConfig:
    base = dict(model=ModelConfig(name=str(model_dir), dtype="fp32", device="cpu"), batch_size=8, per_device_batch_size=4,
                max_steps=8, eval_steps=2, learning_rate=5e-3, val_size=0.1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def base_run(tiny_llama_dir, toy_file, tmp_path_factory) -> Path:
    """An uninterrupted reference run (seed 0, micro-batch 4, 8 steps, checkpoint + eval every 2)."""
    out = tmp_path_factory.mktemp("run_a")
    train(_cfg(tiny_llama_dir), toy_file, out)
    return out


# -- masking and the loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tok_fixture", ["spm_tokenizer", "bpe_tokenizer"])
def test_prompt_tokens_are_masked_exactly(request, tok_fixture):
    tok = request.getfixturevalue(tok_fixture)
    rec = _toy_records(2)[1]
    ex = encode_example(tok, rec["input"], rec["output"])
    full = tok(rec["input"] + rec["output"])["input_ids"]
    p_ids = tok(rec["input"])["input_ids"]
    assert ex["input_ids"] == full + [tok.eos_token_id]  # tokenizer(prompt + response) + EOS
    n = len(p_ids)
    assert full[:n] == p_ids  # the instruction ends with a newline: no token crosses the boundary here
    assert ex["labels"][:n] == [-100] * n  # the whole prompt, BOS included
    assert ex["labels"][n:] == ex["input_ids"][n:]  # every response token and the EOS are targets
    if tok_fixture == "spm_tokenizer":
        assert ex["input_ids"][0] == tok.bos_token_id
    # truncation: a cutoff inside the prompt leaves no response token -> skipped
    assert encode_example(tok, rec["input"], rec["output"], cutoff_len=n) is None
    cut = encode_example(tok, rec["input"], rec["output"], cutoff_len=n + 3)
    assert len(cut["input_ids"]) == n + 3 and sum(x != -100 for x in cut["labels"]) == 3


def test_boundary_token_is_trained(bpe_tokenizer):
    """A token merging the end of the prompt with the start of the response is masked only where it is common."""
    tok = bpe_tokenizer
    prompt, response = "Answer: pos", "itive"
    ex = encode_example(tok, prompt, response)
    p_ids = tok(prompt)["input_ids"]
    lcp = next((i for i, (a, b) in enumerate(zip(p_ids, ex["input_ids"])) if a != b), min(len(p_ids), len(ex["input_ids"])))
    assert ex["labels"][:lcp] == [-100] * lcp and all(x != -100 for x in ex["labels"][lcp:])


@pytest.mark.parametrize("fused", [True, False])
def test_response_only_loss_equals_full_logits_loss(tiny, fused):
    """Loss and gradients of the response-only projection equal the model's own full-logits loss (fp32)."""
    model, tok = tiny
    model.train()
    if getattr(model.config, "model_type", "") == "gemma3_text":
        model.config.final_logit_softcapping = 5.0  # exercise the soft-capped path
    head = model.get_output_embeddings()
    head.weight.requires_grad_(not fused)  # frozen head -> fused function; trainable -> plain autograd
    recs = _toy_records(3)
    batch = Collator(tok.pad_token_id)([encode_example(tok, r["input"], r["output"]) for r in recs])
    assert (batch["attention_mask"] == 0).any()  # padding is present

    ref = model(**batch).loss
    ref.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    g_ref = [p.grad.clone() for p in params]
    model.zero_grad()

    remove = install_response_loss(model, chunk=5)  # chunk smaller than the target count
    out = model(**batch, qt_response_loss=True)
    loss = out.loss_sum / out.n_tokens
    loss.backward()
    remove()
    assert int(out.n_tokens) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip([p.grad for p in params], g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert "forward" not in vars(model)  # the patch is gone


def test_response_loss_no_grad_path(tiny):
    model, tok = tiny
    parts = ModelParts.of(model)
    recs = _toy_records(2)
    b = Collator(tok.pad_token_id)([encode_example(tok, r["input"], r["output"]) for r in recs])
    with torch.no_grad():
        h = parts.decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        s, n = response_loss_sum(parts, h, b["labels"], chunk=7)
        ref = model(**b).loss
    torch.testing.assert_close(s / n, ref, rtol=1e-5, atol=1e-5)


# -- training runs --------------------------------------------------------------------------------------------


def test_loss_falls_and_outputs(base_run):
    log = read_log(base_run / "trainer_log.jsonl")
    tr = [r for r in log if "loss" in r]
    ev = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in tr] == list(range(1, 9))
    assert [r["step"] for r in ev] == [2, 4, 6, 8]
    assert tr[-1]["loss"] < 0.8 * tr[0]["loss"], [r["loss"] for r in tr]
    assert ev[-1]["eval_loss"] < ev[0]["eval_loss"]
    for k in ("lr", "tokens", "tokens_per_s", "eta_s", "elapsed_s"):
        assert k in tr[-1]
    assert tr[-1]["tokens_per_s"] > 0 and tr[-1]["eta_s"] == 0
    assert tr[0]["lr"] < tr[1]["lr"]  # warmup, then cosine decay
    assert tr[1]["lr"] > tr[-1]["lr"]
    s = json.loads((base_run / "summary.json").read_text())
    assert s["stage"] == "train" and {"figures", "tables", "numbers", "timing_s"} <= set(s)
    assert (base_run / s["figures"][0]["path"]).stat().st_size > 1000
    assert s["numbers"]["steps"] == 8 and s["numbers"]["val_rows"] == 5 and s["numbers"]["train_rows"] == 43
    best = min(ev, key=lambda r: r["eval_loss"])
    assert s["numbers"]["best_step"] == best["step"]
    cfg = json.loads((base_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_killed_run_resumes_to_the_same_weights(base_run, tiny_llama_dir, toy_file, tmp_path):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4:
                raise KeyboardInterrupt("simulated kill after the step-4 checkpoint")

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_llama_dir), toy_file, tmp_path, callbacks=[Kill()])
    assert (tmp_path / "checkpoints" / "checkpoint-4").is_dir() and not (tmp_path / "summary.json").exists()
    s = train(_cfg(tiny_llama_dir), toy_file, tmp_path)
    assert s["numbers"]["resumed_from_step"] == 4
    log_a = read_log(base_run / "trainer_log.jsonl")
    log_b = read_log(tmp_path / "trainer_log.jsonl")
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a]  # no duplicated or lost steps
    for a, b in zip(log_a, log_b):
        for k in ("loss", "eval_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a, b)
    wa, wb = _adapter(base_run), _adapter(tmp_path)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7)
    # finished: rerunning returns the summary without training; another config is refused
    assert train(_cfg(tiny_llama_dir), toy_file, tmp_path)["timing_s"] == s["timing_s"]
    with pytest.raises(QtalignError, match="another config"):
        train(_cfg(tiny_llama_dir, learning_rate=1e-3), toy_file, tmp_path)


def test_seed_decides_the_adapter_and_batch_size_does_not(base_run, tiny_llama_dir, toy_file, tmp_path):
    wa = _adapter(base_run)
    train(_cfg(tiny_llama_dir, max_steps=8), toy_file, tmp_path / "same")
    train(_cfg(tiny_llama_dir, per_device_batch_size=2), toy_file, tmp_path / "micro2")
    train(_cfg(tiny_llama_dir, seed=1, max_steps=2, val_size=0), toy_file, tmp_path / "seed1")
    same, micro2, other = _adapter(tmp_path / "same"), _adapter(tmp_path / "micro2"), _adapter(tmp_path / "seed1")
    for k in wa:
        assert torch.equal(same[k], wa[k])  # same seed -> bit-identical adapter
        torch.testing.assert_close(micro2[k], wa[k], rtol=1e-4, atol=1e-6)  # micro-batch 2 x accumulation 4
    assert any(not torch.allclose(other[k], wa[k]) for k in wa if "lora_A" in k)


def test_merged_and_unmerged_adapter_predict_the_same(tiny_llama_dir, toy_file, tmp_path):
    """Train with a large lr so that the adapter matters, then score with the adapter unmerged and merged."""
    from qtalign.cli import main
    from qtalign.scoring import ScoreRequest, Scorer
    from qtalign.specs import load_specs

    out = tmp_path / "run"
    train(_cfg(tiny_llama_dir, learning_rate=3e-2, max_steps=6, val_size=0), toy_file, out)
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(out / "adapter"), "--out", str(merged),
                 "--dtype", "fp32"]) == 0
    assert (merged / "config.json").exists() and list(merged.glob("tokenizer*"))

    task = load_specs().task("emotion")
    items = [json.loads(x) for x in (demo_data_dir() / "emotion" / "de.jsonl").read_text().splitlines()[:6]]
    reqs = []
    for i, it in enumerate(items):
        prefix, q = task.prompt_parts("de", "enout", {"input": it["input"]})
        reqs.append(ScoreRequest(i, "de", prefix, q, task.label_words("de", "enout")))

    def score(**kw):
        lm = load_model(ModelConfig(dtype="fp32", device="cpu", **kw))
        return list(Scorer(lm.model, lm.tokenizer, method="sequence").score([ScoreRequest(**vars(r)) for r in reqs]))

    base = score(name=str(tiny_llama_dir))
    unmerged = score(name=str(tiny_llama_dir), adapter=str(out / "adapter"))
    merged_s = score(name=str(merged))
    diff = max(abs(a - b) for x, y in zip(base, unmerged) for a, b in zip(x.raw, y.raw))
    assert diff > 1e-2  # the adapter changes the scores
    for u, m in zip(unmerged, merged_s):
        assert u.pred == m.pred
        assert u.probs == pytest.approx(m.probs, abs=1e-5)
        assert u.raw == pytest.approx(m.raw, rel=1e-5, abs=1e-4)


def test_config_round_trip_and_cli_errors(tmp_path, toy_file, capsys):
    from qtalign.cli import main

    cfg = TrainConfig(max_steps=3, target_modules="q_proj,k_proj")
    assert cfg.target_modules == ["q_proj", "k_proj"]
    assert TrainConfig(**yaml.safe_load(yaml.safe_dump(cfg.model_dump()))) == cfg
    assert TrainConfig.model_validate_json(cfg.model_dump_json()) == cfg
    d = TrainConfig()
    assert (d.lora_r, d.lora_alpha, d.lora_dropout, d.learning_rate, d.lr_scheduler, d.warmup_ratio, d.batch_size,
            d.epochs, d.cutoff_len, d.val_size) == (8, 16, 0.0, 5e-5, "cosine", 0.1, 16, 3.0, 2048, 0.05)
    (tmp_path / "c.yaml").write_text("train:\n  lora_rank: 4\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--data", str(toy_file), "--out", str(tmp_path / "o")]) == 2
    assert "lora_rank" in capsys.readouterr().err
    saved = tmp_path / "saved.yaml"
    assert main(["train", "--data", str(toy_file), "--lr", "1e-4", "--micro-batch-size", "2", "--out", "x",
                 "--save-config", str(saved)]) == 0
    back = TrainConfig(**yaml.safe_load(saved.read_text())["train"])
    assert back.learning_rate == 1e-4 and back.per_device_batch_size == 2 and back.data == [str(toy_file)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "output": 3}\n')
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "o2"), "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "record 0" in err


# -- multi-process data parallel ------------------------------------------------------------------------------


def test_two_processes_match_one(tiny_llama_dir, toy_file, tmp_path):
    """accelerate launch --cpu --num_processes 2 reaches the loss curve of one process at the same effective batch."""
    common = ["train", "--model", str(tiny_llama_dir), "--dtype", "fp32", "--device", "cpu", "--data", str(toy_file),
              "--batch-size", "8", "--max-steps", "6", "--eval-steps", "3", "--lr", "5e-3", "--val-size", "0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    one = subprocess.run([sys.executable, "-m", "qtalign", *common, "--micro-batch-size", "4", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    acc = Path(sys.executable).with_name("accelerate")
    two = subprocess.run([str(acc), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "qtalign", *common,
                          "--micro-batch-size", "2", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["numbers"]["processes"] == 2 and s2["numbers"]["gradient_accumulation"] == 2
    l1, l2 = read_log(tmp_path / "one" / "trainer_log.jsonl"), read_log(tmp_path / "two" / "trainer_log.jsonl")
    assert [r["step"] for r in l1] == [r["step"] for r in l2] and len(l1) == 8
    for a, b in zip(l1, l2):
        for k in ("loss", "eval_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4), (a, b)
    assert l1[0]["tokens"] == l2[0]["tokens"]  # both count the tokens of all processes
