"""The experiment's stages. Planning (`plan_units`) turns an experiment config into units: a folder each (eval has
two, eval/base and eval/tuned), with the stage's resolved config and its plan, made once before anything runs. Every
stage is then two functions of the same arguments, and nothing else:

    fingerprint(cfg, plan, inputs) -> str     what its result depends on (io.fingerprint)
    run(cfg, plan, inputs, out)               writes the unit's folder ``out``

    cfg     the section as the stage's own config (experiment/config.stage_config: top-level model, seed, data dir,
            prompts and trackers filled in)
    plan    what it reads, read and checked at planning: the data stage's records with the train/eval overlap check;
            an evaluation-type stage's eval/plan.Plan (its fingerprint is the stage's); None for training
    inputs  the folders and fingerprints of the units it reads, and the run's model provider

    data -> train -> eval/base, eval/tuned -> lens -> geometry          (the report is the runner's sink, after them)

A unit that reads another is fingerprinted once that one is done: the tuned model's identity is the trained adapter's
content, so the tuned evaluation records the same fingerprint in stage.json as in results.json. A new stage is its
two functions in STAGE_FUNCTIONS, its units in plan_units and a section in experiment/config.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qtalign.experiment.config import ExperimentConfig, stage_config
from qtalign.io import files_sha256, fingerprint


@dataclass
class Unit:
    """One stage step with its own folder."""

    stage: str
    folder: str  # relative to the run dir
    marker: str  # relative to the run dir: exists once the step has finished
    cfg: Any  # the stage's resolved config
    plan: Any  # what it reads, planned before anything runs
    reads: list[str] = field(default_factory=list)  # folders of the units it reads

    @property
    def config(self) -> dict:
        """The settings that determine the result (recorded in stage.json)."""
        return recorded_config(self.stage, self.cfg)


def recorded_config(stage: str, cfg) -> dict:
    """The config part of a unit's fingerprint (and of its stage.json)."""
    if stage == "report":
        return {"report": cfg.report.model_dump(), "name": cfg.name}
    if stage == "data":
        return cfg.model_dump(mode="json")
    if stage == "train":
        return {**cfg.result_config(), "seed": cfg.seed}
    return cfg.result_config()


@dataclass
class Inputs:
    """What a unit takes from its run: the units it reads (folder -> path, folder -> fingerprint) and the models."""

    dirs: dict[str, Path]
    fingerprints: dict[str, str]
    models: Any  # experiment/runner.Models: config(which), identity(which), model(which), models(), which(model config)


@dataclass
class DataPlan:
    """The data stage's plan: the question records (built once per run), their stats, and the overlap check."""

    records: list[dict]
    stats: dict
    overlap: dict | None  # experiment/overlap.check_overlap's record; None without an eval stage
    seen_langs: list[str]


def _unit_fingerprint(stage: str, config: dict, inputs: Inputs, **parts) -> str:
    return fingerprint({"stage": stage, "config": config, "inputs": inputs.fingerprints}, **parts)


# ------------------------------------------------------------------------------------------------------------------
# data


def qtdata_hashes(dc) -> dict:
    """Content hashes of the files the data stage reads: question files and the task's item files."""
    from qtalign.tasks.items import data_hashes
    from qtalign.tasks.specs import load_specs

    out = {"question_files": files_sha256(dc.question_files), "prompts": files_sha256(dc.prompts),
           "exclude_file": files_sha256([dc.exclude_file] if dc.exclude_file else [])}
    if dc.task and dc.sources:
        specs = load_specs(dc.prompts)
        task = specs.task(dc.task)
        for lang in [*specs.resolve_langs(dc.sources, dc.task), dc.target]:
            out[f"{dc.task}/{lang}"] = data_hashes(task, lang, dc.source(), english_gold=False)
    return out


def plan_data(dc, eval_plan=None) -> DataPlan:
    """Build the records once and check them against the evaluation's items (raises on a shared item)."""
    from qtalign.experiment.overlap import check_overlap, seen_languages
    from qtalign.qtdata.build import build_records

    records, stats = build_records(dc)
    overlap = check_overlap(dc, eval_plan, records) if eval_plan is not None else None
    return DataPlan(records, stats, overlap, overlap["seen_langs"] if overlap else seen_languages(records))


