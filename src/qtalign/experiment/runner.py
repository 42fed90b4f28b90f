"""`qtalign run CONFIG`: one config describes an experiment; the stages run in order into one run dir.

    data → train → eval (base, tuned) → lens → geometry → report

Run dir layout (`out`, default runs/<name>):

    config.yaml          the resolved config (extends + overrides applied); `qtalign run <run dir>/config.yaml` repeats it
    experiment.json      config, seen languages, train/eval overlap check, environment, stage states (the report reads it)
    data/                train.jsonl, stats.json, summary.json               (qtdata.build_question_data)
    train/               adapter/, trainer_log.jsonl, loss.png, summary.json (train.train)
    eval/base/, eval/tuned/   results.json, predictions.jsonl, table.md, labels.md   (evaluate.evaluate)
    lens/, geometry/     arrays, PNGs, summary.json                          (lens.run_lens, geometry.run_geometry)
    report/              the report's own figures;  report.md, report.html   (report.write_report)

Every stage folder holds `stage.json` = {stage, fingerprint, status, timing_s}. The fingerprint hashes the stage's
config (batch sizes excluded: results do not depend on them), the model, the seed and the fingerprints of its
inputs. A stage whose status is done, whose fingerprint matches and whose output exists is skipped; one whose
fingerprint changed is cleared and rerun; one that was interrupted (status running, same fingerprint) is called
again and resumes where the stage supports it (evaluation from predictions.jsonl, training from its checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from qtalign.io import files_sha256, fingerprint as io_fingerprint
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from qtalign.tasks.items import comma_list
from qtalign.errors import QtalignError
from qtalign.eval.config import EvalConfig
from qtalign.analysis.geometry import GeometryConfig
from qtalign.analysis.lens import LensConfig
from qtalign.engine.models import LoadedModel, ModelConfig
from qtalign.qtdata.build import QTDataConfig
import qtalign.train.recipe as train_mod
from qtalign.train.recipe import TrainConfig

STAGES = ("data", "train", "eval", "lens", "geometry", "report")
StageName = Literal["data", "train", "eval", "lens", "geometry", "report"]
# fields of the stage configs that the experiment sets itself (never per section)
MANAGED = {
    "model": "the model is set once, at the top level ('model:'); the tuned model is it + train/adapter",
    "seed": "the seed is set once, at the top level ('seed:')",
    "data": "the experiment trains on its own data stage (data/train.jsonl); configure that in the 'data' section",
    "compare": "the experiment analyses 'base' and 'tuned' (base + train/adapter) itself",
}
NOT_FINGERPRINTED = {"batch_size"}  # evaluation-type stages: results do not depend on it
# training: what train.TrainConfig.fingerprint leaves out (does not change the result)
TRAIN_NOT_FINGERPRINTED = set(train_mod.NOT_FINGERPRINTED)  # one list, owned by the training stage


def _managed(cls, v, info):
    if v is not None:
        raise ValueError(f"not set per section in an experiment: {MANAGED[info.field_name]}")
    return v


def section(cls: type[BaseModel], managed: tuple[str, ...]) -> type[BaseModel]:
    """The stage config `cls` as an experiment section: the `managed` fields are filled in by the experiment
    (setting them is an error; they are left out of dumps)."""
    over = {k: (type(None), Field(None, exclude=True, description=MANAGED[k])) for k in managed if k in cls.model_fields}
    validators = {"_managed": field_validator(*over, mode="before")(_managed)} if over else {}
    return create_model(f"{cls.__name__}Section", __base__=cls, __doc__=cls.__doc__, __validators__=validators, **over)


DataSection = section(QTDataConfig, ("model", "seed"))
TrainSection = section(TrainConfig, ("model", "seed", "data"))
EvalSection = section(EvalConfig, ("model", "seed"))
LensSection = section(LensConfig, ("model", "seed", "compare"))
GeometrySection = section(GeometryConfig, ("model", "seed", "compare"))


class ReportConfig(BaseModel):
    """What the report shows besides the stage outputs."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, description="report title (default: the experiment name)")
    notes: str | None = Field(None, description="free text shown under the title (what the experiment tests, caveats)")


