"""The registry of experiment stages: how each stage of an experiment becomes units (a folder, its done marker, the
fingerprint parts, the units it reads, and the call that runs it). A new stage is an entry here and a section in
experiment/config.py.

    data -> train -> eval/base, eval/tuned -> lens -> geometry -> report

Every unit is fingerprinted with io.fingerprint: its result settings, the content of the data it reads, the base
model's identity, the engine's numerics version and the fingerprints of its inputs (so a change anywhere reruns only
what it invalidates; moving a run dir invalidates nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from qtalign.io import files_sha256, fingerprint

# the functions below take the running experiment (experiment/runner.py's Experiment: its stage configs, models,
# run dir); it is not imported here, so that the registry stays below the runner
Experiment = Any


@dataclass
class Unit:
    """One stage step with its own folder (eval has two: eval/base and eval/tuned)."""

    stage: str
    folder: str  # relative to the run dir
    marker: str  # relative to the run dir: exists once the step has finished
    config: dict  # the settings that determine the result
    inputs: list[str]  # folders of the units it reads
    run: Callable[[], Any]
    data: dict | None = None  # content hashes of the data it reads
    model: dict | None = None  # identity of the (base) model
    numerics: str | None = None  # the engine's numerics version
    fingerprint: str = ""
    outputs: list[str] = field(default_factory=list)  # run-dir-level files it writes besides its folder

    def compute_fingerprint(self, inputs: dict) -> str:
        return fingerprint({"stage": self.stage, "config": self.config, "inputs": inputs}, data=self.data,
                           model=self.model, numerics=self.numerics)


def selection_hashes(cfg) -> dict:
    """Content hashes of the data an evaluation-type stage reads (every planned task x language, the prompt files)."""
    from qtalign.eval.store import spec_digest
    from qtalign.tasks.items import data_hashes
    from qtalign.tasks.specs import load_specs

    specs = load_specs(cfg.prompts)
    groups, _ = cfg.plan(specs)
    source = cfg.source()
    out = {}
    for g in groups:
        key = f"{g.task}/{g.lang}"
        if key not in out:
            out[key] = {"data": data_hashes(specs.task(g.task), g.lang, source), "spec": spec_digest(specs.task(g.task), g.lang)}
    out["prompts"] = files_sha256(cfg.prompts)
    return out


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


# ------------------------------------------------------------------------------------------------------------------
# the stages


def data_units(exp: Experiment) -> list[Unit]:
    from qtalign.qtdata.build import build_question_data

    dc = exp.stage_config("data")
    return [Unit("data", "data", "data/summary.json", dc.model_dump(mode="json"), [],
                 lambda: build_question_data(dc, exp.run_dir / "data"), data=qtdata_hashes(dc))]


def train_units(exp: Experiment) -> list[Unit]:
    tc = exp.stage_config("train", tracking_dir=str(exp.run_dir / "tracking" / "train"))
    conf = {**tc.result_config(), "seed": exp.cfg.seed}

    def run():
        from qtalign.train.recipe import train

        return train(tc, exp.run_dir / "data" / "train.jsonl", exp.run_dir / "train")

    return [Unit("train", "train", "train/summary.json", conf, ["data"], run, data=files_sha256(tc.val_data),
                 model=exp.base_identity)]


def eval_units(exp: Experiment) -> list[Unit]:
    from qtalign.engine.forward import NUMERICS_VERSION

    units = []
    for which in (["base", "tuned"] if exp.tuned else ["base"]):
        ec = exp.stage_config("eval", model=exp.model_cfg(which).model_dump(),
                              tracking_dir=str(exp.run_dir / "tracking" / f"eval_{which}"))

        def run(ec=ec, which=which):
            from qtalign.eval.run import evaluate

            # the model is loaded only when some item is neither in the run dir nor in the shared result store
            return evaluate(ec, exp.run_dir / "eval" / which, loaded=lambda: exp.model(which))

        units.append(Unit("eval", f"eval/{which}", f"eval/{which}/results.json", ec.result_config(),
                          ["train"] if which == "tuned" else [], run, data=selection_hashes(ec), model=exp.base_identity,
                          numerics=NUMERICS_VERSION))
    return units


def analysis_units(name: str) -> Callable[[Experiment], list[Unit]]:
    def units(exp: Experiment) -> list[Unit]:
        from qtalign.engine.forward import NUMERICS_VERSION

        sc = exp.stage_config(name)

        def run():
            if name == "lens":
                from qtalign.analysis.lens import run_lens as fn
            else:
                from qtalign.analysis.geometry import run_geometry as fn
            return fn(sc, exp.run_dir / name, exp.models())

        return [Unit(name, name, f"{name}/summary.json", {**sc.result_config(), "tuned": exp.tuned},
                     ["train"] if exp.tuned else [], run, data=selection_hashes(sc), model=exp.base_identity,
                     numerics=NUMERICS_VERSION)]

    return units


def report_units(exp: Experiment) -> list[Unit]:
    def run():
        from qtalign.report.build import write_report

        return write_report(exp.run_dir)

    cfg = exp.cfg
    return [Unit("report", "report", "report.md", {"report": cfg.report.model_dump(), "name": cfg.name}, [], run,
                 outputs=["report.md", "report.html"])]


# stage name -> the function that makes its units
REGISTRY: dict[str, Callable[[Experiment], list[Unit]]] = {
    "data": data_units, "train": train_units, "eval": eval_units, "lens": analysis_units("lens"),
    "geometry": analysis_units("geometry"), "report": report_units,
}
