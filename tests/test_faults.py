"""Faults found by the red team of issue 25 (docs/reliability.md): non-finite or absurd settings, alias bombs, NaN
scores, inputs longer than the model's context, Ctrl-C, settings that would quietly turn something off, corrupted
cached models, two processes writing one folder, and user mistakes that were reported as qtalign bugs. Each test
fails on the code before the fix."""

from __future__ import annotations

import math
import types
import typing

import pytest
from pydantic import BaseModel, ValidationError

from qtalign.errors import QtalignError as QtalignError_
from test_reliability import cli, snapshot  # noqa: F401 - shared helpers


# ------------------------------------------------------------------------------------------------------------------
# finite or refused


def qt_data(tmp_path):
    """A small question-translation file built from the demo data."""
    assert cli(["build-data", "--task", "emotion", "--sources", "zh", "--data-files", "demo", "--items", "60:70",
                "--out", tmp_path / "qt"])[0] == 0
    return next((tmp_path / "qt").glob("*.jsonl"))


def _config_classes():
    from qtalign.analysis.config import GeometryConfig, LensConfig
    from qtalign.engine.models import ModelConfig
    from qtalign.eval.config import EvalConfig
    from qtalign.experiment.config import ExperimentConfig
    from qtalign.qtdata.config import QTDataConfig
    from qtalign.train.config import TrainConfig

    return [TrainConfig, EvalConfig, LensConfig, GeometryConfig, QTDataConfig, ModelConfig, ExperimentConfig]


def _leaf(ann):
    """(the scalar type of a field: int, float or None; whether it is a list of them; a nested model or None)."""
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) != 1:
            return None, False, None
        return _leaf(args[0])
    if origin is typing.Annotated:
        return _leaf(typing.get_args(ann)[0])
    if origin is list:
        t, _, _ = _leaf(typing.get_args(ann)[0])
        return t, True, None
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return None, False, ann
    if ann in (int, float) and ann is not bool:
        return ann, False, None
    return None, False, None


def _numeric_fields(cls, path=()):
    for name, info in cls.model_fields.items():
        t, is_list, nested = _leaf(info.annotation)
        if nested is not None:
            yield from _numeric_fields(nested, (*path, name))
        elif t is not None:
            yield (*path, name), t, is_list


def _nest(path, value):
    d = value
    for k in reversed(path):
        d = {k: d}
    return d


def test_every_numeric_setting_of_every_config_refuses_non_finite_and_unbounded_values():
    """A walk over every config's fields (nested sections too): no float setting takes inf or nan, no integer setting
    is unbounded (a size that would exhaust memory), no seed is negative."""
    checked = 0
    for cls in _config_classes():
        for path, t, is_list in _numeric_fields(cls):
            bad = [math.inf, -math.inf, math.nan, "inf", "nan"] if t is float else [10**13, 2**64, math.inf]
            if path[-1] == "seed":
                bad += [-1, 2**32]
            for v in bad:
                with pytest.raises(ValidationError):
                    cls.model_validate(_nest(path, [v] if is_list else v))
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("argv, name", [
    (["train", "--learning-rate", "inf"], "learning_rate"),
    (["train", "--epochs", "nan"], "epochs"),
    (["train", "--warmup-ratio", "nan"], "warmup_ratio"),
    (["train", "--weight-decay", "inf"], "weight_decay"),
    (["train", "--lora-r", "1000000000"], "lora_r"),
    (["train", "--batch-size", "1000000000000"], "batch_size"),
    (["train", "--seed", "-1"], "seed"),
    (["eval", "--seed", str(2**40)], "seed"),
    (["eval", "--batch-size", "1000000000000"], "batch_size"),
    (["build-data", "--task", "emotion", "--sources", "zh", "--exclude-items", "0:1000000000000"], "exclude_items"),
])
def test_absurd_settings_are_one_line_before_any_work(tmp_path, tiny_llama_dir, argv, name):
    from qtalign.tasks.items import demo_data_dir

    extra = ["--model", tiny_llama_dir, "--data", demo_data_dir() / "emotion" / "en.jsonl"] if argv[0] == "train" else \
        ["--model", tiny_llama_dir, "--data-files", "demo"] if argv[0] == "eval" else ["--data-files", "demo"]
    rc, err, _ = cli([*argv, *extra, "--out", tmp_path / "o"])
    assert rc == 2 and len(err) == 1 and name in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("override, key", [("train.learning_rate=.inf", "train.learning_rate"),
                                           ("train.epochs=inf", "train.epochs"), ("seed=-3", "seed"),
                                           ("eval.batch_size=1e12", "eval.batch_size"), ("train.lora_r=1e9", "train.lora_r")])