def data_fingerprint(cfg, plan: DataPlan, inputs: Inputs) -> str:
    return _unit_fingerprint("data", recorded_config("data", cfg), inputs, data=qtdata_hashes(cfg))


def data_run(cfg, plan: DataPlan, inputs: Inputs, out: Path):
    from qtalign.qtdata.build import build_question_data

    return build_question_data(cfg, out, built=(plan.records, plan.stats),
                               summary={"overlap": plan.overlap, "seen_langs": plan.seen_langs})


# ------------------------------------------------------------------------------------------------------------------
# train


def train_fingerprint(cfg, plan, inputs: Inputs) -> str:
    return _unit_fingerprint("train", recorded_config("train", cfg), inputs, data=files_sha256(cfg.val_data),
                             model=inputs.models.identity("base"))


def train_run(cfg, plan, inputs: Inputs, out: Path):
    from qtalign.train.recipe import train

    return train(cfg, inputs.dirs["data"] / "train.jsonl", out)


# ------------------------------------------------------------------------------------------------------------------
# evaluation and the analyses: the plan's fingerprint for the models they read


def _eval_plan(cfg, plan):
    from qtalign.eval.run import evaluation_identity

    return plan.for_model(evaluation_identity(cfg), cfg)


def eval_fingerprint(cfg, plan, inputs: Inputs) -> str:
    return _eval_plan(cfg, plan).fingerprint


def eval_run(cfg, plan, inputs: Inputs, out: Path):
    from qtalign.eval.run import evaluate

    # the model is loaded only when some item is neither in the run dir nor in the shared result store
    return evaluate(cfg, out, loaded=lambda: inputs.models.model(inputs.models.which(cfg.model)), plan=_eval_plan(cfg, plan))


def analysis_fingerprint(cfg, plan, inputs: Inputs) -> str:
    models = inputs.models
    return plan.for_model({n: models.identity(n) for n in models.names}).fingerprint


def lens_run(cfg, plan, inputs: Inputs, out: Path):
    from qtalign.analysis.lens import run_lens

    return run_lens(cfg, out, inputs.models.models(), plan=plan)


def geometry_run(cfg, plan, inputs: Inputs, out: Path):
    from qtalign.analysis.geometry import run_geometry

    return run_geometry(cfg, out, inputs.models.models(), plan=plan)


# stage name -> (fingerprint, run)
STAGE_FUNCTIONS: dict[str, tuple[Callable, Callable]] = {
    "data": (data_fingerprint, data_run), "train": (train_fingerprint, train_run), "eval": (eval_fingerprint, eval_run),
    "lens": (analysis_fingerprint, lens_run), "geometry": (analysis_fingerprint, geometry_run),
}


# ------------------------------------------------------------------------------------------------------------------
# planning


def plan_units(cfg: ExperimentConfig, models) -> list[Unit]:
    """Every unit of the experiment with its resolved config and its plan: every input read and checked (the data
    built, the train/eval overlap checked, the items selected) before the run dir is touched."""
    has = set(cfg.stages)
    tracking = cfg.run_dir / "tracking"
    after_train = ["train"] if "train" in has else []
    units: list[Unit] = []
    ec = stage_config(cfg, "eval") if "eval" in has else None
    eval_plan = ec.plan() if ec is not None else None
    if "data" in has:
        dc = stage_config(cfg, "data")
        units.append(Unit("data", "data", "data/summary.json", dc, plan_data(dc, eval_plan)))
    if "train" in has:
        units.append(Unit("train", "train", "train/summary.json",
                          stage_config(cfg, "train", tracking_dir=str(tracking / "train")), None, ["data"]))
    for which in (models.names if ec is not None else []):
        ecw = stage_config(cfg, "eval", model=models.config(which).model_dump(), tracking_dir=str(tracking / f"eval_{which}"))
        units.append(Unit("eval", f"eval/{which}", f"eval/{which}/results.json", ecw, eval_plan,
                          after_train if which == "tuned" else []))
    for name in ("lens", "geometry"):
        if name in has:
            sc = stage_config(cfg, name)
            units.append(Unit(name, name, f"{name}/summary.json", sc, sc.plan(limit=name != "geometry"), after_train))
    return units


def report_unit(cfg: ExperimentConfig) -> Unit:
    """The report: the runner's sink after the units (its fingerprint covers theirs; report.md and report.html are
    written at the top of the run dir)."""
    return Unit("report", "report", "report.md", cfg, None)
