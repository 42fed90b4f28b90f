"""Running where researchers run, checked on CPU: the torch version range and the install commands, loading straight
to a device (device_map), the fp16 path, the message of a merge from a 4-bit config, and benchmarks/gpu_check.py's
dry mode."""

import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_torch_is_a_range_and_the_install_commands_name_the_cpu_wheel():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    req = Requirement(next(d for d in proj["dependencies"] if Requirement(d).name == "torch"))
    assert not any(s.operator in ("==", "===") for s in req.specifier), req  # installs beside a user's CUDA torch
    assert torch.__version__.split("+")[0] in req.specifier and "2.13.0" in req.specifier
    for f in ("README.md", ".ci/run"):  # one command; a bare range would pull a CUDA build where no torch is installed
        assert 'pip install torch==2.13.0 -e ".[test]"' in (ROOT / f).read_text(), f
    assert any(Requirement(d).name == "bitsandbytes" for d in proj["optional-dependencies"]["gpu"])


def _scores(model, tok, method="first-token"):
    import copy

    from qtalign.scoring.scorer import Scorer
    from test_backend import _requests

    return {s.key: s.raw for s in Scorer(model, tok, method, batch_size=4).score(copy.deepcopy(_requests(n=4)))}


def test_models_load_straight_to_their_device_and_device_map_auto_loads(tiny_llama_dir):
    """The default load (device_map = the device) and `model.device_map: auto` score exactly as a
    plain from_pretrained does."""
    from transformers import AutoModelForCausalLM

    from qtalign.engine.models import ModelConfig, load_model

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    lm = load_model(ModelConfig(name=str(tiny_llama_dir), dtype="fp32", device="cpu"))
    ref = _scores(plain, lm.tokenizer)
    assert _scores(lm.model, lm.tokenizer) == ref
    spread = load_model(ModelConfig(name=str(tiny_llama_dir), dtype="fp32", device_map="auto"))
    assert {p.device.type for p in spread.model.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    assert _scores(spread.model, spread.tokenizer) == ref
    assert _scores(spread.model, spread.tokenizer, "sequence") == _scores(plain, lm.tokenizer, "sequence")


def test_fp16_training_is_refused_on_cpu_and_scaled_on_cuda(tmp_path, tiny_llama_dir):
    """fp16 weights train only under the Trainer's loss scaler (CUDA); on CPU one clear error before anything is
    loaded or written, naming bf16."""
    import pytest

    from qtalign.errors import QtalignError
    from qtalign.train.config import TrainConfig
    from qtalign.train.recipe import mixed_precision, train

    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "a", "output": "b"}\n')
    cfg = TrainConfig(model={"name": str(tiny_llama_dir), "dtype": "fp16", "device": "cpu"}, max_steps=1)
    with pytest.raises(QtalignError, match="fp16 trains with a loss scaler, which needs a CUDA GPU; on CPU use --dtype bf16"):
        train(cfg, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert mixed_precision(cfg, "cuda") == {"bf16": False, "fp16": True}
    for dtype, device in (("bf16", "cuda"), ("fp32", "cuda"), ("bf16", "cpu")):
        c = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": dtype})})
        assert mixed_precision(c, device) == {"bf16": False, "fp16": False}


def test_a_merge_from_a_4bit_config_says_what_to_do(tmp_path, tiny_llama_dir, spm_tokenizer):
    import pytest
    from peft import LoraConfig, get_peft_model
    from pydantic import ValidationError

    from conftest import tiny_model
    from qtalign.engine.models import ModelConfig, apply_adapter
    from qtalign.errors import QtalignError
    from qtalign.train.merge import merge

    adapter = tmp_path / "adapter"
    get_peft_model(tiny_model("llama", spm_tokenizer), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    what = r"cannot be merged into a base loaded in 4 bits .*--no-load-in-4bit"
    with pytest.raises(QtalignError, match=what):
        merge(ModelConfig(name=str(tiny_llama_dir), load_in_4bit=True), adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ValidationError, match=what):
        ModelConfig(name=str(tiny_llama_dir), load_in_4bit=True, adapter=str(adapter), merge_adapter=True)
    model = tiny_model("llama", spm_tokenizer)
    model.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes NF4 load (CUDA only)
    with pytest.raises(QtalignError, match=what):
        apply_adapter(model, str(adapter), merge=True)


def test_gpu_check_dry_mode(tmp_path):
    """benchmarks/gpu_check.py --dry: the CPU against itself (every rule and the lens states agree exactly), the
    engine's throughput against a plain loop, peak memory; what a lent GPU runs in full."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--dry", "--json", str(tmp_path / "gc.json"), "--items", "6"]) == 0
    out = json.loads((tmp_path / "gc.json").read_text())
    checks = {(r["arch"], r["check"]) for r in out["agreement"]}
    assert checks == {(a, c) for a in ("llama", "qwen2", "gemma3") for c in (*mod.RULES, "lens states")}
    assert all(r["ok"] and r["same_predictions"] and r["max_prob_diff"] == 0.0 for r in out["agreement"])
    t = out["throughput"]
    assert t["items"] == 6 and t["engine_items_per_s"] > 0 and t["plain_items_per_s"] > 0 and t["peak_memory_MiB"] > 0


UNEVEN = r"""
import datetime, sys, time
from types import SimpleNamespace
import torch.distributed as dist
from qtalign.engine.parallel import barrier_group, finish_barrier
rank, port, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
# the backend's default timeout, made short: the slow rank arrives 3 s after it has run out
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=2))
state = SimpleNamespace(num_processes=2)
group = barrier_group(state, timeout_s=60)
if rank == 1:
    time.sleep(5)  # its share of the items took longer
