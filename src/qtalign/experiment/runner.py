"""`qtalign run CONFIG`: one config describes an experiment; its stages run in order into one run dir.

    data → train → eval (base, tuned) → lens → geometry → report

Run dir layout (`out`, default runs/<name>):

    .qtalign.json        ownership marker: the entries qtalign wrote here (nothing else is ever removed)
    config.yaml          the resolved config (extends + overrides applied); `qtalign run <run dir>/config.yaml` repeats it
    experiment.json      config, seen languages, train/eval overlap check, environment, stage states (the report reads it)
    data/ train/ eval/base/ eval/tuned/ lens/ geometry/      one folder per unit, each with stage.json
    report/              the report's own figures;  report.md, report.html

Every unit folder is owned through a marker of its own (io.OutputDir): a unit that reruns clears the files it wrote
there, never a file of the user's beside them. Every unit folder holds `stage.json` = {stage, fingerprint, status, timing_s} (experiment/stages.py says what the
fingerprint covers). A unit whose status is done, whose fingerprint matches and whose marker file exists is skipped;
one whose fingerprint changed is cleared and rerun; one that was interrupted (status running, same fingerprint) is
called again and resumes where the stage supports it (evaluation from predictions.jsonl, training from its
checkpoints). Before anything reruns, its done marker and those of every unit downstream of it (the report
included) are withdrawn, so that a killed rerun never leaves an old result looking current.
"""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path
from typing import Callable

from qtalign.engine.models import LoadedModel, ModelConfig
from qtalign.errors import QtalignError
from qtalign.experiment.config import STAGES, ExperimentConfig, dump_config, expand
from qtalign.experiment.overlap import check_overlap
from qtalign.experiment.stages import REGISTRY, Unit
from qtalign.io import OutputDir, read_json, write_json, write_text
from qtalign.tracking import check_available

RUN_FILES = ("config.yaml", "experiment.json", "report.md", "report.html", "tracking")


def config_defaults() -> dict:
    """Every setting's default (recorded in experiment.json: the report shows what differs from it)."""
    return ExperimentConfig().model_dump(mode="json")


