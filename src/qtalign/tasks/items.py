"""Loading task items: the official JSON layout, JSON/JSONL files, or Hugging Face datasets.

Gold labels are class indices. A language file's gold word is decoded with that language's data label words,
and when the index-parallel English file is available its gold is the truth for every language (the Norwegian
SNLI file, for example, stores two label words swapped). Every problem is one clear error naming the file,
the record and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from qtalign.errors import QtalignError, data_error
from qtalign.tasks.specs import TaskSpec

DEMO_DATA_TEMPLATE = "{task}/{lang}.jsonl"


@dataclass
class Item:
    index: int  # position in the index-parallel file (the item's identity across languages)
    lang: str
    fields: dict[str, str]
    gold: int | None  # class index, None when the source has no label
    id: str = ""
    gold_word: str | None = None  # the gold value exactly as stored in this language's file
    extra: dict[str, Any] = field(default_factory=dict)


def comma_list(v):
    """'a,b' -> ['a', 'b'] (lists pass through): the CLI/YAML form of list options in every config."""
    return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v


def demo_data_dir() -> Path:
    """The project's own small demo data (emotion reviews in a few languages)."""
    return Path(str(files("qtalign.tasks").joinpath("demo_data")))


@dataclass
class DataSource:
    """Where items come from.

    - ``data_dir`` (official layout): the task's ``test_file`` pattern under this folder;
    - ``files``: a path template with ``{task}`` and ``{lang}`` (``.json`` array or ``.jsonl``), relative to
      ``data_dir`` when given, e.g. ``demo`` = the project's demo data;
    - ``hf:<dataset>``: a Hugging Face dataset (local dir or hub id); ``{lang}`` selects the config, ``split``
      the split.
    """

    data_dir: str | None = None
    files: str | None = None
    split: str = "test"

    @classmethod
    def demo(cls) -> "DataSource":
        return cls(data_dir=str(demo_data_dir()), files=DEMO_DATA_TEMPLATE)

    @classmethod
    def from_options(cls, data_dir: str | None, data_files: str | None, split: str = "test") -> "DataSource":
        """The source the config options name: 'demo' (or nothing at all) is the project's demo data."""
        if data_files == "demo" or (not data_files and not data_dir):
            return cls.demo()
        return cls(data_dir=data_dir, files=data_files, split=split)

    def describe(self) -> str:
        if self.files and self.data_dir and not self.files.startswith("hf:"):
            return str(Path(self.data_dir) / self.files)
        return self.files or str(self.data_dir)

    def path(self, task: TaskSpec, lang: str) -> Path | None:
        if self.files and self.files.startswith("hf:"):
            return None
        if self.files:
            p = Path(self.files.format(task=task.name, lang=lang))
            return p if (p.is_absolute() or not self.data_dir) else Path(self.data_dir) / p
        if not self.data_dir:
            raise QtalignError("no data given: pass --data-dir (official layout) or --data-files (template)")
        if not task.test_file:
            raise QtalignError(f"task '{task.name}' has no test_file pattern; pass --data-files")
        return Path(self.data_dir) / task.test_file.format(lang=lang)

    def exists(self, task: TaskSpec, lang: str) -> bool:
        p = self.path(task, lang)
        return p is None or p.exists()


