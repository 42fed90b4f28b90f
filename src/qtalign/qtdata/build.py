"""Question-translation (alignment) data: the paper's instruction records built from index-parallel question sets.

A record asks the model to translate a task *question* (never its answer) from a source language X into the
target language T. Item i of every language file is the same item, so for item i:

    input  = TaskSpec.lang(X).question(fields_X[i]) + "\\nTranslate the input from {X name} to {T name}:\\n"
    output = TaskSpec.lang(T).question(fields_T[i])

where the names are ``SpecSet.language(code).instruction_name``. This is byte-for-byte the format of the official
files ``snli_{de,es,it,sw,zh}10k_train_question.json`` (see ``roundtrip_official``), which are also accepted as a
source (``question_files``). Labels are never read: items are loaded with the gold field blinded, the question is
rendered only from the task's ``item_fields``, and every record is checked for ``<answer cue><label word>"``.

Output dir (every file written atomically: tmp + rename):
    train.jsonl          {"id", "task", "index", "src", "tgt", "input", "output"} per line
    alpaca.json          (alpaca=True) LLaMA-Factory records {"instruction": input, "input": "", "output": output}
    dataset_info.json    (alpaca=True) {"<dataset_name>": {"file_name": "alpaca.json", "columns": {...}}}, merged into
                         an existing file
    stats.json           rows per source language, item index ranges, duplicates removed, excluded counts, config
    summary.json         the stage artifact (architecture.md), written last
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import string
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qtalign.tasks.items import DataSource, Item, load_items, parse_range, read_records, comma_list
from qtalign.errors import QtalignError, data_error
from qtalign.tasks.specs import SpecSet, TaskSpec, load_specs

INSTRUCTION_TEMPLATE = "\nTranslate the input from {src} to {tgt}:\n"
_INSTRUCTION_RE = re.compile(r"\nTranslate the input from (.+?) to (.+?):\n\Z")
_BLIND_FIELD = "\x00qtdata: labels are never read\x00"


class QTDataConfig(BaseModel):
    """Question-translation data settings (round-trips to YAML/JSON)."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, description="task whose questions are translated (emotion, snli, paws, ...); "
                                               "not needed when only question_files are given")
    sources: list[str] = Field(default_factory=list, description="source language codes (or all/high/low); the "
                               "paper's mixes: zhde = zh,de; zhdeit = zh,de,it; swhi = sw,hi")
    target: str = Field("en", description="target language code (the paper: en, also zh)")
    rows_per_lang: int | None = Field(None, ge=1, description="rows per source language (default: all available)")
    items: str | None = Field(None, description="item index range START:END (e.g. 60:120), applied to every source")
    exclude_items: list[int] = Field(default_factory=list, description="item indices never used (e.g. evaluation items)")
    exclude_file: str | None = Field(None, description="more excluded indices: a text file of indices/START:END ranges, "
                                     "a JSON list, or an evaluation predictions.jsonl (its 'index' of this task)")
    shuffle: bool = Field(True, description="sample rows_per_lang at random and shuffle the mix (else first rows, in order)")
    paired: bool = Field(False, description="use the same item indices for every source language")
    seed: int = Field(0, description="seed of the sampling and the shuffle")
    dedup: bool = Field(True, description="drop records whose input text repeats an earlier one")
    data_dir: str | None = Field(None, description="folder with the official layout (or the base of data_files)")
    data_files: str | None = Field(None, description="path template with {task} and {lang} (.json/.jsonl), 'demo', or "
                                   "hf:<dataset>; e.g. snli/snli_{lang}10k_train.json under data_dir")
    split: str = Field("test", description="split for hf: datasets")
    prompts: list[str] = Field(default_factory=list, description="extra spec files merged over the defaults (e.g. paper_prompts.json)")
    question_files: list[str] = Field(default_factory=list, description="ready question-translation files (official "
                                      "input/answer, our input/output JSONL, or alpaca) mixed into the set")
    alpaca: bool = Field(False, description="also write LLaMA-Factory alpaca.json and dataset_info.json")
    dataset_name: str | None = Field(None, description="dataset_info.json entry name (default qt_<task>_<sources>_<target>)")

    @field_validator("sources", "prompts", "question_files", mode="before")
    @classmethod
    def _split(cls, v):
        return comma_list(v)

    def source(self) -> DataSource:
        return DataSource.from_options(self.data_dir, self.data_files, self.split)

    def fingerprint(self) -> str:
        from qtalign.io import fingerprint

        return fingerprint(self.model_dump(mode="json"))

    def name(self) -> str:
        if self.dataset_name:
            return self.dataset_name
        src = "".join(self.sources) or "files"
        return f"qt_{self.task or 'mixed'}_{src}_{self.target}"


