"""The bundled paper/* configs reproduce the paper's own settings on one GPU (../shared/paper/README.md; the official
training README in docs/notes_research.md): every experiment, with every model fragment, resolves into its stage
configs without the network, and the resolved settings are the paper's."""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from conftest import OFFICIAL, ROOT, needs_shared
from qtalign.experiment.config import list_configs, load_experiment, stage_config
from qtalign.experiment.runner import Experiment

EXPERIMENTS = [n for n in list_configs() if n.startswith("paper/") and not n.startswith("paper/model/")
               and n not in ("paper/base", "paper/nf4")]
GPU_MODELS = {"paper/model/qwen1.5-1.8b": "Qwen/Qwen1.5-1.8B", "paper/model/qwen1.5-4b": "Qwen/Qwen1.5-4B",
              "paper/model/qwen1.5-14b": "Qwen/Qwen1.5-14B", "paper/model/mistral-7b": "mistralai/Mistral-7B-v0.1"}
FRAGMENTS = [n for n in list_configs() if n.startswith("paper/model/")]
DATA_DIR = "/data/official"


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (a config that reached for the hub would)."""
    def refuse(*a, **k):
        raise AssertionError("a paper config opened a network connection while resolving")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_paper_configs_are_all_checked():
    assert set(GPU_MODELS) < set(FRAGMENTS) and len(EXPERIMENTS) >= 6 and "paper/zhde_en" in EXPERIMENTS


@pytest.mark.parametrize("fragment", [None, *FRAGMENTS, "paper/nf4"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_paper_config_resolves_into_its_stage_configs(name, fragment, no_network, tmp_path):
    cfg = load_experiment([name] + ([fragment] if fragment else []), extra={"data_dir": DATA_DIR,
                                                                              "out": str(tmp_path / "run")})
    Experiment(cfg, log=lambda s: None)
    for stage in ("data", "train", "eval", "lens", "geometry"):
        sc = stage_config(cfg, stage)
        if "prompts" in type(sc).model_fields:
            assert sc.prompts == [f"{DATA_DIR}/../paper_prompts.json"], (name, stage)
        if "model" in type(sc).model_fields and sc.model is not None:
            assert sc.model == cfg.model
    assert not (tmp_path / "run").exists()  # resolving writes nothing


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_paper_settings(name, tmp_path):
    """Qwen1.5 base models by hub id in bf16; LoRA r 8 / alpha 16 on q_proj, v_proj; lr 5e-5, cosine, 10 % warmup;
    batch 16 (4 x 4 accumulation on one GPU); 3 epochs; cutoff 2048; the whole 5 % held out, its loss every 50 steps,
    the best checkpoint kept; the family's chat template; all 20 languages x emotion/SNLI/PAWS."""
    from qtalign.train.recipe import training_arguments

    cfg = load_experiment([name], extra={"data_dir": DATA_DIR})
    assert (cfg.model.name, cfg.model.dtype, cfg.model.load_in_4bit) == ("Qwen/Qwen1.5-1.8B", "bf16", False)
    t = stage_config(cfg, "train")
    assert (t.lora_r, t.lora_alpha, t.lora_dropout, t.target_modules) == (8, 16, 0.0, ["q_proj", "v_proj"])
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.epochs, t.max_steps) == (5e-5, "cosine", 0.1, 3, None)
    assert (t.batch_size, t.per_device_batch_size, t.cutoff_len) == (16, 4, 2048)
    assert (t.val_size, t.val_max_rows, t.eval_steps, t.template) == (0.05, None, 50, "chat")
    args = training_arguments(t, tmp_path, 19_000, 1_000, "cpu")
    assert (args.gradient_accumulation_steps, args.eval_steps, args.save_steps) == (4, 50, 50)
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss" and not args.greater_is_better
    assert args.learning_rate == 5e-5 and args.lr_scheduler_type == "cosine" and args.num_train_epochs == 3
    e = cfg.eval
    assert (e.tasks, e.langs, e.variants, e.method, e.limit) == (["emotion", "snli", "paws"], ["all"],
                                                                 ["enout", "native", "irrelevant"], "first-token", None)


def test_twenty_thousand_rows_make_the_papers_3560_steps():
    from qtalign.train.data import split_rows
    from qtalign.train.recipe import planned_steps

    t = stage_config(load_experiment(["paper/zhde_en"], extra={"data_dir": DATA_DIR}), "train")
    train_idx, val_idx = split_rows(20_000, t.val_size, 0, t.val_max_rows)
    assert (len(train_idx), len(val_idx)) == (19_000, 1_000)
    assert planned_steps(t, len(train_idx)) == 3 * 1_188  # "about 3,560 steps"


@needs_shared
def test_the_two_source_experiment_trains_on_twenty_thousand_rows():
    cfg = load_experiment(["paper/zhde_en"], extra={"data_dir": str(OFFICIAL)})
    assert cfg.data.rows_per_lang is None  # every row of each official question file
    sizes = [len(json.loads(open(f, encoding="utf-8").read())) for f in cfg.data.question_files]
    assert sizes == [10_000, 10_000]


@pytest.mark.parametrize("fragment, name", sorted(GPU_MODELS.items()))
def test_model_fragments_name_the_hub_models_in_bf16(fragment, name):
    cfg = load_experiment(["paper/zhde_en", fragment], extra={"data_dir": DATA_DIR})
    assert (cfg.model.name, cfg.model.dtype, cfg.model.load_in_4bit) == (name, "bf16", False)
    assert cfg.train.template == ("raw" if "mistral" in name.lower() else "chat")
    assert cfg.train.eval_steps == 50 and cfg.train.learning_rate == 5e-5