def substitute_data_dir(d: dict) -> dict:
    """Replace '{data_dir}' in every string of a raw config by its top-level data_dir (ValueError naming the key
    when a string uses it and no data_dir is given)."""
    dd = d.get("data_dir")

    def sub(x, path):
        if isinstance(x, dict):
            return {k: sub(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, list):
            return [sub(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, str) and "{data_dir}" in x:
            if not dd:
                raise ValueError(f"field '{path}': uses {{data_dir}} but no data_dir is given (pass --data-dir or data_dir=...)")
            return x.replace("{data_dir}", str(dd))
        return x

    return sub(d, "")


_split = comma_list


class ExperimentConfig(BaseModel):
    """One experiment: question-translation data → LoRA tuning → evaluation of base and tuned → analyses → report."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("experiment", description="short name: the report title and the default run dir runs/<name>")
    out: str | None = Field(None, description="run dir (default runs/<name>); every stage writes a folder in it")
    seed: int = Field(0, description="seed of every stage (sampling, shuffling, LoRA init, training)")
    stages: list[StageName] = Field(default_factory=lambda: list(STAGES),
                                    description="stages this experiment has (without 'train' only the base model is evaluated)")
    data_dir: str | None = Field(None, description="folder in the official layout, given to every section that reads data "
                                 "and sets none; '{data_dir}' inside any string of the config is replaced by it")
    prompts: list[str] = Field(default_factory=list, description="spec files merged over the defaults in every stage "
                               "(e.g. '{data_dir}/../paper_prompts.json')")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model (the tuned model = it + train/adapter)")
    data: DataSection = Field(default_factory=DataSection, description="question-translation data (qtdata.QTDataConfig)")
    train: TrainSection = Field(default_factory=TrainSection, description="LoRA tuning (train.TrainConfig)")
    eval: EvalSection = Field(default_factory=EvalSection, description="evaluation of base and tuned (evaluate.EvalConfig)")
    lens: LensSection = Field(default_factory=LensSection, description="logit lens (lens.LensConfig)")
    geometry: GeometrySection = Field(default_factory=GeometrySection, description="representation geometry (geometry.GeometryConfig)")
    report: ReportConfig = Field(default_factory=ReportConfig, description="report options")

    @field_validator("stages", "prompts", mode="before")
    @classmethod
    def _split_lists(cls, v):
        return _split(v)

    @model_validator(mode="before")
    @classmethod
    def _substitute_data_dir(cls, d):
        return substitute_data_dir(d) if isinstance(d, dict) else d

    @model_validator(mode="after")
    def _check(self):
        order = [s for s in STAGES if s in self.stages]
        if order != list(dict.fromkeys(self.stages)):
            self.stages = order
        if "train" in self.stages and "data" not in self.stages:
            raise ValueError("stage 'train' needs stage 'data' (its training rows)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.name}")


# ------------------------------------------------------------------------------------------------------------------
# config files: bundled names, extends, key=value overrides


def config_dir() -> Path:
    return Path(str(files("qtalign").joinpath("configs")))


def list_configs() -> list[str]:
    root = config_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml") if not p.name.startswith("_"))


def resolve_config_path(name: str | None, relative_to: Path | None = None) -> Path:
    """A config file path, a path relative to the including file, or a bundled name ('demo', 'paper/zhde_en')."""
    name = name or "demo"
    p = Path(name)
    if relative_to is not None and not p.is_absolute() and (relative_to / p).is_file():
        return relative_to / p
    if p.is_file():
        return p
    bundled = config_dir() / (name if name.endswith((".yaml", ".yml")) else name + ".yaml")
    if bundled.is_file():
        return bundled
    raise QtalignError(f"{name}: no such config file, and no bundled config of that name (bundled: {', '.join(list_configs())})")


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_tree(path: Path, _seen: tuple = ()) -> dict:
    """A config file with its `extends:` chain merged: `extends` names one config or a list (merged left to right);
    the extending file's keys win, mappings merge key by key, lists and scalars are replaced."""
    from qtalign.cli import load_config_file

    d = load_config_file(str(path))
    parents = d.pop("extends", None)
    if parents is None:
        return d
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
        raise QtalignError(f"{path}: field 'extends': expected a config name or a list of them")
    base: dict = {}
    for parent in parents:
        ppath = resolve_config_path(parent, path.parent)
        if ppath.resolve() in (*_seen, path.resolve()):
            raise QtalignError(f"{path}: field 'extends': circular ({parent})")
        base = deep_merge(base, read_config_tree(ppath, (*_seen, path.resolve())))
    return deep_merge(base, d)


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise QtalignError(f"bad override {text!r}: use dotted.key=value (e.g. train.epochs=1, eval.langs=en,zh)")
    try:
        v = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        v = value
    return key.strip().split("."), v


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    d = json.loads(json.dumps(d))  # deep copy
    for text in overrides:
        keys, v = parse_override(text)
        node = d
        for i, k in enumerate(keys[:-1]):
            nxt = node.setdefault(k, {})
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise QtalignError(f"bad override {text!r}: '{'.'.join(keys[: i + 1])}' is not a section")
            node = nxt
        node[keys[-1]] = v
    return d


def load_experiment(configs: str | list[str] | None = None, overrides: list[str] | None = None,
                    extra: dict | None = None) -> ExperimentConfig:
    """Config files or bundled names (default 'demo'; several are merged left to right, e.g. an experiment and a
    model fragment) + `extends` + `extra` (CLI options, dotted keys) + key=value overrides -> validated config."""
    names = [configs] if isinstance(configs, str) else list(configs or ["demo"])
    paths = [resolve_config_path(n) for n in names]
    d: dict = {}
    for p in paths:
        d = deep_merge(d, read_config_tree(p))
    d = apply_overrides(d, [f"{k}={json.dumps(v)}" for k, v in (extra or {}).items()] + list(overrides or []))
    where = " + ".join(str(p) for p in paths) + (" (with overrides)" if overrides or extra else "")
    try:
        d = substitute_data_dir(d)
    except ValueError as e:
        raise QtalignError(f"{where}: {e}") from None
    try:
        return ExperimentConfig.model_validate(d)
    except ValidationError as e:
        from qtalign.cli import validation_message

        raise QtalignError(validation_message(e, where)) from None


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------------------------------
# train/eval overlap


def _same_file(a, b) -> bool:
    if a is None or b is None:
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def check_overlap(data_cfg: QTDataConfig, eval_cfg: EvalConfig) -> dict:
    """Which evaluation items are also question-translation training items (by item index in the same files).

    Raises QtalignError when any are shared; returns the record of the check (shown in the report) otherwise.
    Rows from ready question files are built from their own files (e.g. the SNLI train set) and are recorded as such.
    """
    from qtalign.qtdata.build import build_records
    from qtalign.tasks.specs import load_specs

    records, _ = build_records(data_cfg)
    item_keys: set = set()
    if data_cfg.task and data_cfg.sources:
        cands, _ = build_records(data_cfg.model_copy(update={"question_files": [], "rows_per_lang": None, "shuffle": False}))
        item_keys = {(r["src"], r["index"], r["input"]) for r in cands}
    from_items = [r for r in records if (r["src"], r["index"], r["input"]) in item_keys]
    n_files = len(records) - len(from_items)
    train_idx = {r["index"] for r in from_items}
    specs = load_specs(eval_cfg.prompts)
    dsrc, esrc = data_cfg.source(), eval_cfg.source()
    rows, problems = [], []
    for t in eval_cfg.tasks:
        task = specs.task(t)
        langs = [c for c in specs.resolve_langs(eval_cfg.langs, t) if esrc.exists(task, c)]
        row = {"task": t, "n_train": 0, "n_eval": 0, "n_shared": 0}
        if not langs:
            rows.append({**row, "note": "no evaluation data"})
            continue
        items = eval_cfg.select(task, langs[0], esrc)
        eval_idx = {it.index for it in items}
        row["n_eval"] = len(eval_idx)
        notes = []
        if n_files:
            notes.append(f"{n_files} rows from ready question files ({', '.join(Path(f).name for f in data_cfg.question_files)}): "
                         "built from their own (training) items, not from the evaluation files")
        if data_cfg.task == t and from_items:
            tfile, efile = dsrc.path(task, data_cfg.target), esrc.path(task, data_cfg.target)
            row["train_source"] = str(dsrc.path(task, "{lang}") or dsrc.describe())
            row["n_train"] = len(train_idx)
            if _same_file(tfile, efile) and (tfile is not None or dsrc.describe() == esrc.describe()):
                shared = sorted(train_idx & eval_idx)
                row["n_shared"] = len(shared)
                notes.append(f"same item files: training items {min(train_idx)}..{max(train_idx)}, evaluation items "
                             f"{min(eval_idx)}..{max(eval_idx)}" if eval_idx else "same item files")
                if shared:
                    problems.append(f"task '{t}': {len(shared)} evaluation items are also training items (e.g. indices "
                                    f"{', '.join(map(str, shared[:5]))}); make data.items and eval.items disjoint or list "
                                    "them in data.exclude_items / eval.exclude_items")
            else:
                notes.append(f"different item files ({tfile or dsrc.describe()} vs {efile or esrc.describe()}): disjoint by construction")
        elif from_items:
            row["train_source"] = f"task '{data_cfg.task}'"
            notes.append(f"training questions are from task '{data_cfg.task}': a different data set")
        elif n_files:
            row["train_source"] = "question files"
        row["note"] = "; ".join(notes)
        rows.append(row)
    if problems:
        raise QtalignError("train/eval overlap: " + "; ".join(problems))
    return {"overlap": False, "n_train_rows": len(records), "tasks": rows,
            "seen_langs": sorted({r["src"] for r in records if r["src"]} | {r["tgt"] for r in records if r["tgt"]},
                                 key=lambda c: specs.order.index(c) if c in specs.order else 999),
            "detail": f"{len(records)} training rows ({len(from_items)} built from task items, {n_files} from question files)."}


# ------------------------------------------------------------------------------------------------------------------
# stages


def fingerprint(obj) -> str:
    return io_fingerprint(obj)


def _write_json(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(d, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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

    def compute_fingerprint(self, inputs: dict) -> str:
        return io_fingerprint({"stage": self.stage, "config": self.config, "inputs": inputs}, data=self.data,
                              model=self.model, numerics=self.numerics)


def selection_hashes(cfg) -> dict:
    """Content hashes of the data an evaluation-type stage reads (every planned task x language)."""
    from qtalign.tasks.items import data_hashes
    from qtalign.tasks.specs import load_specs

    specs = load_specs(cfg.prompts)
    groups, _ = cfg.plan(specs)
    source = cfg.source()
    out = {}
    for g in groups:
        key = f"{g.task}/{g.lang}"
        if key not in out:
            out[key] = data_hashes(specs.task(g.task), g.lang, source)
    out["prompts"] = files_sha256(cfg.prompts)
    return out


def qtdata_hashes(dc) -> dict:
    """Content hashes of the files the data stage reads: question files and the task's item files."""
    from qtalign.tasks.items import data_hashes
    from qtalign.tasks.specs import load_specs

    out = {"question_files": files_sha256(dc.question_files), "prompts": files_sha256(dc.prompts)}
    if dc.task and dc.sources:
        specs = load_specs(dc.prompts)
        task = specs.task(dc.task)
        for lang in [*specs.resolve_langs(dc.sources, dc.task), dc.target]:
            out[f"{dc.task}/{lang}"] = data_hashes(task, lang, dc.source(), english_gold=False)
    return out


class Experiment:
    def __init__(self, cfg: ExperimentConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.log = log or (lambda s: print(s, flush=True))
        self._models: dict[str, LoadedModel] = {}
        self.overlap: dict | None = None

    # -- stage configs ------------------------------------------------------------------------------------------
    def stage_config(self, name: str, **extra):
        """The section as the stage's own config, with the top-level model/seed/data_dir/prompts filled in."""
        cls = {"data": QTDataConfig, "train": TrainConfig, "eval": EvalConfig, "lens": LensConfig, "geometry": GeometryConfig}[name]
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

    def model(self, which: str) -> LoadedModel:
        """base = the configured model; tuned = the same + the trained LoRA adapter (unmerged). Loaded once per run."""
        if which not in self._models:
            from qtalign.engine.models import load_model

            t0 = time.time()
            self._models[which] = load_model(self.model_cfg(which))
            self.log(f"  loaded {which} model ({self.cfg.model.name}) in {time.time() - t0:.1f} s")
        return self._models[which]

    def models(self) -> dict[str, LoadedModel]:
        return {w: self.model(w) for w in (["base", "tuned"] if self.tuned else ["base"])}

    # -- the plan -----------------------------------------------------------------------------------------------
    def units(self) -> list[Unit]:
        """The stage units in order, each fingerprinted with io.fingerprint: its result settings, the content of the
        data it reads, the base model's identity, the engine's numerics and the fingerprints of its inputs."""
        from qtalign.engine.forward import NUMERICS_VERSION
        from qtalign.engine.models import model_identity

        cfg = self.cfg
        base_id = model_identity(cfg.model)
        units: list[Unit] = []
        if "data" in cfg.stages:
            dc = self.stage_config("data")
            units.append(Unit("data", "data", "data/summary.json", dc.model_dump(mode="json"), [], lambda: self._data(dc),
                              data=qtdata_hashes(dc)))
        if "train" in cfg.stages:
            tc = self.stage_config("train")
            conf = {**tc.model_dump(mode="json", exclude=TRAIN_NOT_FINGERPRINTED | {"model", "data", "val_data"}), "seed": cfg.seed}
            units.append(Unit("train", "train", "train/summary.json", conf, ["data"], lambda: self._train(tc),
                              data=files_sha256(tc.val_data), model=base_id))
        if "eval" in cfg.stages:
            for which in (["base", "tuned"] if self.tuned else ["base"]):
                ec = self.stage_config("eval", model=self.model_cfg(which).model_dump())
                units.append(Unit("eval", f"eval/{which}", f"eval/{which}/results.json", ec.result_config(),
                                  ["train"] if which == "tuned" else [],
                                  (lambda ec=ec, which=which: self._evaluate(ec, which)),
                                  data=selection_hashes(ec), model=base_id, numerics=NUMERICS_VERSION))
        for name in ("lens", "geometry"):
            if name in cfg.stages:
                sc = self.stage_config(name)
                runner = self._lens if name == "lens" else self._geometry
                units.append(Unit(name, name, f"{name}/summary.json", {**sc.result_config(), "tuned": self.tuned},
                                  ["train"] if self.tuned else [], (lambda sc=sc, runner=runner: runner(sc)),
                                  data=selection_hashes(sc), model=base_id, numerics=NUMERICS_VERSION))
        if "report" in cfg.stages:
            units.append(Unit("report", "report", "report.md", {"report": cfg.report.model_dump(), "name": cfg.name},
                              [u.folder for u in units], self._report))
        fps: dict[str, str] = {}
        for u in units:
            if u.stage == "report":
                continue  # fingerprinted at run time from what is actually done (see run)
            u.fingerprint = u.compute_fingerprint({i: fps.get(i) for i in u.inputs})
            fps[u.folder] = u.fingerprint
        return units

    # -- stage runners ------------------------------------------------------------------------------------------
    def _data(self, dc):
        from qtalign.qtdata.build import build_question_data

        return build_question_data(dc, self.run_dir / "data")

    def _train(self, tc):
        from qtalign.train.recipe import train

        return train(tc, self.run_dir / "data" / "train.jsonl", self.run_dir / "train")

    def _evaluate(self, ec, which: str):
        from qtalign.eval.run import evaluate

        # the model is loaded only when some item is neither in the run dir nor in the shared result store
        return evaluate(ec, self.run_dir / "eval" / which, loaded=lambda: self.model(which))

    def _lens(self, lc):
        from qtalign.analysis.lens import run_lens

        return run_lens(lc, self.run_dir / "lens", self.models())

    def _geometry(self, gc):
        from qtalign.analysis.geometry import run_geometry

        return run_geometry(gc, self.run_dir / "geometry", self.models())

    def _report(self):
        from qtalign.report.build import write_report

        return write_report(self.run_dir)

    # -- state --------------------------------------------------------------------------------------------------
    def state(self, u: Unit) -> str:
        """'done' (skippable), 'partial' (same fingerprint, interrupted: resume), 'stale' (other fingerprint) or 'missing'."""
        sj = _read_json(self.run_dir / u.folder / "stage.json")
        if sj is None:
            return "stale" if (self.run_dir / u.folder).exists() else "missing"
        if sj.get("fingerprint") != u.fingerprint:
            return "stale"
        if sj.get("status") == "done" and (self.run_dir / u.marker).exists():
            return "done"
        return "partial"

    def _write_experiment(self, extra: dict | None = None) -> None:
        p = self.run_dir / "experiment.json"
        d = _read_json(p) or {}
        d.update(extra or {})
        _write_json(p, d)

    def run(self, only: list[str] | None = None, force: list[str] | None = None) -> dict:
        """Run the experiment's stages (or the subset `only`); returns {unit folder: 'ran' | 'skipped'}."""
        cfg, rd = self.cfg, self.run_dir
        only = list(cfg.stages) if not only else only
        force = set(force or [])
        for s in [*only, *force]:
            if s not in STAGES and s != "all":
                raise QtalignError(f"unknown stage '{s}' (stages: {', '.join(STAGES)})")
            if s in STAGES and s not in cfg.stages:
                raise QtalignError(f"stage '{s}' is not part of this experiment (its stages: {', '.join(cfg.stages)})")
        if "all" in force:
            force = set(cfg.stages)
        seen: list[str] = []
        if "data" in cfg.stages and "eval" in cfg.stages:
            self.overlap = check_overlap(self.stage_config("data"), self.stage_config("eval"))  # before anything runs
            seen = self.overlap["seen_langs"]
        elif "data" in cfg.stages:
            from qtalign.qtdata.build import build_records

            records, _ = build_records(self.stage_config("data"))
            seen = sorted({r[k] for r in records for k in ("src", "tgt") if r[k]})
        rd.mkdir(parents=True, exist_ok=True)
        (rd / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        from qtalign.environment import environment, hardware

        env = environment()
        env.update(hardware())
        self._write_experiment({"config": cfg.model_dump(mode="json"), "seen_langs": seen,
                                "overlap": self.overlap, "environment": env, "started": time.time()})
        units = self.units()
        done: dict[str, str] = {}
        outcome: dict[str, str] = {}
        for u in units:
            if u.stage == "report":
                u.fingerprint = fingerprint({"config": u.config, "inputs": {i: done.get(i) for i in u.inputs}})
                # outputs on disk that this config did not produce (not rerun in a --stages subset): flagged in the report
                stale = [v.folder for v in units if v.stage != "report" and v.folder not in done and (rd / v.folder).exists()]
                self._write_experiment({"stale_stages": stale})
            st = self.state(u)
            wanted = u.stage in only
            if not wanted:
                if st == "done":
                    done[u.folder] = u.fingerprint
                else:
                    needed_by = [v.folder for v in units if u.folder in v.inputs and v.stage in only and v.stage != "report"]
                    if needed_by:
                        raise QtalignError(f"stage '{u.folder}' is needed by {', '.join(needed_by)} but is not up to date in {rd} "
                                           f"({st}); run it too (--stages {u.stage},{','.join(sorted({v.split('/')[0] for v in needed_by}))})")
                continue
            if st == "done" and u.stage not in force:
                self.log(f"[{u.folder}] up to date (fingerprint {u.fingerprint}): skipped")
                sj = _read_json(rd / u.folder / "stage.json") or {}
                _write_json(rd / u.folder / "stage.json", {**sj, "skipped_last_run": True})
                done[u.folder] = u.fingerprint
                outcome[u.folder] = "skipped"
                continue
            if st == "stale" or u.stage in force:
                shutil.rmtree(rd / u.folder, ignore_errors=True)
                if u.stage == "report":
                    for name in ("report.md", "report.html"):
                        (rd / name).unlink(missing_ok=True)
            self.log(f"[{u.folder}] {'resuming' if st == 'partial' and u.stage not in force else 'running'} …")
            sj_path = rd / u.folder / "stage.json"
            prev = _read_json(sj_path) or {}
            _write_json(sj_path, {"stage": u.folder, "fingerprint": u.fingerprint, "status": "running", "config": u.config,
                                  "started": time.time(), "attempts": prev.get("attempts", 0) + 1})
            t0 = time.time()
            u.run()
            dt = time.time() - t0
            _write_json(sj_path, {"stage": u.folder, "fingerprint": u.fingerprint, "status": "done", "config": u.config,
                                  "timing_s": round(dt, 2),
                                  "finished": time.time(), "attempts": prev.get("attempts", 0) + 1, "skipped_last_run": False})
            self.log(f"[{u.folder}] done in {dt:.1f} s")
            done[u.folder] = u.fingerprint
            outcome[u.folder] = "ran"
            self._write_experiment({"stages": {**(_read_json(rd / "experiment.json") or {}).get("stages", {}), u.folder: "done"}})
        self._write_experiment({"finished": time.time(), "last_run": outcome})
        return outcome


def run_experiment(cfg: ExperimentConfig, stages: list[str] | None = None, force: list[str] | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
    return Experiment(cfg, log).run(stages, force)


# ------------------------------------------------------------------------------------------------------------------
# CLI


def configure_parser(p, name: str) -> None:
    from qtalign.cli import add_model_args, add_task_args

    p.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                   help="config files or bundled names (default: demo; see --list; several are merged left to right, "
                        "e.g. paper/zhde_en paper/model/qwen1.5-4b) and dotted overrides such as train.epochs=1 eval.langs=en,zh")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run dir (default runs/<name>)")
    g.add_argument("--stages", help=f"comma list: run only these stages ({','.join(STAGES)}); the others must be up to date")
    g.add_argument("--force", help="comma list of stages to rerun even when up to date ('all' for every stage)")
    g.add_argument("--seed", type=int)
    g.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    g.add_argument("--list", action="store_true", help="list the bundled configs and exit")
    g.add_argument("--export", metavar="DIR", help="after the run, copy the report and its figures (no adapters/arrays) to DIR")
    add_model_args(p)
    add_task_args(p)


def _cli_extra(args) -> dict:
    """CLI options as dotted config keys: model options → model.*, task options → eval.*, --data-dir/--prompts → top level."""
    from qtalign.cli import model_overrides, task_overrides

    extra = {f"model.{k}": v for k, v in model_overrides(args).items()}
    t = task_overrides(args)
    for k in ("data_dir", "prompts"):
        if k in t:
            extra[k] = t.pop(k)
    extra.update({f"eval.{k}": v for k, v in t.items()})
    for k in ("out", "seed"):
        if getattr(args, k, None) is not None:
            extra[k] = getattr(args, k)
    return extra


def export_report(run_dir: str | Path, dest: str | Path) -> Path:
    """Copy a run's report (report.md + the figures it links, report.html, config.yaml, experiment.json and the
    evaluation results/tables) to `dest`, keeping relative paths: small enough to commit (no adapters, arrays)."""
    import re

    run_dir, dest = Path(run_dir), Path(dest)
    md = run_dir / "report.md"
    if not md.exists():
        raise QtalignError(f"{run_dir}: no report.md to export (run the report stage first)")
    keep = ["report.md", "report.html", "config.yaml", "experiment.json"]
    keep += [m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text(encoding="utf-8")) if not m.startswith("data:")]
    for which in ("base", "tuned"):
        keep += [f"eval/{which}/{n}" for n in ("results.json", "table.md", "table.csv", "labels.md")]
    keep += ["train/summary.json", "lens/summary.json", "lens/lens_means.csv", "geometry/summary.json", "data/stats.json"]
    for stage in STAGES:
        keep.append(f"{stage}/stage.json")
    keep += ["eval/base/stage.json", "eval/tuned/stage.json"]
    for rel in dict.fromkeys(keep):
        src = run_dir / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run_cli(args) -> int:
    if args.list:
        for n in list_configs():
            first = resolve_config_path(n).read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
            print(f"{n:34s} {first}")
        return 0
    configs = [args.config] if args.config else []
    overrides = []
    for a in args.args:
        key = a.split("=", 1)[0]
        # key=value (a dotted key never contains a path separator); anything else names a config file
        (overrides if "=" in a and "/" not in key and not key.endswith((".yaml", ".yml", ".json")) else configs).append(a)
    cfg = load_experiment(configs or None, overrides, _cli_extra(args))
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    t0 = time.time()
    only = _split(args.stages) if args.stages else None
    force = _split(args.force) if args.force else None
    Experiment(cfg).run(only, force)
    rd = cfg.run_dir
    if args.export:
        print(f"exported the report to {export_report(rd, args.export)}")
    print(f"done in {time.time() - t0:.0f} s: {rd}" + (f"; report: {rd / 'report.html'}" if (rd / "report.html").exists() else ""))
    return 0
