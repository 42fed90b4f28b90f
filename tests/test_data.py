import json

import pytest

from conftest import OFFICIAL, PAPER_PROMPTS, needs_shared
from qtalign.tasks.items import DataSource, load_items, parse_range
from qtalign.errors import QtalignError
from qtalign.tasks.specs import load_specs


def _write(path, recs, jsonl=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    else:
        path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return path


def _snli_dir(tmp_path, de_recs=None, en_recs=None):
    en = en_recs if en_recs is not None else [
        {"premise": "A man.", "hypothesis": "A person.", "answer": "entailment"},
        {"premise": "A dog.", "hypothesis": "A cat.", "answer": "contradiction"},
        {"premise": "A kid.", "hypothesis": "A happy kid.", "answer": "neutral"},
    ]
    de = de_recs if de_recs is not None else [
        {"premise": "Ein Mann.", "hypothesis": "Eine Person.", "answer": "Konsequenz"},
        {"premise": "Ein Hund.", "hypothesis": "Eine Katze.", "answer": "Widerspruch"},
        {"premise": "Ein Kind.", "hypothesis": "Ein frohes Kind.", "answer": "neutral"},
    ]
    _write(tmp_path / "snli" / "snli_en600_test.json", en)
    _write(tmp_path / "snli" / "snli_de600_test.json", de)
    return DataSource(data_dir=str(tmp_path))


def test_gold_is_a_class_index_from_the_parallel_english_file(tmp_path):
    task = load_specs().task("snli")
    items = load_items(task, "de", _snli_dir(tmp_path))
    assert [it.gold for it in items] == [0, 2, 1]
    assert [it.gold_word for it in items] == ["Konsequenz", "Widerspruch", "neutral"]
    assert items[1].fields == {"premise": "Ein Hund.", "hypothesis": "Eine Katze."}


def test_jsonl_template_ranges_and_exclusions(tmp_path):
    task = load_specs().task("emotion")
    recs = [{"input": f"review {i}", "answer": "positive" if i % 2 else "negative"} for i in range(10)]
    _write(tmp_path / "emo" / "en.jsonl", recs, jsonl=True)
    src = DataSource(data_dir=str(tmp_path), files="emo/{lang}.jsonl")
    items = load_items(task, "en", src, items=parse_range("2:8"), exclude={3, 4})
    assert [it.index for it in items] == [2, 5, 6, 7]
    assert [it.gold for it in items] == [1, 0, 1, 0]


def test_demo_data_is_parallel_and_balanced():
    task = load_specs().task("emotion")
    en = load_items(task, "en", DataSource.demo())
    assert len(en) == 120 and sum(it.gold == 0 for it in en) == 60
    for lang in ("zh", "de", "fr", "es", "sw"):
        other = load_items(task, lang, DataSource.demo(), english_gold=False)
        assert [it.gold for it in other] == [it.gold for it in en]


@pytest.mark.parametrize("case,needle", [
    ("missing_field", "record 1: field 'hypothesis': missing"),
    ("unknown_label", "record 0: field 'answer': unknown label 'vielleicht'"),
    ("empty", "file is empty"),
    ("no_records", "file has no records"),
    ("non_parallel", "not index-parallel"),
    ("disagree", "record 2: field 'answer': gold class 'entailment' disagrees with the parallel English file"),
    ("bad_json", "invalid JSON"),
    ("not_object", "record 0: record is not a JSON object"),
    ("wrong_type", "record 0: field 'premise': expected a string"),
])
def test_bad_input_gives_one_clear_error_naming_file_record_field(tmp_path, case, needle):
    task = load_specs().task("snli")
    good = [{"premise": "P.", "hypothesis": "H.", "answer": "Konsequenz"}] * 3
    de = [dict(r) for r in good]
    if case == "missing_field":
        del de[1]["hypothesis"]
    elif case == "unknown_label":
        de[0]["answer"] = "vielleicht"
    elif case == "non_parallel":
        de = de[:2]
    elif case == "disagree":
        de[2]["answer"] = "Konsequenz"
    elif case == "not_object":
        de = ["text", "x", "y"]
    elif case == "wrong_type":
        de[0]["premise"] = 3
    en = [{"premise": "P.", "hypothesis": "H.", "answer": "entailment"}] * 2 + [{"premise": "P.", "hypothesis": "H.", "answer": "neutral" if case == "disagree" else "entailment"}]
    src = _snli_dir(tmp_path, de, en)
    path = tmp_path / "snli" / "snli_de600_test.json"
    if case == "empty":
        path.write_text("")
    elif case == "no_records":
        path.write_text("[]")
    elif case == "bad_json":
        path.write_text('[{"premise": ')
    with pytest.raises(QtalignError) as e:
        load_items(task, "de", src)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_missing_file_and_bad_range():
    task = load_specs().task("snli")
    with pytest.raises(QtalignError, match="file not found"):
        load_items(task, "de", DataSource(data_dir="/nonexistent"))
    with pytest.raises(QtalignError, match="bad item range"):
        parse_range("a:b")


@needs_shared
def test_official_files_decode_by_index_including_known_mismatches():
    """All 18 shared languages x 3 tasks load; every language's gold equals English gold item by item, with the
    data words of both our default specs and the paper's specs (Norwegian SNLI swaps two words)."""
    for specs in (load_specs(), load_specs(PAPER_PROMPTS)):
        src = DataSource(data_dir=str(OFFICIAL))
        for tname in ("emotion", "snli", "paws"):
            task = specs.task(tname)
            en = load_items(task, "en", src)
            for lang in specs.resolve_langs("all", tname):
                if not src.exists(task, lang):
                    assert lang in ("is", "ms")
                    continue
                items = load_items(task, lang, src, english_gold=False)
                assert [it.gold for it in items] == [it.gold for it in en], (tname, lang)
    no = load_items(load_specs().task("snli"), "no", DataSource(data_dir=str(OFFICIAL)))
    neutral = [it for it in no if it.gold == 1]
    assert neutral and all(it.gold_word == "motsigelse" for it in neutral)
