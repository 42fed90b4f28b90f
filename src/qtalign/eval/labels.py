"""Label-tokenisation report: per model x task x language x variant, how each label word is tokenised, whether
the classes' first-token candidate sets collide, and how much they overlap with the English labels' sets."""

from __future__ import annotations

from pathlib import Path

from qtalign.errors import QtalignError

from qtalign.io import write_json, write_text
from qtalign.scoring.first_token import plan_words
from qtalign.tasks.specs import SpecSet
from qtalign.tasks.tokens import candidate_sets, describe_tokens


def label_report(tok, specs: SpecSet, tasks: list[str], langs: list[str], variants: list[str]) -> list[dict]:
    """One row per task x variant x language: how the tokenizer ``tok`` writes each label word and what evaluation's
    first-token rule makes of it."""
    cache: dict = {}

    def cands(words):
        key = tuple(words)
        if key not in cache:
            cache[key] = candidate_sets(tok, list(words))
        return cache[key]

    rows = []
    for t in tasks:
        task = specs.task(t)
        en = candidate_sets(tok, list(task.classes))
        for v in variants:
            for lang in langs:
                if lang not in task.languages:
                    continue
                words = task.label_words(lang, v)
                cs = candidate_sets(tok, words)
                try:
                    forced, scored = plan_words(cands, words)
                    problem = None
                except QtalignError as e:  # reported, not raised
                    forced, scored, problem = "", words, str(e)
                final = candidate_sets(tok, scored) if forced else cs
                en_all = set().union(*map(set, en.sets))
                rows.append({
                    "task": t, "variant": v, "lang": lang,
                    "labels": dict(zip(task.classes, words)),
                    "tokens": {c: describe_tokens(tok, tok(w, add_special_tokens=False)["input_ids"]) for c, w in zip(task.classes, words)},
                    "n_tokens": {c: len(tok(w, add_special_tokens=False)["input_ids"]) for c, w in zip(task.classes, words)},
                    "candidates": {c: len(s) for c, s in zip(task.classes, final.sets)},
                    "collision_tokens": describe_tokens(tok, cs.shared),
                    "forced_prefix": forced,
                    "overlap_with_english": {c: len(set(s) & en_all) for c, s in zip(task.classes, final.sets)},
                    "problem": problem,
                })
    return rows


def write_label_report(rows: list[dict], out: Path) -> None:
    write_json(out / "labels.json", rows)
    write_text(out / "labels.md", label_markdown(rows))


def label_markdown(rows: list[dict]) -> str:
    md = ["| task | variant | lang | labels (tokens) | candidates | collisions | forced prefix | overlap with English sets |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lab = "; ".join(f"{w} ({'·'.join(r['tokens'][c])})" for c, w in r["labels"].items())
        cand = " / ".join(str(n) for n in r["candidates"].values())
        ov = " / ".join(str(n) for n in r["overlap_with_english"].values())
        coll = " ".join(repr(x) for x in r["collision_tokens"][:6]) or "–"
        md.append(f"| {r['task']} | {r['variant']} | {r['lang']} | {lab} | {cand} | {coll} | {r['forced_prefix'] or '–'} | {ov}"
                  + (f" ⚠ {r['problem']}" if r["problem"] else "") + " |")
    return "\n".join(md) + "\n"
