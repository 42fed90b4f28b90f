"""One base model with adapters switched (engine.models.ModelSet): base and tuned models share one copy of the base
weights, and every score, lens number and pooled state equals, bit for bit, that of separately loaded models (fp32 and
bf16), in whatever order the models are used, also after a forward that failed half-way."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from qtalign.engine.forward import Prompt
from qtalign.engine.models import ModelConfig, ModelSet, load_model, model_identity
from qtalign.eval.run import EvalConfig, build_requests, evaluate
from qtalign.scoring.scorer import Scorer
from qtalign.tasks.items import DataSource, select_items
from qtalign.tasks.specs import load_specs

ORDER = ["base", "t1", "base", "t2", "t1", "base"]  # every switch: on, off, to another adapter, back


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    """Two LoRA adapters with random (non-zero) weights: q/v projections, and v projection + the LM head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for name, seed, targets in (("t1", 1, ["q_proj", "v_proj"]), ("t2", 2, ["v_proj", "lm_head"])):
        m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        torch.manual_seed(seed)
        pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                          task_type="CAUSAL_LM"))
        d = tmp_path_factory.mktemp(f"adapter_{name}")
        with warnings.catch_warnings():  # peft's note that the LM head's adapter saves the embedding layers
            warnings.simplefilter("ignore")
            pm.save_pretrained(d)
        out[name] = str(d)
    return out


def _cfgs(model_dir, adapters, dtype):
    base = ModelConfig(name=str(model_dir), dtype=dtype, device="cpu")
    return {"base": base, **{k: base.model_copy(update={"adapter": d}) for k, d in adapters.items()}}


@pytest.fixture(scope="module")
def reqs():
    task = load_specs().task("emotion")
    items = select_items(task, "zh", DataSource.from_options(None, "demo", "test"), None, 6, set())
    return build_requests(task, "zh", "native", items, "first-token")


def _scores(lm, reqs, method):
    """Per item, the raw class numbers as a float64 tensor (exact: the rules' host floats)."""
    return {s.key: torch.tensor(s.raw, dtype=torch.float64)
            for s in Scorer(lm.model, lm.tokenizer, method, 4).score(copy.deepcopy(reqs))}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype,methods", [("fp32", ("first-token", "sequence", "faithful")),
                                           ("bf16", ("first-token", "sequence"))])
def test_switched_adapters_score_as_separate_models_bit_for_bit(tiny_llama_dir, adapters, reqs, dtype, methods):
    cfgs = _cfgs(tiny_llama_dir, adapters, dtype)
    ref = {k: {m: _scores(load_model(c), reqs, m) for m in methods} for k, c in cfgs.items()}
    for m in methods:  # the adapters change the scores: the comparison can tell a wrong adapter state
        assert not _equal(ref["t1"][m], ref["base"][m]) and not _equal(ref["t2"][m], ref["t1"][m])
    models = ModelSet(cfgs["base"])
    for k in ORDER:
        lm = models.load(cfgs[k])
        for m in methods:
            assert _equal(_scores(lm, reqs, m), ref[k][m]), (k, m)
    # the tuned model's identity (its fingerprint, the store's keys) is that of a separate load
    for k, c in cfgs.items():
        assert models.load(c).info["identity"] == model_identity(c) == load_model(c).info["identity"]


def test_evaluate_with_a_shared_base_writes_what_separate_models_write(tiny_llama_dir, adapters, tmp_path):
    cfgs = _cfgs(tiny_llama_dir, adapters, "fp32")
    models = ModelSet(cfgs["base"])

    def ev(which, lm, out):
        cfg = EvalConfig(model=cfgs[which], tasks=["emotion"], langs=["en", "zh"], variants=["native"], data_files="demo",
                         limit=5, batch_size=3, store=False)
        res = evaluate(cfg, tmp_path / out, loaded=lm, progress=False)
        return res, (tmp_path / out / "predictions.jsonl").read_bytes()

    for which in ("t1", "base", "t2"):
        shared, sep = ev(which, models.load(cfgs[which]), f"{which}_shared"), ev(which, load_model(cfgs[which]), f"{which}_sep")
        assert shared[1] == sep[1], which
        assert shared[0]["fingerprint"] == sep[0]["fingerprint"] and shared[0]["model"]["identity"] == sep[0]["model"]["identity"]
        assert shared[0]["model"]["num_parameters"] == sep[0]["model"]["num_parameters"]
    assert json.loads(ev("t1", models.load(cfgs["t1"]), "again")[1].splitlines()[0]) != \
        json.loads(ev("base", models.load(cfgs["base"]), "again_base")[1].splitlines()[0])


