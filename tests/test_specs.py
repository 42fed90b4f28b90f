import json

import pytest

from conftest import PAPER_PROMPTS, needs_shared
from qtalign.errors import QtalignError
from qtalign.tasks.specs import VARIANTS, derive_question_template, load_specs

LANGS20 = "en zh de fr es it nl ja ru sv sl pl bg no ms is hi th sw bn".split()


def test_default_specs_cover_3_tasks_x_20_languages():
    s = load_specs()
    assert s.order == LANGS20
    assert {t: s.task(t).n_shot for t in ("emotion", "snli", "paws")} == {"emotion": 2, "snli": 6, "paws": 4}
    for t in s.tasks.values():
        assert sorted(t.languages) == sorted(LANGS20)
        for lang in LANGS20:
            for v in VARIANTS:
                fields = {f: f"<{f}>" for f in t.item_fields}
                prompt = t.prompt(lang, v, fields)
                ls = t.lang(lang)
                # demos then the query; every prompt ends with the answer cue `: "`
                assert prompt.endswith(ls.answer_cue) and ls.answer_cue.endswith(': "')
                words = t.label_words(lang, v)
                block = t.demo_block(lang, v)
                assert block.count(ls.answer_cue) == t.n_shot
                for w in words:  # every class's label word is shown in the demonstrations
                    assert f'{ls.answer_cue}{w}"' in block


def test_resource_groups_and_names():
    s = load_specs()
    high = [c for c in s.order if s.language(c).resource_group == "high"]
    assert sorted(high) == sorted("en de fr sv zh es ru nl it ja".split())
    assert s.language("zh").instruction_name == "Chinese"
    assert s.resolve_langs("low", "emotion") == [c for c in LANGS20 if c not in high]


@needs_shared
@pytest.mark.parametrize("task", ["emotion", "snli", "paws"])
def test_rendering_matches_paper_prompts_for_every_language(task):
    """Our renderer (demo block + derived/declared question) equals the paper's query_template filled in."""
    paper = json.loads(PAPER_PROMPTS.read_text(encoding="utf-8"))
    s = load_specs(PAPER_PROMPTS)
    t = s.task(task)
    T = paper["tasks"][task]
    n = 0
    for lang, ld in T["languages"].items():
        # the canonical question format derived from the field words equals the paper's template
        assert derive_question_template(T["item_fields"], ld["fields"], ld["answer_cue"]) == ld["question_template"], lang
        for variant, block in ld["demos"].items():
            item = {f: f"{f} text with {{braces}} ünïcode" for f in T["item_fields"]}
            ref = ld["query_template"]
            for k, val in [("demos", block), *item.items()]:
                ref = ref.replace("{" + k + "}", val)
            assert t.prompt(lang, variant, item) == ref, (task, lang, variant)
            n += 1
    assert n == len(T["languages"]) * len(next(iter(T["languages"].values()))["demos"])


@needs_shared
def test_paper_specs_derive_native_and_irrelevant_demos_for_snli():
    s = load_specs(PAPER_PROMPTS)
    t = s.task("snli")
    nat = t.demo_block("no", "native")
    # the Norwegian SNLI file stores neutral/contradiction swapped; the scored (script) words are the correct ones
    assert 'Svar: "nøytral"' in nat and 'Svar: "motsigelse"' in nat and '"neutral"' not in nat
    irr = t.demo_block("de", "irrelevant")
    assert irr.count('Antwort: "ox"') == 2 and irr.count('Antwort: "sheep"') == 2
    # gold decoding uses the file's words
    assert t.lang("no").data_label_words["neutral"] == "motsigelse"


def test_user_spec_adds_a_language_without_code(tmp_path):
    doc = {"languages": {"info": {"eo": {"english_name": "Esperanto", "resource_group": "low"}}},
           "tasks": {"emotion": {"languages": {"eo": {
               "fields": {"answer": "Emocio"},
               "label_words_native": {"positive": "pozitiva", "negative": "negativa"},
               "demo_items": [{"input": "Bona libro.", "label": "positive"}, {"input": "Malbona.", "label": "negative"}]}}}}}
    p = tmp_path / "eo.json"
    p.write_text(json.dumps(doc), encoding="utf-8")
    s = load_specs(p)
    assert s.language("eo").english_name == "Esperanto"
    prompt = s.task("emotion").prompt("eo", "native", {"input": "Ĝi funkcias."})
    assert prompt == 'Bona libro.\nEmocio: "pozitiva"\nMalbona.\nEmocio: "negativa"\nĜi funkcias.\nEmocio: "'
    assert "eo" in s.resolve_langs("all", "emotion")


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["tasks"]["emotion"]["languages"]["xx"].pop("label_words_native"), "field 'label_words_native': missing"),
    (lambda d: d["tasks"]["emotion"]["languages"]["xx"].update(question_template="{review}\nX: \""), "placeholders"),
    (lambda d: d["tasks"]["emotion"]["languages"]["xx"]["demo_items"][0].update(label="happy"), "unknown class 'happy'"),
])
def test_bad_spec_files_give_one_clear_error(tmp_path, mutate, needle):
    doc = {"tasks": {"emotion": {"languages": {"xx": {
        "fields": {"answer": "X"}, "label_words_native": {"positive": "p", "negative": "n"},
        "demo_items": [{"input": "a", "label": "positive"}]}}}}}
    mutate(doc)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(QtalignError) as e:
        load_specs(p)
    msg = str(e.value)
    assert str(p) in msg and "tasks.emotion.languages.xx" in msg and needle in msg and "\n" not in msg


def test_unknown_task_language_variant_errors():
    s = load_specs()
    with pytest.raises(QtalignError, match="unknown task"):
        s.task("mnli")
    with pytest.raises(QtalignError, match="unknown language"):
        s.resolve_langs("en,xx", "emotion")
    with pytest.raises(QtalignError, match="unknown label variant"):
        s.task("emotion").label_words("en", "fancy")
