"""Metrics to the trackers researchers already use, off by default (``report_to: []``):

- ``tensorboard``: event files under ``<tracking dir>/tensorboard`` (``tensorboard --logdir <run dir>/tracking``);
- ``wandb``: an offline Weights & Biases run under ``<tracking dir>`` (``wandb sync`` uploads it later);
- ``mlflow``: an MLflow file store at ``<tracking dir>/mlruns`` (``mlflow ui --backend-store-uri ...``).

Training reports through the Trainer's own integrations (train/recipe.py points them at the tracking dir);
evaluation and experiment metrics are written here, to the same places.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator

from qtalign.errors import QtalignError

TRACKERS = ("tensorboard", "wandb", "mlflow")
NEEDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def parse_trackers(v) -> list[str]:
    """`report_to` as given (a list or 'a,b'), validated."""
    v = [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else list(v or [])
    bad = [x for x in v if x not in TRACKERS]
    if bad:
        raise ValueError(f"unknown tracker {bad[0]!r} (choose from {', '.join(TRACKERS)}; [] = none)")
    return v


# the type of every config's `report_to`: tracker names, as a list or 'a,b', validated
Trackers = Annotated[list[str], BeforeValidator(parse_trackers)]


def check_available(report_to: list[str], tracking_dir: str | Path | None = None) -> None:
    """One clear error, before any work, for a tracker whose package is not installed or a tracking_dir that is a
    file or cannot be written."""
    for t in report_to:
        if importlib.util.find_spec(NEEDS[t]) is None:
            raise QtalignError(f"report_to: '{t}' needs the {NEEDS[t]} package (pip install {NEEDS[t]})")
    if report_to and tracking_dir:
        from qtalign.io import check_folder

        check_folder(Path(tracking_dir).expanduser(), "tracking_dir")


def log_metrics(report_to: list[str], folder: str | Path, metrics: dict[str, float], step: int = 0,
                run_name: str | None = None) -> None:
    """Scalar metrics (NaNs left out) to every tracker in ``report_to``."""
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
    folder = Path(folder)
    if not report_to or not metrics:
        return
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(log_dir=str(folder / "tensorboard"))
        for k, v in metrics.items():
            w.add_scalar(k, v, step)
        w.close()
    if "wandb" in report_to:
        import wandb

        run = wandb.init(mode="offline", dir=str(folder), name=run_name, reinit=True)
        run.log(metrics, step=step)
        run.finish()
    if "mlflow" in report_to:
        import mlflow

        mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
        with mlflow.start_run(run_name=run_name):
            mlflow.log_metrics({k.replace("/", "."): v for k, v in metrics.items()}, step=step)


def eval_scalars(metrics: dict) -> dict[str, float]:
    """An evaluation's metrics (results.json['metrics']) as flat scalar names: eval/<task>/<variant>/<lang>/<metric>."""
    out = {}
    for t, tv in metrics.items():
        for v, d in tv.items():
            for lang, m in d["langs"].items():
                for k in ("acc", "cal_acc", "auc", "majority_pred_share"):
                    if m.get(k) is not None:
                        out[f"eval/{t}/{v}/{lang}/{k}"] = m[k]
            for g, a in d["avg"].items():
                for k in ("acc", "cal_acc", "auc"):
                    if a.get(k) is not None:
                        out[f"eval/{t}/{v}/avg_{g}/{k}"] = a[k]
    return out
