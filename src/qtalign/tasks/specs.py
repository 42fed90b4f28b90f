"""Tasks, languages, prompts and label words as data.

A spec file is a JSON document in the schema of the paper's ``paper_prompts.json`` plus a few extensions
(see ``docs/spec_format.md``). The project ships its own defaults in ``qtalign/tasks/data/*.json``; user files are
merged on top of them (a language entry of a task is replaced whole, task keys are updated), so a new language
or task needs a data file and no code.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable

from qtalign.errors import QtalignError, data_error
from qtalign.io import require_file

DEFAULT_SPEC_FILES = ("languages.json", "emotion.json", "snli.json", "paws.json")
VARIANTS = ("enout", "native", "irrelevant")
VARIANT_ALIASES = {"irrelative": "irrelevant", "english": "enout", "en": "enout"}


def canonical_variant(name: str) -> str:
    v = VARIANT_ALIASES.get(name, name)
    if v not in VARIANTS:
        raise QtalignError(f"unknown label variant '{name}' (choose from {', '.join(VARIANTS)}; 'irrelative' = irrelevant)")
    return v


@dataclass(frozen=True)
class Language:
    code: str
    english_name: str
    instruction_name: str
    resource_group: str  # "high" | "low"


@dataclass
class LangSpec:
    """How one task is written in one language."""

    code: str
    fields: dict[str, str]
    answer_cue: str
    question_template: str
    data_label_words: dict[str, str]  # class id -> word stored in this language's data files (decodes gold)
    label_words: dict[str, str]  # class id -> native word scored in the 'native' variant
    script_label_words: dict[str, str | None]  # class id -> official script dictionary word (faithful mode)
    demos: dict[str, str] = field(default_factory=dict)  # variant -> verbatim demo block
    demo_items: list[dict[str, str]] = field(default_factory=list)

    def question(self, item_fields: dict[str, str]) -> str:
        """The bare question in this language's format, ending with the answer cue."""
        return self.question_template.format_map(item_fields)


@dataclass
class TaskSpec:
    name: str
    n_shot: int
    classes: list[str]
    item_fields: list[str]
    gold_field: str
    test_file: str | None
    languages: dict[str, LangSpec]
    irrelevant_label_words: dict[str, str] = field(default_factory=dict)
    variants_info: dict[str, Any] = field(default_factory=dict)  # the paper's per-script notes (faithful mode)
    train_file_label_words: dict[str, str] = field(default_factory=dict)
    # items whose English value of this field is equal form one cluster (SNLI: the premise shared by a triple): a
    # retrieval hit may be any item of the cluster, and bootstrap intervals resample whole clusters
    cluster_field: str | None = None

    def lang(self, code: str) -> LangSpec:
        try:
            return self.languages[code]
        except KeyError:
            raise QtalignError(
                f"task '{self.name}' has no spec for language '{code}' (known: {' '.join(self.languages)})"
            ) from None

    def label_words(self, lang: str, variant: str) -> list[str]:
        """Label words scored for each class (in class order) for a language and label variant."""
        variant = canonical_variant(variant)
        if variant == "enout":
            return list(self.classes)
        if variant == "native":
            words = self.lang(lang).label_words
        else:
            words = self.irrelevant_label_words
            if not words:
                raise QtalignError(f"task '{self.name}' defines no irrelevant_label_words")
        return [words[c] for c in self.classes]

    def demo_block(self, lang: str, variant: str) -> str:
        """The demonstration block (no trailing newline) for a language and variant; '' for zero-shot."""
        variant = canonical_variant(variant)
        ls = self.lang(lang)
        if self.n_shot == 0:
            return ""
        for key in (variant, *[a for a, v in VARIANT_ALIASES.items() if v == variant]):
            if key in ls.demos:
                return ls.demos[key]
        words = dict(zip(self.classes, self.label_words(lang, variant)))
        if ls.demo_items:
            return "\n".join(ls.question({f: d[f] for f in self.item_fields}) + words[d["label"]] + '"'
                             for d in ls.demo_items[: self.n_shot])
        if "enout" in ls.demos:  # relabel the English-label block
            block = ls.demos["enout"]
            marker = "\x00{}\x00"
            for i, c in enumerate(self.classes):
                pat = f'{ls.answer_cue}{c}"'
                if pat not in block:
                    raise QtalignError(
                        f"task '{self.name}' language '{lang}': cannot derive '{variant}' demos: "
                        f"the enout block has no {pat!r}"
                    )
                block = block.replace(pat, marker.format(i))
            for i, c in enumerate(self.classes):
                block = block.replace(marker.format(i), f'{ls.answer_cue}{words[c]}"')
            return block
        raise QtalignError(f"task '{self.name}' language '{lang}' has no demonstrations for variant '{variant}'")

    def prompt_parts(self, lang: str, variant: str, item_fields: dict[str, str]) -> tuple[str, str]:
        """(prefix, question): the prompt is prefix + question; prefix is shared by all items of a language."""
        demos = self.demo_block(lang, variant)
        prefix = demos + "\n" if demos else ""
        return prefix, self.lang(lang).question(item_fields)

    def prompt(self, lang: str, variant: str, item_fields: dict[str, str]) -> str:
        return "".join(self.prompt_parts(lang, variant, item_fields))


