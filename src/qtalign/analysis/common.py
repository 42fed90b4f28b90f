"""What both analysis stages share: loading the models to compare, the start of a run (seeds, output dir, specs,
groups), the per-layer mean with its interval, and the summary record."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from qtalign.analysis.config import BASE, AnalysisConfig
from qtalign.engine.models import LoadedModel, ModelSet
from qtalign.io import write_json


def load_models(cfg: AnalysisConfig) -> dict[str, LoadedModel]:
    """{'base': the base model, label: base model + adapter for every entry of cfg.compare}: one base model in memory,
    the adapters attached to it and switched per forward (engine.models.ModelSet)."""
    models = ModelSet(cfg.model)
    out = {BASE: models.load(cfg.model)}
    for name, adapter in cfg.compare.items():
        out[name] = models.load(cfg.model.model_copy(update={"adapter": adapter}))
    return out


def mean_ci(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and 95 % CI half-width (1.96 sd / sqrt n) of an (n, L+1) array."""
    n = x.shape[0]
    if n == 0:
        nan = np.full(x.shape[1], np.nan)
        return nan, nan
    m = x.mean(0)
    sd = x.std(0, ddof=1) if n > 1 else np.zeros(x.shape[1])
    return m, 1.96 * sd / math.sqrt(n)


# --------------------------------------------------------------------------------------------------------
# stage


def write_summary(out: Path, stage: str, plan, models: dict, t0: float, **fields) -> dict:
    """The summary.json every analysis stage writes last (docs/architecture.md), with stage-specific `fields`; its
    fingerprint is the plan's for the models compared ({name: identity}): the config, the data, the models'
    identities and the engine's numerics (the experiment's unit records the same value). Returns the record."""
    plan = plan.for_model({n: lm.info.get("identity") for n, lm in models.items()})
    summary = {"stage": stage, "fingerprint": plan.fingerprint, "covers": plan.covers(),
               "config": plan.cfg.model_dump(mode="json"),
               "models": {n: lm.info for n, lm in models.items()}, **fields, "timing_s": round(time.time() - t0, 2)}
    write_json(out / "summary.json", summary)
    return summary


def prepare_analysis(cfg: AnalysisConfig, out_dir: str | Path, kind: str, own: tuple[str, ...], check=None,
                     apply_limit: bool = True, plan=None, models: dict[str, LoadedModel] | None = None):
    """What every analysis run starts with: seeds, the plan (specs, the groups that have data, their items: every
    data error here; ``plan`` when the caller made it already), the stage's own checks (``check(groups)``), only then
    the output dir claimed, and last the models (``models``, else loaded: load_models) -> (out, plan, models)."""
    from transformers import set_seed

    from qtalign.io import OutputDir

    set_seed(cfg.seed)
    out = OutputDir(out_dir, kind).check()
    plan = plan or cfg.plan(limit=apply_limit)
    if check is not None:
        check(plan.groups)
    out.claim()
    out.remove("summary.json")  # present again only once this run has finished
    out.record(*own)
    return out.path, plan, models or load_models(cfg)
