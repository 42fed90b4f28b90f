"""Small task data shared by tests/test_lens.py and tests/test_geometry.py (not a test module).

Languages: en and zh (from the project's demo data) and a made-up language 'xx' whose positive label word is the
English word ('positive', so its token set overlaps English and the paper's rule drops every positive item) and
whose negative label word is Chinese ('消极', disjoint from English)."""

from __future__ import annotations

import json
from pathlib import Path

from qtalign.tasks.items import demo_data_dir

N_ITEMS = 10

XX_SPEC = {
    "languages": {"info": {"xx": {"english_name": "Testish", "resource_group": "low"}}},
    "tasks": {"emotion": {"languages": {"xx": {
        "fields": {"answer": "Emotion"},
        "answer_cue": "Emotion: \"",
        "question_template": "{input}\nEmotion: \"",
        "label_words_native": {"positive": "positive", "negative": "消极"},
        "demo_items": [
            {"input": "Great blender, quiet and strong.", "label": "positive"},
            {"input": "The headphones broke after a week.", "label": "negative"},
        ],
    }}}},
}


def write_data(root: Path, n: int = N_ITEMS) -> dict:
    """Write en/zh/xx emotion files under root; returns {'spec', 'files', 'data_dir', 'n', 'n_pos'}."""
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "xx_spec.json"
    spec.write_text(json.dumps(XX_SPEC, ensure_ascii=False), encoding="utf-8")
    src = demo_data_dir() / "emotion"
    en = [json.loads(x) for x in (src / "en.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()][:n]
    zh = [json.loads(x) for x in (src / "zh.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()][:n]
    xx = [{"input": r["input"].upper(), "answer": "positive" if r["answer"] == "positive" else "消极"} for r in en]
    (root / "emotion").mkdir(exist_ok=True)
    for lang, recs in (("en", en), ("zh", zh), ("xx", xx)):
        with open(root / "emotion" / f"{lang}.jsonl", "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"spec": str(spec), "files": "{task}/{lang}.jsonl", "data_dir": str(root), "n": n,
            "n_pos": sum(r["answer"] == "positive" for r in en)}