# ----------------------------------------------------------------------------------------------------------
# rendering and the label-leak guard


def _check_no_gold(task: TaskSpec) -> None:
    if task.gold_field in task.item_fields:
        raise QtalignError(f"task '{task.name}': gold field '{task.gold_field}' is listed in item_fields; "
                           "question-translation data must not contain labels")


def render_pair(task: TaskSpec, specs: SpecSet, src: str, tgt: str, src_fields: dict[str, str],
                tgt_fields: dict[str, str]) -> tuple[str, str]:
    """(input, output) of one record: the question in src's format + the instruction, and the question in tgt's."""
    _check_no_gold(task)
    qx = task.lang(src).question({f: src_fields[f] for f in task.item_fields})
    qt = task.lang(tgt).question({f: tgt_fields[f] for f in task.item_fields})
    names = {"src": specs.language(src).instruction_name, "tgt": specs.language(tgt).instruction_name}
    return qx + INSTRUCTION_TEMPLATE.format(**names), qt


def _label_words(task: TaskSpec) -> set[str]:
    words = set(task.classes) | set(task.irrelevant_label_words.values()) | set(task.train_file_label_words.values())
    for ls in task.languages.values():
        words |= set(ls.data_label_words.values()) | set(ls.label_words.values())
        words |= {w for w in ls.script_label_words.values() if w}
    return {w.strip() for w in words if w and w.strip()}


class LeakGuard:
    """Finds '<answer cue><label word>"' (any label word of the task, any language) after a language's answer cue."""

    def __init__(self, specs: SpecSet, tasks: list[str] | None = None):
        self.specs = specs
        self.tasks = tasks if tasks is not None else list(specs.tasks)
        self._re: dict[str, re.Pattern | None] = {}

    def pattern(self, lang: str | None) -> re.Pattern | None:
        key = lang or "*"
        if key not in self._re:
            cues, words = set(), set()
            for t in self.tasks:
                task = self.specs.task(t)
                words |= _label_words(task)
                langs = [lang] if lang in task.languages else list(task.languages)
                cues |= {task.lang(c).answer_cue for c in langs}
            alt = lambda xs: "|".join(re.escape(x) for x in sorted(xs, key=lambda s: (-len(s), s)))  # noqa: E731
            self._re[key] = re.compile(f'(?:{alt(cues)})\\s*(?:{alt(words)})\\s*"') if cues and words else None
        return self._re[key]

    def check(self, rec: dict, where: str) -> None:
        for fld, lang in (("input", rec.get("src")), ("output", rec.get("tgt"))):
            pat = self.pattern(lang)
            m = pat.search(rec[fld]) if pat else None
            if m:
                raise QtalignError(f"{where}: field '{fld}': label leak: {m.group(0)!r} (question-translation data must "
                                   "not contain answers)")


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
        if kind == "alpaca":
            extra = r.get("input") or ""
            text, target = r["instruction"] + (("\n" + extra) if extra else ""), r["output"]
        else:
            text, target = r["input"], r[need[1]]
        m = _INSTRUCTION_RE.search(text)
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
    path = Path(path)
    if not path.exists():
        raise QtalignError(f"{path}: exclusion file not found")
    text = path.read_text(encoding="utf-8-sig")
    head = text.lstrip()[:1]
    out: set[int] = set()
    if head in ("{", "["):
        if head == "[":
            try:
                recs = json.loads(text)
            except json.JSONDecodeError as e:
                raise data_error(path, f"invalid JSON at line {e.lineno}: {e.msg}") from None
            if not isinstance(recs, list):
                raise data_error(path, "expected a JSON list")
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
        for tok in re.split(r"[\s,]+", line.split("#", 1)[0].strip()):
            if not tok:
                continue
            try:
                if ":" in tok:
                    a, b = tok.split(":", 1)
                    out.update(range(int(a), int(b)))
                else:
                    out.add(int(tok))
            except ValueError:
                raise data_error(path, f"bad item index {tok!r} (integers or START:END)", record=f"line {n + 1}") from None
    return out


# ----------------------------------------------------------------------------------------------------------
# building


