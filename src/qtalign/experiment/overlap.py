"""The train/eval overlap check: which evaluation items are also question-translation training items. Files are
compared by content (a byte-identical copy in another folder is the same file)."""

from __future__ import annotations

from pathlib import Path

from qtalign.errors import QtalignError
from qtalign.qtdata.config import QTDataConfig


def _same_file(a, b) -> bool:
    """Whether two item files are the same data: the same path, or the same content."""
    if a is None or b is None:
        return a == b
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    if a.is_file() and b.is_file() and a.stat().st_size == b.stat().st_size:
        from qtalign.io import file_sha256

        return file_sha256(a) == file_sha256(b)
    return False


def _task_row(t: str, task, data_cfg: QTDataConfig, plan, lang: str, from_items: list[dict], n_files: int,
              problems: list[str]) -> dict:
    """The overlap record of one evaluated task (a shared item is appended to ``problems``)."""
    dsrc, esrc = data_cfg.source(), plan.cfg.source()
    train_idx = {r["index"] for r in from_items}
    eval_idx = {it.index for it in plan.by_lang[(t, lang)]}
    row = {"task": t, "n_train": 0, "n_eval": len(eval_idx), "n_shared": 0}
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
    return row


def seen_languages(records: list[dict], order: list[str] | None = None) -> list[str]:
    """The languages of the training rows (sources and targets), in the specs' order."""
    langs = {r["src"] for r in records if r["src"]} | {r["tgt"] for r in records if r["tgt"]}
    return sorted(langs, key=lambda c: (order.index(c) if order and c in order else 999, c))


def check_overlap(data_cfg: QTDataConfig, plan, records: list[dict]) -> dict:
    """Which evaluation items (``plan``: the evaluation's eval/plan.Plan) are also question-translation training
    items (``records``: qtdata.build.build_records(data_cfg)): by item index in the same files, the files compared
    by content.

    Raises QtalignError when any are shared; returns the record of the check (shown in the report) otherwise.
    Rows from ready question files are built from their own files (e.g. the SNLI train set) and are recorded as such.
    """
    from_items = [r for r in records if r.get("origin") == "items"]
    n_files = len(records) - len(from_items)
    specs = plan.specs
    rows, problems = [], []
    for t in plan.cfg.tasks:
        langs = [lang for (tt, lang) in plan.by_lang if tt == t]
        if not langs:
            rows.append({"task": t, "n_train": 0, "n_eval": 0, "n_shared": 0, "note": "no evaluation data"})
            continue
        rows.append(_task_row(t, specs.task(t), data_cfg, plan, langs[0], from_items, n_files, problems))
    if problems:
        raise QtalignError("train/eval overlap: " + "; ".join(problems))
    return {"overlap": False, "n_train_rows": len(records), "tasks": rows, "seen_langs": seen_languages(records, specs.order),
            "detail": f"{len(records)} training rows ({len(from_items)} built from task items, {n_files} from question files)."}
