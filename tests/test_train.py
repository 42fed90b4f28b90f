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

from conftest import ROOT
from qtalign.tasks.items import demo_data_dir
from qtalign.engine.forward import ModelParts
from qtalign.errors import QtalignError
from qtalign.engine.models import ModelConfig, load_model
from qtalign.train.config import TrainConfig
from qtalign.train.data import Collator, encode_example
from qtalign.train.loss import install_response_loss, response_loss_sum
from qtalign.train.recipe import train
from qtalign.train.trainer import read_log


def _toy_records(n: int = 48) -> list[dict]:
    """de/zh -> en question-translation pairs rendered from the demo emotion items (the specs' formats)."""
    from qtalign.qtdata.build import render_pair
    from qtalign.tasks.specs import load_specs

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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny models run fastest on one thread, and far faster than on two when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(model_dir, **kw) -> TrainConfig:
    base = dict(model=ModelConfig(name=str(model_dir), dtype="fp32", device="cpu"), batch_size=8, per_device_batch_size=4,
                max_steps=8, eval_steps=2, learning_rate=5e-2, val_size=8, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius distance (Adam turns float-rounding-level gradient differences into lr-sized steps for
    coordinates whose gradient is ~0, so element-wise tolerances are the wrong test)."""
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def base_run(tiny_llama_dir, toy_file, tmp_path_factory) -> Path:
    """An uninterrupted reference run (seed 0, micro-batch 4, 8 steps, checkpoint + eval every 2). 40 training rows
    = 5 full steps per epoch, so step 6 starts the reshuffled second epoch (a partial last step would be padded by
    repeating rows, differently for different micro-batch layouts)."""
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
    losses = [r["loss"] for r in tr]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert ev[-1]["eval_loss"] < ev[0]["eval_loss"] - 0.2, ev
    for k in ("lr", "tokens", "tokens_per_s", "eta_s", "elapsed_s"):
        assert k in tr[-1]
    assert tr[-1]["tokens_per_s"] > 0 and tr[-1]["eta_s"] == 0
    assert tr[0]["lr"] < tr[1]["lr"]  # warmup, then cosine decay
    assert tr[1]["lr"] > tr[-1]["lr"]
    s = json.loads((base_run / "summary.json").read_text())
    assert s["stage"] == "train" and {"figures", "tables", "numbers", "timing_s"} <= set(s)
    assert (base_run / s["figures"][0]["path"]).stat().st_size > 1000
    assert s["numbers"]["steps"] == 8 and s["numbers"]["val_rows"] == 8 and s["numbers"]["train_rows"] == 40
    best = min(ev, key=lambda r: r["eval_loss"])
    assert s["numbers"]["best_step"] == best["step"]
    cfg = json.loads((base_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_killed_run_resumes_to_the_same_weights(base_run, tiny_llama_dir, toy_file, tmp_path):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_save(self, args, state, control, **kw):
            if state.global_step == self.step:
                raise KeyboardInterrupt(f"simulated kill after the step-{self.step} checkpoint")

    with pytest.raises(KeyboardInterrupt):  # killed in epoch 1 (steps 1-5) ...
        train(_cfg(tiny_llama_dir), toy_file, tmp_path, callbacks=[Kill(4)])
    assert (tmp_path / "checkpoints" / "checkpoint-4").is_dir() and not (tmp_path / "summary.json").exists()
    with pytest.raises(KeyboardInterrupt):  # ... resumed, and killed again inside the reshuffled epoch 2
        train(_cfg(tiny_llama_dir), toy_file, tmp_path, callbacks=[Kill(6)])
    assert [r["step"] for r in read_log(tmp_path / "trainer_log.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    s = train(_cfg(tiny_llama_dir), toy_file, tmp_path)
    assert s["numbers"]["resumed_from_step"] == 6
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


# -- a kill or a full disk at every phase of a checkpoint write ----------------------------------------------------


class Killed(BaseException):
    """A simulated kill: no `except Exception` handler of the code under test catches it."""


class WriteFaults:
    """Counts the writes into ``folder`` (every file a writer creates there: torch.save, safetensors, open() for
    writing; every folder renamed into it or removed from it) and, at the ``at``-th, leaves that write half done (half
    the file's bytes; half the removed folder's files; the rename not made) and stops: ``Killed`` (a kill) or an
    OSError ENOSPC (a full disk). With ``at`` None it only records the writes (the phases a test enumerates)."""

    def __init__(self, folder: Path, at: int | None = None, fault: str = "kill"):
        self.folder, self.at, self.fault, self.events, self.full = str(folder), at, fault, [], False

    def _hit(self, kind: str, path) -> bool:
        """Record a write; whether it is the one to stop at."""
        path = os.path.abspath(os.fspath(path))
        if not path.startswith(self.folder + os.sep):
            return False
        self.events.append(f"{kind} {os.path.relpath(path, self.folder)}")
        return len(self.events) - 1 == self.at

    def _stop(self, full_error: Exception | None = None):
        """Stop: a kill, or a full disk (then every later file created in the folder fails too) reported as the
        writing library reports it: torch.save a RuntimeError, safetensors its own error, Python an OSError naming
        no file."""
        if self.fault == "kill":
            raise Killed(self.events[-1])
        self.full = True
        raise full_error or OSError(28, "No space left on device")

    def install(self, mp: pytest.MonkeyPatch) -> "WriteFaults":
        import builtins
        import io
        import shutil

        import peft.peft_model
        import safetensors.torch

        real_save, real_safe, real_open = torch.save, peft.peft_model.safe_save_file, builtins.open
        real_rename, real_rmtree, real_os_open = os.rename, shutil.rmtree, os.open

        def cut(path, data: bytes, full_error: Exception | None = None):
            Path(path).write_bytes(data[: len(data) // 2])
            self._stop(full_error)

        def save(obj, f, *a, **kw):
            if isinstance(f, (str, os.PathLike)) and self._hit("write", f):
                buf = io.BytesIO()
                real_save(obj, buf, *a, **kw)
                cut(f, buf.getvalue(), RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
            return real_save(obj, f, *a, **kw)

        def safe_save(tensors, filename, metadata=None):
            if self._hit("write", filename):
                cut(filename, safetensors.torch.save(tensors, metadata=metadata), safetensors.SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"))
            return real_safe(tensors, filename, metadata=metadata)

        def os_open(path, flags, *a, **kw):
            if self.full and flags & os.O_CREAT and os.path.abspath(os.fspath(path)).startswith(self.folder + os.sep):
                raise OSError(28, "No space left on device", os.fspath(path))
            return real_os_open(path, flags, *a, **kw)

        class CutText(io.StringIO):
            def __init__(self, path):
                super().__init__()
                self.path = path

            def close(self):  # the text reaches the file when it is closed: half of it does
                if not self.closed:
                    text = self.getvalue()
                    super().close()
                    cut(self.path, text.encode())

            def __exit__(self, *exc):
                self.close()

        def open_(file, mode="r", *a, **kw):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") and self._hit("write", file):
                assert "b" not in mode, mode
                return CutText(file)
            return real_open(file, mode, *a, **kw)

        def rename(src, dst, *a, **kw):
            if self._hit("rename", dst):
                self._stop()
            return real_rename(src, dst, *a, **kw)

        def rmtree(path, *a, **kw):
            if self._hit("remove", path):
                files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                for p in files[: max(1, len(files) // 2)]:
                    p.unlink()
                self._stop()
            return real_rmtree(path, *a, **kw)

        mp.setattr(torch, "save", save)
        mp.setattr(peft.peft_model, "safe_save_file", safe_save)
        mp.setattr(builtins, "open", open_)
        mp.setattr(os, "rename", rename)
        mp.setattr(shutil, "rmtree", rmtree)
        mp.setattr(os, "open", os_open)
        return self


def _ckpt_cfg(model_dir):
    """2 steps, a checkpoint (and validation) after each, one checkpoint kept besides the best: the second checkpoint
    write rotates the first out."""
    return _cfg(model_dir, max_steps=2, eval_steps=1, save_total_limit=1)


@pytest.fixture(scope="module")
def ckpt_reference(tiny_llama_dir, toy_file, tmp_path_factory):
    """An uninterrupted run, recording the writes into checkpoints/ (the phases to stop at)."""
    out = tmp_path_factory.mktemp("ckpt_ref")
    with pytest.MonkeyPatch.context() as mp:
        faults = WriteFaults(out / "checkpoints").install(mp)
        train(_ckpt_cfg(tiny_llama_dir), toy_file, out)
    assert any(e.startswith("write") for e in faults.events) and any("trainer_state.json" in e for e in faults.events)
    return out, faults.events


def _same_run(ref: Path, out: Path) -> None:
    wa, wb = _adapter(ref), _adapter(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "the adapter differs"
    log_a, log_b = ([(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_log(d / "trainer_log.jsonl")]
                    for d in (ref, out))
    assert log_b == log_a, f"the log differs: {sorted(set(log_a) ^ set(log_b), key=str)} ({len(log_b)} != {len(log_a)} records)"


def test_a_training_killed_at_every_phase_of_a_checkpoint_write_resumes_to_the_same_adapter(
        ckpt_reference, tiny_llama_dir, toy_file, tmp_path, capsys):
    ref, events = ckpt_reference
    failed = []
    for at, event in enumerate(events):
        out = tmp_path / f"k{at}"
        with pytest.MonkeyPatch.context() as mp:
            WriteFaults(out / "checkpoints", at, "kill").install(mp)
            with pytest.raises(Killed):
                train(_ckpt_cfg(tiny_llama_dir), toy_file, out)
        assert not (out / "summary.json").exists()
        try:
            train(_ckpt_cfg(tiny_llama_dir), toy_file, out)  # the rerun resumes and finishes
            _same_run(ref, out)
        except Exception as e:  # noqa: BLE001 - collected: every phase is tried
            failed.append(f"killed at {event!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    assert not failed, "\n".join(failed)
    assert "discarded, an incomplete checkpoint" in capsys.readouterr().err


def test_a_full_disk_at_every_write_of_a_checkpoint_is_one_line_and_the_rerun_resumes_to_the_same_adapter(
        ckpt_reference, tiny_llama_dir, toy_file, tmp_path):
    from test_reliability import cli

    ref, events = ckpt_reference
    args = ["train", "--model", tiny_llama_dir, "--dtype", "fp32", "--device", "cpu", "--data", toy_file, "--batch-size",
            "8", "--per-device-batch-size", "4", "--max-steps", "2", "--eval-steps", "1", "--learning-rate", "5e-2",
            "--val-size", "8", "--seed", "0", "--save-total-limit", "1"]
    failed = []
    second = next(i for i, e in enumerate(events) if e.startswith("rename")) + 1  # the first checkpoint is in place
    for at, event in enumerate(events[second:], second):  # the writes of the second (the same code wrote the first)
        if not event.startswith("write"):  # a rename or a removal needs no space
            continue
        out = tmp_path / f"f{at}"
        with pytest.MonkeyPatch.context() as mp:
            WriteFaults(out / "checkpoints", at, "full").install(mp)
            rc, err, _ = cli([*args, "--out", out])
        try:
            assert rc == 2 and len(err) == 1 and "No space left on device" in err[0], err
            assert f"error: {out / 'checkpoints'}/" in err[0], err  # names the checkpoint it was writing
            assert not (out / "summary.json").exists()
            rc, err, _ = cli([*args, "--out", out])
            assert rc == 0, err
            _same_run(ref, out)
        except AssertionError as e:
            failed.append(f"disk full at {event!r}: {str(e).splitlines()[0]}")
    assert not failed, "\n".join(failed)


def test_checkpoint_completeness_names_the_missing_or_cut_file_and_accepts_another_world_sizes_rng(ckpt_reference,
                                                                                                    tmp_path):
    """The completeness check on a real checkpoint: whole, it passes; each file the resume reads, cut or missing, is
    named; the RNG files of a run with another number of processes are accepted (the Trainer resumes without them),
    a process's file missing among them is not."""
    import shutil
    import types

    from qtalign.train.trainer import checkpoint_problem, resume_files

    ref, _ = ckpt_reference
    src = next((ref / "checkpoints").glob("checkpoint-*"))
    one = types.SimpleNamespace(args=types.SimpleNamespace(world_size=1), accelerator=types.SimpleNamespace(scaler=None))
    two = types.SimpleNamespace(args=types.SimpleNamespace(world_size=2), accelerator=types.SimpleNamespace(scaler=None))
    assert checkpoint_problem(src, resume_files(one, src)) is None
    needed = resume_files(one, src)
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "adapter_model.safetensors"} <= set(needed)
    for name in needed:
        for how in ("cut", "missing"):
            d = tmp_path / f"{how}-{name}" / src.name
            shutil.copytree(src, d)
            if how == "cut":
                (d / name).write_bytes((d / name).read_bytes()[:-7])
            else:
                (d / name).unlink()
            assert checkpoint_problem(d, resume_files(one, d)) == f"{name} is {'cut or unreadable' if how == 'cut' else 'missing'}"
    d = tmp_path / "two" / src.name
    shutil.copytree(src, d)
    assert checkpoint_problem(d, resume_files(two, d)) is None  # written by one process, resumed by two
    (d / "rng_state.pth").rename(d / "rng_state_0.pth")
    shutil.copy(d / "rng_state_0.pth", d / "rng_state_1.pth")
    assert checkpoint_problem(d, resume_files(one, d)) is None and checkpoint_problem(d, resume_files(two, d)) is None
    (d / "rng_state_1.pth").unlink()
    assert checkpoint_problem(d, resume_files(two, d)) == "rng_state_1.pth is missing"


