"""Command-line options generated from the pydantic configs: one flag per config field, named after it
(``learning_rate`` -> ``--learning-rate``), with the field's own description and default as its help, so that flags
and config keys have one name and one help text. The model section is flattened (``--model`` sets ``model.name``,
``--dtype`` sets ``model.dtype``, ...).

A command's config is: its config file (``--config``, flat or under a key named after the command) < its flags.
"""

from __future__ import annotations

import os

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from qtalign.errors import QtalignError, validation_message

MODEL_FLAG_NAMES = {"name": "--model"}
# keys an experiment config sets once at the top level for all its sections
SHARED_TOP_LEVEL = ("model", "seed", "data_dir", "prompts", "report_to")


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _unwrap(ann) -> tuple[Any, bool]:
    """(the annotation without Optional, whether None is allowed)."""
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return (args[0] if len(args) == 1 else ann), len(args) < len(typing.get_args(ann))
    return ann, False


def _kind(ann) -> tuple[str, Any]:
    """('bool' | 'int' | 'float' | 'str' | 'list' | 'choice' | 'model' | 'other', extra)."""
    ann, _ = _unwrap(ann)
    origin = typing.get_origin(ann)
    if ann is bool:
        return "bool", None
    if ann in (int, float, str):
        return ann.__name__, ann
    if origin is Literal:
        return "choice", list(typing.get_args(ann))
    if origin in (list, dict):  # a dict field takes KEY=VALUE entries (its validator parses them)
        return "list", typing.get_args(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "model", ann
    return "other", None


def _help(info, extra: str = "") -> str:
    text = (info.description or "").replace("%", "%%")
    default = info.get_default(call_default_factory=True)
    if default not in (None, [], {}, "") and not isinstance(default, BaseModel):
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text += f" (default: {shown})"
    return text + extra


def add_config_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type[BaseModel],
                       skip: set[str] = frozenset(), title: str | None = None, names: dict[str, str] | None = None,
                       only: list[str] | None = None) -> None:
    """One flag per field of ``cls`` (or of the fields in ``only``; nested models other than the model section are
    left to the config file)."""
    g = p.add_argument_group(title) if title and isinstance(p, argparse.ArgumentParser) else p
    names = names or {}
    for name, info in cls.model_fields.items():
        if name in skip or (only is not None and name not in only):
            continue
        kind, extra = _kind(info.annotation)
        if kind == "model":  # nested models: their own sections (the model section is added by add_model_options)
            continue
        kw = {"bool": {"action": argparse.BooleanOptionalAction}, "int": {"type": int, "metavar": "INT"},
              "float": {"type": float, "metavar": "FLOAT"}, "choice": {"choices": extra},
              "list": {"action": "append", "metavar": "A,B"}}.get(kind, {})
        g.add_argument(names.get(name, flag(name)), dest=name, default=None,
                       help=_help(info, " (comma list; repeatable)" if kind == "list" else ""), **kw)


def add_model_options(p: argparse.ArgumentParser) -> None:
    from qtalign.engine.models import ModelConfig

    add_config_options(p, ModelConfig, title="model", names=MODEL_FLAG_NAMES)


def model_values(args) -> dict:
    """The model flags that were given, as ModelConfig keys."""
    from qtalign.engine.models import ModelConfig

    return given(args, ModelConfig)


def _flatten(v):
    """A repeatable list flag's values ['a,b', 'c'] -> ['a', 'b', 'c'] (other values unchanged)."""
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return [y.strip() for x in v for y in x.split(",") if y.strip()]
    return v


def given(args, cls: type[BaseModel], skip: set[str] = frozenset()) -> dict:
    """The flags of ``cls``'s fields that were given on the command line."""
    return {k: _flatten(getattr(args, k)) for k in cls.model_fields if k not in skip and getattr(args, k, None) is not None}


def experiment_section(d: dict, section: str, cls: type[BaseModel]) -> dict:
    """A config's section as the command's own config, with an experiment's shared top-level keys filled in as
    `qtalign run` does (experiment/config.py ``stage_config``): a key the section leaves empty (null, [] or absent)
    takes the top level's value; prompts are the top level's, then the section's."""
    from qtalign.tasks.items import comma_list

    sec = dict(d[section])
    for k, v in d.items():
        if k not in cls.model_fields or k not in SHARED_TOP_LEVEL:
            continue
        if k == "prompts" and sec.get(k):
            sec[k] = list(dict.fromkeys([*(comma_list(v) or []), *(comma_list(sec[k]) or [])]))
        elif sec.get(k) is None or sec.get(k) in ([], ""):
            sec[k] = v
    return sec


def build_config(cls: type[BaseModel], args, section: str | None = None, skip: set[str] = frozenset(),
                 extra: dict | None = None) -> BaseModel:
    """``cls`` from --config (flat, or under ``section``) < the command line's flags (< ``extra``); a validation error
    names the file (or 'command line') and the field."""
    from pydantic import ValidationError

    from qtalign.io import read_config

    path = getattr(args, "config", None)
    d = read_config(path) if path else {}
    where = path or "command line"
    if section and isinstance(d.get(section), dict):
        d = experiment_section(d, section, cls)
        where = f"{path}: section '{section}'"
    d.update(given(args, cls, skip | {"model"}))
    if "model" in cls.model_fields:
        m = d.get("model") or {}
        d["model"] = {**({"name": m} if isinstance(m, str) else m), **model_values(args)}
    d.update(extra or {})
    try:
        return cls.model_validate(d)
    except ValidationError as e:
        raise QtalignError(validation_message(e, where)) from None


def add_common(p: argparse.ArgumentParser, out_required: bool = True, overwrite: bool = True, save: bool = True,
               out_help: str = "output dir (resumable)") -> None:
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML/JSON config file (flat, or under a key named after the command); flags override it")
    g.add_argument("--out", required=out_required, type=os.path.expanduser, help=out_help)
    if overwrite:
        g.add_argument("--overwrite", action="store_true",
                       help="replace a previous result in --out (only files qtalign wrote there are removed)")
    if save:
        g.add_argument("--save-config", metavar="FILE", help="write the resolved config as YAML and exit")


def save_config(cfg: BaseModel, path: str, section: str) -> None:
    """--save-config: the resolved config, under the command's section, as YAML (atomically)."""
    import yaml

    from qtalign.io import write_text

    write_text(path, yaml.safe_dump({section: cfg.model_dump(mode="json")}, sort_keys=False, allow_unicode=True))
    print(f"wrote {path}")