@dataclass
class SpecSet:
    languages: dict[str, Language]
    order: list[str]
    tasks: dict[str, TaskSpec]
    sources: list[str]

    def task(self, name: str) -> TaskSpec:
        try:
            return self.tasks[name]
        except KeyError:
            raise QtalignError(f"unknown task '{name}' (known: {', '.join(self.tasks)})") from None

    def language(self, code: str) -> Language:
        try:
            return self.languages[code]
        except KeyError:
            raise QtalignError(f"unknown language '{code}' (known: {' '.join(self.order)})") from None

    def resolve_langs(self, spec: str | Iterable[str], task: str | None = None) -> list[str]:
        """'all' or a comma list -> language codes in table order (restricted to the task's languages)."""
        if isinstance(spec, str):
            spec = [s.strip() for s in spec.split(",") if s.strip()]
        spec = list(spec)
        avail = self.order if task is None else [c for c in self.order if c in self.task(task).languages]
        if spec in (["all"], []):
            return list(avail)
        out = []
        for code in spec:
            if code in ("high", "low"):
                out += [c for c in avail if self.languages[c].resource_group == code]
                continue
            self.language(code)
            if task is not None:
                self.task(task).lang(code)
            out.append(code)
        return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------------------------
# loading


def _read_json(path: Path) -> dict:
    if path.exists() and not path.is_file() and not path.is_dir():
        require_file(path, "spec file")  # a pipe: one line, not a file read half
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise QtalignError(f"{path}: spec file not found") from None
    except IsADirectoryError:
        raise QtalignError(f"{path}: is a folder, not a spec file") from None
    except UnicodeDecodeError:
        raise QtalignError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise QtalignError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(doc, dict):
        raise data_error(path, "a spec file must be a JSON object with 'languages' and/or 'tasks'")
    return doc


def merge_spec_docs(docs: Iterable[tuple[str, dict]]) -> tuple[dict, dict[str, str]]:
    """Merge raw spec documents; returns the merged doc and, per task/lang entry, the file it came from."""
    merged: dict = {"languages": {"order": [], "info": {}}, "tasks": {}}
    origin: dict[str, str] = {}
    for src, doc in docs:
        langs = doc.get("languages", {})
        for code in [*langs.get("order", []), *langs.get("info", {})]:  # the order given, then languages it leaves out
            if code not in merged["languages"]["order"]:
                merged["languages"]["order"].append(code)
        for code, info in langs.get("info", {}).items():
            merged["languages"]["info"].setdefault(code, {}).update(info)
        for tname, tdoc in doc.get("tasks", {}).items():
            if not isinstance(tdoc, dict):
                raise data_error(src, "must be an object", record=f"tasks.{tname}")
            tgt = merged["tasks"].setdefault(tname, {"languages": {}})
            for k, v in tdoc.items():
                if k == "languages":
                    for code, ldoc in v.items():
                        tgt["languages"][code] = ldoc
                        origin[f"{tname}/{code}"] = src
                else:
                    tgt[k] = v
            origin.setdefault(tname, src)
    return merged, origin


def _template_fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def derive_question_template(item_fields: list[str], fields: dict[str, str], answer_cue: str) -> str:
    """The canonical format: one '<field word>: {field}' line per item field (raw when the task has no field
    word for it, as emotion reviews), then the answer cue."""
    lines = [f"{fields[f]}: {{{f}}}" if fields.get(f) else f"{{{f}}}" for f in item_fields]
    return "\n".join(lines + [answer_cue])