def test_the_base_weights_are_loaded_once(tiny_llama_dir, adapters, monkeypatch):
    import qtalign.engine.models as mm

    cfgs = _cfgs(tiny_llama_dir, adapters, "fp32")
    calls = []
    real = mm.load_model
    monkeypatch.setattr(mm, "load_model", lambda cfg, **kw: calls.append(cfg) or real(cfg, **kw))
    models = ModelSet(cfgs["base"])
    views = [models.load(cfgs[k]) for k in ORDER]
    assert len(calls) == 1 and calls[0].adapter is None
    base_bytes = sum(p.numel() * p.element_size() for p in real(cfgs["base"]).model.parameters())
    storages = {}
    for lm in views:
        for p in lm.model.parameters():
            storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    lora = sum(p.numel() * p.element_size() for n, p in models.peft.named_parameters() if "lora_" in n)
    assert sum(storages.values()) == base_bytes + lora < 1.5 * base_bytes
    assert len({id(lm.model.get_base_model()) for lm in views}) == 1
    # a merged adapter is another model's weights: loaded apart, never merged into the shared base
    merged = models.load(cfgs["t1"].model_copy(update={"merge_adapter": True}))
    assert len(calls) == 2 and merged.model is not views[0].model.get_base_model()


def test_a_failed_forward_leaves_every_adapter_state_right(tiny_llama_dir, adapters, reqs):
    cfgs = _cfgs(tiny_llama_dir, adapters, "fp32")
    ref = {k: _scores(load_model(c), reqs, "first-token") for k, c in cfgs.items()}
    models = ModelSet(cfgs["base"])
    base, t1, t2 = (models.load(cfgs[k]) for k in ("base", "t1", "t2"))
    layer = base.model.get_base_model().model.layers[1]
    fail = {"on": True}

    def boom(*_):
        if fail["on"]:
            raise RuntimeError("injected fault")

    h = layer.register_forward_hook(boom)
    for lm in (t1, base, t2):  # the fault half-way through a forward, in every state
        before = models._state
        with pytest.raises(RuntimeError, match="injected"):
            _scores(lm, reqs, "first-token")
        assert models._state == before
    fail["on"] = False
    h.remove()
    for k, lm in (("base", base), ("t2", t2), ("t1", t1), ("base", base)):
        assert _equal(_scores(lm, reqs, "first-token"), ref[k]), k
    with pytest.raises(KeyError):  # an exception inside a view's context restores the state it found
        with t2.model.adapter_context():
            raise KeyError("x")
    assert _equal(_scores(base, reqs, "first-token"), ref["base"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lens_and_geometry_of_a_shared_base_equal_separate_models(tiny_llama_dir, adapters, dtype):
    from qtalign.analysis.geometry import pooled_states
    from qtalign.analysis.lens import lens_group

    cfgs = _cfgs(tiny_llama_dir, adapters, dtype)
    specs = load_specs()
    task = specs.task("emotion")
    items = select_items(task, "zh", DataSource.from_options(None, "demo", "test"), None, 4, set())
    prompts = [Prompt(r.key, r.group, r.prefix, r.prefix + r.question)
               for r in build_requests(task, "zh", "native", items, "first-token")]

    def run(lm):
        g = lens_group(lm, task, "zh", "native", items, batch_size=3, keep_overlap=True)
        st = pooled_states(lm, prompts, ["last", "prompt"], batch_size=3)
        return g.arrays, st

    ref = {k: run(load_model(c)) for k, c in cfgs.items()}
    assert not np.array_equal(ref["t1"][0]["latent"], ref["base"][0]["latent"])
    models = ModelSet(cfgs["base"])
    for k in ORDER:
        arrays, st = run(models.load(cfgs[k]))
        assert all(np.array_equal(arrays[m], ref[k][0][m]) for m in arrays), k
        assert all(np.array_equal(st[p][key], ref[k][1][p][key]) for p in st for key in st[p]), k


def test_load_models_and_the_experiment_share_one_base(tiny_llama_dir, adapters, tmp_path):
    import shutil

    from qtalign.analysis.common import load_models
    from qtalign.analysis.lens import LensConfig
    from qtalign.experiment.config import ExperimentConfig
    from qtalign.experiment.runner import Experiment

    lc = LensConfig(model=ModelConfig(name=str(tiny_llama_dir), dtype="fp32"), compare=[adapters["t1"], f"b={adapters['t2']}"])
    ms = load_models(lc)
    assert list(ms) == ["base", "tuned", "b"] and len({id(lm.model.get_base_model()) for lm in ms.values()}) == 1
    cfg = ExperimentConfig.model_validate({"name": "t", "out": str(tmp_path / "run"),
                                           "model": {"name": str(tiny_llama_dir), "dtype": "fp32", "device": "cpu"}})
    exp = Experiment(cfg, log=lambda s: None)
    shutil.copytree(adapters["t1"], exp.models.config("tuned").adapter)
    models = exp.models.models()
    assert list(models) == ["base", "tuned"]
    assert models["base"].model.get_base_model() is models["tuned"].model.get_base_model()
    assert models["tuned"].info["identity"] == model_identity(exp.models.config("tuned"))
    sep = load_model(exp.models.config("tuned"))
    task = load_specs().task("emotion")
    items = select_items(task, "en", DataSource.from_options(None, "demo", "test"), None, 4, set())
    reqs = build_requests(task, "en", "native", items, "first-token")
    assert _equal(_scores(models["tuned"], reqs, "sequence"), _scores(sep, reqs, "sequence"))
