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
    stats.json           rows per source language, item index ranges, duplicates removed, excluded counts, the
                         control (if any) and what it changed, config

Controls (``control``; the rows are selected exactly as without one, then changed, so a control run trains on the
same number of rows with the same responses and the same mix):
    copy       input = the row's own target-language question + "Translate the input from T to T": the format, the
               task's questions and the target language, without any cross-lingual content (src becomes the target)
    shuffled   each row keeps its source question but gets another item's target question as its response (a seeded
               derangement: no row keeps its own translation): the format and both languages' text, without the
               translation correspondence
    summary.json         the stage artifact (architecture.md), written last
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from pathlib import Path
from typing import Any

from qtalign.errors import QtalignError, data_error
from qtalign.io import OutputDir, read_json, write_json, write_jsonl
from qtalign.qtdata.config import QTDataConfig
from qtalign.qtdata.files import INSTRUCTION_TEMPLATE, load_question_records, read_exclusions
from qtalign.tasks.items import DataSource, Item, load_items, parse_range
from qtalign.tasks.specs import SpecSet, TaskSpec, load_specs

_BLIND_FIELD = "\x00qtdata: labels are never read\x00"

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
        keep = set(common)
        if n is not None and n < len(common):
            keep = set(random.Random(f"{cfg.seed}/paired").sample(common, n) if cfg.shuffle else common[:n])
        return {lang: [r for r in rs if r["index"] in keep] for lang, rs in cands.items()}
    out = {}
    for lang, rs in cands.items():
        if n is not None and n < len(rs):
            rs = random.Random(f"{cfg.seed}/{lang}").sample(rs, n) if cfg.shuffle else rs[:n]
            rs = sorted(rs, key=lambda r: r["_order"])
        out[lang] = rs
    return out


class _Pool:
    """Candidate records per source language, with the counts stats.json reports (item range and exclusions applied
    as records arrive)."""

    def __init__(self, rng: slice | None, excluded: set[int]):
        self.lo, self.hi = (rng.start, rng.stop) if rng is not None else (None, None)
        self.excluded = excluded
        self.cands: dict[str, list[dict]] = {}
        self.per: dict[str, dict[str, Any]] = {}
        self.order = 0

    def add(self, lang: str, rec: dict) -> None:
        st = self.per.setdefault(lang, {"available": 0, "out_of_range": 0, "excluded": 0, "duplicates": 0})
        st["available"] += 1
        if (self.lo is not None and rec["index"] < self.lo) or (self.hi is not None and rec["index"] >= self.hi):
            st["out_of_range"] += 1
            return
        if rec["index"] in self.excluded:
            st["excluded"] += 1
            return
        rec["_order"] = self.order
        self.order += 1
        self.cands.setdefault(lang, []).append(rec)

    def dedup(self) -> None:
        """Drop records whose input text repeats an earlier one (counted per language)."""
        seen: set[str] = set()
        for lang, rs in self.cands.items():
            keep = []
            for r in rs:
                if r["input"] in seen:
                    self.per[lang]["duplicates"] += 1
                    continue
                seen.add(r["input"])
                keep.append(r)
            self.cands[lang] = keep


def _check_build(cfg: QTDataConfig) -> None:
    if not cfg.question_files and not (cfg.task and cfg.sources):
        raise QtalignError("nothing to build: give a task with source languages (--task, --sources) and/or question files")
    if cfg.sources and not cfg.task:
        raise QtalignError("source languages need a task (--task)")


def _add_from_items(pool: _Pool, cfg: QTDataConfig, specs: SpecSet) -> None:
    """Records rendered from index-parallel item files: each source language's question -> the target's."""
    task = specs.task(cfg.task)
    _check_no_gold(task)
    specs.language(cfg.target)
    task.lang(cfg.target)
    if cfg.target in cfg.sources:
        raise QtalignError(f"source language '{cfg.target}' is also the target language")
    srcs = [c for c in specs.resolve_langs(cfg.sources, cfg.task) if c != cfg.target]
    items = _load_parallel(task, [*srcs, cfg.target] if cfg.target not in srcs else srcs, cfg.source())
    for lang in srcs:
        for it, ti in zip(items[lang], items[cfg.target]):
            inp, outp = render_pair(task, specs, lang, cfg.target, it.fields, ti.fields)
            pool.add(lang, {"id": f"{task.name}/{lang}-{cfg.target}/{it.index}", "task": task.name, "index": it.index,
                            "src": lang, "tgt": cfg.target, "input": inp, "output": outp, "origin": "items"})


