"""The experiment config: one YAML document (bundled name or file, `extends:` chains, dotted key=value overrides) whose
sections are the stage configs. Unknown keys and bad values are one line naming the file(s) and the dotted key."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from qtalign.analysis.config import GeometryConfig, LensConfig
from qtalign.engine.models import ModelConfig
from qtalign.errors import QtalignError, validation_message
from qtalign.io import read_config, require_file, yaml_load
from qtalign.limits import SETTINGS, Seed
from qtalign.eval.config import EvalConfig
from qtalign.qtdata.config import QTDataConfig
from qtalign.tasks.items import CommaList
from qtalign.tracking import Trackers
from qtalign.train.config import TrainConfig


STAGES = ("data", "train", "eval", "lens", "geometry", "report")
StageName = Literal["data", "train", "eval", "lens", "geometry", "report"]
# fields of the stage configs that the experiment sets itself (never per section)
MANAGED = {
    "model": "the model is set once, at the top level ('model:'); the tuned model is it + train/adapter",
    "seed": "the seed is set once, at the top level ('seed:')",
    "data": "the experiment trains on its own data stage (data/train.jsonl); configure that in the 'data' section",
    "compare": "the experiment analyses 'base' and 'tuned' (base + train/adapter) itself",
}


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


SECTION_CONFIGS = {"data": QTDataConfig, "train": TrainConfig, "eval": EvalConfig, "lens": LensConfig, "geometry": GeometryConfig}
DataSection = section(QTDataConfig, ("model", "seed"))
TrainSection = section(TrainConfig, ("model", "seed", "data"))
EvalSection = section(EvalConfig, ("model", "seed"))
LensSection = section(LensConfig, ("model", "seed", "compare"))
GeometrySection = section(GeometryConfig, ("model", "seed", "compare"))


class ReportConfig(BaseModel):
    """What the report shows besides the stage outputs."""

    model_config = SETTINGS

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



class ExperimentConfig(BaseModel):
    """One experiment: question-translation data → LoRA tuning → evaluation of base and tuned → analyses → report."""

    model_config = SETTINGS

    name: str = Field("experiment", description="short name: the report title and the default run dir runs/<name>")
    out: str | None = Field(None, description="run dir (default runs/<name>); every stage writes a folder in it")
    seed: Seed = Field(0, description="seed of every stage (sampling, shuffling, LoRA init, training)")
    seeds: CommaList[Seed] = Field(default_factory=list, description="training seeds: with any, each seed is a run of its own "
                             "(<out>/seed<k>, or <out>/<arm>/seed<k>) with seed=k, all sharing the base evaluation "
                             "through the result store; a seed redraws everything random in training (the row sample, "
                             "its order, LoRA init, dropout); empty: the one run of 'seed'")
    arms: dict[str, dict] = Field(default_factory=dict, description="named arms, each a run of its own (<out>/<arm>) "
                                  "with the settings that differ, as dotted keys (e.g. {copy: {data.control: copy}}); "
                                  "arms x seeds runs in all, compared side by side in <out>/compare")
    stages: CommaList[StageName] = Field(default_factory=lambda: list(STAGES),
                                    description="stages this experiment has (without 'train' only the base model is evaluated)")
    data_dir: str | None = Field(None, description="folder in the official layout, given to every section that reads data "
                                 "and sets none; '{data_dir}' inside any string of the config is replaced by it")
    prompts: CommaList[str] = Field(default_factory=list, description="spec files merged over the defaults in every stage "
                               "(e.g. '{data_dir}/../paper_prompts.json')")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model (the tuned model = it + train/adapter)")
    report_to: Trackers = Field(default_factory=list, description="trackers for training and evaluation metrics: "
                                "tensorboard, wandb (offline), mlflow (file store); given to every section that sets none")
    data: DataSection = Field(default_factory=DataSection, description="question-translation data (qtdata.QTDataConfig)")
    train: TrainSection = Field(default_factory=TrainSection, description="LoRA tuning (train.TrainConfig)")
    eval: EvalSection = Field(default_factory=EvalSection, description="evaluation of base and tuned (evaluate.EvalConfig)")
    lens: LensSection = Field(default_factory=LensSection, description="logit lens (lens.LensConfig)")
    geometry: GeometrySection = Field(default_factory=GeometrySection, description="representation geometry (geometry.GeometryConfig)")
    report: ReportConfig = Field(default_factory=ReportConfig, description="report options")

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, v):
        for name, over in v.items():
            if not name or "/" in name or name.startswith(".") or name == "compare" or name.startswith("seed"):
                raise ValueError(f"arm name {name!r}: a plain folder name, not 'compare' or 'seed...'")
            if not isinstance(over, dict):
                raise ValueError(f"arm {name!r}: expected a mapping of dotted keys to values")
            for key in over:
                if key.split(".")[0] in ("arms", "seeds", "out", "name"):
                    raise ValueError(f"arm {name!r}: '{key}' cannot differ between arms")
        return v

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
        if "train" in self.stages and self.model.adapter:
            raise ValueError("model.adapter: the tuned model is the base model + train/adapter, so a base adapter would be "
                             "lost; merge it into the base first (qtalign merge) and use the merged folder as model.name")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.name}").expanduser()  # `out: ~/x` is the home's x


def stage_config(cfg: ExperimentConfig, name: str, **extra):
    """The section ``name`` as the stage's own config, with the top-level model/seed/data_dir/prompts/trackers filled
    in and ``extra`` fields set (a tuned model, a tracking folder)."""
    cls = SECTION_CONFIGS[name]
    d = getattr(cfg, name).model_dump()
    f = cls.model_fields
    if "seed" in f:
        d["seed"] = cfg.seed
    if "model" in f:
        d["model"] = cfg.model.model_dump()
    if "data_dir" in f and not d.get("data_dir") and cfg.data_dir:
        d["data_dir"] = cfg.data_dir
    if "prompts" in f:
        d["prompts"] = list(dict.fromkeys([*cfg.prompts, *d.get("prompts", [])]))
    if "report_to" in f and cfg.report_to and not d.get("report_to"):
        d["report_to"] = list(cfg.report_to)
    d.update(extra)
    return cls(**d)


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
    if p.exists() and not p.is_dir():
        return require_file(p, "config file")  # a file, or one line for a pipe
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
    d = read_config(path)
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
        v = yaml_load(value) if value.strip() else None
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
        raise QtalignError(validation_message(e, where)) from None


def expand(cfg: ExperimentConfig) -> list[tuple[str, ExperimentConfig]]:
    """The runs of an experiment: itself when it lists no arms and no seeds; else one config per arm x seed, each
    with its own run dir (<out>[/<arm>][/seed<k>]), name and seed, and no arms or seeds of its own. An arm's dotted
    keys are applied as overrides to the experiment's config and validated like any config."""
    if not cfg.arms and not cfg.seeds:
        return [(cfg.name, cfg)]
    base = cfg.model_dump(mode="json", exclude={"arms", "seeds"})
    out = []
    for arm, over in (cfg.arms or {"": {}}).items():
        for seed in cfg.seeds or [cfg.seed]:
            parts = [p for p in (arm, f"seed{seed}" if cfg.seeds else "") if p]
            d = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in over.items()])
            d.update(seed=seed, out=str(cfg.run_dir.joinpath(*parts)), name=f"{cfg.name}/{'/'.join(parts)}")
            try:
                out.append(("/".join(parts), ExperimentConfig.model_validate(d)))
            except ValidationError as e:
                raise QtalignError(validation_message(e, f"arm '{arm}'" if arm else "seeds")) from None
    return out


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


