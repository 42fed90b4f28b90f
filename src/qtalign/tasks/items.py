"""Loading task items: the official JSON layout, JSON/JSONL files, or Hugging Face datasets.

Gold labels are class indices. A language file's gold word is decoded with that language's data label words,
and when the index-parallel English file is available its gold is the truth for every language (the Norwegian
SNLI file, for example, stores two label words swapped). Every problem is one clear error naming the file,
the record and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator

from qtalign.errors import QtalignError, check_text, data_error
from qtalign.io import require_file
from qtalign.tasks.specs import TaskSpec

DEMO_DATA_TEMPLATE = "{task}/{lang}.jsonl"
INDICES_MAX = 10_000_000  # an index list (exclusions) larger than any data file qtalign reads


@dataclass
class Item:
    index: int  # position in the index-parallel file (the item's identity across languages)
    lang: str
    fields: dict[str, str]
    gold: int | None  # class index, None when the source has no label
    id: str = ""
    gold_word: str | None = None  # the gold value exactly as stored in this language's file


def comma_list(v):
    """'a,b' -> ['a', 'b'] (lists pass through): the CLI/YAML form of list options in every config."""
    return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v


T = TypeVar("T")
# the type of every list setting of every config: a list, or its comma-separated form ('en,zh') from YAML or the CLI
CommaList = Annotated[list[T], BeforeValidator(comma_list)]


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
            p = Path(fill_template(self.files, task=task.name, lang=lang))
            return p if (p.is_absolute() or not self.data_dir) else Path(self.data_dir) / p
        if not self.data_dir:
            raise QtalignError("no data given: pass --data-dir (official layout) or --data-files (template)")
        if not task.test_file:
            raise QtalignError(f"task '{task.name}' has no test_file pattern; pass --data-files")
        return Path(self.data_dir) / task.test_file.format(lang=lang)

    def exists(self, task: TaskSpec, lang: str) -> bool:
        p = self.path(task, lang)
        return p is None or p.exists()


def fill_template(template: str, **values: str) -> str:
    """A path template with {task} / {lang}: one clear error for any other placeholder."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise QtalignError(f"data_files template {template!r}: bad placeholder ({e}); use {{task}} and {{lang}} "
                           "(double braces for a literal brace)") from None


