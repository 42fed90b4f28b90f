"""The experiment report (qtalign.report): paired statistics from per-item records, and report.md / report.html
generated from a whole `qtalign run` on a tiny random Llama (every section; self-contained HTML; rendered by
headless Chromium when it is installed)."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qtalign.experiment.config import ExperimentConfig
from qtalign.experiment.runner import Experiment
from qtalign.report.build import SECTIONS, render_report, write_report
from qtalign.report.numbers import STATS_SCHEMA, language_entry
from qtalign.report.paired import compare, group_summary
from qtalign.report.read import read_predictions
from qtalign.stats import mcnemar, wilson

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _rec(lang: str, i: int, correct: bool, cal: bool) -> dict:
    return {"key": f"emotion/enout/{lang}/{i}", "task": "emotion", "variant": "enout", "lang": lang, "index": i,
            "correct": correct, "cal_correct": cal}


def test_paired_statistics_and_groups():
    # en: base 6/10, tuned 9/10 (b=0 right only in base, c=3 right only in tuned); sw: base 5/10, tuned 4/10 (b=2, c=1)
    base_en = [True] * 6 + [False] * 4
    tuned_en = [True] * 9 + [False]
    base_sw = [True, True, True, False, False, True, True, False, False, False]
    tuned_sw = [False, False, True, True, False, True, True, False, False, False]
    base = {r["key"]: r for r in [_rec("en", i, c, not c) for i, c in enumerate(base_en)] + [_rec("sw", i, c, c) for i, c in enumerate(base_sw)]}
    tuned = {r["key"]: r for r in [_rec("en", i, c, c) for i, c in enumerate(tuned_en)] + [_rec("sw", i, c, c) for i, c in enumerate(tuned_sw)]}
    del tuned["emotion/enout/sw/9"]  # an item missing in one run is left out of the pairing
    rows = {r.lang: r for r in compare(base, tuned, {"en": "high", "sw": "low"}, {"en"})}
    en, sw = rows["en"], rows["sw"]
    assert en.raw.n == 10 and en.raw.acc("base") == 0.6 and en.raw.acc("tuned") == 0.9
    assert abs(language_entry(en)["raw"]["delta"] - 0.3) < 1e-12
    assert en.raw.mcnemar() == (0, 3, mcnemar(0, 3)) and en.raw.ci("tuned") == wilson(9, 10)
    assert en.cal.acc("base") == 0.4 and en.cal.mcnemar()[:2] == (1, 6)
    assert sw.raw.n == 9 and sw.raw.mcnemar()[:2] == (2, 1) and sw.seen is False and en.seen is True
    allg = group_summary(list(rows.values()), "all")
    assert allg["raw"]["n_items"] == 19 and (allg["raw"]["b"], allg["raw"]["c"]) == (2, 4)
    # the pooled test flips each item index with all its languages: brute force over the 2^k sign patterns
    contrib = {}
    for lang, r in rows.items():
        for i, (b_, t_) in enumerate(zip(r.raw.base, r.raw.tuned)):
            contrib[i] = contrib.get(i, 0.0) + (t_ - b_) / (r.raw.n * 2)
    w = [x for x in contrib.values() if x]
    obs = abs(sum(w))
    exact = sum(abs(sum(s * x for s, x in zip(signs, w))) >= obs - 1e-12
                for signs in itertools.product((1, -1), repeat=len(w))) / 2 ** len(w)
    assert abs(allg["raw"]["p"] - exact) < 0.02  # Monte Carlo (10,000 permutations) against the exact enumeration
    assert abs(en.p("raw") - mcnemar(0, 3)) < 1e-12  # one item per cluster, one language: McNemar's exact test
    assert abs(allg["raw"]["base"] - (0.6 + 5 / 9) / 2) < 1e-12  # macro average over languages
    assert group_summary(list(rows.values()), "seen")["langs"] == ["en"]
    assert group_summary(list(rows.values()), "low")["langs"] == ["sw"]
    assert group_summary([en], "unseen") is None
    # base only: no tuned columns, no test
    only = compare(base, {}, {"en": "high", "sw": "low"}, set())
    assert all(not r.raw.tuned for r in only) and math.isnan(only[0].raw.mcnemar()[2])


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    d = {
        "name": "tiny-report",
        "out": str(out),
        "model": {"name": str(tiny_llama_dir), "dtype": "fp32", "device": "cpu"},
        "data": {"task": "emotion", "data_files": "demo", "sources": ["zh"], "target": "en", "items": "60:120", "rows_per_lang": 4},
        "train": {"max_steps": 1, "batch_size": 4, "per_device_batch_size": 4, "learning_rate": 1e-2, "val_size": 0, "cutoff_len": 128},
        "eval": {"tasks": ["emotion"], "data_files": "demo", "langs": ["en", "zh", "de", "sw"], "items": "0:8"},
        "lens": {"tasks": ["emotion"], "data_files": "demo", "langs": ["en", "zh"], "limit": 2},
        "geometry": {"tasks": ["emotion"], "data_files": "demo", "langs": ["en", "zh"], "limit": 3, "pools": ["last"]},
        "report": {"title": "Tiny report", "notes": "A test run."},
    }
    Experiment(ExperimentConfig.model_validate(d), log=lambda s: None).run()
    return out


def _md_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_report_has_every_section_and_the_right_numbers(run_dir):
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# Tiny report\n") and "A test run." in md
    heads = re.findall(r"^## (.+)$", md, flags=re.M)
    assert heads == list(SECTIONS)
    for link in _md_images(md):
        assert (run_dir / link).is_file(), link
    imgs = _md_images(md)
    assert "train/loss.png" in imgs and "report/accuracy_emotion_enout.png" in imgs
    assert any(x.startswith("lens/") for x in imgs) and any(x.startswith("geometry/") for x in imgs)
    # the per-language statistics (stats.json) agree with the evaluation's own per-item records
    st = json.loads((run_dir / "stats.json").read_text())
    assert st["schema"] == STATS_SCHEMA and st["has_tuned"] and st["tasks"] == [
        {"task": "emotion", "variant": "enout", "langs": ["en", "zh", "de", "sw"]}]
    langs = {e["lang"]: e for e in st["languages"]}
    base = read_predictions(run_dir / "eval" / "base" / "predictions.jsonl")
    tuned = read_predictions(run_dir / "eval" / "tuned" / "predictions.jsonl")
    for lang in ("en", "zh", "de", "sw"):
        pairs = [(r["correct"], tuned[k]["correct"]) for k, r in base.items() if r["lang"] == lang]
        kb, kt = sum(b for b, _ in pairs), sum(t for _, t in pairs)
        e = langs[lang]
        assert (e["task"], e["variant"], e["n"], e["seen"]) == ("emotion", "enout", 8, lang in ("en", "zh"))
        assert e["raw"]["base"] == kb / 8 and e["raw"]["tuned"] == kt / 8 and e["raw"]["base_ci"] == list(wilson(kb, 8))
        assert abs(e["raw"]["delta"] - (kt - kb) / 8) < 1e-12
        assert (e["raw"]["b"], e["raw"]["c"]) == (sum(b and not t for b, t in pairs), sum(t and not b for b, t in pairs))
        assert e["test"] == "mcnemar" and e["raw"]["p"] == mcnemar(e["raw"]["b"], e["raw"]["c"])
    lo, hi = wilson(round(8 * langs["en"]["raw"]["base"]), 8)  # the Markdown row formats those numbers
    row = next(line for line in md.splitlines() if line.startswith("| en * |"))
    assert f"| {100 * langs['en']['raw']['base']:.1f} [{100 * lo:.1f}–{100 * hi:.1f}] |" in row
    assert f"| {100 * langs['en']['raw']['delta']:+.1f} |" in row
    groups = {e["group"]: e for e in st["groups"]}
    assert [(g, groups[g]["n_langs"], groups[g]["raw"]["n_items"]) for g in ("seen", "unseen", "low")] == [
        ("seen", 2, 16), ("unseen", 2, 16), ("low", 1, 8)]
    assert groups["english"]["langs"] == ["en"] and groups["seen"]["langs"] == ["en", "zh"]
    assert abs(groups["all"]["raw"]["base"] - sum(e["raw"]["base"] for e in langs.values()) / 4) < 1e-12
    assert "no overlap" in md and "training items 6" in md  # the overlap check and its ranges
    assert "| torch |" in md and "| seed | 0 |" in md and "| train | done |" in md  # environment and timings
    assert "| emotion | enout | zh |" in md  # the label-tokenisation table
    tn = json.loads((run_dir / "train" / "summary.json").read_text())["numbers"]
    assert f"| this run | {tn['train_rows']} | {tn['steps']} | {tn['steps'] * 4 / tn['train_rows']:.2f} | {tn['train_tokens']:,} |" in md
    qt = json.loads((run_dir / "data" / "stats.json").read_text())
    p_rows = int(sum(d["available"] for d in qt["per_source"].values()) * 0.95)
    assert f"| the paper | {p_rows} | {-(-p_rows // 16) * 3} | 3 |" in md


def test_html_is_self_contained(run_dir):
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == len(_md_images(md)) > 3
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"<script|<link|https?://|src=\"(?!data:)", html)
    for name in SECTIONS:
        assert f"<h2>{name}</h2>" in html
    assert "<table>" in html and "<pre><code class=\"language-yaml\">" in html


def test_report_of_a_base_only_run(run_dir, tmp_path):
    d = tmp_path / "base_only"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("tuned", "lens", "geometry", "train"))
    md_path, html_path = write_report(d)
    md = md_path.read_text(encoding="utf-8")
    assert "tuned % [95 % CI]" not in md and "has not run" in md and html_path.exists()
    st = json.loads((d / "stats.json").read_text())
    assert not st["has_tuned"] and st["checkpoint"] is None and st["families"]["langs"]["m"] == 0
    assert all(math.isnan(e["raw"]["tuned"]) and math.isnan(e["raw"]["p"]) for e in st["languages"])
    assert all(e["raw"]["base"] == e2["raw"]["base"] for e, e2 in zip(st["languages"], json.loads((run_dir / "stats.json").read_text())["languages"]))
    assert re.findall(r"^## (.+)$", md, flags=re.M) == list(SECTIONS)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); the HTML is checked statically above")
def test_html_renders_in_headless_chromium(run_dir, tmp_path):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
           (run_dir / "report.html").resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert "<h1>Tiny report</h1>" in dom
    for name in SECTIONS:
        assert f"<h2>{name}</h2>" in dom, name
    assert dom.count("<img") == len(_md_images((run_dir / "report.md").read_text(encoding="utf-8")))
    shot = tmp_path / "shot.png"
    subprocess.run([*cmd[:-2], f"--screenshot={shot}", "--window-size=1200,2400", cmd[-1]], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000  # rendered something (not a blank page)


# -- AUC and the paired bootstrap, on synthetic data with known answers -----------------------------------------


def _auc_brute(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_auc_known_values_and_brute_force():
    import random

    from qtalign.stats import auc, class_auc

    assert auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auc([0.5] * 6, [True, False] * 3) == 0.5  # all ties: chance
    assert math.isnan(auc([0.1, 0.2], [True, True]))
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(5, 40)
        scores = [round(rng.random(), 1) for _ in range(n)]  # many ties
        labels = [rng.random() < 0.4 for _ in range(n)]
        if 0 < sum(labels) < n:
            assert abs(auc(scores, labels) - _auc_brute(scores, labels)) < 1e-12
    # a model that always answers one class can still rank the items: AUC sees what accuracy hides
    probs = [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]  # always predicts class 0
    assert class_auc(probs, [0, 0, 1, 1], 2) == 1.0
    # three classes: macro one-vs-rest
    p3 = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]]
    want = sum(_auc_brute([p[c] for p in p3], [g == c for g in [0, 1, 2, 0]]) for c in range(3)) / 3
    assert abs(class_auc(p3, [0, 1, 2, 0], 3) - want) < 1e-12


def test_metrics_auc_ranks_by_the_unrounded_scores():
    """Confident items whose stored probabilities round to 1.0 are still ranked by their first-token masses (or
    sequence log-likelihoods): the AUC in results.json equals the brute force over the exact scores."""
    from qtalign.eval.metrics import class_log_scores, record_auc

    masses = [(1e-3, 1e-12), (1e-3, 1e-10), (1e-3, 1e-11), (1e-3, 1e-9)]  # rounded: all {"a": 1.0, "b": 0.0}
    recs = [{"gold": g, "scores": {"a": 1.0, "b": 0.0}, "mass": {"a": ma, "b": mb}}
            for g, (ma, mb) in zip(["a", "b", "a", "b"], masses)]
    exact = [ma / (ma + mb) for ma, mb in masses]
    assert record_auc(recs, ["a", "b"]) == _auc_brute(exact, [True, False, True, False]) == 1.0
    assert record_auc([{**r, "mass": None} for r in recs], ["a", "b"]) == 0.5  # the rounded scores alone: all ties
    seq = {"gold": "a", "scores": {"a": 1.0, "b": 0.0}, "logprobs": {"a": -1.0, "b": -40.0}}
    assert abs(class_log_scores(seq)[1] - (-39.0 - math.log1p(math.exp(-39.0)))) < 1e-12


def test_paired_bootstrap_interval_covers_a_known_change():
    """stats.bootstrap_change over items, or over clusters of items (units), as the report's Scores use it."""
    import random

    from qtalign.stats import bootstrap_change

    def paired_bootstrap(stat, base, tuned, n_boot, seed=0, clusters=None):
        by: dict = {}
        for i, c in enumerate(clusters or range(len(base))):
            by.setdefault(c, []).append(i)
        seqs = {"base": base, "tuned": tuned}
        return bootstrap_change(lambda which, draw: stat([seqs[which][i] for u in draw for i in u]), list(by.values()),
                                n_boot, seed)

    rng = random.Random(1)
    base = [rng.random() < 0.5 for _ in range(400)]
    tuned = [b or rng.random() < 0.3 for b in base]  # about +15 points, never worse on an item
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    obs, lo, hi = paired_bootstrap(mean, base, tuned, n_boot=500, seed=0)
    assert abs(obs - (mean(tuned) - mean(base))) < 1e-12 and 0 < lo < obs < hi
    same = paired_bootstrap(mean, base, base, n_boot=200)
    assert same == (0.0, 0.0, 0.0)  # no change on any item: the interval is the point
    # clusters: resampling whole clusters gives a wider interval when items inside a cluster move together
    clustered_base = [x for x in base[:100] for _ in range(4)]
    clustered_tuned = [x for x in tuned[:100] for _ in range(4)]
    cl = [i // 4 for i in range(400)]
    _, lo_i, hi_i = paired_bootstrap(mean, clustered_base, clustered_tuned, n_boot=500)
    _, lo_c, hi_c = paired_bootstrap(mean, clustered_base, clustered_tuned, n_boot=500, clusters=cl)
    assert (hi_c - lo_c) > 1.5 * (hi_i - lo_i)


def test_compare_runs_matches_each_runs_own_metrics(tmp_path, tiny_llama_dir):
    """`qtalign compare` shows, per run, the macro averages that run's own evaluation computed (accuracy, calibrated
    accuracy, AUC) on the items every run evaluated (a run of items 0-5 beside one of 0-3: both on 0-3), and two runs of
    one model get distinct labels (no column silently replaces another)."""
    from qtalign.cli import main

    from test_experiment import tiny_dict

    runs = []
    for name, items in (("a", "0:6"), ("b", "0:4")):
        d = tiny_dict(tiny_llama_dir, tmp_path / name)
        d["stages"] = ["eval", "report"]
        d["eval"]["items"] = items
        Experiment(ExperimentConfig.model_validate(d), log=lambda s: None).run()
        runs.append(tmp_path / name)
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    got = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    labels = list(got["runs"])
    assert [got["runs"][lb]["dir"] for lb in labels] == ["../a", "../b"]  # relative to the comparison, not the machine
    assert len(labels) == 2 and labels[0] != labels[1] and all(r.name in lb for r, lb in zip(runs, labels))
    own = json.loads((runs[1] / "eval" / "base" / "results.json").read_text())["metrics"]["emotion"]["enout"]["avg"]
    for g in ("all", "high", "low"):  # run b evaluated only the common items: its own numbers
        c = got["tasks"]["emotion/enout"][labels[1]][g]
        assert c["n_langs"] == own[g]["n_langs"]
        for k in ("acc", "cal_acc", "auc"):
            assert abs(c[k] - own[g][k]) < 1e-9, (g, k)
    preds = read_predictions(runs[0] / "eval" / "base" / "predictions.jsonl")  # run a: recomputed on items 0-3
    langs = sorted({r["lang"] for r in preds.values()})
    for key, k in (("correct", "acc"), ("cal_correct", "cal_acc")):
        per = [[r[key] for r in preds.values() if r["lang"] == lg and r["index"] < 4] for lg in langs]
        assert all(len(x) == 4 for x in per)
        assert abs(got["tasks"]["emotion/enout"][labels[0]]["all"][k] - sum(sum(x) / 4 for x in per) / len(per)) < 1e-12
    assert (tmp_path / "cmp" / "compare.html").read_text().count("<img") >= 1
    md = (tmp_path / "cmp" / "compare.md").read_text()  # a model folder outside the runs: its name, not the machine's path
    assert str(tiny_llama_dir) not in md and f"| {Path(tiny_llama_dir).name} |" in md
    assert "| 4 |" in md  # items per language: the common items
    assert {x["n"] for lb in labels for x in got["languages"]["emotion/enout"][lb].values()} == {4}
    from qtalign.report.compare import render_compare  # the document is rendered from compare.json alone

    assert render_compare(got, tmp_path / "cmp").render(embed=False) == md


def test_sign_flip_test_is_mcnemar_without_clusters_and_wider_with_them():
    """The permutation test reduces to McNemar's exact test for independent items, and clustered items (perfectly
    correlated within a cluster) give a larger p than the same items treated as independent."""
    from qtalign.stats import sign_flip_p

    for b, c in ((0, 3), (2, 9), (5, 5), (1, 12)):
        contrib = [-1.0] * b + [1.0] * c + [0.0] * 7
        assert abs(sign_flip_p(contrib, n_perm=20000) - mcnemar(b, c)) < 0.015, (b, c)
    independent = sign_flip_p([1.0] * 12)
    clustered = sign_flip_p([3.0] * 4)  # the same 12 gains, in 4 clusters of 3
    assert independent < 0.001 and clustered > 0.1


def test_spearman_is_pearson_of_ranks_and_undefined_without_a_ranking():
    import random
    import warnings

    from qtalign.stats import spearman

    def pearson(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        cov = sum((u - ma) * (v - mb) for u, v in zip(a, b))
        return cov / (sum((u - ma) ** 2 for u in a) * sum((v - mb) ** 2 for v in b)) ** 0.5

    rng = random.Random(3)
    x = [rng.random() for _ in range(17)]
    y = [v + rng.gauss(0, 0.3) for v in x]
    rank = lambda v: [sorted(v).index(u) for u in v]  # no ties in continuous draws
    r, p = spearman(x + [None, float("nan")], y + [0.5, 0.5])  # pairs with a missing side are dropped
    assert r == pytest.approx(pearson(rank(x), rank(y)), abs=1e-12) and 0 < p < 0.05
    assert spearman(x, [-v for v in x])[0] == pytest.approx(-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a layer tuning left untouched: constant change, no ranking, no warning
        assert all(math.isnan(v) for v in spearman(x, [0.0] * len(x)))
        assert all(math.isnan(v) for v in spearman(x[:2], y[:2]))


def test_class_order_is_matched_by_name_and_unpaired_items_are_counted():
    from qtalign.errors import QtalignError
    from qtalign.report.paired import unpaired

    def rec(i, gold, scores, **kw):
        return {"key": f"t/enout/en/{i}", "task": "t", "variant": "enout", "lang": "en", "index": i, "gold": gold,
                "correct": True, "scores": scores, **kw}

    base = {f"t/enout/en/{i}": rec(i, g, {"a": p, "b": 1 - p}) for i, (g, p) in enumerate([("a", .9), ("b", .2), ("a", .7), ("b", .4)])}
    tuned = {k: rec(r["index"], r["gold"], {"b": r["scores"]["b"], "a": r["scores"]["a"]}) for k, r in base.items()}  # keys reordered
    row = compare(base, tuned, {"en": "high"}, set())[0]
    assert row.auc("base") == row.auc("tuned") == 1.0
    bad = {k: {**r, "scores": {"a": .5, "c": .5}} for k, r in tuned.items()}
    with pytest.raises(QtalignError, match="differ"):
        compare(base, bad, {"en": "high"}, set())
    del tuned["t/enout/en/3"]
    assert unpaired(base, tuned) == {"t/enout/en": 1} and compare(base, tuned, {"en": "high"}, set())[0].raw.n == 3


def test_display_path_never_shows_the_machines_layout(tmp_path, monkeypatch):
    """Paths in reports: relative to the run dir, under {data_dir} (also a file beside it, as configs name the
    paper's prompts: {data_dir}/../paper_prompts.json), $QTALIGN_CACHE, the package; elsewhere left as they are."""
    from qtalign.report.format import display_path

    monkeypatch.setenv("QTALIGN_CACHE", str(tmp_path / "cache"))
    run, data = tmp_path / "run", tmp_path / "shared" / "data" / "official"
    assert display_path(run / "eval" / "base", run) == "eval/base"
    assert display_path(data / "snli" / "en.json", run, str(data)) == "{data_dir}/snli/en.json"
    assert display_path(f"{data}/../paper_prompts.json", run, str(data)) == "{data_dir}/../paper_prompts.json"
    assert display_path(tmp_path / "cache" / "models" / "x", run) == "$QTALIGN_CACHE/models/x"
    far = tmp_path / "shared" / "elsewhere.json"  # two levels up from the data dir: not shown relative to it
    assert display_path(far, run, str(data)) == str(far)
    assert display_path("qwen2.5-coder-0.5b", run) == "qwen2.5-coder-0.5b"


def test_compare_change_is_each_runs_paired_change(run_dir, tmp_path, capsys):
    """`qtalign compare --which change` (the study summary): per run and task, the macro change tuned − base recomputed
    by brute force from the per-item predictions, the same interval as the run's own report, and one clear error for a
    run without a tuned evaluation."""
    from qtalign.cli import main
    assert main(["compare", "--which", "change", f"x={run_dir}", f"y={run_dir}", "--out", str(tmp_path / "cmp")]) == 0
    got = json.loads((tmp_path / "cmp" / "compare.json").read_text())["changes"]
    base = read_predictions(run_dir / "eval" / "base" / "predictions.jsonl")
    tuned = read_predictions(run_dir / "eval" / "tuned" / "predictions.jsonl")
    langs = sorted({r["lang"] for r in base.values()})

    def acc(recs, lang, key="correct"):
        xs = [r[key] for r in recs.values() if r["lang"] == lang]
        return sum(xs) / len(xs)

    for key, kind in (("correct", "raw"), ("cal_correct", "cal")):
        want = sum(acc(tuned, lg, key) - acc(base, lg, key) for lg in langs) / len(langs)
        assert abs(got["x"]["emotion/enout"]["all"][kind]["delta"] - want) < 1e-12
    seen = got["x"]["emotion/enout"]["seen"]
    assert seen["langs"] == ["en", "zh"] and got["x"] == got["y"]
    own = next(g for g in json.loads((run_dir / "stats.json").read_text())["groups"] if g["group"] == "all")  # the run's own report
    for kind in ("raw", "cal", "auc"):
        for k in ("delta", "ci_low", "ci_high"):
            assert got["x"]["emotion/enout"]["all"][kind][k] == pytest.approx(own[kind][k], nan_ok=True)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert got["x"]["emotion/enout"]["all"]["n_langs"] == 4 and "| x | yes | all | 4 |" in md and "compare.png" in md
    # a base-only run has no change: one line, exit 2, nothing written
    base_only = tmp_path / "base_only"
    (base_only / "eval").mkdir(parents=True)
    shutil.copytree(run_dir / "eval" / "base", base_only / "eval" / "base")
    capsys.readouterr()
    assert main(["compare", "--which", "change", str(base_only), "--out", str(tmp_path / "cmp2")]) == 2
    assert "no tuned evaluation" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "cmp2").exists()


def test_holm_on_known_examples_and_against_the_step_down_procedure():
    from qtalign.stats import holm

    # by hand: sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06, monotone)
    assert [round(x, 12) for x in holm([0.01, 0.04, 0.03, 0.005])] == [0.03, 0.06, 0.06, 0.02]
    out = holm([0.5, float("nan"), None, 0.9])  # missing tests stay missing and do not count in m
    assert out[0] == 1.0 and math.isnan(out[1]) and math.isnan(out[2]) and out[3] == 1.0
    # oracle: Holm's step-down rejects H_(k) at alpha iff p_(j) <= alpha / (m - j) for every j <= k;
    # the adjusted p rejects exactly those (adjusted p <= alpha)
    import random

    rng = random.Random(0)
    for _ in range(200):
        ps = [rng.random() ** 3 for _ in range(rng.randint(1, 12))]
        adj = holm(ps)
        for alpha in (0.01, 0.05, 0.2):
            order = sorted(range(len(ps)), key=lambda i: ps[i])
            rejected, ok = set(), True
            for j, i in enumerate(order):
                ok = ok and ps[i] <= alpha / (len(ps) - j)
                if ok:
                    rejected.add(i)
            assert {i for i, a in enumerate(adj) if a <= alpha} == rejected
        assert all(a >= p for a, p in zip(adj, ps))


def test_p_at_the_permutation_floor_is_shown_as_a_bound():
    from qtalign.report.format import pval
    from qtalign.report.paired import N_PERM
    from qtalign.stats import sign_flip_p

    p = sign_flip_p([1.0] * 40)  # no permutation reaches the observed change
    assert p == 1 / (1 + N_PERM)
    assert pval(p) == f"< {1 / (1 + N_PERM):.1e} *" and pval(p).startswith("< 1.0e-04")
    assert pval(2e-5 * 0.5) == "1.0e-05 *"  # an exact test's small p is a value, not a bound
    assert pval(0.2) == "0.200" and pval(0.01) == "0.010 *"


def test_report_tests_families_with_holm(run_dir):
    from qtalign.report.paired import GROUPS
    from qtalign.stats import holm

    st = json.loads((run_dir / "stats.json").read_text())
    nan = lambda xs: [None if x != x else x for x in xs]  # noqa: E731  (NaN == NaN for the comparison)
    for family, entries, key in (("groups", [g for g in st["groups"] if g["group"] in GROUPS], "group"),
                                 ("langs", st["languages"], "lang")):
        fam, by = st["families"][family], {(e["task"], e["variant"], e[key]): e for e in entries}
        tests = [by[tuple(k[:3])][k[3]] for k in fam["keys"]]
        assert nan([x["p_holm"] for x in tests]) == nan(holm([x["p"] for x in tests]))
        assert fam["m"] == sum(x["p"] == x["p"] for x in tests)
        assert {tuple(k[2:]) for k in fam["keys"]} == {(e[key], kind) for e in entries for kind in ("raw", "cal")}
    assert {k[2] for k in st["families"]["groups"]["keys"]} >= {"all", "seen", "unseen"}
    assert "english" not in {k[2] for k in st["families"]["groups"]["keys"]}  # the retention row is not a family test
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "p Holm" in md and f"m = {st['families']['groups']['m']}" in md and f"m = {st['families']['langs']['m']}" in md
    tn = json.loads((run_dir / "train" / "summary.json").read_text())["numbers"]
    assert st["checkpoint"]["steps"] == tn["steps"] and "**Evaluated checkpoint:**" in md


def test_report_renders_from_stats_json_alone(run_dir, tmp_path):
    """report.md is rendered from stats.json only: without the per-item predictions it comes out the same, and a number
    changed in stats.json is the number the report prints (the sections format, they do not recompute)."""
    from qtalign.report.html import md_to_html

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    for p in d.glob("eval/*/predictions.jsonl*"):
        p.unlink()
    st = json.loads((d / "stats.json").read_text())
    doc = render_report(d, st)
    assert doc.render(embed=False) == (run_dir / "report.md").read_text(encoding="utf-8")
    assert md_to_html(doc.render(embed=True), doc.title) == (run_dir / "report.html").read_text(encoding="utf-8")
    en = next(e for e in st["languages"] if e["lang"] == "en")
    en["raw"]["delta"], en["raw"]["b"], en["raw"]["c"] = 0.4321, 17, 23
    row = next(line for line in render_report(d, st).render(embed=False).splitlines() if line.startswith("| en * |"))
    assert "| +43.2 | 17/23 |" in row


def test_missing_clusters_are_an_error_not_a_silent_fallback(tmp_path):
    """A results.json without recorded clusters, for a task whose items come in clusters, regenerated where the data is
    absent: before, the report silently tested the items as independent (another p); now it names what is missing."""
    from qtalign.errors import QtalignError
    from qtalign.report.read import derive_clusters

    cfg = {"tasks": ["snli"], "langs": ["en"], "data_dir": str(tmp_path / "gone")}
    with pytest.raises(QtalignError, match=r"records no item clusters for task 'snli'.*not on this machine"):
        derive_clusters(cfg, "x/eval/base/results.json")
    assert derive_clusters({**cfg, "tasks": ["emotion"]}, "x") == {}  # a task without clusters needs no data


def test_compare_matches_items_by_data_content_not_index(tmp_path, tiny_llama_dir):
    """Two runs that read different files under the same names (here: zh edited) are not paired item by item: the
    group is left out of the comparison, named with the reason; the groups with identical data are compared."""
    from qtalign.cli import main
    from qtalign.tasks.items import demo_data_dir

    from test_experiment import tiny_dict

    edited = tmp_path / "demo"
    shutil.copytree(demo_data_dir(), edited)
    zh = edited / "emotion" / "zh.jsonl"
    lines = zh.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["input"] = first["input"] + " 另一个评论。"
    zh.write_text("\n".join([json.dumps(first, ensure_ascii=False), *lines[1:]]) + "\n", encoding="utf-8")
    runs = []
    for name, files in (("a", "demo"), ("b", str(edited / "{task}" / "{lang}.jsonl"))):
        d = tiny_dict(tiny_llama_dir, tmp_path / name)
        d["stages"] = ["eval", "report"]
        d["eval"].update(data_files=files, items="0:4")
        Experiment(ExperimentConfig.model_validate(d), log=lambda s: None).run()
        runs.append(tmp_path / name)
    assert main(["compare", f"a={runs[0]}", f"b={runs[1]}", "--out", str(tmp_path / "cmp")]) == 0
    got = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert got["not_compared"] == [{"run": "b", "group": "emotion/enout/zh", "why": "it read other data than the first run"}]
    assert "**Not compared**" in (tmp_path / "cmp" / "compare.md").read_text()
    per_lang = got["tasks"]["emotion/enout"]
    assert per_lang["a"]["all"]["n_langs"] == 3 and per_lang["b"]["all"]["n_langs"] == 2  # en, sw; not zh


def test_compare_aggregates_training_seeds(run_dir, tmp_path):
    """Runs labelled <arm>-seed<k> are aggregated: the mean change over seeds and the SD between them (two copies of
    one run: the mean is its change and the SD 0), beside each seed's own item-level interval."""
    from qtalign.cli import main
    from qtalign.report.compare import seed_arms, seed_summary

    assert seed_arms(["qt-seed1", "qt-seed2", "copy-seed1", "seed0", "other"]) == {"qt": ["qt-seed1", "qt-seed2"]}
    s = seed_summary([0.01, 0.03, 0.08])
    assert s["mean"] == pytest.approx(0.04) and s["sd"] == pytest.approx(math.sqrt(((0.03) ** 2 + 0.01 ** 2 + 0.04 ** 2) / 2))
    assert main(["compare", "--which", "change", f"qt-seed1={run_dir}", f"qt-seed2={run_dir}", "--out", str(tmp_path / "c")]) == 0
    got = json.loads((tmp_path / "c" / "compare.json").read_text())
    agg = got["seeds"]["qt"]["emotion/enout"]["all"]["raw"]
    assert agg["n_seeds"] == 2 and agg["sd"] == 0 and agg["mean"] == got["changes"]["qt-seed1"]["emotion/enout"]["all"]["raw"]["delta"]
    assert got["changes"]["qt-seed1"]["emotion/enout"]["all"]["raw"]["p_holm"] >= got["changes"]["qt-seed1"]["emotion/enout"]["all"]["raw"]["p"]
    assert agg["per_seed"]["qt-seed2"] == got["changes"]["qt-seed2"]["emotion/enout"]["all"]["raw"] and got["families"]["qt-seed1"]["m"] > 0
    from qtalign.report.compare import render_compare  # the document, seeds included, is rendered from compare.json alone

    md = (tmp_path / "c" / "compare.md").read_text()
    assert render_compare(got, tmp_path / "c").render(embed=False) == md and "## Across training seeds" in md
    got["seeds"]["qt"]["emotion/enout"]["all"]["raw"]["sd"] = 0.0123
    assert "| 1.2 |" not in md and "| 1.2 |" in render_compare(got, tmp_path / "c").render(embed=False)


def test_card_verdicts_follow_the_intervals():
    from qtalign.report.card import verdict

    up, down, flat = {"ci_low": 0.01, "ci_high": 0.05}, {"ci_low": -0.05, "ci_high": -0.01}, {"ci_low": -0.01, "ci_high": 0.02}
    assert verdict("gain", {"raw": up, "cal": up, "auc": flat}) == "reproduced"
    assert verdict("gain", {"raw": up, "cal": flat, "auc": up}) == "reproduced"
    assert verdict("gain", {"raw": up, "cal": flat, "auc": flat}).startswith("raw accuracy only")
    assert verdict("gain", {"raw": flat, "cal": down, "auc": down}) == "not reproduced (a loss: calibrated, AUC)"
    assert verdict("gain", {"raw": flat, "cal": up, "auc": up}) == "not reproduced"
    assert verdict("loss", {"raw": down, "cal": flat}) == "reproduced"
    assert verdict("loss", {"raw": up}) == "not reproduced (a gain)"
    assert verdict("gain", None) == "not testable here"


def test_card_is_computed_from_the_runs_and_refuses_bad_claims(run_dir, tmp_path, capsys):
    from qtalign.cli import main
    from qtalign.report.card import inputs_digest
    from qtalign.report.format import change

    shutil.copytree(run_dir, tmp_path / "res" / "tiny")
    claims = tmp_path / "res" / "claims.yaml"
    claims.write_text(
        "claims:\n"
        "  - {id: a, table: T1, claim: gain, paper: {model: M, change: '+5'}, expect: gain,\n"
        "     measurements: [{run: tiny, task: emotion, group: all}, {run: tiny, task: emotion, group: [zh, sw]}]}\n"
        "  - {id: b, table: T6, claim: labels, paper: {model: M, change: '+20'}, expect: gain, missing: 'not run here'}\n",
        encoding="utf-8")
    out = tmp_path / "card.md"
    assert main(["card", str(claims), "--out", str(out)]) == 0
    md = out.read_text(encoding="utf-8")
    s = next(g for g in json.loads((tmp_path / "res" / "tiny" / "stats.json").read_text())["groups"] if g["group"] == "all")
    assert change(s["raw"]) in md  # the run's own report's numbers
    assert "**not testable here**: not run here" in md and inputs_digest(claims, ["tiny"]) in md
    rows = [line for line in md.splitlines() if line.startswith("| T")]
    assert len(rows) == 3 and "zh, sw" in rows[1]
    # a changed prediction changes the digest (a stale card is detectable)
    before = inputs_digest(claims, ["tiny"])
    p = tmp_path / "res" / "tiny" / "eval" / "tuned" / "predictions.jsonl"
    p.write_text(p.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    assert inputs_digest(claims, ["tiny"]) != before
    claims.write_text("claims:\n  - {id: c, table: T, claim: x, paper: {}, expect: up, missing: m}\n", encoding="utf-8")
    assert main(["card", str(claims), "--out", str(out)]) == 2
    assert "field 'expect'" in capsys.readouterr().err
    (tmp_path / "mine.md").write_text("my notes\n")
    claims.write_text("claims:\n  - {id: c, table: T, claim: x, paper: {}, expect: gain, missing: m}\n", encoding="utf-8")
    assert main(["card", str(claims), "--out", str(tmp_path / "mine.md")]) == 2  # not a card qtalign wrote
    assert (tmp_path / "mine.md").read_text() == "my notes\n"


def test_published_reproduction_card_is_current():
    """docs/reproduction.md records the digest of everything it was computed from: regenerate it
    (`qtalign card docs/results/claims.yaml --out docs/reproduction.md`) whenever a published result changes."""
    from qtalign.report.card import inputs_digest, load_claims

    root = Path(__file__).resolve().parents[1] / "docs"
    claims = root / "results" / "claims.yaml"
    names = [m["run"] for c in load_claims(claims) for m in c.get("measurements") or []]
    assert inputs_digest(claims, names) in (root / "reproduction.md").read_text(encoding="utf-8")
