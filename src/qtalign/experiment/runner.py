"""`qtalign run CONFIG`: one config describes an experiment; its stages run in order into one run dir.

    data → train → eval (base, tuned) → lens → geometry → report

Run dir layout (`out`, default runs/<name>):

    .qtalign.json        ownership marker: the entries qtalign wrote here (nothing else is ever removed)
    config.yaml          the resolved config (extends + overrides applied); `qtalign run <run dir>/config.yaml` repeats it
    experiment.json      config, seen languages, train/eval overlap check, environment, stage states (the report reads it)
    data/ train/ eval/base/ eval/tuned/ lens/ geometry/      one folder per unit, each with stage.json
    report/              the report's own figures;  report.md, report.html

The run is a recipe: plan every unit (experiment/stages.plan_units: configs resolved, data built, overlap checked,
items selected), then for each unit in order skip it or run it, then the report (a sink: it reads what the units
wrote). Every unit folder is owned through a marker of its own (io.OutputDir): a unit that reruns clears the files it
wrote there, never a file of the user's beside them. Every unit folder holds `stage.json` = {stage, fingerprint,
status, timing_s} (experiment/stages.py says what the fingerprint covers; a unit that reads another is fingerprinted
once that one is done). A unit whose status is done, whose fingerprint matches and whose marker file exists is skipped;
one whose fingerprint changed is cleared and rerun; one that was interrupted (status running, same fingerprint) is
called again and resumes where the stage supports it (evaluation from predictions.jsonl, training from its
checkpoints). Before anything reruns, its done marker and those of every unit downstream of it (the report
included) are withdrawn, so that a killed rerun never leaves an old result looking current.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from qtalign.engine.models import LoadedModel, ModelConfig
from qtalign.errors import QtalignError
from qtalign.experiment.config import STAGES, ExperimentConfig, dump_config, expand
from qtalign.experiment.stages import STAGE_FUNCTIONS, Inputs, Unit, plan_units, report_unit
from qtalign.io import OutputDir, fingerprint, read_json, write_json, write_text
from qtalign.tracking import check_available

REPORT_OUTPUTS = ("stats.json", "report.md", "report.html")  # report/build.py's OUTPUTS (not imported: the report
# module is loaded only when a report is written)
RUN_FILES = ("config.yaml", "experiment.json", *REPORT_OUTPUTS, "tracking")


class Models:
    """The models of a run, each loaded once: base = the configured model; tuned = the same + the trained LoRA adapter
    (unmerged). The one object through which the stages reach models (stages.Inputs.models)."""

    def __init__(self, cfg: ExperimentConfig, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.names = ["base", "tuned"] if "train" in cfg.stages else ["base"]
        self._loaded: dict[str, LoadedModel] = {}
        self._set = None  # engine.models.ModelSet, made at the first load

    def config(self, which: str) -> ModelConfig:
        if which == "base":
            return self.cfg.model
        adapter = self.cfg.run_dir / "train" / "adapter"
        return self.cfg.model.model_copy(update={"adapter": str(adapter), "merge_adapter": False})

    def which(self, mc: ModelConfig) -> str:
        """The name of the model a stage config names."""
        return next(w for w in self.names if self.config(w).model_dump() == mc.model_dump())

    def identity(self, which: str) -> dict:
        """engine.models.model_identity (the tuned model's covers the trained adapter's content: asked once it exists;
        content hashes are cached by path, size and mtime)."""
        from qtalign.engine.models import model_identity

        return model_identity(self.config(which))

    def model(self, which: str) -> LoadedModel:
        """One base model in memory per run, the adapter switched per forward (engine.models.ModelSet)."""
        if which not in self._loaded:
            from qtalign.engine.models import ModelSet

            t0 = time.time()
            if self._set is None:
                self._set = ModelSet(self.cfg.model)
            self._loaded[which] = self._set.load(self.config(which))
            self.log(f"  loaded {which} model ({self.cfg.model.name}) in {time.time() - t0:.1f} s")
        return self._loaded[which]

    def models(self) -> dict[str, LoadedModel]:
        return {w: self.model(w) for w in self.names}


class Experiment:
    def __init__(self, cfg: ExperimentConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.log = log or (lambda s: print(s, flush=True))
        self.models = Models(cfg, self.log)

    def units(self) -> list[Unit]:
        """The units of this experiment, planned: every input read and checked (experiment/stages.plan_units)."""
        return plan_units(self.cfg, self.models)

    # -- the recipe ---------------------------------------------------------------------------------------------
    def run(self, only: list[str] | None = None, force: list[str] | None = None) -> dict:
        """Run the experiment's stages (or the subset `only`); returns {unit folder: 'ran' | 'skipped'}."""
        cfg = self.cfg
        only = list(cfg.stages) if not only else only
        force = self._check_stages(only, set(force or []))
        check_available(sorted({*cfg.report_to, *(cfg.train.report_to if "train" in cfg.stages else []),
                                *(cfg.eval.report_to if "eval" in cfg.stages else [])}))
        units = self.units()  # every input read and checked before the run dir is touched
        fps, states = self._states(units)
        self._check_inputs(units, states, only)
        self.claim(units)
        if self._withdraw_reruns(units, states, only, force):
            fps, states = self._states(units)  # the withdrawn units now rerun
        self._start(units, states, only)
        done: dict[str, str] = {}
        outcome: dict[str, str] = {}
        for u in units:
            if u.stage in only:
                fps[u.folder] = fps[u.folder] or self.fingerprint(u, fps)  # what it reads is done now
                outcome[u.folder] = self._step(u, fps[u.folder], u.stage in force, self.inputs(u, fps))
            if u.stage in only or states[u.folder] == "done":
                done[u.folder] = fps[u.folder]
        if "report" in cfg.stages:
            self._report(units, done, only, force, outcome)
        p = self.run_dir / "experiment.json"
        write_json(p, {**(read_json(p) or {}), "stages": {f: "done" for f in outcome}, "finished": time.time(),
                       "last_run": outcome})
        self._track()
        return outcome

    def inputs(self, u: Unit, fps: dict) -> Inputs:
        return Inputs({r: self.run_dir / r for r in u.reads}, {r: fps[r] for r in u.reads}, self.models)

    def fingerprint(self, u: Unit, fps: dict) -> str:
        return STAGE_FUNCTIONS[u.stage][0](u.cfg, u.plan, self.inputs(u, fps))

    def _states(self, units: list[Unit]) -> tuple[dict[str, str | None], dict[str, str]]:
        """Each unit's fingerprint and state; a unit that reads one that is not done has no fingerprint yet (it is
        fingerprinted when reached, once what it reads has run)."""
        fps: dict[str, str | None] = {}
        states: dict[str, str] = {}
        for u in units:
            ready = all(states.get(r) == "done" for r in u.reads)
            fps[u.folder] = self.fingerprint(u, fps) if ready else None
            states[u.folder] = self.state(u, fps[u.folder])
        return fps, states

    def _step(self, u: Unit, fp: str, forced: bool, inputs: Inputs | None = None) -> str:
        """Skip a unit that is up to date, else run it (resuming where it was interrupted): 'skipped' or 'ran'."""
        st = self.state(u, fp)
        sj_path = self.run_dir / u.folder / "stage.json"
        if st == "done" and not forced:
            self.log(f"[{u.folder}] up to date (fingerprint {fp}): skipped")
            write_json(sj_path, {**(read_json(sj_path) or {}), "skipped_last_run": True})
            return "skipped"
        if st == "stale" or forced:
            self.owned_dir().remove(u.folder, *(REPORT_OUTPUTS if u.stage == "report" else ()))
        self.owned_dir().subdir(u.folder, u.stage).record("stage.json")
        self.log(f"[{u.folder}] {'resuming' if st == 'partial' and not forced else 'running'} …")
        attempts = (read_json(sj_path) or {}).get("attempts", 0) + 1
        record = {"stage": u.folder, "fingerprint": fp, "config": u.config, "attempts": attempts}
        write_json(sj_path, {**record, "status": "running", "started": time.time()})
        t0 = time.time()
        self.execute(u, inputs)
        dt = time.time() - t0
        write_json(sj_path, {**record, "status": "done", "timing_s": round(dt, 2), "finished": time.time(),
                             "skipped_last_run": False})
        self.log(f"[{u.folder}] done in {dt:.1f} s")
        return "ran"

    def execute(self, u: Unit, inputs: Inputs | None) -> None:
        """Run one unit's stage into its folder (experiment/parallel.py runs train and eval on every process)."""
        if u.stage == "report":
            from qtalign.report.build import write_report

            write_report(self.run_dir)
        else:
            STAGE_FUNCTIONS[u.stage][1](u.cfg, u.plan, inputs, self.run_dir / u.folder)

    def _report(self, units: list[Unit], done: dict[str, str], only: list[str], force: set[str], outcome: dict) -> None:
        """The sink: the report of what the units wrote, fingerprinted by what is done (not rerun otherwise)."""
        u = report_unit(self.cfg)
        fp = fingerprint({"stage": "report", "config": u.config, "inputs": {v.folder: done.get(v.folder) for v in units}})
        if "report" in only:
            outcome[u.folder] = self._step(u, fp, "report" in force)

    # -- the run dir --------------------------------------------------------------------------------------------
    def downstream(self, units: list[Unit], folder: str) -> list[Unit]:
        """The units that read ``folder``, directly or through others."""
        out, frontier = [], {folder}
        for u in units:
            if frontier & set(u.reads):
                out.append(u)
                frontier.add(u.folder)
        return out

    def owned_dir(self) -> OutputDir:
        return OutputDir(self.run_dir, "experiment", option="out")

    def claim(self, units: list[Unit]) -> OutputDir:
        """Own the run dir and check that every folder the stages write is qtalign's or absent (each unit folder, and
        the folders on its way, through their own markers)."""
        out = self.owned_dir().check()
        out.claim()
        for name in [*[s for s in STAGES if s in self.cfg.stages], *RUN_FILES]:
            if (self.run_dir / name).exists() and not out.is_ours(name):
                raise QtalignError(f"{self.run_dir / name}: exists and was not written by qtalign; move it away or choose "
                                   "another --out (qtalign never deletes or overwrites files it did not write)")
        for u in units:
            parts = u.folder.split("/")
            for i in range(len(parts)):
                if (self.run_dir.joinpath(*parts[:i + 1])).exists():
                    OutputDir(self.run_dir.joinpath(*parts[:i + 1]), u.stage if i == len(parts) - 1 else "experiment",
                              option="out").check()
        out.record(*[s for s in STAGES if s in self.cfg.stages], *RUN_FILES)
        return out

    def state(self, u: Unit, fp: str | None) -> str:
        """'done' (skippable), 'partial' (same fingerprint, interrupted: resume), 'stale' (other fingerprint, a
        withdrawn marker, or not fingerprinted yet) or 'missing'."""
        sj = read_json(self.run_dir / u.folder / "stage.json")
        if sj is None:
            return "stale" if (self.run_dir / u.folder).exists() else "missing"
        if fp is None or sj.get("fingerprint") != fp or sj.get("status") == "stale":  # another config, or withdrawn
            return "stale"
        if sj.get("status") == "done" and (self.run_dir / u.marker).exists():
            return "done"
        return "partial"

    def _withdraw(self, u: Unit) -> None:
        """Take back a unit's done marker (its folder stays: an interrupted stage resumes from it)."""
        sj_path = self.run_dir / u.folder / "stage.json"
        sj = read_json(sj_path)
        if sj is not None and sj.get("status") == "done":
            write_json(sj_path, {**sj, "status": "stale", "withdrawn": time.time()})
        if u.stage == "report":
            self.owned_dir().remove(*REPORT_OUTPUTS)

    # -- checks before running ----------------------------------------------------------------------------------
    def _check_stages(self, only: list[str], force: set[str]) -> set[str]:
        cfg = self.cfg
        for s in [*only, *force]:
            if s not in STAGES and s != "all":
                raise QtalignError(f"unknown stage '{s}' (stages: {', '.join(STAGES)})")
            if s in STAGES and s not in cfg.stages:
                raise QtalignError(f"stage '{s}' is not part of this experiment (its stages: {', '.join(cfg.stages)})")
        return set(cfg.stages) if "all" in force else force

    def _start(self, units: list[Unit], states: dict[str, str], only: list[str]) -> None:
        """config.yaml, and experiment.json with what is known before anything runs (the facts of an earlier run
        are dropped, never left looking current)."""
        from qtalign.environment import environment, hardware

        write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
        data = next((u.plan for u in units if u.stage == "data"), None)
        # outputs on disk that this config does not produce (not rerun in a --stages subset): flagged in the report
        stale = [u.folder for u in units if u.stage not in only and states[u.folder] != "done" and (self.run_dir / u.folder).exists()]
        old = {k: v for k, v in (read_json(self.run_dir / "experiment.json") or {}).items()
               if k not in ("finished", "last_run", "stale_stages", "stages")}
        write_json(self.run_dir / "experiment.json", {
            **old, "config": self.cfg.model_dump(mode="json"), "config_defaults": ExperimentConfig().model_dump(mode="json"),
            "seen_langs": data.seen_langs if data else [], "overlap": data.overlap if data else None,
            "environment": {**environment(), **hardware()}, "started": time.time(), "stale_stages": stale})

    def _check_inputs(self, units: list[Unit], states: dict[str, str], only: list[str]) -> None:
        """A --stages subset whose inputs are not up to date is refused before anything is touched."""
        for u in units:
            if u.stage in only or states[u.folder] == "done":
                continue
            needed_by = [v.folder for v in units if u.folder in v.reads and v.stage in only]
            if needed_by:
                raise QtalignError(f"stage '{u.folder}' is needed by {', '.join(needed_by)} but is not up to date in "
                                   f"{self.run_dir} ({states[u.folder]}); run it too (--stages {u.stage},"
                                   f"{','.join(sorted({v.split('/')[0] for v in needed_by}))})")

    def _withdraw_reruns(self, units: list[Unit], states: dict[str, str], only: list[str], force: set[str]) -> bool:
        """The markers of the units about to rerun, of everything downstream of them and of the report are withdrawn
        first; returns whether any unit reruns."""
        rerun = [u for u in units if u.stage in only and (states[u.folder] != "done" or u.stage in force)]
        for u in rerun:
            for v in [u, *self.downstream(units, u.folder), *([report_unit(self.cfg)] if "report" in self.cfg.stages else [])]:
                self._withdraw(v)
        return bool(rerun)

    def _track(self) -> None:
        """The experiment's headline numbers (macro averages of base and tuned, and their change) to its trackers."""
        from qtalign.tracking import eval_scalars, log_metrics

        if not self.cfg.report_to:
            return
        base, tuned = (eval_scalars((read_json(self.run_dir / "eval" / w / "results.json") or {}).get("metrics", {}))
                       for w in ("base", "tuned"))
        out = {}
        for name, b in base.items():  # eval/<task>/<variant>/avg_all/<metric> -> experiment/<task>/<variant>/base_<metric>
            head, sep, k = name.removeprefix("eval/").rpartition("/avg_all/")
            if sep:  # a macro average over all languages
                out[f"experiment/{head}/base_{k}"] = b
                if name in tuned:
                    out[f"experiment/{head}/tuned_{k}"], out[f"experiment/{head}/delta_{k}"] = tuned[name], tuned[name] - b
        log_metrics(self.cfg.report_to, self.run_dir / "tracking" / "experiment", out, run_name=self.cfg.name)