try:
    finish_barrier(state, group, timeout_s=60) if mode == "ours" else dist.barrier()
    print("ok")
except Exception as e:
    print("failed", type(e).__name__)
"""


def test_uneven_ranks_finish_safely_under_two_processes(tmp_path):
    """The end of a data-parallel evaluation waits for a rank slower than the backend's default timeout (a plain
    barrier under the same timeout fails: the test can tell)."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    outcome = {}
    for mode in ("ours", "plain"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        procs = [subprocess.Popen([sys.executable, str(script), str(r), port, mode], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, env=env) for r in (0, 1)]
        outcome[mode] = [p.communicate(timeout=120)[0].strip().splitlines()[-1:] for p in procs]
    assert outcome["ours"] == [["ok"], ["ok"]]
    assert any(o != ["ok"] for o in outcome["plain"])


# -- `qtalign run` under several processes ---------------------------------------------------------------------


def _run_cfg(model_dir, out) -> dict:
    return {
        "name": "tiny", "out": str(out), "seed": 0, "stages": ["data", "train", "eval", "lens"],
        "model": {"name": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "data": {"task": "emotion", "data_files": "demo", "sources": ["zh", "de"], "target": "en", "items": "60:120",
                 "rows_per_lang": 6},
        # one process: micro-batches of 2, accumulated twice; two processes: one micro-batch of 2 each (batch 4 both)
        "train": {"max_steps": 2, "batch_size": 4, "per_device_batch_size": 2, "learning_rate": 5e-3, "val_size": 0,
                  "cutoff_len": 128},
        "eval": {"tasks": ["emotion"], "data_files": "demo", "langs": ["en", "zh", "sw"], "items": "0:7", "batch_size": 3},
        "lens": {"tasks": ["emotion"], "data_files": "demo", "langs": ["en", "zh"], "limit": 3},
    }


@pytest.mark.slow
def test_qtalign_run_under_two_processes_equals_one(tmp_path, tiny_llama_dir):
    """`accelerate launch --num_processes 2 -m qtalign run` (gloo, CPU): the main process owns the run dir, training runs
    DDP, evaluation data-parallel, the lens on the main process while the other waits; the items' predictions and
    scores, the adapter and the lens numbers equal those of one process."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np
    import yaml
    from safetensors.torch import load_file

    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(_run_cfg(tiny_llama_dir, tmp_path / "one")), encoding="utf-8")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    one = subprocess.run([sys.executable, "-m", "qtalign", "run", str(cfg)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    env["QTALIGN_STORE"] = str(tmp_path / "store2")  # nothing served from the first run's records
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qtalign", "run",
                          str(cfg), f"out={tmp_path / 'two'}"], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = tmp_path / "one", tmp_path / "two"
    # one process owns the run dir: it alone ran and reported every unit, and no process's shard is left
    for unit in ("data", "train", "eval/base", "eval/tuned", "lens"):
        assert two.stdout.count(f"[{unit}] running") == 1 and two.stdout.count(f"[{unit}] done") == 1, two.stdout
    assert two.stdout.count("done in") - two.stdout.count("] done in") == 1
    assert not list(b.rglob("predictions.rank*.jsonl"))
    assert json.loads((b / "train" / "summary.json").read_text())["numbers"]["processes"] == 2
    for which in ("base", "tuned"):
        assert json.loads((b / "eval" / which / "results.json").read_text())["processes"] == 2
        p1, p2 = ([json.loads(x) for x in (d / "eval" / which / "predictions.jsonl").read_text().splitlines()] for d in (a, b))
        assert [r["key"] for r in p1] == [r["key"] for r in p2] and len(p1) == 21
        for x, y in zip(p1, p2):
            assert x["pred"] == y["pred"] and x["cal_pred"] == y["cal_pred"], (which, x["key"])
            assert max(abs(x["scores"][c] - y["scores"][c]) for c in x["scores"]) < 1e-5
    # the same global batches: 2 x 2 rows all-reduced, or 2 rows accumulated twice (equal here to float rounding;
    # the sums' order differs, so bit equality is not promised)
    w1, w2 = (load_file(d / "train" / "adapter" / "adapter_model.safetensors") for d in (a, b))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert float((w1[k] - w2[k]).norm() / w1[k].norm()) < 1e-5, k
    l1, l2 = (sorted((d / "lens").rglob("*.npz")) for d in (a, b))
    assert [p.relative_to(a) for p in l1] == [p.relative_to(b) for p in l2] and l1
    for p, q in zip(l1, l2):
        x, y = np.load(p), np.load(q)
        assert all(np.array_equal(x[k], y[k]) for k in x.files), p.name


def test_arms_and_seeds_are_refused_under_several_processes(tmp_path, monkeypatch, tiny_llama_dir):
    """One line, before any process group work or any file: arms and seeds run under one process."""
    from types import SimpleNamespace

    import qtalign.engine.parallel as par
    from qtalign.errors import QtalignError
    from qtalign.experiment.config import ExperimentConfig
    from qtalign.experiment.parallel import run_processes

    d = _run_cfg(tiny_llama_dir, tmp_path / "run")
    monkeypatch.setattr(par, "distributed_state", lambda: SimpleNamespace(num_processes=2, is_main_process=True))
    monkeypatch.setattr(par, "barrier_group", lambda state: pytest.fail("no process group before the check"))
    with pytest.raises(QtalignError, match="arms and seeds run under one process"):
        run_processes(ExperimentConfig.model_validate({**d, "seeds": [0, 1]}))
    assert not (tmp_path / "run").exists()