def test_nf4_is_the_official_evaluations_weights_for_a_whole_run():
    cfg = load_experiment(["paper/zhde_en", "paper/model/qwen1.5-14b", "paper/nf4"], extra={"data_dir": DATA_DIR})
    assert (cfg.model.name, cfg.model.dtype, cfg.model.load_in_4bit) == ("Qwen/Qwen1.5-14B", "fp16", True)
    exp = Experiment(cfg)
    assert stage_config(exp.cfg, "eval").model.load_in_4bit and exp.models.config("tuned").load_in_4bit


def test_a_bf16_run_is_evaluated_in_4_bits_from_its_config(tmp_path, capsys):
    """The paper's own order (train unquantised, evaluate NF4): `qtalign eval --config RUN/config.yaml --load-in-4bit`
    resolves to the run's eval stage (tasks, languages, data, the paper's prompts) with the 4-bit model."""
    from qtalign.cli import main
    from qtalign.eval.config import EvalConfig

    assert main(["run", "paper/zhde_en", "--data-dir", DATA_DIR, "--print-config"]) == 0
    run_cfg = tmp_path / "config.yaml"
    run_cfg.write_text(capsys.readouterr().out, encoding="utf-8")
    adapter = str(tmp_path / "runs/paper-zhde-en/train/adapter")
    saved = tmp_path / "eval4.yaml"
    assert main(["eval", "--config", str(run_cfg), "--load-in-4bit", "--dtype", "fp16", "--adapter", adapter,
                 "--out", str(tmp_path / "e"), "--save-config", str(saved)]) == 0
    got = EvalConfig.model_validate(yaml.safe_load(saved.read_text(encoding="utf-8"))["eval"])
    exp = Experiment(load_experiment(["paper/zhde_en"], extra={"data_dir": DATA_DIR}))
    want_model = exp.cfg.model.model_copy(update={"load_in_4bit": True, "dtype": "fp16", "adapter": adapter})
    assert got == stage_config(exp.cfg, "eval", model=want_model.model_dump())
    assert got.prompts == [f"{DATA_DIR}/../paper_prompts.json"] and got.data_dir == DATA_DIR


# -- the scale recipes shipped with docs/scale.md --------------------------------------------------------------------

RECIPES = ROOT / "docs" / "recipes"


def test_the_fsdp_recipe_is_an_fsdp2_launch_for_accelerate(monkeypatch):
    """accelerate's own launcher reads the shipped config into FSDP2 with one unit per decoder layer and a whole
    state dict (the adapter saved complete); an unknown key or a wrong version fails here, not on a GPU node."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = RECIPES / "fsdp2.yaml"
    assert ClusterConfig.from_yaml_file(str(path)).distributed_type == "FSDP"
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for k, v in env.items():
        if k.startswith("FSDP_"):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # FSDP2: the no-offload policy (CPUOffloadPolicy offloads)
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)


def test_the_llamafactory_recipe_has_paper_base_settings():
    """Training elsewhere: the shipped LLaMA-Factory file trains with paper/base's settings, on the rows and dataset
    name the data stage writes for it (data.alpaca=true)."""
    lf = yaml.safe_load((RECIPES / "llamafactory_qwen1.5_lora.yaml").read_text(encoding="utf-8"))
    cfg = load_experiment(["paper/zhde_en"], extra={"data_dir": DATA_DIR})
    t = cfg.train
    assert lf["model_name_or_path"] == cfg.model.name and lf["finetuning_type"] == "lora"
    assert lf["lora_target"].split(",") == t.target_modules
    assert (lf["lora_rank"], lf["lora_alpha"], lf["lora_dropout"]) == (t.lora_r, t.lora_alpha, t.lora_dropout)
    assert lf["per_device_train_batch_size"] * lf["gradient_accumulation_steps"] == t.batch_size
    assert (lf["learning_rate"], lf["num_train_epochs"], lf["lr_scheduler_type"], lf["warmup_ratio"]) == (
        t.learning_rate, t.epochs, t.lr_scheduler, t.warmup_ratio)
    assert (lf["cutoff_len"], lf["val_size"], lf["eval_steps"], lf["save_steps"]) == (t.cutoff_len, t.val_size, 50, 50)
    assert lf["load_best_model_at_end"] and lf["metric_for_best_model"] == "eval_loss" and lf["bf16"]
    assert lf["dataset_dir"] == f"runs/{cfg.name}/data"


@needs_shared
def test_the_data_stage_writes_the_llamafactory_dataset(tmp_path):
    """`data.alpaca=true` writes alpaca.json and a dataset_info.json whose dataset name is the recipe's."""
    from qtalign.cli import main

    lf = yaml.safe_load((RECIPES / "llamafactory_qwen1.5_lora.yaml").read_text(encoding="utf-8"))
    out = tmp_path / "run"
    assert main(["run", "paper/zhde_en", "--data-dir", str(OFFICIAL), "--stages", "data", "data.alpaca=true",
                 "data.rows_per_lang=20", f"out={out}"]) == 0
    info = json.loads((out / "data" / "dataset_info.json").read_text(encoding="utf-8"))
    assert list(info) == [lf["dataset"]] and info[lf["dataset"]]["file_name"] == "alpaca.json"
    rows = json.loads((out / "data" / "alpaca.json").read_text(encoding="utf-8"))
    assert len(rows) == 40 and all(r["instruction"] and r["output"] and r["input"] == "" for r in rows)