def run_experiments(cfg: ExperimentConfig, only: list[str] | None = None, force: list[str] | None = None,
                    log: Callable[[str], None] | None = None) -> list[Path]:
    """Run an experiment, or each of its arms x seeds (experiment.config.expand) one after the other, each a
    resumable run of its own; with several, compare them side by side in <out>/compare (the change tuned - base per
    run, and per arm the mean over seeds with its spread). Returns the run dirs."""
    log = log or (lambda s: print(s, flush=True))
    if not cfg.arms and not cfg.seeds:
        Experiment(cfg, log).run(only, force)
        return [cfg.run_dir]
    runs = expand(cfg)
    top = OutputDir(cfg.run_dir, "experiments", option="out").check()
    top.claim()
    top.record(*sorted({label.split("/")[0] for label, _ in runs}), "compare", "config.yaml")
    write_text(cfg.run_dir / "config.yaml", dump_config(cfg))
    for label, sub in runs:
        log(f"=== {label} ({sub.run_dir}) ===")
        Experiment(sub, log).run(only, force)
    done = [(label, sub) for label, sub in runs if (sub.run_dir / "eval" / "base" / "results.json").exists()]
    if len(done) > 1:
        from qtalign.report.compare import compare_runs

        which = "change" if all("train" in sub.stages for _, sub in done) else "base"
        # a run's label in the comparison: 'copy/seed1' -> 'copy-seed1' (compare labels are plain names)
        compare_runs([f"{label.replace('/', '-')}={sub.run_dir}" for label, sub in done], cfg.run_dir / "compare",
                     title=f"{(cfg.report.title or cfg.name)}: {len(done)} runs (arms x seeds)", which=which)
        log(f"[compare] {cfg.run_dir / 'compare' / 'compare.md'}")
    return [sub.run_dir for _, sub in runs]