def _add_from_files(pool: _Pool, cfg: QTDataConfig, specs: SpecSet) -> None:
    """Records of ready question files (official input/answer, our JSONL, alpaca)."""
    for qf in cfg.question_files:
        for r in load_question_records(qf, specs):
            if r["src"] is None:
                raise data_error(qf, "cannot tell the source language: the record has no 'src' and its instruction "
                                 "names no known language", record=r["row"], field="input")
            pool.add(r["src"], {"id": r["id"], "task": r["task"] or cfg.task, "index": r["index"], "src": r["src"],
                                "tgt": r["tgt"], "input": r["input"], "output": r["output"]})


def _warnings(cfg: QTDataConfig, specs: SpecSet, records: list[dict], pool: _Pool, chosen: dict, ranged: bool) -> list[str]:
    out = []
    other_tgts = sorted({str(r["tgt"]) for r in records if r["tgt"] != cfg.target})
    if other_tgts:
        out.append(f"some question-file records translate into {', '.join(other_tgts)}, not the target '{cfg.target}'")
    if cfg.task and cfg.sources and not cfg.data_files and cfg.data_dir and not ranged and not pool.excluded:
        out.append(f"the items come from the task's evaluation files ({specs.task(cfg.task).test_file}) and no item "
                   "range or exclusion keeps them apart from the items you evaluate on (use --items/--exclude-file)")
    for lang in pool.per:
        n = len(chosen.get(lang, []))
        if cfg.rows_per_lang and n < cfg.rows_per_lang:
            out.append(f"{lang}: only {n} of {cfg.rows_per_lang} requested rows available")
    return out


