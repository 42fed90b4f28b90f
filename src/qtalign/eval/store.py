"""The shared result store: per-item evaluation records, reused by every run and experiment that asks for the same
thing, instead of being recomputed per run dir.

A store entry is one group (task x variant x language) under one fingerprint (``io.fingerprint``) of:
- config: the task's spec for that language (prompt format, demos, label words, the English spec that decodes
  gold), the variant, the scoring method (and its options) and calibration;
- data: the content hashes of the language's file and of the English file (gold);
- model: ``engine.models.model_identity`` (weights, adapter, dtype);
- numerics: ``engine.forward.NUMERICS_VERSION``.
Records inside an entry are per item index, so a run that needs items 0-59 reuses an entry filled by a run of items
0-249. Where: ``$QTALIGN_STORE``, default ``$QTALIGN_CACHE/store``.

    <root>/<fp[:2]>/<fp>/meta.json        what the fingerprint covers (for a human), written once
    <root>/<fp[:2]>/<fp>/records.jsonl    one record per item, appended under a lock
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

from qtalign.errors import QtalignError
from qtalign.io import cache_root, canonical, check_folder, file_lock, fingerprint, read_jsonl, repair_jsonl_tail, text_sha256, write_json
from qtalign.tasks.groups import Group
from qtalign.tasks.specs import TaskSpec


# the layout of a per-item record; bump when a record's fields change meaning (records of another version are not mixed)
RECORD_VERSION = "1"


def store_root() -> Path:
    return Path(os.environ.get("QTALIGN_STORE") or cache_root() / "store").expanduser()


def spec_digest(task: TaskSpec, lang: str) -> str:
    """A hash of everything in a task's spec that shapes one language's prompts, labels and gold decoding."""
    d = dataclasses.asdict(task)
    langs = d.pop("languages")
    d["languages"] = {c: langs[c] for c in sorted({lang, "en"}) if c in langs}
    return text_sha256(canonical(d))


def group_fingerprint(group: Group, task: TaskSpec, scoring: dict, data: dict, model: dict, numerics: str) -> str:
    config = {"group": list(group), "spec": spec_digest(task, group.lang), "scoring": scoring}
    return fingerprint(config, data=data, model=model, numerics=numerics)


def finite_record(r: dict) -> bool:
    """Whether a per-item record's class scores are all finite numbers."""
    scores = r.get("scores")
    return isinstance(scores, dict) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores.values())


class Store:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else store_root()

    def check(self) -> "Store":
        """One line, before any work, when the store's folder is a file or cannot be written."""
        check_folder(self.root, "result store")
        return self

    def entry(self, fp: str) -> Path:
        return self.root / fp[:2] / fp

    def records(self, fp: str) -> dict[int, dict]:
        """{item index: record} of an entry (empty when there is none); a record with non-finite scores (written by
        a version that counted NaN as a tie) is no record: its item is scored again."""
        return {r["index"]: r for r in read_jsonl(self.entry(fp) / "records.jsonl") if finite_record(r)}

    def add(self, fp: str, records: list[dict], meta: dict) -> int:
        """Append the records whose item is not stored yet; returns how many were added."""
        if not records:
            return 0
        bad = next((r for r in records if not finite_record(r)), None)
        if bad is not None:
            raise QtalignError(f"{bad.get('key')}: non-finite class scores {bad.get('scores')}; not added to the result store")
        d = self.entry(fp)
        try:
            d.mkdir(parents=True, exist_ok=True)
            with file_lock(d / ".lock"):
                repair_jsonl_tail(d / "records.jsonl")  # a writer killed mid-line: the next record starts on its own line
                have = set(self.records(fp))
                new = [r for r in records if r["index"] not in have]
                if not (d / "meta.json").exists():
                    write_json(d / "meta.json", {**meta, "fingerprint": fp, "created": round(time.time())})
                if new:
                    import json

                    with open(d / "records.jsonl", "a", encoding="utf-8") as f:
                        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
            return len(new)
        except OSError as e:  # a read-only or full store is said, never taken for "nothing new"
            raise QtalignError(f"result store {self.root}: cannot write {d} ({e.strerror or e}); free space or fix "
                               "$QTALIGN_STORE, or evaluate with --no-store") from None