def _blind(task: TaskSpec) -> TaskSpec:
    """The task with its gold field renamed to a key no record has: loading never reads a label."""
    return dataclasses.replace(task, gold_field=_BLIND_FIELD)


def _load_parallel(task: TaskSpec, langs: list[str], source: DataSource) -> dict[str, list[Item]]:
    blind = _blind(task)
    loaded = {lang: load_items(blind, lang, source, require_gold=False, english_gold=False) for lang in langs}
    ref = langs[0]
    for lang in langs[1:]:
        a, b = loaded[ref], loaded[lang]
        where = lambda c: source.path(task, c) or source.describe().format(task=task.name, lang=c)  # noqa: E731
        if len(a) != len(b):
            raise QtalignError(f"{where(lang)}: not index-parallel with {where(ref)}: {len(b)} records vs {len(a)} "
                               "(files of one task must hold the same items in the same order)")
        for x, y in zip(a, b):
            if x.id != y.id:
                raise data_error(where(lang), f"id {y.id!r} != {x.id!r} of the same row in {where(ref)}: the files are "
                                 "not index-parallel", record=y.index, field="id")
    return loaded


def _select(cands: dict[str, list[dict]], cfg: QTDataConfig) -> dict[str, list[dict]]:
    """rows_per_lang records per source language (seeded sample when shuffling, else the first ones)."""
    n = cfg.rows_per_lang
    if cfg.paired:
        common = sorted(set.intersection(*[{r["index"] for r in rs} for rs in cands.values()])) if cands else []
        keep = common
        if n is not None and n < len(common):
            keep = sorted(random.Random(f"{cfg.seed}/paired").sample(common, n)) if cfg.shuffle else common[:n]
        keep = set(keep)
        return {lang: [r for r in rs if r["index"] in keep] for lang, rs in cands.items()}
    out = {}
    for lang, rs in cands.items():
        if n is not None and n < len(rs):
            rs = random.Random(f"{cfg.seed}/{lang}").sample(rs, n) if cfg.shuffle else rs[:n]
            rs = sorted(rs, key=lambda r: r["_order"])
        out[lang] = rs
    return out