def _lang_spec(task: str, code: str, d: dict, classes: list[str], item_fields: list[str], src: str) -> LangSpec:
    rec = f"tasks.{task}.languages.{code}"

    def need(key):
        if key not in d:
            raise data_error(src, "missing", record=rec, field=key)
        return d[key]

    fields = need("fields")
    if "answer" not in fields:
        raise data_error(src, "missing the 'answer' field word", record=rec, field="fields")
    answer_cue = d.get("answer_cue") or f'{fields["answer"]}: "'
    qt = d.get("question_template")
    if qt is None and "query_template" in d:
        qt = d["query_template"].removeprefix("{demos}\n")
    if qt is None:
        qt = derive_question_template(item_fields, fields, answer_cue)
    try:
        _template_fields(qt)
    except ValueError as e:  # a stray '{' or '}'
        raise data_error(src, f"not a valid template ({e}); write a literal brace as {{{{ or }}}}", rec, "question_template") from None
    if _template_fields(qt) != set(item_fields):
        raise data_error(src, f"placeholders {sorted(_template_fields(qt))} != item fields {item_fields}", rec, "question_template")
    if not qt.endswith(answer_cue):
        raise data_error(src, f"must end with the answer cue {answer_cue!r}", rec, "question_template")
    native = need("label_words_native")
    missing = [c for c in classes if not native.get(c)]
    if missing:
        raise data_error(src, f"no word for class(es) {missing}", rec, "label_words_native")
    script = d.get("label_words_script") or {}
    scored = {c: (script.get(c) or native[c]) for c in classes}
    items = d.get("demo_items", [])
    for j, it in enumerate(items):
        for f in [*item_fields, "label"]:
            if f not in it:
                raise data_error(src, "missing", record=f"{rec}.demo_items[{j}]", field=f)
        if it["label"] not in classes:
            raise data_error(src, f"unknown class '{it['label']}' (classes: {classes})", f"{rec}.demo_items[{j}]", "label")
    return LangSpec(
        code=code,
        fields=dict(fields),
        answer_cue=answer_cue,
        question_template=qt,
        data_label_words={c: native[c] for c in classes},
        label_words=scored,
        script_label_words={c: script.get(c) for c in classes} if script else {c: native[c] for c in classes},
        demos=dict(d.get("demos", {})),
        demo_items=list(items),
    )


def build_specset(merged: dict, origin: dict[str, str], sources: list[str]) -> SpecSet:
    info = merged["languages"]["info"]
    languages = {}
    for code in merged["languages"]["order"]:
        i = info.get(code, {})
        name = i.get("english_name") or code
        languages[code] = Language(code, name, i.get("instruction_name") or name, i.get("resource_group") or "low")
    tasks = {}
    for tname, t in merged["tasks"].items():
        src = origin.get(tname, "<spec>")
        for key in ("classes", "item_fields"):
            if not t.get(key):
                raise data_error(src, "missing", record=f"tasks.{tname}", field=key)
        classes, item_fields = list(t["classes"]), list(t["item_fields"])
        langs = {}
        for code, ld in t.get("languages", {}).items():
            langs[code] = _lang_spec(tname, code, ld, classes, item_fields, origin.get(f"{tname}/{code}", src))
            if code not in languages:
                languages[code] = Language(code, code, code, "low")
        irr = t.get("irrelevant_label_words") or {}
        scored = (t.get("variants", {}).get("irrelative", {}) or {}).get("scored_label_words")
        if not irr and isinstance(scored, dict):
            irr = scored
        tasks[tname] = TaskSpec(
            name=tname,
            n_shot=int(t.get("n_shot", 0)),
            classes=classes,
            item_fields=item_fields,
            gold_field=t.get("gold_field", "answer"),
            test_file=t.get("test_file"),
            languages=langs,
            irrelevant_label_words=dict(irr),
            variants_info=dict(t.get("variants", {})),
            train_file_label_words={k: v for k, v in (t.get("train_file_label_words") or {}).items() if not k.startswith("_")},
            cluster_field=t.get("cluster_field"),
        )
    order = [c for c in merged["languages"]["order"]] + [c for c in languages if c not in merged["languages"]["order"]]
    return SpecSet(languages=languages, order=order, tasks=tasks, sources=sources)


@lru_cache(maxsize=16)
def _load_cached(paths: tuple[str, ...], include_defaults: bool) -> SpecSet:
    docs = []
    if include_defaults:
        base = files("qtalign.tasks").joinpath("data")
        for name in DEFAULT_SPEC_FILES:
            p = Path(str(base.joinpath(name)))
            docs.append((f"qtalign/tasks/data/{name}", _read_json(p)))
    for p in paths:
        docs.append((p, _read_json(Path(p))))
    merged, origin = merge_spec_docs(docs)
    return build_specset(merged, origin, [s for s, _ in docs])


def load_specs(paths: Iterable[str | Path] | str | Path | None = None, include_defaults: bool = True) -> SpecSet:
    """The project's default specs, with the given spec files (e.g. the paper's paper_prompts.json) merged on top."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    return _load_cached(tuple(str(Path(p)) for p in paths), include_defaults)