def read_records(path: Path) -> list[dict]:
    """A JSON array or JSONL file -> list of objects (clear errors for everything else)."""
    if not path.exists():
        raise QtalignError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise data_error(path, "file is empty")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        recs = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise data_error(path, f"invalid JSON: {e.msg}", record=n) from None
    else:
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise data_error(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not recs:
        raise data_error(path, "file has no records")
    for n, r in enumerate(recs):
        if not isinstance(r, dict):
            raise data_error(path, "record is not a JSON object", record=n)
    return recs


def _read_hf(spec: str, lang: str, split: str) -> list[dict]:
    import datasets  # local import: only this path needs it

    name = spec.removeprefix("hf:").format(lang=lang)
    config = None
    if "@" in name:
        name, config = name.split("@", 1)
    try:
        if Path(name).exists():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; report one line
        raise QtalignError(f"hf:{name}: cannot load split '{split}': {e}".splitlines()[0]) from None
    return [dict(r) for r in ds]


def class_decoder(task: TaskSpec, lang: str) -> dict[str, int]:
    """Gold word -> class index for one language: its data label words first, then the class ids."""
    dec: dict[str, int] = {}
    ls = task.languages.get(lang)
    if ls is not None:
        for i, c in enumerate(task.classes):
            dec.setdefault(ls.data_label_words[c].strip(), i)
    for i, c in enumerate(task.classes):
        dec.setdefault(c, i)
    for c, w in task.train_file_label_words.items():
        if c in task.classes:
            dec.setdefault(w, task.classes.index(c))
    return dec


def _decode_gold(task: TaskSpec, lang: str, value: Any, path: Path, n: int, dec: dict[str, int]) -> int:
    if isinstance(value, bool) or value is None:
        raise data_error(path, f"gold label {value!r} is not a label word or class index", record=n, field=task.gold_field)
    if isinstance(value, int):
        if 0 <= value < len(task.classes):
            return value
        raise data_error(path, f"class index {value} out of range 0..{len(task.classes) - 1}", record=n, field=task.gold_field)
    word = str(value).strip()
    if word not in dec:
        raise data_error(
            path, f"unknown label {word!r} for language '{lang}' (expected one of {sorted(dec)})", record=n, field=task.gold_field
        )
    return dec[word]


def parse_records(task: TaskSpec, lang: str, recs: list[dict], path: Path, require_gold: bool = True) -> list[Item]:
    dec = class_decoder(task, lang)
    items = []
    for n, r in enumerate(recs):
        flds = {}
        for f in task.item_fields:
            if f not in r:
                raise data_error(path, "missing", record=n, field=f)
            if not isinstance(r[f], str):
                raise data_error(path, f"expected a string, got {type(r[f]).__name__}", record=n, field=f)
            flds[f] = r[f]
        gold, word = None, r.get(task.gold_field)
        if task.gold_field in r:
            gold = _decode_gold(task, lang, r[task.gold_field], path, n, dec)
        elif require_gold:
            raise data_error(path, "missing", record=n, field=task.gold_field)
        items.append(Item(index=n, lang=lang, fields=flds, gold=gold, id=str(r.get("id", n)),
                          gold_word=None if word is None else str(word)))
    return items


def _load_file(task: TaskSpec, lang: str, source: DataSource, require_gold: bool) -> tuple[list[Item], str]:
    path = source.path(task, lang)
    if path is None:
        recs = _read_hf(source.files, lang, source.split)
        where = source.files.format(lang=lang)
        return parse_records(task, lang, recs, Path(where), require_gold), where
    return parse_records(task, lang, read_records(path), path, require_gold), str(path)


def load_items(
    task: TaskSpec,
    lang: str,
    source: DataSource,
    items: slice | None = None,
    require_gold: bool = True,
    english_gold: bool = True,
    exclude: set[int] | None = None,
) -> list[Item]:
    """Items of one task in one language, gold taken from the parallel English file when it exists."""
    out, where = _load_file(task, lang, source, require_gold)
    if english_gold and lang != "en" and source.exists(task, "en"):
        ref, ref_where = _load_file(task, "en", source, require_gold=False)
        if len(ref) != len(out):
            raise QtalignError(
                f"{where}: not index-parallel with {ref_where}: {len(out)} records vs {len(ref)} (files of one task "
                "must hold the same items in the same order)"
            )
        for it, r in zip(out, ref):
            if r.gold is None:
                continue
            if it.gold is not None and it.gold != r.gold:
                raise data_error(
                    where,
                    f"gold class '{task.classes[it.gold]}' disagrees with the parallel English file ('{task.classes[r.gold]}' "
                    f"in {ref_where}); the files are not parallel or this language's data label words are wrong",
                    record=it.index,
                    field=task.gold_field,
                )
            it.gold = r.gold
    if items is not None:
        out = out[items]
    if exclude:
        out = [it for it in out if it.index not in exclude]
    return out


def parse_range(text: str | None) -> slice | None:
    """'0:250', '250:', ':100' or None -> slice."""
    if not text:
        return None
    try:
        a, _, b = text.partition(":")
        return slice(int(a) if a else None, int(b) if b else None)
    except ValueError:
        raise QtalignError(f"bad item range {text!r}: use START:END, e.g. 0:250") from None
