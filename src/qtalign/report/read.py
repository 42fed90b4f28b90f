"""Reading a run dir's artifacts (the report reads nothing else; docs/architecture.md lists them):

    stats.json              the report's statistics (written by the report itself, from the others; report/numbers.py)
    experiment.json         resolved config, seen languages, overlap check, environment (written by `qtalign run`)
    <unit>/stage.json       status, fingerprint and timing of each unit
    data/stats.json         question-translation data statistics
    train/summary.json      training summary (+ trainer_log.jsonl, loss.png)
    eval/base, eval/tuned   results.json + predictions.jsonl (or predictions.jsonl.gz in an export), labels.md
    lens/, geometry/        summary.json (figures, tables, numbers; geometry: per-layer retrieval)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qtalign.io import read_json, read_jsonl


def read_predictions(path: Path) -> dict[str, dict]:
    """{item key: record} of a predictions.jsonl (or its .gz)."""
    return {r["key"]: r for r in read_jsonl(path)}


@dataclass
class Run:
    dir: Path
    exp: dict
    base: dict | None = None  # eval/base/results.json
    tuned: dict | None = None
    base_preds: dict[str, dict] = field(default_factory=dict)
    tuned_preds: dict[str, dict] = field(default_factory=dict)
    languages: dict[str, dict] = field(default_factory=dict)  # code -> {name, resource_group}
    order: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return self.exp.get("config") or (self.base or {}).get("config") or {}

    @property
    def seen(self) -> set[str]:
        return set(self.exp.get("seen_langs") or [])

    @property
    def resource(self) -> dict[str, str]:
        return {c: d.get("resource_group", "?") for c, d in self.languages.items()}

    @property
    def trained_task(self) -> str | None:
        """The task whose questions the model was tuned on (None without a data stage)."""
        data = self.config.get("data") or {}
        return data.get("task") if "data" in (self.config.get("stages") or []) else None

    def summary(self, folder: str) -> dict | None:
        return read_json(self.dir / folder / "summary.json")

    def stage(self, folder: str) -> dict | None:
        return read_json(self.dir / folder / "stage.json")

    @property
    def clusters(self) -> dict[str, dict[int, int]]:
        """task -> item index -> cluster (items sharing e.g. an SNLI premise), as the evaluation recorded them; for
        evaluations made before they were recorded, derived from the evaluated data, which must then be at hand (a
        report never falls back to treating clustered items as independent: its p-values would change silently)."""
        if self.base is None:
            return {}
        if "clusters" in self.base:
            return {t: {int(i): c for i, c in d.items()} for t, d in self.base["clusters"].items()}
        return derive_clusters(self.base.get("config") or {}, self.dir / "eval" / "base" / "results.json")


def derive_clusters(config: dict, where: Path | str) -> dict[str, dict[int, int]]:
    """Clusters of an evaluation that did not record them, from its config's data; QtalignError naming the missing
    files when a task has clusters and its data is not here."""
    from pydantic import ValidationError

    from qtalign.errors import QtalignError
    from qtalign.eval.config import EvalConfig
    from qtalign.tasks.items import cluster_ids
    from qtalign.tasks.specs import load_specs

    try:
        cfg = EvalConfig.model_validate(config)
    except ValidationError as e:
        raise QtalignError(f"{where}: records no item clusters and its config cannot be read to derive them "
                           f"({e.errors()[0].get('msg')})") from None
    specs, source, out = load_specs(cfg.prompts), cfg.source(), {}
    for t in cfg.tasks:
        task = specs.task(t)
        if not task.cluster_field:
            continue
        if not source.exists(task, "en"):
            raise QtalignError(f"{where}: records no item clusters for task '{t}' (items sharing a premise are tested "
                               f"together), and the data to derive them ({source.path(task, 'en') or source.describe()}) "
                               "is not on this machine: run the report where that data is (tests that treated the items as "
                               "independent would give other p-values and intervals)")
        its = cfg.select(task, "en", source)
        out[t] = dict(zip((it.index for it in its), cluster_ids(task, its)))
    return out


def _language_info(results: dict | None) -> tuple[dict[str, dict], list[str]]:
    """Language names, resource groups and order: recorded in results.json; for runs made before that, from the
    project's default language table."""
    if results and results.get("languages"):
        langs = results["languages"]
        return dict(langs), list(langs)
    from qtalign.tasks.specs import load_specs

    specs = load_specs()
    return ({c: {"name": specs.languages[c].english_name, "resource_group": specs.languages[c].resource_group}
             for c in specs.order}, list(specs.order))


def read_run(run_dir: str | Path, predictions: bool = True) -> Run:
    """The run's artifacts; ``predictions=False`` leaves the per-item records out (rendering from stats.json)."""
    rd = Path(run_dir)
    run = Run(rd, read_json(rd / "experiment.json") or {})
    run.base = read_json(rd / "eval" / "base" / "results.json")
    run.tuned = read_json(rd / "eval" / "tuned" / "results.json")
    if run.base is not None and predictions:
        run.base_preds = read_predictions(rd / "eval" / "base" / "predictions.jsonl")
    if run.tuned is not None and predictions:
        run.tuned_preds = read_predictions(rd / "eval" / "tuned" / "predictions.jsonl")
    run.languages, run.order = _language_info(run.base)
    for c in sorted({r["lang"] for r in run.base_preds.values()} - set(run.languages)):
        run.languages[c] = {"name": c, "resource_group": "low"}
        run.order.append(c)
    return run