def build_records(cfg: QTDataConfig, specs: SpecSet | None = None) -> tuple[list[dict], dict]:
    """The records (in output order) and their stats, without writing anything."""
    specs = specs or load_specs(cfg.prompts)
    if not cfg.question_files and not (cfg.task and cfg.sources):
        raise QtalignError("nothing to build: give a task with source languages (--task, --sources) and/or question files")
    if cfg.sources and not cfg.task:
        raise QtalignError("source languages need a task (--task)")
    rng_items = parse_range(cfg.items)
    excluded = set(cfg.exclude_items)
    if cfg.exclude_file:
        excluded |= read_exclusions(cfg.exclude_file, cfg.task)
    cands: dict[str, list[dict]] = {}
    per: dict[str, dict[str, Any]] = {}
    order = 0

    lo, hi = (rng_items.start, rng_items.stop) if rng_items is not None else (None, None)
    if (lo is not None and lo < 0) or (hi is not None and hi < 0):
        raise QtalignError(f"bad item range {cfg.items!r}: item indices are non-negative (START:END)")

    def add(lang: str, rec: dict) -> None:
        nonlocal order
        st = per.setdefault(lang, {"available": 0, "out_of_range": 0, "excluded": 0, "duplicates": 0})
        st["available"] += 1
        if (lo is not None and rec["index"] < lo) or (hi is not None and rec["index"] >= hi):
            st["out_of_range"] += 1
            return
        if rec["index"] in excluded:
            st["excluded"] += 1
            return
        rec["_order"] = order
        order += 1
        cands.setdefault(lang, []).append(rec)

    guard_tasks = [cfg.task] if cfg.task else None
    if cfg.task and cfg.sources:
        task = specs.task(cfg.task)
        _check_no_gold(task)
        specs.language(cfg.target)
        task.lang(cfg.target)
        if cfg.target in cfg.sources:
            raise QtalignError(f"source language '{cfg.target}' is also the target language")
        srcs = [c for c in specs.resolve_langs(cfg.sources, cfg.task) if c != cfg.target]
        source = cfg.source()
        items = _load_parallel(task, [*srcs, cfg.target] if cfg.target not in srcs else srcs, source)
        tgt_items = items[cfg.target]
        for lang in srcs:
            for it, ti in zip(items[lang], tgt_items):
                inp, outp = render_pair(task, specs, lang, cfg.target, it.fields, ti.fields)
                add(lang, {"id": f"{task.name}/{lang}-{cfg.target}/{it.index}", "task": task.name, "index": it.index,
                           "src": lang, "tgt": cfg.target, "input": inp, "output": outp})
    for qf in cfg.question_files:
        recs = load_question_records(qf, specs)
        for r in recs:
            if r["src"] is None:
                raise data_error(qf, "cannot tell the source language: the record has no 'src' and its instruction "
                                 "names no known language", record=r["row"], field="input")
            r["task"] = r["task"] or cfg.task
            add(r["src"], {"id": r["id"], "task": r["task"], "index": r["index"], "src": r["src"], "tgt": r["tgt"],
                           "input": r["input"], "output": r["output"]})

    if cfg.dedup:
        seen: set[str] = set()
        for lang, rs in cands.items():
            keep = []
            for r in rs:
                if r["input"] in seen:
                    per[lang]["duplicates"] += 1
                    continue
                seen.add(r["input"])
                keep.append(r)
            cands[lang] = keep
    chosen = _select(cands, cfg)
    records = [r for rs in chosen.values() for r in rs]
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(records)
    guard = LeakGuard(specs, guard_tasks)
    for k, r in enumerate(records):
        del r["_order"]
        guard.check(r, f"record {k} ({r['id']})")

    warnings = []
    other_tgts = sorted({str(r["tgt"]) for r in records if r["tgt"] != cfg.target})
    if other_tgts:
        warnings.append(f"some question-file records translate into {', '.join(other_tgts)}, not the target '{cfg.target}'")
    if cfg.task and cfg.sources and not cfg.data_files and cfg.data_dir and rng_items is None and not excluded:
        warnings.append(f"the items come from the task's evaluation files ({specs.task(cfg.task).test_file}) and no item "
                        "range or exclusion keeps them apart from the items you evaluate on (use --items/--exclude-file)")
    for lang, st in per.items():
        rs = chosen.get(lang, [])
        idx = [r["index"] for r in rs]
        st.update(rows=len(rs), index_min=min(idx) if idx else None, index_max=max(idx) if idx else None)
        if cfg.rows_per_lang and len(rs) < cfg.rows_per_lang:
            warnings.append(f"{lang}: only {len(rs)} of {cfg.rows_per_lang} requested rows available")
    idx = [r["index"] for r in records]
    stats = {
        "rows": len(records),
        "rows_per_source": {lang: st["rows"] for lang, st in per.items()},
        "index_min": min(idx) if idx else None,
        "index_max": max(idx) if idx else None,
        "duplicates_removed": sum(st["duplicates"] for st in per.values()),
        "excluded": sum(st["excluded"] for st in per.values()),
        "out_of_range": sum(st["out_of_range"] for st in per.values()),
        "per_source": per,
        "warnings": warnings,
    }
    return records, stats


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_question_data(cfg: QTDataConfig, out_dir: str | Path) -> dict:
    """Build the records and write train.jsonl (+ alpaca.json, dataset_info.json), stats.json, summary.json."""
    t0 = time.time()
    records, stats = build_records(cfg)
    if not records:
        raise QtalignError("no records left after the item range, exclusions and de-duplication")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # present again only once this build has finished
    keys = ("id", "task", "index", "src", "tgt", "input", "output")
    _write_atomic(out / "train.jsonl", "".join(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n" for r in records))
    files = ["train.jsonl"]
    if cfg.alpaca:
        alp = [{"instruction": r["input"], "input": "", "output": r["output"]} for r in records]
        _write_atomic(out / "alpaca.json", json.dumps(alp, ensure_ascii=False, indent=1))
        info_path = out / "dataset_info.json"
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
        info[cfg.name()] = {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
        _write_atomic(info_path, json.dumps(info, ensure_ascii=False, indent=1))
        files += ["alpaca.json", "dataset_info.json"]
    stats = {**stats, "files": files, "dataset_name": cfg.name(), "fingerprint": cfg.fingerprint(), "config": cfg.model_dump()}
    _write_atomic(out / "stats.json", json.dumps(stats, ensure_ascii=False, indent=1))
    rows = "\n".join(f"| {lang} | {st['rows']} | {st['index_min']}..{st['index_max']} | {st['excluded']} | {st['duplicates']} |"
                     for lang, st in stats["per_source"].items())
    summary = {
        "stage": "data",
        "figures": [],
        "tables": [{"title": f"question-translation data -> {cfg.target} ({cfg.name()})",
                    "markdown": "| source | rows | items | excluded | duplicates |\n|---|---|---|---|---|\n" + rows}],
        "numbers": {"rows": stats["rows"], "duplicates_removed": stats["duplicates_removed"], "excluded": stats["excluded"]},
        "timing_s": round(time.time() - t0, 3),
        "fingerprint": cfg.fingerprint(),
    }
    _write_atomic(out / "summary.json", json.dumps(summary, ensure_ascii=False, indent=1))
    return stats


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


# ----------------------------------------------------------------------------------------------------------
# CLI


def configure_parser(p, name: str) -> None:
    g = p.add_argument_group("question-translation data")
    g.add_argument("--config", help="YAML/JSON config file (keys of QTDataConfig, optionally under 'build_data'); "
                   "command-line options override it")
    g.add_argument("--task", help="task whose questions are translated: emotion, snli, paws")
    g.add_argument("--sources", help="comma list of source languages (or all/high/low); paper mixes: zhde = zh,de")
    g.add_argument("--target", help="target language (default en)")
    g.add_argument("--rows-per-lang", type=int, help="rows per source language (default all)")
    g.add_argument("--items", help="item range START:END (e.g. 60:120)")
    g.add_argument("--exclude-items", help="comma list of item indices / START:END ranges never used")
    g.add_argument("--exclude-file", help="file of excluded indices, or an eval predictions.jsonl")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false", default=None, help="first rows, in order")
    g.add_argument("--paired", action="store_true", default=None, help="same item indices for every source language")
    g.add_argument("--seed", type=int)
    g.add_argument("--no-dedup", dest="dedup", action="store_false", default=None, help="keep repeated inputs")
    g.add_argument("--data-dir", help="folder in the official layout (e.g. ../shared/data/official)")
    g.add_argument("--data-files", help="path template with {task},{lang} (.json/.jsonl), 'demo', or hf:<dataset>; "
                   "e.g. 'snli/snli_{lang}10k_train.json' under --data-dir")
    g.add_argument("--split", help="split for hf: datasets")
    g.add_argument("--prompts", action="append", help="spec file merged over the defaults (e.g. paper_prompts.json); repeatable")
    g.add_argument("--question-files", action="append", help="comma list of ready question files (official input/answer, "
                   "our JSONL, alpaca) mixed in; repeatable")
    g.add_argument("--alpaca", action="store_true", default=None, help="also write alpaca.json + dataset_info.json (LLaMA-Factory)")
    g.add_argument("--dataset-name", help="dataset_info.json entry name")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--save-config", help="write the resolved config as YAML and exit")


def _parse_indices(text: str) -> list[int]:
    out: list[int] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        try:
            if ":" in tok:
                a, b = tok.split(":", 1)
                out += range(int(a), int(b))
            else:
                out.append(int(tok))
        except ValueError:
            raise QtalignError(f"bad --exclude-items entry {tok!r}: use integers or START:END") from None
    return out


def qtdata_config(args) -> QTDataConfig:
    from qtalign.cli import load_config_file, task_overrides

    d = load_config_file(getattr(args, "config", None))
    d = dict(d.get("build_data", d))
    d.update(task_overrides(args, keys=("task", "sources", "target", "rows_per_lang", "items", "exclude_file", "shuffle",
                                        "paired", "seed", "dedup", "data_dir", "data_files", "split", "prompts",
                                        "alpaca", "dataset_name")))
    if getattr(args, "exclude_items", None):
        d["exclude_items"] = [*d.get("exclude_items", []), *_parse_indices(args.exclude_items)]
    if getattr(args, "question_files", None):
        d["question_files"] = [f.strip() for x in args.question_files for f in x.split(",") if f.strip()]
    return QTDataConfig(**d)


def run_cli(args) -> int:
    cfg = qtdata_config(args)
    if args.save_config:
        import yaml

        Path(args.save_config).write_text(yaml.safe_dump({"build_data": cfg.model_dump()}, sort_keys=False, allow_unicode=True))
        print(f"wrote {args.save_config}")
        return 0
    stats = build_question_data(cfg, args.out)
    for w in stats["warnings"]:
        print(f"warning: {w}")
    print(json.dumps({"out": args.out, "rows": stats["rows"], "rows_per_source": stats["rows_per_source"],
                      "duplicates_removed": stats["duplicates_removed"], "excluded": stats["excluded"]}, ensure_ascii=False))
    return 0
