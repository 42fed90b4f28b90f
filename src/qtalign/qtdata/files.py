"""Reading question-translation files (our JSONL, the official input/answer files, alpaca JSON) and exclusion lists."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qtalign.errors import QtalignError, check_text, data_error
from qtalign.io import require_file
from qtalign.tasks.items import parse_indices, read_records
from qtalign.tasks.specs import SpecSet, load_specs

INSTRUCTION_TEMPLATE = "\nTranslate the input from {src} to {tgt}:\n"
INSTRUCTION_RE = re.compile(r"\nTranslate the input from (.+?) to (.+?):\n\Z")

# ----------------------------------------------------------------------------------------------------------
# reading question files, exclusion lists


def _name_to_code(specs: SpecSet) -> dict[str, str]:
    out: dict[str, str] = {}
    for code in specs.order:
        lang = specs.language(code)
        out.setdefault(lang.instruction_name, code)
        out.setdefault(lang.english_name, code)
    return out


def load_question_records(path: str | Path, specs: SpecSet | None = None) -> list[dict]:
    """Question-translation records of a file -> [{"input", "output", "src", "tgt", "index", "id", "task", "row"}].

    Accepts our JSONL (input/output), the official files (input/answer; the input must end with the instruction
    'Translate the input from X to Y:') and alpaca/LLaMA-Factory JSON (instruction/input/output). src/tgt are
    taken from the record, else from the instruction's language names (None when the name is not in the specs).
    """
    path = Path(path)
    names = _name_to_code(specs or load_specs())
    out = []
    for n, r in enumerate(read_records(path)):
        if "instruction" in r:
            kind, need = "alpaca", ("instruction", "output")
        elif "output" in r:
            kind, need = "ours", ("input", "output")
        else:
            kind, need = "official", ("input", "answer")
        for f in need:
            if f not in r:
                raise data_error(path, "missing", record=n, field=f)
            if not isinstance(r[f], str):
                raise data_error(path, f"expected a string, got {type(r[f]).__name__}", record=n, field=f)
            check_text(path, r[f], n, f)
        if kind == "alpaca":
            extra = r.get("input") or ""
            text, target = r["instruction"] + (("\n" + extra) if extra else ""), r["output"]
        else:
            text, target = r["input"], r[need[1]]
        m = INSTRUCTION_RE.search(text)
        if m is None and kind == "official":
            raise data_error(path, "not a question-translation record: the input does not end with "
                             f"{INSTRUCTION_TEMPLATE.format(src='<X>', tgt='<Y>')!r}", record=n, field="input")
        idx = r.get("index", n)
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise data_error(path, f"expected a non-negative integer, got {idx!r}", record=n, field="index")
        rec = {"input": text, "output": target}
        src = r.get("src") or (names.get(m.group(1)) if m else None)
        tgt = r.get("tgt") or (names.get(m.group(2)) if m else None)
        rec.update(src=src, tgt=tgt, index=idx, id=r.get("id", f"{path.stem}:{n}"), task=r.get("task"), row=n)
        out.append(rec)
    return out


def read_exclusions(path: str | Path, task: str | None = None) -> set[int]:
    """Item indices from a text file (integers / START:END, '#' comments), a JSON list of integers or records with
    'index', or an evaluation predictions.jsonl (only records of `task` when they name a task)."""
    path = require_file(path, "exclusion file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise data_error(path, "not UTF-8 text") from None
    head = text.lstrip()[:1]
    out: set[int] = set()
    if head in ("{", "["):
        if head == "[":
            try:
                recs = json.loads(text)
            except json.JSONDecodeError as e:
                raise data_error(path, f"invalid JSON at line {e.lineno}: {e.msg}") from None
        else:
            recs = read_records(path)
        tasks_seen = set()
        for n, r in enumerate(recs):
            if isinstance(r, dict):
                if task and "task" in r:
                    tasks_seen.add(r["task"])
                    if r["task"] != task:
                        continue
                r = r.get("index")
            if isinstance(r, bool) or not isinstance(r, int):
                raise data_error(path, f"expected an integer item index, got {r!r}", record=n, field="index")
            out.add(r)
        if not out and tasks_seen:
            raise data_error(path, f"no records of task '{task}' (tasks there: {', '.join(sorted(tasks_seen))})")
        return out
    for n, line in enumerate(text.splitlines()):
        try:
            out.update(parse_indices(line.split("#", 1)[0], "item index"))
        except QtalignError as e:
            raise data_error(path, str(e), record=f"line {n + 1}") from None
    return out


