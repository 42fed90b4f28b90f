"""Question-translation data builder: the paper's format, mixing, selection, leak guard, errors, official round trip."""

import json

import pytest
import yaml
from pydantic import ValidationError

from conftest import OFFICIAL, PAPER_PROMPTS, needs_shared
from qtalign.cli import main as cli_main
from qtalign.tasks.items import demo_data_dir, read_records
from qtalign.errors import QtalignError
from qtalign.qtdata.build import build_question_data, build_records
from qtalign.qtdata.config import QTDataConfig
from qtalign.qtdata.files import load_question_records, read_exclusions
from qtalign.qtdata.official import roundtrip_official, template_regex
from qtalign.tasks.specs import load_specs

DEMO = demo_data_dir() / "emotion"


def fill(template: str, fields: dict) -> str:
    """Independent of str.format: replace each placeholder by its text."""
    for k, v in fields.items():
        template = template.replace("{" + k + "}", v)
    return template


def demo_rows(lang):
    return read_records(DEMO / f"{lang}.jsonl")


def write_jsonl(path, recs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")


def snli_files(tmp_path, langs, n=4, **override):
    """Tiny index-parallel SNLI files {lang}.jsonl; returns the data_files template."""
    for lang in langs:
        recs = [{"premise": f"{lang} premise {i} {{braces}}", "hypothesis": f"{lang} hyp {i}", "answer": "entailment"} for i in range(n)]
        for (l, i), rec in override.get("patch", {}).items():
            if l == lang:
                recs[i] = rec
        write_jsonl(tmp_path / "d" / f"{lang}.jsonl", recs[: override.get("sizes", {}).get(lang, n)])
    return str(tmp_path / "d" / "{lang}.jsonl")


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_format_is_the_papers_for_a_hand_built_item(tmp_path):
    specs = load_specs()
    files = snli_files(tmp_path, ["de", "en"], n=1)
    recs, _ = build_records(QTDataConfig(task="snli", sources=["de"], data_files=files), specs)
    (rec,) = recs
    t = specs.task("snli")
    de = {"premise": "de premise 0 {braces}", "hypothesis": "de hyp 0"}
    en = {"premise": "en premise 0 {braces}", "hypothesis": "en hyp 0"}
    q_de, q_en = fill(t.lang("de").question_template, de), fill(t.lang("en").question_template, en)
    assert q_de.endswith(t.lang("de").answer_cue) and q_en.endswith('Answer: "')
    assert rec["input"] == f"{q_de}\nTranslate the input from {specs.language('de').instruction_name} to English:\n"
    assert rec["output"] == q_en
    # the question is exactly what evaluation renders as the query
    assert rec["input"].startswith(t.prompt_parts("de", "enout", de)[1])
    assert (rec["src"], rec["tgt"], rec["index"], rec["task"]) == ("de", "en", 0, "snli")


@needs_shared
def test_format_equals_paper_question_translation_template(tmp_path):
    paper = json.loads(PAPER_PROMPTS.read_text(encoding="utf-8"))
    qt = paper["question_translation"]
    specs = load_specs(PAPER_PROMPTS)
    files = snli_files(tmp_path, ["sw", "zh", "en"], n=2)
    recs, _ = build_records(QTDataConfig(task="snli", sources=["sw", "zh"], data_files=files, shuffle=False,
                                         prompts=[str(PAPER_PROMPTS)]), specs)
    assert len(recs) == 4
    for r in recs:
        ld = paper["tasks"]["snli"]["languages"][r["src"]]
        fx = {"premise": f"{r['src']} premise {r['index']} {{braces}}", "hypothesis": f"{r['src']} hyp {r['index']}"}
        fe = {"premise": f"en premise {r['index']} {{braces}}", "hypothesis": f"en hyp {r['index']}"}
        q_en = fill(paper["tasks"]["snli"]["languages"]["en"]["question_template"], fe)
        name = qt["attested"]["snli"][r["src"]]
        assert r["input"] == fill(qt["input_template"], {"question_X": fill(ld["question_template"], fx), "instruction_name_X": name})
        assert r["output"] == fill(qt["answer_template"], {"question_en": q_en})
    assert "\nHypothesis: " in next(r for r in recs if r["src"] == "sw")["input"]  # the untranslated field word


def test_demo_several_sources_mixed_and_parallel(tmp_path):
    specs = load_specs()
    t = specs.task("emotion")
    srcs = ["zh", "de", "fr", "es", "sw"]
    stats = build_question_data(QTDataConfig(task="emotion", sources=srcs, items="60:120", rows_per_lang=7), tmp_path)
    recs = read_jsonl(tmp_path / "train.jsonl")
    assert stats["rows_per_source"] == {s: 7 for s in srcs} and len(recs) == 35
    assert [r["src"] for r in recs] != sorted(r["src"] for r in recs)  # shuffled mix
    rows = {lang: demo_rows(lang) for lang in [*srcs, "en"]}
    for r in recs:
        assert 60 <= r["index"] < 120 and r["tgt"] == "en"
        name = specs.language(r["src"]).instruction_name
        assert r["input"] == t.lang(r["src"]).question({"input": rows[r["src"]][r["index"]]["input"]}) + \
            f"\nTranslate the input from {name} to English:\n"
        assert r["output"] == t.lang("en").question({"input": rows["en"][r["index"]]["input"]})
    assert not list(tmp_path.glob("*.tmp")) and json.loads((tmp_path / "summary.json").read_text())["numbers"]["rows"] == 35
    assert all(set(r) == {"id", "task", "index", "src", "tgt", "input", "output"} for r in recs)


def test_target_zh():
    specs = load_specs()
    t = specs.task("emotion")
    recs, _ = build_records(QTDataConfig(task="emotion", sources=["en", "de"], target="zh", items="60:70"), specs)
    zh = demo_rows("zh")
    assert len(recs) == 20
    for r in recs:
        assert r["tgt"] == "zh" and r["input"].endswith(f"\nTranslate the input from {specs.language(r['src']).instruction_name} to Chinese:\n")
        assert r["output"] == t.lang("zh").question({"input": zh[r["index"]]["input"]})
    with pytest.raises(QtalignError, match="also the target"):
        build_records(QTDataConfig(task="emotion", sources=["zh"], target="zh"), specs)


def test_ranges_and_exclusions_keep_items_disjoint(tmp_path):
    (tmp_path / "ex.txt").write_text("# eval items\n61, 63\n70:80\n", encoding="utf-8")
    preds = [{"key": f"emotion/enout/de/{i}", "task": "emotion", "lang": "de", "index": i} for i in (90, 91)]
    preds.append({"key": "snli/enout/de/100", "task": "snli", "lang": "de", "index": 100})
    write_jsonl(tmp_path / "eval" / "predictions.jsonl", preds)
    assert read_exclusions(tmp_path / "ex.txt") == {61, 63, *range(70, 80)}
    assert read_exclusions(tmp_path / "eval" / "predictions.jsonl", "emotion") == {90, 91}
    for f in ("ex.txt", "eval/predictions.jsonl"):
        cfg = QTDataConfig(task="emotion", sources=["zh", "de"], items="60:120", exclude_items=[100, 119],
                           exclude_file=str(tmp_path / f))
        recs, stats = build_records(cfg)
        used = {r["index"] for r in recs}
        assert used <= set(range(60, 120)) and not used & ({100, 119} | read_exclusions(tmp_path / f, "emotion"))
        assert stats["excluded"] == 2 * (120 - 60 - len({r["index"] for r in recs if r["src"] == "zh"}))
    # the evaluation range of the demo (0:60) and the training range never meet
    train, _ = build_records(QTDataConfig(task="emotion", sources=["zh"], items="60:"))
    assert min(r["index"] for r in train) == 60
    with pytest.raises(QtalignError, match="no records of task 'paws'"):
        read_exclusions(tmp_path / "eval" / "predictions.jsonl", "paws")
    (tmp_path / "bad.txt").write_text("1\nx2\n")
    with pytest.raises(QtalignError, match=r"bad.txt: record line 2: bad item index 'x2'"):
        read_exclusions(tmp_path / "bad.txt")


def test_dedup(tmp_path):
    same = {"premise": "p", "hypothesis": "h"}
    files = snli_files(tmp_path, ["de", "zh", "en"], n=5, patch={("de", 1): same, ("de", 3): same})
    cfg = QTDataConfig(task="snli", sources=["de", "zh"], data_files=files)
    recs, stats = build_records(cfg)
    assert stats["duplicates_removed"] == 1 and stats["per_source"]["de"]["duplicates"] == 1 and len(recs) == 9
    assert len({r["input"] for r in recs}) == len(recs)
    recs, stats = build_records(cfg.model_copy(update={"dedup": False}))
    assert stats["duplicates_removed"] == 0 and len(recs) == 10


def test_seed_determinism(tmp_path):
    cfg = QTDataConfig(task="emotion", sources=["zh", "de", "fr"], items="60:120", rows_per_lang=20, alpaca=True)
    build_question_data(cfg, tmp_path / "a")
    build_question_data(cfg, tmp_path / "b")
    for f in ("train.jsonl", "alpaca.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    other, _ = build_records(cfg.model_copy(update={"seed": 1}))
    first = read_jsonl(tmp_path / "a" / "train.jsonl")
    assert [r["id"] for r in other] != [r["id"] for r in first]
    # a language's sample does not depend on which other languages are mixed in
    zh_only, _ = build_records(cfg.model_copy(update={"sources": ["zh"]}))
    assert sorted(r["index"] for r in zh_only) == sorted(r["index"] for r in first if r["src"] == "zh")
    # no shuffle: the first rows in order; paired: the same items in every language
    ordered, _ = build_records(cfg.model_copy(update={"shuffle": False}))
    assert [r["index"] for r in ordered if r["src"] == "de"] == list(range(60, 80))
    paired, _ = build_records(cfg.model_copy(update={"paired": True}))
    by = {s: sorted(r["index"] for r in paired if r["src"] == s) for s in ("zh", "de", "fr")}
    assert by["zh"] == by["de"] == by["fr"] and len(by["zh"]) == 20


def test_no_label_leaks(tmp_path, monkeypatch):
    specs = load_specs()
    t = specs.task("emotion")
    recs, _ = build_records(QTDataConfig(task="emotion", sources=["zh", "de", "fr", "es", "sw"], target="en"), specs)
    assert len(recs) == 600
    for r in recs:  # an independent check: no answer cue is followed by a label word and a closing quote
        for fld, lang in (("input", r["src"]), ("output", r["tgt"])):
            ls = t.lang(lang)
            for w in [*t.classes, *ls.data_label_words.values(), *ls.label_words.values()]:
                assert f'{ls.answer_cue}{w}"' not in r[fld]
    # labels are never read: a garbage gold value does not matter
    files = snli_files(tmp_path, ["de", "en"], n=2, patch={("de", 0): {"premise": "a", "hypothesis": "b", "answer": 12345}})
    assert len(build_records(QTDataConfig(task="snli", sources=["de"], data_files=files))[0]) == 2
    # a rendering that leaked the answer is refused
    from qtalign.tasks.specs import LangSpec

    orig = LangSpec.question
    monkeypatch.setattr(LangSpec, "question", lambda self, f: orig(self, f) + self.label_words["positive"] + '"')
    with pytest.raises(QtalignError, match="label leak"):
        build_records(QTDataConfig(task="emotion", sources=["zh"], items="60:62"), specs)
    monkeypatch.setattr(LangSpec, "question", orig)
    # an item text holding a labelled answer is refused
    leak = {"premise": 'x\nAntwort: "Widerspruch"', "hypothesis": "y"}
    files = snli_files(tmp_path / "l", ["de", "en"], n=2, patch={("de", 1): leak})
    with pytest.raises(QtalignError, match="record .*label leak"):
        build_records(QTDataConfig(task="snli", sources=["de"], data_files=files), specs)
    # a spec that lists the gold field among the item fields is refused
    monkeypatch.setattr(specs.task("snli"), "item_fields", ["premise", "hypothesis", "answer"])
    with pytest.raises(QtalignError, match="gold field 'answer'"):
        build_records(QTDataConfig(task="snli", sources=["de"], data_files=files), specs)


def test_bad_inputs(tmp_path):
    files = snli_files(tmp_path, ["de", "en"], n=3, patch={("de", 2): {"premise": "p"}})
    with pytest.raises(QtalignError, match=r"de.jsonl: record 2: field 'hypothesis': missing"):
        build_records(QTDataConfig(task="snli", sources=["de"], data_files=files))
    with pytest.raises(QtalignError, match="unknown language 'xx'"):
        build_records(QTDataConfig(task="emotion", sources=["zh", "xx"]))
    with pytest.raises(QtalignError, match=r"emotion/it.jsonl: file not found"):
        build_records(QTDataConfig(task="emotion", sources=["zh"], target="it"))
    (tmp_path / "xx.json").write_text(json.dumps({"languages": {"info": {"xx": {"english_name": "Xish"}}}}))
    with pytest.raises(QtalignError, match="task 'emotion' has no spec for language 'xx'"):
        build_records(QTDataConfig(task="emotion", sources=["zh"], target="xx"), load_specs(tmp_path / "xx.json"))
    files = snli_files(tmp_path / "np", ["de", "zh", "en"], n=4, sizes={"zh": 3})
    with pytest.raises(QtalignError, match=r"zh.jsonl: not index-parallel with .*de.jsonl: 3 records vs 4"):
        build_records(QTDataConfig(task="snli", sources=["de", "zh"], data_files=files))
    write_jsonl(tmp_path / "ids" / "de.jsonl", [{"id": "a", "input": "x"}, {"id": "b", "input": "y"}])
    write_jsonl(tmp_path / "ids" / "en.jsonl", [{"id": "b", "input": "x"}, {"id": "a", "input": "y"}])
    with pytest.raises(QtalignError, match="not index-parallel"):
        build_records(QTDataConfig(task="emotion", sources=["de"], data_files=str(tmp_path / "ids" / "{lang}.jsonl")))
    with pytest.raises(QtalignError, match="nothing to build"):
        build_records(QTDataConfig())
    with pytest.raises(QtalignError, match="item indices are non-negative"):
        build_records(QTDataConfig(task="emotion", sources=["zh"], items="-5:"))
    with pytest.raises(ValidationError):
        QTDataConfig(task="emotion", source=["zh"])
    q = tmp_path / "q.json"
    q.write_text(json.dumps([{"input": 'A: "\nTranslate the input from German to English:\n', "answer": "B"}, {"input": "x"}]))
    with pytest.raises(QtalignError, match=r"q.json: record 1: field 'answer': missing"):
        load_question_records(q)
    q.write_text(json.dumps([{"input": "a review", "answer": "positive"}]))  # a test file is not a question file
    with pytest.raises(QtalignError, match=r"q.json: record 0: field 'input': not a question-translation record"):
        load_question_records(q)
    q.write_text(json.dumps([{"input": 'A: "\nTranslate the input from Klingon to English:\n', "answer": "B"}]))
    with pytest.raises(QtalignError, match="cannot tell the source language"):
        build_records(QTDataConfig(question_files=[str(q)]))


def test_question_files_mixed_and_alpaca(tmp_path):
    a = tmp_path / "a"
    build_question_data(QTDataConfig(task="emotion", sources=["de"], items="60:70", alpaca=True, dataset_name="qt_de"), a)
    info0 = json.loads((a / "dataset_info.json").read_text())
    build_question_data(QTDataConfig(task="emotion", sources=["zh"], items="60:70", alpaca=True, dataset_name="qt_zh"), a)
    info = json.loads((a / "dataset_info.json").read_text())
    cols = {"prompt": "instruction", "query": "input", "response": "output"}
    assert info0 == {"qt_de": {"file_name": "alpaca.json", "columns": cols}} and set(info) == {"qt_de", "qt_zh"}
    ours = read_jsonl(a / "train.jsonl")
    alp = json.loads((a / "alpaca.json").read_text())
    assert [(x["instruction"], x["input"], x["output"]) for x in alp] == [(r["input"], "", r["output"]) for r in ours]
    # official layout (input/answer), our JSONL and alpaca all read back to the same records
    off = tmp_path / "off.json"
    off.write_text(json.dumps([{"input": r["input"], "answer": r["output"]} for r in ours], ensure_ascii=False))
    for p in (a / "train.jsonl", a / "alpaca.json", off):
        got = load_question_records(p)
        assert [(g["input"], g["output"], g["src"], g["tgt"]) for g in got] == [(r["input"], r["output"], "zh", "en") for r in ours]
    # several files -> one mixed set, de-duplicated by input
    de_dir = tmp_path / "de"
    build_question_data(QTDataConfig(task="emotion", sources=["de"], items="60:70"), de_dir)
    recs, stats = build_records(QTDataConfig(question_files=[str(off), str(de_dir / "train.jsonl"), str(a / "alpaca.json")]))
    assert stats["rows_per_source"] == {"zh": 10, "de": 10} and stats["duplicates_removed"] == 10 and len(recs) == 20


def test_roundtrip_on_our_own_output(tmp_path):
    """The round trip also inverts what the builder writes (no shared data needed)."""
    specs = load_specs()
    build_question_data(QTDataConfig(task="emotion", sources=["sw"], shuffle=False, dedup=False), tmp_path)
    n, bad = roundtrip_official(tmp_path / "train.jsonl", DEMO / "en.jsonl", "sw", specs, task="emotion")
    assert (n, bad) == (120, [])
    recs = read_jsonl(tmp_path / "train.jsonl")
    recs[5]["output"] = recs[5]["output"].replace("\n", " \n")
    recs[7]["input"] = recs[7]["input"].replace("Swahili", "Kiswahili")
    write_jsonl(tmp_path / "t2.jsonl", recs)
    n, bad = roundtrip_official(tmp_path / "t2.jsonl", DEMO / "en.jsonl", "sw", specs, task="emotion")
    assert [(b["index"], b["field"]) for b in bad] == [(5, "output"), (7, "input")]
    rx = template_regex("A: {a}\nB: {b}\nA again: {a}\nC: \"")
    assert rx.fullmatch('A: x\nB: y\nA again: x\nC: "').groupdict() == {"a": "x", "b": "y"}
    assert rx.fullmatch('A: x\nB: y\nA again: z\nC: "') is None


@needs_shared
@pytest.mark.parametrize("lang", ["de", "es", "it", "sw", "zh"])
def test_roundtrip_official_question_files(lang):
    specs = load_specs(PAPER_PROMPTS)
    n, bad = roundtrip_official(OFFICIAL / "snli" / f"snli_{lang}10k_train_question.json", OFFICIAL / "snli" / "snli_en10k_train.json", lang, specs)
    assert n == 10000
    assert bad == [], bad[:2]


@needs_shared
def test_official_question_files_as_source(tmp_path):
    files = [str(OFFICIAL / "snli" / f"snli_{lang}10k_train_question.json") for lang in ("zh", "de")]
    stats = build_question_data(QTDataConfig(question_files=files, task="snli", rows_per_lang=300, items="0:5000",
                                             exclude_items=[0, 1, 2], prompts=[str(PAPER_PROMPTS)]), tmp_path)
    assert stats["rows_per_source"] == {"zh": 300, "de": 300}
    recs = read_jsonl(tmp_path / "train.jsonl")
    assert all(3 <= r["index"] < 5000 and r["output"].endswith('Answer: "') for r in recs)
    assert {r["input"].rsplit("\n", 2)[-2] for r in recs} == {"Translate the input from Chinese to English:",
                                                               "Translate the input from German to English:"}


def test_cli_and_config_roundtrip(tmp_path, capsys):
    out = tmp_path / "qt"
    assert cli_main(["build-data", "--task", "emotion", "--sources", "zh,de", "--items", "60:120", "--rows-per-lang", "5",
                     "--exclude-items", "60:65,99", "--alpaca", "--out", str(out), "--save-config", str(tmp_path / "c.yaml")]) == 0
    cfg = QTDataConfig(**yaml.safe_load((tmp_path / "c.yaml").read_text())["build_data"])
    assert cfg.exclude_items == [60, 61, 62, 63, 64, 99] and cfg.sources == ["zh", "de"] and cfg.alpaca
    assert QTDataConfig(**json.loads(cfg.model_dump_json())) == cfg
    assert cli_main(["build-data", "--config", str(tmp_path / "c.yaml"), "--seed", "3", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == 10 and stats["config"]["seed"] == 3 and stats["excluded"] == 12
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows_per_source"] == {"zh": 5, "de": 5}
    assert cli_main(["build-data", "--task", "emotion", "--sources", "zh", "--target", "zz", "--out", str(out)]) == 2


# ------------------------------------------------------------------------------------------------------------------
# controls: the same rows without the cross-lingual content (copy) or without the translation correspondence (shuffled)


def _control_cfg(files, control, **kw):
    return QTDataConfig(task="snli", sources=["de", "zh"], data_files=files, control=control, **kw)


def test_copy_control_is_target_to_target_on_the_same_rows(tmp_path):
    specs = load_specs()
    files = snli_files(tmp_path, ["de", "zh", "en"], n=6)
    plain, _ = build_records(_control_cfg(files, "none", rows_per_lang=4), specs)
    copy, stats = build_records(_control_cfg(files, "copy", rows_per_lang=4), specs)
    assert [(r["id"], r["index"], r["output"]) for r in copy] == [(r["id"], r["index"], r["output"]) for r in plain]
    en = specs.language("en").instruction_name
    for r in copy:
        # the input is the row's own English question (independently rendered from the English file) + English -> English
        q_en = fill(specs.task("snli").lang("en").question_template,
                    {"premise": f"en premise {r['index']} {{braces}}", "hypothesis": f"en hyp {r['index']}"})
        assert r["input"] == f"{q_en}\nTranslate the input from {en} to {en}:\n"
        assert (r["src"], r["tgt"], r["control"]) == ("en", "en", "copy")
        assert "de premise" not in r["input"] and "zh premise" not in r["input"]
    assert stats["control"] == {"kind": "copy", "rows_changed": 8,
                                "repeated_inputs": 8 - len({r["index"] for r in copy})}
    assert stats["rows_per_source"] == {"de": 4, "zh": 4}  # what was selected, before the control


def test_shuffled_control_is_a_derangement_of_the_responses(tmp_path):
    specs = load_specs()
    files = snli_files(tmp_path, ["de", "zh", "en"], n=7)
    for paired in (False, True):  # paired: every item appears once per source, so equal responses come in pairs
        plain, _ = build_records(_control_cfg(files, "none", paired=paired, seed=3), specs)
        shuf, stats = build_records(_control_cfg(files, "shuffled", paired=paired, seed=3), specs)
        assert [r["input"] for r in shuf] == [r["input"] for r in plain]
        assert sorted(r["output"] for r in shuf) == sorted(r["output"] for r in plain)
        for a, b in zip(plain, shuf):
            assert b["output"] != a["output"], b["id"]  # no row keeps its own translation
            assert b["control"] == "shuffled" and (b["src"], b["tgt"]) == (a["src"], a["tgt"])
        again, _ = build_records(_control_cfg(files, "shuffled", paired=paired, seed=3), specs)
        assert again == shuf  # seeded
        other, _ = build_records(_control_cfg(files, "shuffled", paired=paired, seed=4), specs)
        assert [r["output"] for r in other] != [r["output"] for r in shuf]
        assert stats["control"]["kind"] == "shuffled"


def test_shuffled_control_refuses_a_single_response(tmp_path):
    files = snli_files(tmp_path, ["de", "en"], n=1)
    with pytest.raises(QtalignError, match="shuffled"):
        build_records(QTDataConfig(task="snli", sources=["de"], data_files=files, control="shuffled"))


def test_control_is_written_and_changes_the_fingerprint(tmp_path):
    files = snli_files(tmp_path, ["de", "en"], n=3)
    stats = build_question_data(QTDataConfig(task="snli", sources=["de"], data_files=files, control="copy"), tmp_path / "out")
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert {r["control"] for r in rows} == {"copy"} and stats["control"]["kind"] == "copy"
    assert QTDataConfig(control="copy").fingerprint() != QTDataConfig().fingerprint()
    with pytest.raises(ValidationError):
        QTDataConfig(control="reverse")
