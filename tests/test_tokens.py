import pytest

from qtalign.tasks.specs import load_specs
from qtalign.tasks.tokens import candidate_sets, label_continuation, prefix_tokens, token_bytes_table

FAMILIES = ["spm_tokenizer", "bpe_tokenizer"]


@pytest.mark.parametrize("family", FAMILIES)
def test_byte_table_reassembles_text(family, request):
    tok = request.getfixturevalue(family)
    table = token_bytes_table(tok)
    for text in ['Emotion: "positive"', "情感: \"积极\" ok", "อารมณ์: \"เชิงบวก\"", "Svar: \"nøytral\"", "কোনো উত্তর"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        got = b"".join(table[i] for i in ids)
        # SentencePiece may add a leading dummy space; the rest must be byte-identical
        assert got.lstrip(b" ") == text.encode("utf-8").lstrip(b" ")


@pytest.mark.parametrize("family", FAMILIES)
def test_candidate_sets_rule_on_every_default_label(family, request):
    """Every candidate's bytes are a prefix of its label; the token the tokenizer actually emits first after the
    answer cue is a candidate (unless shared with another class); no token sits in two classes' sets."""
    tok = request.getfixturevalue(family)
    table = token_bytes_table(tok)
    specs = load_specs()
    checked = 0
    for t in specs.tasks.values():
        for lang in specs.order:
            ls = t.lang(lang)
            for v in ("enout", "native"):
                words = t.label_words(lang, v)
                cs = candidate_sets(tok, words)
                seen = set()
                for w, s in zip(words, cs.sets):
                    assert not (seen & set(s))
                    seen |= set(s)
                    for i in s:
                        assert table[i] and w.encode("utf-8").startswith(table[i])
                    prompt = "x\n" + ls.answer_cue
                    pids = tok(prompt)["input_ids"]
                    first = label_continuation(tok, pids, prompt, w)[0]
                    assert first in s or first in cs.shared, (lang, w)
                    checked += 1
                for i in cs.shared:  # shared tokens really begin two labels
                    assert sum(w.encode("utf-8").startswith(table[i]) for w in words) >= 2
    assert checked > 200


def test_leading_space_tokens_do_not_begin_a_label(spm_tokenizer):
    table = token_bytes_table(spm_tokenizer)
    ids = prefix_tokens(spm_tokenizer, "positive")
    assert ids and all(not table[i].startswith(b" ") for i in ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_with_a_common_prefix_are_planned_as_two_steps(family, request):
    """When no token tells the classes apart (as Thai 'เชิงบวก'/'เชิงลบ' on some vocabularies), first-token
    scoring appends the common prefix to the prompt and scores the remainders (the paper's Thai two-step)."""
    from conftest import tiny_model
    from qtalign.errors import QtalignError
    from qtalign.scoring.scorer import Scorer

    tok = request.getfixturevalue(family)
    words = ["qqzxa", "qqzyb"]  # no vocabulary entry covers more than the shared 'qqz'
    assert candidate_sets(tok, words).empty_classes == [0, 1]
    scorer = Scorer(tiny_model("llama", tok), tok)
    forced, rest = scorer.plan(words)
    assert forced == "qqz" and rest == ["xa", "yb"]
    assert candidate_sets(tok, rest).empty_classes == []
    with pytest.raises(QtalignError, match="--method sequence"):
        scorer.plan(["qqzxa", "qqzxb", "other"])