def _stats(records: list[dict], pool: _Pool, chosen: dict, warnings: list[str]) -> dict:
    per = pool.per
    for lang, st in per.items():
        idx = [r["index"] for r in chosen.get(lang, [])]
        st.update(rows=len(idx), index_min=min(idx) if idx else None, index_max=max(idx) if idx else None)
    idx = [r["index"] for r in records]
    return {
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


def _copy_control(records: list[dict], specs: SpecSet) -> dict:
    """Each row's input becomes its own response (the target-language question) with the target -> target
    instruction; src becomes the target language."""
    for r in records:
        name = specs.language(r["tgt"]).instruction_name
        r.update(input=r["output"] + INSTRUCTION_TEMPLATE.format(src=name, tgt=name), src=r["tgt"], control="copy")
    return {"rows_changed": len(records)}


def _shuffled_control(records: list[dict], seed: int) -> dict:
    """A seeded derangement of the responses: the multiset of responses is kept, and no row keeps a response equal to
    its own (rows of one item in several source languages share a response, so equality is by text)."""
    n = len(records)
    outs = [r["output"] for r in records]
    if len(set(outs)) < 2:
        raise QtalignError("control 'shuffled': every row has the same response; there is nothing to pair it with")
    rng = random.Random(f"{seed}/shuffled")
    order = list(range(n))
    rng.shuffle(order)
    new = [""] * n
    for k, i in enumerate(order):  # a cycle through a random order: a derangement of positions
        new[i] = outs[order[(k + 1) % n]]
    for i in range(n):  # rows of the same item met in the cycle: swap with a row where both then differ
        if new[i] != outs[i]:
            continue
        for j in [*order[order.index(i) + 1:], *order]:
            if new[j] != outs[i] and new[i] != outs[j] and j != i:
                new[i], new[j] = new[j], new[i]
                break
        else:
            raise QtalignError("control 'shuffled': cannot pair every row with another item's response")
    for r, o in zip(records, new):
        r.update(output=o, control="shuffled")
    return {"rows_changed": n}


def apply_control(records: list[dict], cfg: QTDataConfig, specs: SpecSet) -> dict | None:
    """Change the selected rows into the configured control (None without one); returns what it did for stats.json."""
    if cfg.control == "none":
        return None
    done = _copy_control(records, specs) if cfg.control == "copy" else _shuffled_control(records, cfg.seed)
    return {"kind": cfg.control, **done, "repeated_inputs": len(records) - len({r["input"] for r in records})}


def build_records(cfg: QTDataConfig, specs: SpecSet | None = None) -> tuple[list[dict], dict]:
    """The records (in output order) and their stats, without writing anything."""
    specs = specs or load_specs(cfg.prompts)
    _check_build(cfg)
    rng = parse_range(cfg.items)
    excluded = set(cfg.exclude_items) | (read_exclusions(cfg.exclude_file, cfg.task) if cfg.exclude_file else set())
    pool = _Pool(rng, excluded)
    if cfg.task and cfg.sources:
        _add_from_items(pool, cfg, specs)
    _add_from_files(pool, cfg, specs)
    if cfg.dedup:
        pool.dedup()
    chosen = _select(pool.cands, cfg)
    records = [r for rs in chosen.values() for r in rs]
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(records)
    stats = _stats(records, pool, chosen, _warnings(cfg, specs, records, pool, chosen, rng is not None))
    control = apply_control(records, cfg, specs)
    if control is not None:
        stats["control"] = control
    guard = LeakGuard(specs, [cfg.task] if cfg.task else None)
    for k, r in enumerate(records):
        del r["_order"]
        guard.check(r, f"record {k} ({r['id']})")
    return records, stats


OUR_FILES = ("train.jsonl", "alpaca.json", "dataset_info.json", "stats.json", "summary.json")


def _summary(cfg: QTDataConfig, stats: dict, t0: float) -> dict:
    rows = "\n".join(f"| {lang} | {st['rows']} | {st['index_min']}..{st['index_max']} | {st['excluded']} | {st['duplicates']} |"
                     for lang, st in stats["per_source"].items())
    return {
        "stage": "data",
        "figures": [],
        "tables": [{"title": f"question-translation data -> {cfg.target} ({cfg.name()})",
                    "markdown": "| source | rows | items | excluded | duplicates |\n|---|---|---|---|---|\n" + rows}],
        "numbers": {"rows": stats["rows"], "duplicates_removed": stats["duplicates_removed"], "excluded": stats["excluded"]},
        "timing_s": round(time.time() - t0, 3),
        "fingerprint": cfg.fingerprint(),
    }


def build_question_data(cfg: QTDataConfig, out_dir: str | Path, built: tuple[list[dict], dict] | None = None,
                        summary: dict | None = None) -> dict:
    """Build the records (``built``: build_records(cfg) made already) and write train.jsonl (+ alpaca.json,
    dataset_info.json), stats.json, summary.json (with the fields of ``summary`` added)."""
    t0 = time.time()
    out = OutputDir(out_dir, "data").check()
    records, stats = built or build_records(cfg)
    if not records:
        raise QtalignError("no records left after the item range, exclusions and de-duplication")
    out.claim()
    out.remove("summary.json")  # present again only once this build has finished
    out.record(*OUR_FILES)
    keys = ("id", "task", "index", "src", "tgt", "input", "output", "control")
    write_jsonl(out.path / "train.jsonl", ({k: r[k] for k in keys if k in r} for r in records))
    files = ["train.jsonl"]
    if cfg.alpaca:
        write_json(out.path / "alpaca.json", [{"instruction": r["input"], "input": "", "output": r["output"]} for r in records])
        info = read_json(out.path / "dataset_info.json", {}) or {}
        info[cfg.name()] = {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
        write_json(out.path / "dataset_info.json", info)
        files += ["alpaca.json", "dataset_info.json"]
    stats = {**stats, "files": files, "dataset_name": cfg.name(), "fingerprint": cfg.fingerprint(), "config": cfg.model_dump(mode="json")}
    write_json(out.path / "stats.json", stats)
    write_json(out.path / "summary.json", {**_summary(cfg, stats, t0), **(summary or {})})
    return stats