def test_seed_decides_the_adapter_and_micro_batch_and_checkpointing_do_not(base_run, tiny_llama_dir, toy_file, tmp_path):
    wa = _adapter(base_run)
    train(_cfg(tiny_llama_dir, max_steps=8), toy_file, tmp_path / "same")
    train(_cfg(tiny_llama_dir, per_device_batch_size=2), toy_file, tmp_path / "micro2")
    train(_cfg(tiny_llama_dir, seed=1, max_steps=2, val_size=0), toy_file, tmp_path / "seed1")
    train(_cfg(tiny_llama_dir, gradient_checkpointing=True), toy_file, tmp_path / "gc")
    same, micro2, other = _adapter(tmp_path / "same"), _adapter(tmp_path / "micro2"), _adapter(tmp_path / "seed1")
    gc = _adapter(tmp_path / "gc")
    for k in wa:
        assert torch.equal(same[k], wa[k])  # same seed -> bit-identical adapter
        assert _rel(gc[k], wa[k]) < 1e-4, k  # gradient checkpointing recomputes the same activations
        assert _rel(micro2[k], wa[k]) < 1e-3, k  # micro-batch 2 x accumulation 4: equal up to float rounding
    assert any(not torch.allclose(other[k], wa[k]) for k in wa if "lora_A" in k)