def read_records(path: Path) -> list[dict]:
    """A JSON array or JSONL file -> list of objects (clear errors for everything else)."""
    require_file(path, "data file", missing="file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise data_error(path, f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8") from None
    if not text.strip():
        raise data_error(path, "file is empty")
    head = text.lstrip()[:1]
    recs = None
    if head in ("[", "{") and path.suffix != ".jsonl":  # a JSON array; one JSON object is an error, not JSON Lines
        try:
            recs = json.loads(text)  # an array when it parses
        except json.JSONDecodeError as e:
            if head == "[":
                raise data_error(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if isinstance(recs, dict):
            raise data_error(path, "expected a JSON array of records (or JSON Lines), got one JSON object")
    if recs is None:
        recs = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise data_error(path, f"invalid JSON: {e.msg}", record=n) from None
    if not recs:
        raise data_error(path, "file has no records")
    for n, r in enumerate(recs):
        if not isinstance(r, dict):
            raise data_error(path, "record is not a JSON object", record=n)
    return recs


def _read_hf(spec: str, lang: str, split: str) -> list[dict]:
    import datasets  # local import: only this path needs it

    name = fill_template(spec.removeprefix("hf:"), lang=lang)
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
            if not r[f].strip():
                raise data_error(path, "empty text (an item needs its text to be scored)", record=n, field=f)
            flds[f] = check_text(path, r[f], n, f)
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
        where = fill_template(source.files, lang=lang)
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
    out = apply_range(out, items, where)
    if exclude:
        out = [it for it in out if it.index not in exclude]
    return out


def parse_range(text: str | None, what: str = "item range") -> slice | None:
    """'0:250', '250:', ':100' or None -> slice. Indices are item positions (never negative, never Python-style
    from the end); an empty or reversed range and a bare number are errors, not guesses."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    text = str(text).strip()
    a, sep, b = text.partition(":")
    try:
        lo = int(a) if a.strip() else None
        hi = int(b) if b.strip() else None
    except ValueError:
        lo = hi = None
        sep = ""
    if not sep or (lo is None and hi is None and text != ":"):
        raise QtalignError(f"bad {what} {text!r}: use START:END (e.g. 0:250), START: or :END")
    if (lo is not None and lo < 0) or (hi is not None and hi < 0):
        raise QtalignError(f"bad {what} {text!r}: item indices are non-negative positions in the file (not counted from the end)")
    if lo is not None and hi is not None and hi <= lo:
        raise QtalignError(f"bad {what} {text!r}: END must be greater than START")
    return slice(lo, hi)


def parse_indices(v, what: str = "item indices") -> list[int]:
    """Item indices as given: a list of integers, or text of integers and START:END ranges separated by commas or
    white space ('3, 7, 60:70'); the one home of index lists (CLI, configs, exclusion files)."""
    if v is None:
        return []
    parts = v if isinstance(v, list) else re.split(r"[\s,]+", str(v).strip())
    out: list[int] = []
    for tok in parts:
        if isinstance(tok, bool):
            raise QtalignError(f"bad {what} {tok!r}: use integers or START:END")
        if isinstance(tok, int):
            if tok < 0:
                raise QtalignError(f"bad {what} {tok}: item indices are non-negative")
            out.append(tok)
            continue
        tok = str(tok).strip()
        if not tok:
            continue
        if ":" in tok:
            rng = parse_range(tok, what)
            if rng.start is None or rng.stop is None:
                raise QtalignError(f"bad {what} {tok!r}: a range needs both ends here (START:END)")
            if len(out) + rng.stop - rng.start > INDICES_MAX:
                raise QtalignError(f"bad {what} {tok!r}: more than {INDICES_MAX} indices")
            out += range(rng.start, rng.stop)
            continue
        try:
            n = int(tok)
        except ValueError:
            raise QtalignError(f"bad {what} {tok!r}: use integers or START:END") from None
        if n < 0:
            raise QtalignError(f"bad {what} {tok!r}: item indices are non-negative")
        out.append(n)
    return out


def indices_field(v, what: str = "exclude_items") -> list[int]:
    """parse_indices for a pydantic field validator: the error as a ValueError, which pydantic reports with the field."""
    try:
        return parse_indices(v, what)
    except QtalignError as e:
        raise ValueError(str(e)) from None


def apply_range(items: list, rng: slice | None, where: str, what: str = "item range") -> list:
    """items[rng], with one clear error when the range starts or ends past the end of the file."""
    if rng is None:
        return items
    n = len(items)
    if (rng.start or 0) >= n or (rng.stop is not None and rng.stop > n):
        shown = f"{'' if rng.start is None else rng.start}:{'' if rng.stop is None else rng.stop}"
        raise QtalignError(f"{where}: {what} {shown} is past the end of the file ({n} items: 0:{n})")
    return items[rng]


def select_items(task: TaskSpec, lang: str, source: DataSource, rng: slice | None = None, limit: int | None = None,
                 exclude: set[int] | None = None) -> list[Item]:
    """The items one stage uses: the range, then the exclusions, then the first ``limit`` (the one home of this
    idiom for evaluation, the analyses and the overlap check)."""
    items = load_items(task, lang, source, rng, exclude=exclude)
    return items[:limit] if limit else items


def cluster_ids(task: TaskSpec, items: list[Item]) -> list[int] | None:
    """Cluster ids of parallel items, by the task's ``cluster_field`` (SNLI: the premise a triple of hypotheses
    shares), numbered in order of first appearance; None when the task declares none (each item its own cluster).
    Items resampled together by every bootstrap and counted together by retrieval."""
    if not task.cluster_field:
        return None
    vals = [it.fields.get(task.cluster_field) for it in items]
    ids = {v: k for k, v in enumerate(dict.fromkeys(vals))}
    return [ids[v] for v in vals]


def data_hashes(task: TaskSpec, lang: str, source: DataSource, english_gold: bool = True) -> dict[str, str]:
    """Content hashes of what loading a task x language reads: its file and (for the gold) the English file; for
    hf: datasets, a hash of the records. Part of every result's fingerprint."""
    from qtalign.io import canonical, file_sha256, text_sha256

    langs = [lang] + (["en"] if english_gold and lang != "en" and source.exists(task, "en") else [])
    out = {}
    for code in langs:
        path = source.path(task, code)
        if path is None:
            recs = _read_hf(source.files, code, source.split)
            out[f"{fill_template(source.files, lang=code)}[{source.split}]"] = text_sha256(canonical(recs))
        else:
            require_file(path, "data file", missing="file not found")
            out[f"{task.name}/{code}"] = file_sha256(path)
    return out