class Experiment:
    def __init__(self, cfg: ExperimentConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.log = log or (lambda s: print(s, flush=True))
        self._models: dict[str, LoadedModel] = {}
        self.overlap: dict | None = None

    # -- stage configs and models -------------------------------------------------------------------------------
    def stage_config(self, name: str, **extra):
        """The section as the stage's own config, with the top-level model/seed/data_dir/prompts filled in."""
        from qtalign.experiment.config import SECTION_CONFIGS

        cls = SECTION_CONFIGS[name]
        d = getattr(self.cfg, name).model_dump()
        f = cls.model_fields
        if "seed" in f:
            d["seed"] = self.cfg.seed
        if "model" in f:
            d["model"] = self.cfg.model.model_dump()
        if "data_dir" in f and not d.get("data_dir") and self.cfg.data_dir:
            d["data_dir"] = self.cfg.data_dir
        if "prompts" in f:
            d["prompts"] = list(dict.fromkeys([*self.cfg.prompts, *d.get("prompts", [])]))
        if "report_to" in f and self.cfg.report_to and not d.get("report_to"):
            d["report_to"] = list(self.cfg.report_to)
        d.update(extra)
        return cls(**d)

    @property
    def tuned(self) -> bool:
        return "train" in self.cfg.stages

    def adapter_dir(self) -> Path:
        return self.run_dir / "train" / "adapter"

    def model_cfg(self, which: str) -> ModelConfig:
        if which == "base":
            return self.cfg.model
        return self.cfg.model.model_copy(update={"adapter": str(self.adapter_dir()), "merge_adapter": False})

    @cached_property
    def base_identity(self) -> dict:
        from qtalign.engine.models import model_identity

        return model_identity(self.cfg.model)

    def model(self, which: str) -> LoadedModel:
        """base = the configured model; tuned = the same + the trained LoRA adapter (unmerged). One base model in
        memory per run, the adapter switched per forward (engine.models.ModelSet)."""
        if which not in self._models:
            from qtalign.engine.models import ModelSet

            t0 = time.time()
            if getattr(self, "_model_set", None) is None:
                self._model_set = ModelSet(self.cfg.model)
            self._models[which] = self._model_set.load(self.model_cfg(which))
            self.log(f"  loaded {which} model ({self.cfg.model.name}) in {time.time() - t0:.1f} s")
        return self._models[which]

    def models(self) -> dict[str, LoadedModel]:
        return {w: self.model(w) for w in (["base", "tuned"] if self.tuned else ["base"])}

    # -- the plan -----------------------------------------------------------------------------------------------
    def units(self) -> list[Unit]:
        units = [u for name in STAGES if name in self.cfg.stages for u in REGISTRY[name](self)]
        fps: dict[str, str] = {}
        for u in units:
            if u.stage == "report":
                u.inputs = [v.folder for v in units if v.stage != "report"]
                continue  # fingerprinted at run time from what is actually done
            u.fingerprint = u.compute_fingerprint({i: fps.get(i) for i in u.inputs})
            fps[u.folder] = u.fingerprint
        return units

    def downstream(self, units: list[Unit], folder: str) -> list[Unit]:
        """The units that read ``folder``, directly or through others."""
        out, frontier = [], {folder}
        for u in units:
            if frontier & set(u.inputs):
                out.append(u)
                frontier.add(u.folder)
        return out

    # -- the run dir --------------------------------------------------------------------------------------------
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

    def state(self, u: Unit) -> str:
        """'done' (skippable), 'partial' (same fingerprint, interrupted: resume), 'stale' (other fingerprint, or a
        withdrawn marker) or 'missing'."""
        sj = read_json(self.run_dir / u.folder / "stage.json")
        if sj is None:
            return "stale" if (self.run_dir / u.folder).exists() else "missing"
        if sj.get("fingerprint") != u.fingerprint or sj.get("status") == "stale":  # another config, or a withdrawn result
            return "stale"
        if sj.get("status") == "done" and (self.run_dir / u.marker).exists():
            return "done"
        return "partial"

    def _write_experiment(self, extra: dict | None = None) -> None:
        p = self.run_dir / "experiment.json"
        d = read_json(p) or {}
        d.update(extra or {})
        write_json(p, d)

    def _withdraw(self, u: Unit) -> None:
        """Take back a unit's done marker (its folder stays: an interrupted stage resumes from it)."""
        sj_path = self.run_dir / u.folder / "stage.json"
        sj = read_json(sj_path)
        if sj is not None and sj.get("status") == "done":
            write_json(sj_path, {**sj, "status": "stale", "withdrawn": time.time()})
        if u.stage == "report":
            for name in u.outputs:
                self.owned_dir().remove(name)

    # -- running ------------------------------------------------------------------------------------------------
    def _check_stages(self, only: list[str], force: set[str]) -> set[str]:
        cfg = self.cfg
        for s in [*only, *force]:
            if s not in STAGES and s != "all":
                raise QtalignError(f"unknown stage '{s}' (stages: {', '.join(STAGES)})")
            if s in STAGES and s not in cfg.stages:
                raise QtalignError(f"stage '{s}' is not part of this experiment (its stages: {', '.join(cfg.stages)})")
        return set(cfg.stages) if "all" in force else force

    def _seen_langs(self) -> list[str]:
        """Checks the data and the train/eval overlap before anything runs; returns the languages trained on."""
        if "data" in self.cfg.stages and "eval" in self.cfg.stages:
            self.overlap = check_overlap(self.stage_config("data"), self.stage_config("eval"))
            return self.overlap["seen_langs"]
        if "data" in self.cfg.stages:
            from qtalign.qtdata.build import build_records

            records, _ = build_records(self.stage_config("data"))
            return sorted({r[k] for r in records for k in ("src", "tgt") if r[k]})
        return []

    def _start(self, seen: list[str]) -> None:
        from qtalign.environment import environment, hardware

        write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
        d = read_json(self.run_dir / "experiment.json") or {}
        for k in ("finished", "last_run", "stale_stages", "stages"):  # facts of an earlier run: never left looking current
            d.pop(k, None)
        write_json(self.run_dir / "experiment.json", d)
        self._write_experiment({"config": self.cfg.model_dump(mode="json"), "config_defaults": config_defaults(),
                                "seen_langs": seen, "overlap": self.overlap,
                                "environment": {**environment(), **hardware()}, "started": time.time()})

    def _check_inputs(self, units: list[Unit], states: dict[str, str], only: list[str]) -> None:
        """A --stages subset whose inputs are not up to date is refused before anything is touched."""
        for u in units:
            if u.stage in only or u.stage == "report" or states[u.folder] == "done":
                continue
            needed_by = [v.folder for v in units if u.folder in v.inputs and v.stage in only and v.stage != "report"]
            if needed_by:
                raise QtalignError(f"stage '{u.folder}' is needed by {', '.join(needed_by)} but is not up to date in "
                                   f"{self.run_dir} ({states[u.folder]}); run it too (--stages {u.stage},"
                                   f"{','.join(sorted({v.split('/')[0] for v in needed_by}))})")

    def _withdraw_reruns(self, units: list[Unit], states: dict[str, str], only: list[str], force: set[str]) -> None:
        """The markers of the units about to rerun, and of everything downstream of them, are withdrawn first."""
        rerun = [u for u in units if u.stage in only and u.stage != "report" and (states[u.folder] != "done" or u.stage in force)]
        for u in rerun:
            for v in [u, *self.downstream(units, u.folder)]:
                self._withdraw(v)

    def _run_unit(self, u: Unit, st: str, forced: bool) -> None:
        rd = self.run_dir
        if st == "stale" or forced:
            self.owned_dir().remove(u.folder)
            if u.stage == "report":
                self.owned_dir().remove(*u.outputs)
        self.owned_dir().subdir(u.folder, u.stage).record("stage.json")
        self.log(f"[{u.folder}] {'resuming' if st == 'partial' and not forced else 'running'} …")
        sj_path = rd / u.folder / "stage.json"
        attempts = (read_json(sj_path) or {}).get("attempts", 0) + 1
        write_json(sj_path, {"stage": u.folder, "fingerprint": u.fingerprint, "status": "running", "config": u.config,
                             "started": time.time(), "attempts": attempts})
        t0 = time.time()
        u.run()
        dt = time.time() - t0
        write_json(sj_path, {"stage": u.folder, "fingerprint": u.fingerprint, "status": "done", "config": u.config,
                             "timing_s": round(dt, 2), "finished": time.time(), "attempts": attempts, "skipped_last_run": False})
        self.log(f"[{u.folder}] done in {dt:.1f} s")

    def run(self, only: list[str] | None = None, force: list[str] | None = None) -> dict:
        """Run the experiment's stages (or the subset `only`); returns {unit folder: 'ran' | 'skipped'}."""
        cfg, rd = self.cfg, self.run_dir
        only = list(cfg.stages) if not only else only
        force = self._check_stages(only, set(force or []))
        check_available(sorted({*cfg.report_to, *(cfg.train.report_to if "train" in cfg.stages else []),
                                *(cfg.eval.report_to if "eval" in cfg.stages else [])}))
        units = self.units()  # every input read and checked before the run dir is touched
        seen = self._seen_langs()
        states = {u.folder: self.state(u) for u in units if u.stage != "report"}
        self._check_inputs(units, states, only)
        self.claim(units)
        self._start(seen)
        self._withdraw_reruns(units, states, only, force)
        states = {u.folder: self.state(u) for u in units if u.stage != "report"}  # withdrawn units now rerun
        done: dict[str, str] = {}
        outcome: dict[str, str] = {}
        for u in units:
            if u.stage == "report":
                u.fingerprint = u.compute_fingerprint({i: done.get(i) for i in u.inputs})
                # outputs on disk that this config did not produce (not rerun in a --stages subset): flagged in the report
                stale = [v.folder for v in units if v.stage != "report" and v.folder not in done and (rd / v.folder).exists()]
                self._write_experiment({"stale_stages": stale})
                states[u.folder] = self.state(u)
            st = states[u.folder]
            if u.stage not in only:
                if st == "done":
                    done[u.folder] = u.fingerprint
                continue
            if st == "done" and u.stage not in force:
                self.log(f"[{u.folder}] up to date (fingerprint {u.fingerprint}): skipped")
                sj = read_json(rd / u.folder / "stage.json") or {}
                write_json(rd / u.folder / "stage.json", {**sj, "skipped_last_run": True})
                outcome[u.folder] = "skipped"
            else:
                self._run_unit(u, st, u.stage in force)
                outcome[u.folder] = "ran"
            done[u.folder] = u.fingerprint
            self._write_experiment({"stages": {**(read_json(rd / "experiment.json") or {}).get("stages", {}), u.folder: "done"}})
        self._write_experiment({"finished": time.time(), "last_run": outcome})
        self._track()
        return outcome

    def _track(self) -> None:
        """The experiment's headline numbers (macro averages of base and tuned, and their change) to its trackers."""
        from qtalign.tracking import log_metrics

        if not self.cfg.report_to:
            return
        base = read_json(self.run_dir / "eval" / "base" / "results.json") or {}
        tuned = read_json(self.run_dir / "eval" / "tuned" / "results.json") or {}
        out = {}
        for t, tv in base.get("metrics", {}).items():
            for v, d in tv.items():
                for k in ("acc", "cal_acc", "auc"):
                    b = d["avg"]["all"].get(k)
                    out[f"experiment/{t}/{v}/base_{k}"] = b
                    tt = ((tuned.get("metrics", {}).get(t) or {}).get(v) or {}).get("avg", {}).get("all", {}).get(k)
                    if tt is not None and b is not None:
                        out[f"experiment/{t}/{v}/tuned_{k}"] = tt
                        out[f"experiment/{t}/{v}/delta_{k}"] = tt - b
        log_metrics(self.cfg.report_to, self.run_dir / "tracking" / "experiment", out, run_name=self.cfg.name)


def run_label(label: str) -> str:
    """A run's label in a comparison: 'copy/seed1' -> 'copy-seed1' (compare labels are plain names)."""
    return label.replace("/", "-")


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
        compare_runs([f"{run_label(label)}={sub.run_dir}" for label, sub in done], cfg.run_dir / "compare",
                     title=f"{(cfg.report.title or cfg.name)}: {len(done)} runs (arms x seeds)", which=which)
        log(f"[compare] {cfg.run_dir / 'compare' / 'compare.md'}")
    return [sub.run_dir for _, sub in runs]