def test_merged_and_unmerged_adapter_predict_the_same(tiny_llama_dir, toy_file, tmp_path):
    """Train with a large lr so that the adapter matters, then score with the adapter unmerged and merged."""
    from qtalign.cli import main
    from qtalign.scoring.scorer import ScoreRequest, Scorer
    from qtalign.tasks.specs import load_specs

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
    assert main(["train", "--data", str(toy_file), "--learning-rate", "1e-4", "--per-device-batch-size", "2", "--out", "x",
                 "--save-config", str(saved)]) == 0
    back = TrainConfig(**yaml.safe_load(saved.read_text())["train"])
    assert back.learning_rate == 1e-4 and back.per_device_batch_size == 2 and back.data == [str(toy_file)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "output": 3}\n')
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "o2"), "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "record 0" in err


def test_a_short_run_on_many_rows_validates_a_bounded_share(tiny_llama_dir, tmp_path):
    """8 steps on 8,000 rows with the default settings: 64 validation rows (not 5 % = 400), one evaluation and one
    checkpoint at the end (not one per step); what the defaults resolved to is recorded in train_config.json, and the
    paper's settings (the whole 5 %, an evaluation and checkpoint every 50 steps) stay expressible."""
    from qtalign.train.data import split_rows
    from qtalign.train.recipe import training_arguments

    recs = _toy_records(40)
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({**recs[i % 40], "id": f"r{i}"}, ensure_ascii=False) + "\n" for i in range(8000)),
                   encoding="utf-8")
    cfg = TrainConfig(model=ModelConfig(name=str(tiny_llama_dir), dtype="fp32", device="cpu"), max_steps=8,
                      per_device_batch_size=8, cutoff_len=128, learning_rate=5e-3)
    s = train(cfg, big, tmp_path / "o")
    assert (s["numbers"]["train_rows"], s["numbers"]["val_rows"]) == (8000 - 64, 64)
    assert [r["step"] for r in read_log(tmp_path / "o" / "trainer_log.jsonl") if "eval_loss" in r] == [8]
    assert sorted(p.name for p in (tmp_path / "o" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-8"]
    resolved = json.loads((tmp_path / "o" / "train_config.json").read_text())["resolved"]
    assert resolved == {"train_rows": 7936, "val_rows": 64, "steps": 8, "eval_steps": 8, "save_steps": 8,
                        "best_checkpoint": True}
    paper = cfg.model_copy(update={"val_max_rows": None, "eval_steps": 50, "max_steps": None})
    assert len(split_rows(8000, paper.val_size, 0, paper.val_max_rows)[1]) == 400
    args = training_arguments(paper, tmp_path / "p", 7600, 400, "cpu")
    assert (args.eval_steps, args.save_steps, args.load_best_model_at_end) == (50, 50, True)
    assert training_arguments(cfg.model_copy(update={"max_steps": 3750}), tmp_path / "p", 7936, 64, "cpu").eval_steps == 375
    # the settings added since 0.1 enter the fingerprint only where they act: runs made before keep theirs
    study = TrainConfig(val_data=["held_out.json"], eval_steps=25)
    assert "val_max_rows" not in study.result_config() and "min_eval_steps" not in study.result_config()
    assert cfg.result_config()["val_max_rows"] == 64 and cfg.result_config()["min_eval_steps"] == 10


# -- multi-process data parallel ------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tiny_llama_dir, toy_file, tmp_path):
    """Two CPU processes (torchrun; `accelerate launch --multi_gpu` runs the same way) reach the loss curve of one
    process at the same effective batch: 1 x micro 4 x accumulation 2 == 2 x micro 2 x accumulation 2. 40 training
    rows = 5 full steps per epoch (with a partial last step, accelerate pads each process's shard by repeating rows,
    so that step differs), and 7 steps cross into the reshuffled second epoch."""
    train(_cfg(tiny_llama_dir, max_steps=7, eval_steps=3), toy_file, tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    run = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(run), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "qtalign", "train",
                          "--model", str(tiny_llama_dir), "--dtype", "fp32", "--device", "cpu", "--data", str(toy_file),
                          "--batch-size", "8", "--per-device-batch-size", "2", "--max-steps", "7", "--eval-steps", "3",
                          "--learning-rate", "5e-2", "--val-size", "8", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["numbers"]["processes"] == 2 and s2["numbers"]["gradient_accumulation"] == 2
    l1, l2 = read_log(tmp_path / "one" / "trainer_log.jsonl"), read_log(tmp_path / "two" / "trainer_log.jsonl")
    assert [r["step"] for r in l1] == [r["step"] for r in l2] and sum("loss" in r for r in l1) == 7
    for a, b in zip(l1, l2):
        for k in ("loss", "eval_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4), (a, b)
    tok1, tok2 = ([r["tokens"] for r in log if "tokens" in r] for log in (l1, l2))
    assert tok1 == tok2  # the token count covers all processes
    w1, w2 = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    for k in w1:
        assert _rel(w2[k], w1[k]) < 1e-3, k


# -- the real embedded model ----------------------------------------------------------------------------------


@pytest.mark.gemma
def test_gemma_response_loss_and_one_training_step(tmp_path):
    """On Gemma 3 270M: the response-only loss equals the full-logits loss (fp32, 2 rows), and one bf16 training
    step runs, saves an adapter and leaves a passed-in model unchanged."""
    lm = load_model(ModelConfig(dtype="fp32", device="cpu"))
    tok = lm.tokenizer
    recs = _toy_records(2)
    batch = Collator(tok.pad_token_id)([encode_example(tok, r["input"], r["output"]) for r in recs])
    remove = install_response_loss(lm.model)
    with torch.no_grad():
        ref = lm.model(**batch).loss
        out = lm.model(**batch, qt_response_loss=True)
    remove()
    torch.testing.assert_close(out.loss_sum / out.n_tokens, ref, rtol=1e-4, atol=1e-4)

    lm16 = load_model(ModelConfig(dtype="bf16", device="cpu"))
    before = {k: v.clone() for k, v in lm16.model.state_dict().items() if "layers.0.self_attn" in k}
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _toy_records(4)), encoding="utf-8")
    s = train(TrainConfig(batch_size=4, per_device_batch_size=2, max_steps=1, val_size=0), data, tmp_path / "run", loaded=lm16)
    log = read_log(tmp_path / "run" / "trainer_log.jsonl")
    assert s["numbers"]["steps"] == 1 and 0 < log[0]["loss"] < 20
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    after = lm16.model.state_dict()
    assert type(lm16.model).__name__.endswith("ForCausalLM") and all(torch.equal(after[k], v) for k, v in before.items())


# -- the chat template (the paper's LLaMA-Factory practice) and held-out validation files -----------------------

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a test model."
          "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, bpe_tokenizer):
    """A tiny Qwen2 whose tokenizer carries a ChatML template with a default system line (as Qwen2.5's)."""
    import copy

    tok = copy.deepcopy(bpe_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    from conftest import tiny_model

    d = tmp_path_factory.mktemp("tiny_qwen_chat")
    tiny_model("qwen2", tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_chat_template_trains_only_the_assistant_turn(chat_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_dir)
    rec = _toy_records(2)[1]
    ex = encode_example(tok, rec["input"], rec["output"], template="chat")
    text = tok.decode(ex["input_ids"])
    assert text == (f"<|im_start|>system\nYou are a test model.<|im_end|>\n<|im_start|>user\n{rec['input']}<|im_end|>\n"
                    f"<|im_start|>assistant\n{rec['output']}<|im_end|>\n")
    targets = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert [lab for lab in ex["labels"] if lab != -100] == targets
    assert tok.decode(targets) == rec["output"] + "<|im_end|>\n"  # the response and the end of its turn, nothing else
    n_masked = ex["labels"].index(targets[0])
    assert tok.decode(ex["input_ids"][:n_masked]).endswith("<|im_start|>assistant\n")
    # raw stays as it was: no template tokens
    assert "<|im_start|>" not in tok.decode(encode_example(tok, rec["input"], rec["output"])["input_ids"])


def test_chat_template_response_only_loss_equals_full_loss(chat_dir):
    model = load_model(ModelConfig(name=str(chat_dir), dtype="fp32", device="cpu")).model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_dir)
    batch = Collator(tok.pad_token_id)([encode_example(tok, r["input"], r["output"], template="chat") for r in _toy_records(3)])
    with torch.no_grad():
        ref = model(**batch).loss
        remove = install_response_loss(model, chunk=5)
        out = model(**batch, qt_response_loss=True)
        remove()
    torch.testing.assert_close(out.loss_sum / out.n_tokens, ref, rtol=1e-5, atol=1e-5)


def test_chat_training_run_records_template_and_uses_val_files(chat_dir, toy_file, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _toy_records(48)[40:]), encoding="utf-8")
    cfg = _cfg(chat_dir, template="chat", val_data=[str(val)], max_steps=2, eval_steps=2)
    s = train(cfg, toy_file, tmp_path / "run")
    assert s["numbers"]["template"] == "chat" and s["numbers"]["val_rows"] == 8 and s["numbers"]["train_rows"] == 48
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]["template"] == "chat"
    assert s["fingerprint"] != _cfg(chat_dir, template="raw", val_data=[str(val)], max_steps=2).fingerprint([str(toy_file)])
    log = read_log(tmp_path / "run" / "trainer_log.jsonl")
    assert any("eval_loss" in r for r in log)


def test_chat_template_without_one_is_one_clear_error(tiny_llama_dir, toy_file, tmp_path):
    with pytest.raises(QtalignError, match=r"template 'chat'.*has no chat template"):
        train(_cfg(tiny_llama_dir, template="chat", max_steps=1, val_size=0), toy_file, tmp_path / "run")


def test_tensorboard_tracking_is_read_back(tiny_llama_dir, toy_file, tmp_path):
    """report_to: tensorboard writes the Trainer's training metrics (through its integration) and the evaluation's
    metrics as TensorBoard event files; TensorBoard's own reader gets the logged values back."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qtalign.eval.config import EvalConfig
    from qtalign.eval.run import evaluate

    out = tmp_path / "run"
    train(_cfg(tiny_llama_dir, max_steps=3, eval_steps=3, report_to=["tensorboard"]), toy_file, out)
    acc = EventAccumulator(str(out / "tracking" / "tensorboard"))
    acc.Reload()
    loss = [e.value for e in acc.Scalars("train/loss")]
    logged = [r["loss"] for r in read_log(out / "trainer_log.jsonl") if "loss" in r]
    assert loss == pytest.approx(logged, rel=1e-5) and len(loss) == 3
    assert [e.step for e in acc.Scalars("eval/loss")] == [3]
    ecfg = EvalConfig(model=ModelConfig(name=str(tiny_llama_dir), dtype="fp32"), tasks=["emotion"], langs=["en"], data_files="demo",
                      limit=4, report_to=["tensorboard"])
    res = evaluate(ecfg, tmp_path / "eval", progress=False)
    ea = EventAccumulator(str(tmp_path / "eval" / "tracking" / "tensorboard"))
    ea.Reload()
    assert ea.Scalars("eval/emotion/enout/en/acc")[0].value == pytest.approx(res["metrics"]["emotion"]["enout"]["langs"]["en"]["acc"])


def test_the_validation_loop_runs_as_many_forwards_on_every_rank_and_its_sums_equal_one_process():
    """Under sharded training every forward gathers weights on all ranks: a rank with fewer validation batches would
    leave the others waiting. Each rank of 2 and 3 runs the same number of forwards; the losses summed over ranks equal
    one process's (an uncounted filler batch adds nothing)."""
    from types import SimpleNamespace

    from qtalign.train.trainer import ResponseTrainer

    class Model:
        training = True

        def __init__(self):
            self.calls = 0

        def eval(self):
            self.training = False

        def train(self, mode=True):
            self.training = mode

        def __call__(self, input_ids, attention_mask, labels, qt_response_loss):
            self.calls += 1
            m = labels != -100
            return SimpleNamespace(loss_sum=(input_ids * m).sum().double() / 7, n_tokens=m.sum())

    rows = [{"input_ids": list(range(1, 2 + i % 5)), "labels": [-100] + list(range(2, 2 + i % 5))} for i in range(11)]

    def run(rank, world, bs):
        model, seen = Model(), {}
        fake = SimpleNamespace(
            model=model, eval_dataset=rows, eval_bs=bs, data_collator=Collator(0), state=SimpleNamespace(epoch=1.0),
            args=SimpleNamespace(process_index=rank, world_size=world, device="cpu"),
            accelerator=SimpleNamespace(reduce=lambda t, reduction: t), control=None, log=lambda m: seen.update(m),
            callback_handler=SimpleNamespace(on_evaluate=lambda *a: None))
        ResponseTrainer.evaluate(fake)
        return model.calls, seen["eval_loss"], model.training

    calls1, loss1, _ = run(0, 1, 3)
    assert calls1 == 4
    for world in (2, 3):
        for bs in (1, 2, 3, 4):
            res = [run(r, world, bs) for r in range(world)]
            assert len({c for c, _, _ in res}) == 1, (world, bs, res)  # the same number of forwards on every rank
            assert all(tr for _, _, tr in res)  # training mode restored
    # the ranks' sums are what one process sums (the fake reduce keeps each rank's part: summed by hand)
    parts = []
    for r in range(3):
        model = Model()
        tot = {}
        fake = SimpleNamespace(model=model, eval_dataset=rows, eval_bs=2, data_collator=Collator(0),
                               state=SimpleNamespace(epoch=1.0),
                               args=SimpleNamespace(process_index=r, world_size=3, device="cpu"),
                               accelerator=SimpleNamespace(reduce=lambda t, reduction: tot.setdefault("t", t.clone())),
                               control=None, log=lambda m: None, callback_handler=SimpleNamespace(on_evaluate=lambda *a: None))
        ResponseTrainer.evaluate(fake)
        parts.append(tot["t"])
    total = sum(parts)
    assert abs(float(total[0] / total[1]) - loss1) < 1e-12
