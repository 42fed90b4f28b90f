"""The round trip against the official question files: every stored record rebuilt byte-for-byte from its parsed
fields and the English train file."""

from __future__ import annotations

import re
import string
from pathlib import Path

from qtalign.errors import QtalignError
from qtalign.qtdata.build import _blind, render_pair
from qtalign.qtdata.files import INSTRUCTION_TEMPLATE, load_question_records
from qtalign.tasks.items import DataSource, load_items, read_records
from qtalign.tasks.specs import SpecSet

# ----------------------------------------------------------------------------------------------------------
# round trip against the official question files


def template_regex(template: str) -> re.Pattern:
    """A question template inverted into a regex: each placeholder becomes a named group (a repeat, a backreference)."""
    parts, seen = [], set()
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name:
            parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>.*?)")
            seen.add(name)
    return re.compile("".join(parts), re.DOTALL)


def _guess_task(specs: SpecSet, record: dict, lang: str) -> str:
    fits = [t for t, ts in specs.tasks.items() if lang in ts.languages and all(f in record for f in ts.item_fields)]
    if len(fits) != 1:
        raise QtalignError(f"cannot tell the task from the English file's fields {sorted(record)} (matching: {fits}); pass task=")
    return fits[0]


def roundtrip_official(question_file: str | Path, english_file: str | Path, lang: str, specs: SpecSet,
                       task: str | None = None, target: str = "en") -> tuple[int, list[dict]]:
    """Rebuild every record of a stored question file and compare byte-for-byte.

    The source-language fields are parsed back out of each stored input with the language's question template
    (inverted into a regex); the target fields come from `english_file` (index-parallel). Returns
    (records checked, mismatches), each mismatch {"index", "field", "stored", "rebuilt"}.
    """
    english_file = Path(english_file).resolve()
    first = read_records(english_file)[0]
    ts = specs.task(task or _guess_task(specs, first, target))
    tgt_items = load_items(_blind(ts), target, DataSource(files=str(english_file)), require_gold=False, english_gold=False)
    stored = load_question_records(question_file, specs)
    if len(stored) != len(tgt_items):
        raise QtalignError(f"{question_file}: not index-parallel with {english_file}: {len(stored)} records vs {len(tgt_items)}")
    rx = template_regex(ts.lang(lang).question_template)
    suffix = INSTRUCTION_TEMPLATE.format(src=specs.language(lang).instruction_name, tgt=specs.language(target).instruction_name)
    mismatches = []
    for n, (rec, ti) in enumerate(zip(stored, tgt_items)):
        m = rx.fullmatch(rec["input"].removesuffix(suffix)) if rec["input"].endswith(suffix) else None
        if m is None:
            mismatches.append({"index": n, "field": "input", "stored": rec["input"], "rebuilt": None})
            continue
        inp, outp = render_pair(ts, specs, lang, target, m.groupdict(), ti.fields)
        for fld, rebuilt in (("input", inp), ("output", outp)):
            if rec[fld] != rebuilt:
                mismatches.append({"index": n, "field": fld, "stored": rec[fld], "rebuilt": rebuilt})
    return len(stored), mismatches