def test_experiment_configs_name_the_dotted_key_of_a_non_finite_or_absurd_value(tmp_path, override, key):
    rc, err, _ = cli(["run", "demo", override, "--out", tmp_path / "r"])
    assert rc == 2 and len(err) == 1 and f"field '{key}'" in err[0], err
    assert not (tmp_path / "r").exists()


def test_a_yaml_alias_bomb_is_refused_naming_the_file(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 values written out
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nname: t\n")
    rc, err, _ = cli(["run", bomb, "--out", tmp_path / "r"])
    assert rc == 2 and len(err) == 1 and "bomb.yaml" in err[0] and "alias" in err[0], err
    loop = tmp_path / "loop.yaml"
    loop.write_text("eval: &e\n  tasks: *e\n")
    rc, err, _ = cli(["eval", "--config", loop, "--out", tmp_path / "e"])
    assert rc == 2 and len(err) == 1 and "loop.yaml" in err[0], err
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    rc, err, _ = cli(["eval", "--config", deep, "--out", tmp_path / "e"])
    assert rc == 2 and len(err) == 1 and "deep.yaml" in err[0], err


def test_a_modest_use_of_aliases_still_loads(tmp_path):
    from qtalign.io import read_config

    p = tmp_path / "ok.yaml"
    p.write_text("langs: &l [en, zh]\neval: {langs: *l}\nlens: {langs: *l}\n")
    assert read_config(p) == {"langs": ["en", "zh"], "eval": {"langs": ["en", "zh"]}, "lens": {"langs": ["en", "zh"]}}


def test_a_lora_rank_above_the_hidden_size_is_refused_at_load(tmp_path, tiny_llama_dir):
    import json

    hidden = json.loads((tiny_llama_dir / "config.json").read_text())["hidden_size"]
    data = qt_data(tmp_path)
    rc, err, _ = cli(["train", "--model", tiny_llama_dir, "--dtype", "fp32", "--data", data,
                      "--lora-r", str(hidden + 1), "--max-steps", "1", "--out", tmp_path / "t"])
    assert rc == 2 and "lora_r" in err[-1] and f"({hidden})" in err[-1], err
    assert not (tmp_path / "t" / "adapter").exists()


# ------------------------------------------------------------------------------------------------------------------
# NaN scores stop the evaluation


@pytest.fixture
def nan_llama_dir(tmp_path, tiny_llama_dir):
    """The tiny Llama with one weight matrix set to NaN: every class score it produces is NaN."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    d = tmp_path / "nan_llama"
    shutil.copytree(tiny_llama_dir, d)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    m.save_pretrained(d)
    return d


@pytest.mark.parametrize("method", ["first-token", "sequence", "faithful"])
def test_nan_scores_stop_the_evaluation_and_nothing_is_recorded(tmp_path, nan_llama_dir, method):
    import json
    import os
    from pathlib import Path

    out = tmp_path / "e"
    rc, err, _ = cli(["eval", "--model", nan_llama_dir, "--dtype", "fp32", "--data-files", "demo", "--tasks", "emotion",
                      "--langs", "en", "--limit", "4", "--method", method, "--out", out])
    assert rc == 2 and "emotion/enout/en" in err[-1] and "non-finite" in err[-1] and "item" in err[-1], err
    assert not (out / "results.json").exists() and not (out / "table.md").exists()
    preds = out / "predictions.jsonl"
    assert not preds.exists() or not [json.loads(x) for x in preds.read_text().splitlines() if x.strip()]
    store = Path(os.environ["QTALIGN_STORE"])
    assert not store.exists() or not [p for p in store.rglob("records.jsonl") if p.stat().st_size]


@pytest.mark.parametrize("command", ["lens", "geometry"])
def test_nan_numbers_stop_the_analyses(tmp_path, nan_llama_dir, command):
    out = tmp_path / "a"
    rc, err, _ = cli([command, "--model", nan_llama_dir, "--dtype", "fp32", "--data-files", "demo", "--langs", "en,zh",
                      "--limit", "4", "--out", out])
    assert rc == 2 and "NaN/inf" in err[-1] and "item" in err[-1], err
    assert not (out / "summary.json").exists() and not list(out.glob("*.png"))


def test_finite_scores_are_usable_and_nan_or_inf_are_not():
    from qtalign.scoring.base import usable

    assert usable([0.2, 0.0, 0.8]) and usable([-1.5, float("-inf")]) and usable([0.0, 0.0])
    assert not usable([float("nan"), 0.5]) and not usable([float("inf"), 0.1]) and not usable([float("-inf")] * 2)


# ------------------------------------------------------------------------------------------------------------------
# prompt length against the model's context


def test_an_input_longer_than_the_context_is_refused_naming_file_record_and_length(tmp_path, tiny_llama_dir):
    import json

    from qtalign.tasks.items import demo_data_dir

    recs = [json.loads(x) for x in (demo_data_dir() / "emotion" / "en.jsonl").read_text().splitlines()]
    recs[5]["input"] = "This review goes on and on. " * 3600  # 100,000 characters
    f = tmp_path / "data" / "emotion" / "en.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "e"
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, "--dtype", "fp32", "--data-files", tmp_path / "data" / "{task}" / "{lang}.jsonl",
                      "--tasks", "emotion", "--langs", "en", "--out", out])
    assert rc == 2 and len(err) == 1 and str(f) in err[0] and "record 5" in err[0] and "4096 positions" in err[0], err
    assert not (out / "results.json").exists() and not (out / "predictions.jsonl").exists()
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, "--dtype", "fp32", "--data-files", tmp_path / "data" / "{task}" / "{lang}.jsonl",
                      "--tasks", "emotion", "--langs", "en", "--exclude-items", "5", "--limit", "6", "--out", out])
    assert rc == 0, err  # the named way out works


def test_training_rows_beyond_the_context_are_refused(tmp_path, tiny_llama_dir):
    import json

    data = qt_data(tmp_path)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    rows[0]["input"] = "word " * 1500 + rows[0]["input"]  # about 4,500 tokens: kept whole under cutoff_len 8192
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, err, _ = cli(["train", "--model", tiny_llama_dir, "--dtype", "fp32", "--data", long, "--cutoff-len", "8192",
                      "--max-steps", "1", "--out", tmp_path / "t"])
    assert rc == 2 and "cutoff_len 8192" in err[-1] and "4096 positions" in err[-1], err
    assert not (tmp_path / "t" / "adapter").exists()


# ------------------------------------------------------------------------------------------------------------------
# Ctrl-C


def test_an_interrupt_raised_inside_a_finalizer_still_stops_the_command(monkeypatch):
    """Python drops a KeyboardInterrupt raised while a __del__ runs ("Exception ignored in ..."): the command must
    stop all the same, with one line and exit 130, instead of carrying on to exit 0."""
    import gc
    import os
    import signal
    import time

    import qtalign.cli.models as models_cli

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside __del__

    def run_cli(args):
        Finalized()
        gc.collect()
        t0 = time.time()
        while time.time() - t0 < 10:  # work that goes on unless the interrupt reaches it
            sum(range(1000))
        return 0

    monkeypatch.setattr(models_cli, "run_cli", run_cli)
    t0 = time.time()
    rc, err, _ = cli(["models"])
    assert rc == 130 and err[-1] == "qtalign models: interrupted; rerun the same command to resume", err
    assert time.time() - t0 < 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored for the caller


def test_ctrl_c_after_the_command_finished_is_ignored_while_the_process_exits(tmp_path, tiny_llama_dir):
    """Ctrl-C pressed again and again from the command's last line to the process's end (Python frees torch's modules
    there, with SIGINT back at the system default): the finished command still exits 0, with nothing on stderr. It
    used to die by the signal (-2, no message) or print "Exception ignored" tracebacks from atexit callbacks."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "QTALIGN_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "QTALIGN_STORE": str(tmp_path / "store")}
    p = subprocess.Popen([sys.executable, "-m", "qtalign", "eval", "--model", str(tiny_llama_dir), *EVAL_ARGS,
                          "--out", str(tmp_path / "e")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    for line in p.stdout:
        if '"eval_s"' in line:  # the command's last line: its work is saved
            break
    sent = 0
    while p.poll() is None:
        p.send_signal(signal.SIGINT)
        sent += 1
        time.sleep(0.01)
    err = p.stderr.read()
    assert p.returncode == 0 and err.strip() == "", (p.returncode, sent, err[-2000:])
    assert sent >= 3  # the exit took a while: the signals came while it ran


@pytest.mark.parametrize("delay", [1.5, 4.0, 8.0])
def test_ctrl_c_at_points_of_qtalign_run_exits_130_with_one_line(tmp_path, tiny_llama_dir, delay):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "QTALIGN_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "qtalign", "run", "demo", "--out", str(tmp_path / "r"),
                          f"model.name={tiny_llama_dir}", "model.dtype=fp32"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    if p.returncode == 0:  # finished before the signal came
        pytest.skip(f"the run finished within {delay} s")
    (tmp_path / "err.txt").write_text(err)
    assert p.returncode == 130 and lines[-1] == "qtalign run: interrupted; rerun the same command to resume", err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]


@pytest.mark.slow
def test_ctrl_c_repeated_at_random_points_of_qtalign_run_each_rerun_resumes_to_the_uninterrupted_result(
        tmp_path, tiny_llama_dir):
    """Ctrl-C at seeded random moments (imports, data, every step's checkpoint write, evaluation), the same command
    rerun after each: every stop is exit 130 with one line, and the run that finishes has the adapter (bit for bit) and
    the accuracies of a run never interrupted. The moments are drawn within the uninterrupted run's own duration (a
    faster machine draws earlier ones), and a series that finished after fewer than two stops starts again in a fresh
    folder: at least one series is stopped twice or more, whatever the machine's speed."""
    import json
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    over = [f"model.name={tiny_llama_dir}", "model.dtype=fp32", "stages=data,train,eval", "train.eval_steps=1",
            "eval.items=0:8", "eval.langs=en,zh"]
    env = {**os.environ, "QTALIGN_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

    def command(out: str, store: str):
        argv = [sys.executable, "-m", "qtalign", "run", "demo", "--out", str(tmp_path / out), *over]
        return subprocess.Popen(argv, env={**env, "QTALIGN_STORE": str(tmp_path / store)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    t0 = time.time()
    p = command("ref", "store_ref")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    whole = time.time() - t0  # the uninterrupted run, start-up included
    rng, series = random.Random(25), []
    for trial in range(4):
        stops = 0
        for attempt in range(8):
            p = command(f"r{trial}", f"store{trial}")
            if attempt < 7:  # the last one runs to the end
                try:
                    p.wait(timeout=rng.uniform(1.0, max(1.5, whole)))
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=300)
            if p.returncode == 0:
                break
            lines = err.strip().splitlines()
            assert p.returncode == 130 and lines[-1] == "qtalign run: interrupted; rerun the same command to resume", err[-2000:]
            assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
            stops += 1
        assert p.returncode == 0, (stops, err[-2000:])
        series.append(stops)
        a, b = (load_file(str(tmp_path / d / "train" / "adapter" / "adapter_model.safetensors")) for d in ("ref", f"r{trial}"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for arm in ("base", "tuned"):
            ra, rb = (json.loads((tmp_path / d / "eval" / arm / "results.json").read_text()) for d in ("ref", f"r{trial}"))
            assert ra["metrics"] == rb["metrics"], arm
        if stops >= 2:
            break
    assert max(series) >= 2, series


# ------------------------------------------------------------------------------------------------------------------
# nothing quietly turned off


EVAL_ARGS = ["--dtype", "fp32", "--data-files", "demo", "--tasks", "emotion", "--langs", "en", "--limit", "2"]


@pytest.mark.parametrize("var", ["QTALIGN_STORE", "QTALIGN_CACHE"])
def test_a_store_or_cache_that_is_a_file_is_one_line_not_a_store_turned_off(tmp_path, tiny_llama_dir, monkeypatch, var):
    f = tmp_path / "afile"
    f.write_text("x")
    monkeypatch.setenv(var, str(f))
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--out", tmp_path / "e"])
    assert rc == 2 and len(err) == 1 and f"${var}" in err[0] and "is a file" in err[0], err
    assert not (tmp_path / "e").exists()
    monkeypatch.setenv(var, str(f / "below"))
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--out", tmp_path / "e"])
    assert rc == 2 and len(err) == 1 and "is a file" in err[0], err


def test_store_import_into_a_store_that_cannot_be_written_is_an_error_not_0_added(tmp_path, tiny_llama_dir, monkeypatch):
    assert cli(["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--out", tmp_path / "e"])[0] == 0
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for i in range(256):  # every entry's parent folder is taken by a file: nothing can be written
        (blocked / f"{i:02x}").write_text("")
    monkeypatch.setenv("QTALIGN_STORE", str(blocked))
    rc, err, out = cli(["store", "import", tmp_path / "e"])
    assert rc == 2 and len(err) == 1 and "result store" in err[0] and "cannot write" in err[0], (err, out)
    assert "added" not in out


def test_store_import_reads_an_exports_records_once(tmp_path, tiny_llama_dir, monkeypatch):
    """The records whose digest is checked are the records imported: the file is read once, not once for the digest
    and again for the records."""
    import builtins
    import hashlib
    import shutil
    from pathlib import Path

    from qtalign.eval.run import import_evaluation

    assert cli(["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--out", tmp_path / "e"])[0] == 0
    exp = tmp_path / "exp"
    shutil.copytree(tmp_path / "e", exp)
    (exp / "predictions.sha256").write_text(hashlib.sha256((exp / "predictions.jsonl").read_bytes()).hexdigest() + "\n")
    reads = []
    real_open, real_read = builtins.open, Path.read_bytes

    def counted_open(file, *a, **kw):
        if Path(str(file)).name.startswith("predictions.jsonl"):
            reads.append(file)
        return real_open(file, *a, **kw)

    def counted_read(self):
        if self.name.startswith("predictions.jsonl"):
            reads.append(self)
        return real_read(self)

    monkeypatch.setattr(builtins, "open", counted_open)
    monkeypatch.setattr(Path, "read_bytes", counted_read)
    assert import_evaluation(exp)["records"] == 2
    assert len(reads) == 1, reads


def test_a_tracker_that_is_not_installed_stops_the_run_before_any_work(tmp_path, tiny_llama_dir, monkeypatch):
    import qtalign.tracking

    monkeypatch.setitem(qtalign.tracking.NEEDS, "mlflow", "qtalign_no_such_package")
    rc, err, _ = cli(["run", "demo", "--out", tmp_path / "r", f"model.name={tiny_llama_dir}", "model.dtype=fp32",
                      "report_to=[mlflow]"])
    assert rc == 2 and len(err) == 1 and "mlflow" in err[0] and "pip install" in err[0], err
    assert not (tmp_path / "r").exists()


def test_a_tilde_in_out_is_the_home_folder(tmp_path, monkeypatch):
    from qtalign.experiment.config import load_experiment

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    rc, err, _ = cli(["build-data", "--task", "emotion", "--sources", "zh", "--data-files", "demo", "--items", "60:70",
                      "--out", "~/qt"])
    assert rc == 0, err
    assert (home / "qt" / ".qtalign.json").is_file() and not (tmp_path / "~").exists()
    assert load_experiment(["demo"], ["out=~/runs/x"]).run_dir == home / "runs" / "x"


# ------------------------------------------------------------------------------------------------------------------
# one process at a time writes an output folder


def test_two_processes_racing_for_one_out_the_second_is_refused_naming_the_holder(tmp_path, tiny_llama_dir):
    import json
    import subprocess
    import sys

    out = tmp_path / "e"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom qtalign.io import OutputDir\n"
                               "OutputDir(sys.argv[1], 'eval').claim()\nprint('held', flush=True)\ntime.sleep(120)\n",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, err, _ = cli(["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--out", out])
        assert rc == 2 and len(err) == 1 and f"pid {holder.pid}" in err[0] and "in use" in err[0], err
        assert not (out / "predictions.jsonl").exists() and not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".qtalign.lock").read_text().strip() == str(holder.pid)  # left behind by a killed process
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--out", out])
    assert rc == 0, err  # the stale lock is taken over
    assert json.loads((out / ".qtalign.json").read_text())["lock"] == ".qtalign.lock"


@pytest.mark.slow
def test_two_evals_started_together_into_one_out_one_writes_and_the_other_is_refused_or_reuses(tmp_path, tiny_llama_dir):
    """Two real `qtalign eval` processes started at once into one --out: the one that claims the folder writes it; the
    other is refused with one line naming the holder's pid, or (started after the first finished) returns the
    finished result. Either way the folder holds one whole evaluation."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "e"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "qtalign", "eval", "--model", str(tiny_llama_dir), *EVAL_ARGS, "--out", str(out)]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
    codes = sorted(rc for *_, rc in done)
    assert codes in ([0, 0], [0, 2]), done
    for pid, _, err, rc in done:
        if rc == 2:
            other = next(q for q, *_ in done if q != pid)
            line = err.strip().splitlines()[-1]
            assert "in use by another qtalign process" in line and f"pid {other}" in line, err
            assert "Traceback" not in err
    res = json.loads((out / "results.json").read_text())
    assert res["fingerprint"] and len((out / "predictions.jsonl").read_text().splitlines()) == 2
    assert not list(out.rglob(".qtalign.lock")) and not list(out.glob(".*.tmp*"))


def test_a_finished_command_gives_its_folder_lock_back(tmp_path, tiny_llama_dir):
    import subprocess
    import sys

    out = tmp_path / "e"
    assert cli(["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--out", out])[0] == 0  # in this process
    assert (out / "lm_eval").is_dir() and not list(out.rglob(".qtalign.lock"))  # the lock files go with the locks
    p = subprocess.run([sys.executable, "-c", "import sys\nfrom qtalign.io import OutputDir\nOutputDir(sys.argv[1], 'eval').claim()\n",
                        str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------------------------------------------------------
# GGUF integrity

from test_models import fake_parts  # noqa: E402,F401 - the fixture: a registry entry made of tiny part packages


def test_a_same_size_corrupted_cached_gguf_is_assembled_again_before_conversion(fake_parts, tmp_path, monkeypatch, capsys):
    from qtalign.engine import models
    from qtalign.engine import registry as reg
    from qtalign.engine.gguf import converted_dir

    entry, blob, pkgs = fake_parts
    monkeypatch.setenv("QTALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(reg, "registry", lambda: {**reg._load(str(reg.registry_path())), entry.name: entry})
    converted = []
    monkeypatch.setattr(models, "ensure_converted",
                        lambda path, sha, label: converted.append((path.read_bytes(), sha)) or converted_dir(sha))
    cached = models.gguf_cache_path(entry.name)
    cached.parent.mkdir(parents=True)
    bad = bytearray(blob)
    bad[70] ^= 0xFF  # the original size, one byte changed
    cached.write_bytes(bytes(bad))
    models.embedded_model_dir(entry.name)
    assert converted == [(blob, entry.sha256)]  # the genuine file, never the corrupted one
    assert "assembling it again" in capsys.readouterr().err
    # the packages corrupted too: one line naming the model and the fix, nothing converted
    cached.write_bytes(bytes(bad))
    part = pkgs / "qt_fake_part2" / "data" / "part02.bin"
    data = bytearray(part.read_bytes())
    data[3] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(models.QtalignError, match=r"model 'fake-model': the assembled GGUF's sha256 .*reinstall"):
        models.embedded_model_dir(entry.name)
    assert len(converted) == 1


# ------------------------------------------------------------------------------------------------------------------
# user mistakes are one line and exit 2, not "internal error"


@pytest.fixture
def adapter_dir(tmp_path, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    from qtalign.engine.models import ModelConfig, load_model

    lm = load_model(ModelConfig(name=str(tiny_llama_dir), dtype="fp32"))
    get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adp")
    return tmp_path / "adp"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle"])
def test_a_damaged_adapter_weights_file_is_one_line(tmp_path, tiny_llama_dir, adapter_dir, damage):
    import pickle

    w = adapter_dir / "adapter_model.safetensors"
    if damage == "truncated":
        w.write_bytes(w.read_bytes()[:300])
    elif damage == "garbage":
        w.write_bytes(b"not a safetensors file " * 20)
    else:  # a pickle that is not plain tensors: refused, never run
        w.unlink()
        w = adapter_dir / "adapter_model.bin"
        w.write_bytes(pickle.dumps({"x": __import__("datetime").date(2020, 1, 1)}))
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--adapter", adapter_dir, "--out", tmp_path / "e"])
    assert rc == 2 and len(err) == 1 and str(w) in err[0] and "internal error" not in err[0], err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("template", ["{% for m in messages %}{{ m.content }", "{{ raise_exception('no system role') }}"])
def test_a_broken_chat_template_is_one_line(tmp_path, tiny_llama_dir, template):
    import json
    import shutil

    m = tmp_path / "chat_model"
    shutil.copytree(tiny_llama_dir, m)
    tc = json.loads((m / "tokenizer_config.json").read_text())
    tc["chat_template"] = template
    (m / "tokenizer_config.json").write_text(json.dumps(tc))
    rc, err, _ = cli(["train", "--model", m, "--dtype", "fp32", "--data", qt_data(tmp_path), "--template", "chat",
                      "--max-steps", "1", "--out", tmp_path / "t"])
    assert rc == 2 and "chat template" in err[-1] and "does not render" in err[-1], err
    assert not (tmp_path / "t" / "adapter").exists()


@pytest.mark.parametrize("template", ['{input\nX: "', '{input} }\nX: "'])
def test_a_stray_brace_in_a_spec_template_is_one_line(tmp_path, template):
    import json

    from qtalign.tasks.specs import load_specs

    doc = {"tasks": {"emotion": {"languages": {"xx": {
        "fields": {"answer": "X"}, "label_words_native": {"positive": "p", "negative": "n"},
        "question_template": template, "demo_items": [{"input": "a", "label": "positive"}]}}}}}
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(QtalignError_) as e:
        load_specs(p)
    assert str(p) in str(e.value) and "question_template" in str(e.value) and "brace" in str(e.value)


def test_a_lone_surrogate_in_data_is_one_line_naming_the_record(tmp_path, tiny_llama_dir):
    import json

    from qtalign.tasks.items import demo_data_dir

    lines = (demo_data_dir() / "emotion" / "en.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"input": "', '"input": "ok \\ud800 ', 1)  # an escape without its pair
    f = tmp_path / "d" / "emotion" / "en.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text("\n".join(lines) + "\n")
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, "--dtype", "fp32", "--data-files", tmp_path / "d" / "{task}" / "{lang}.jsonl",
                      "--tasks", "emotion", "--langs", "en", "--out", tmp_path / "e"])
    assert rc == 2 and len(err) == 1 and f"{f}: record 1: field 'input'" in err[0] and "surrogate" in err[0], err
    rows = [json.loads(x) for x in qt_data(tmp_path).read_text().splitlines()]
    rows[2]["output"] = "\ud800" + rows[2]["output"]
    g = tmp_path / "qt_bad.jsonl"
    g.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, err, _ = cli(["train", "--model", tiny_llama_dir, "--dtype", "fp32", "--data", g, "--out", tmp_path / "t"])
    assert rc == 2 and len(err) == 1 and f"{g}: record 2: field 'output'" in err[0] and "surrogate" in err[0], err


@pytest.mark.parametrize("command", ["eval", "train"])
def test_a_tracking_dir_that_is_a_file_is_one_line_before_any_work(tmp_path, tiny_llama_dir, command):
    f = tmp_path / "tracking_file"
    f.write_text("x")
    argv = ["eval", "--model", tiny_llama_dir, *EVAL_ARGS] if command == "eval" else \
        ["train", "--model", tiny_llama_dir, "--dtype", "fp32", "--data", qt_data(tmp_path), "--max-steps", "1"]
    rc, err, _ = cli([*argv, "--report-to", "tensorboard", "--tracking-dir", f, "--out", tmp_path / "o"])
    assert rc == 2 and len(err) == 1 and "tracking_dir" in err[0] and "is a file" in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_pipe_given_as_an_input_file_is_one_line(tmp_path, tiny_llama_dir):
    """A process substitution (`--config <(...)`) is a pipe: qtalign hashes and rereads its inputs, so it says so
    instead of 'not found' or an internal error."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv in (["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--config", fifo],
                 ["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--prompts", fifo],
                 ["eval", "--model", tiny_llama_dir, *EVAL_ARGS[:2], "--tasks", "emotion", "--langs", "en", "--data-files", fifo],
                 ["train", "--model", tiny_llama_dir, "--data", fifo],
                 ["run", fifo]):
        rc, err, _ = cli([*argv, "--out", tmp_path / "o"])
        assert rc == 2 and len(err) == 1 and f"{fifo}: not a regular file" in err[0], (argv, err)
    assert not (tmp_path / "o").exists()


def test_a_full_disk_is_one_line_naming_the_file_and_the_run_resumes(tmp_path, tiny_llama_dir, monkeypatch):
    import errno
    import json
    from pathlib import Path

    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".results.json.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    out = tmp_path / "e"
    monkeypatch.setattr(Path, "write_bytes", full)
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--out", out])
    assert rc == 2 and len(err) == 1 and f"{out / 'results.json'}: No space left on device" in err[0], err
    assert not (out / "results.json").exists() and len((out / "predictions.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(Path, "write_bytes", real)
    rc, err, stdout = cli(["eval", "--model", tiny_llama_dir, *EVAL_ARGS, "--out", out])
    assert rc == 0 and json.loads(stdout.strip().splitlines()[-1])["out"], err
    assert (out / "results.json").exists()


def test_a_full_disk_while_training_writes_its_log_is_one_line_naming_it_and_the_run_resumes(tmp_path, tiny_llama_dir,
                                                                                               monkeypatch):
    """The log is appended after each step; a full disk there (half a line written, an OSError naming no file, as
    Python reports it) is one line naming the log, and the rerun resumes to the adapter of an uninterrupted run (the
    training checkpoints and the disk-full stops inside them: tests/test_train.py)."""
    import builtins
    import json

    import torch
    from safetensors.torch import load_file

    data = qt_data(tmp_path)
    args = ["train", "--model", tiny_llama_dir, "--dtype", "fp32", "--data", data, "--batch-size", "2",
            "--per-device-batch-size", "2", "--max-steps", "3", "--eval-steps", "1", "--val-size", "2"]
    assert cli([*args, "--out", tmp_path / "ref"])[0] == 0
    real_open, opened = builtins.open, []

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if str(file).endswith("trainer_log.jsonl") and "a" in mode:
            opened.append(file)
            return Full(f) if len(opened) == 3 else f
        return f

    out = tmp_path / "o"
    with monkeypatch.context() as mp:
        mp.setattr(builtins, "open", open_)
        rc, err, _ = cli([*args, "--out", out])
    assert rc == 2 and len(err) == 1 and f"{out / 'trainer_log.jsonl'}: No space left on device" in err[0], err
    assert not (out / "summary.json").exists()
    rc, err, _ = cli([*args, "--out", out])
    assert rc == 0, err
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (tmp_path / "ref", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [[(r["step"], r.get("loss")) for r in map(json.loads, (d / "trainer_log.jsonl").read_text().splitlines())]
             for d in (tmp_path / "ref", out)]
    assert steps[0] == steps[1]


def test_a_librarys_own_write_error_is_a_full_disk_only_where_a_probe_write_fails_too(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError: io.disk_errors makes it an OSError naming the path when a
    probe write into the folder fails too; a bug (the probe succeeds) and a QtalignError stay what they are."""
    import errno
    import os

    from qtalign.io import disk_errors

    with pytest.raises(RuntimeError, match="unexpected pos"), disk_errors(tmp_path / "ckpt", probe=tmp_path):
        raise RuntimeError("unexpected pos 576 vs 534")
    with pytest.raises(QtalignError_, match="mine"), disk_errors(tmp_path / "ckpt", probe=tmp_path):
        raise QtalignError_("mine")
    (tmp_path / "log").write_text("")
    with pytest.raises(TypeError), disk_errors(tmp_path / "log"):  # the probe goes into the file's folder
        raise TypeError("not JSON serializable")
    with pytest.raises(OSError) as e, disk_errors(tmp_path / "log"):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write to an open file reports it: no name
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "log")
    real_open = os.open

    def full(path, flags, *a, **kw):
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", full)
    with pytest.raises(OSError) as e, disk_errors(tmp_path / "ckpt", probe=tmp_path):
        raise RuntimeError("unexpected pos 576 vs 534")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "ckpt")
    assert not list(tmp_path.glob(".qtalign-probe*"))


def test_the_store_never_takes_or_gives_a_record_with_non_finite_scores(tmp_path):
    import json

    from qtalign.eval.store import Store

    store = Store(tmp_path / "store")
    good = {"key": "emotion/enout/en/0", "index": 0, "scores": {"positive": 0.7, "negative": 0.3}}
    nan = {"key": "emotion/enout/en/1", "index": 1, "scores": {"positive": float("nan"), "negative": float("nan")}}
    with pytest.raises(QtalignError_, match="emotion/enout/en/1: non-finite"):
        store.add("ab" * 8, [good, nan], {})
    assert store.records("ab" * 8) == {}
    # an entry written by a version that counted NaN as a tie: its NaN record is no record, and a rescored one is added
    d = store.entry("cd" * 8)
    d.mkdir(parents=True)
    (d / "records.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(nan) + "\n")
    assert set(store.records("cd" * 8)) == {0}
    fixed = {**nan, "scores": {"positive": 0.4, "negative": 0.6}}
    assert store.add("cd" * 8, [good, fixed], {}) == 1 and store.records("cd" * 8)[1] == fixed
