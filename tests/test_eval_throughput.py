"""benchmarks/eval_throughput.py: the official method and the lm-eval task agree with our scorer (tiny fp32 models),
evaluate.build_requests builds exactly the evaluated prompts, and the benchmark runs end to end."""

from __future__ import annotations

import importlib.util
import random
import sys

import pytest

from conftest import ROOT, tiny_model

from qtalign.tasks.items import DataSource, Item, load_items
from qtalign.eval.run import build_requests, scored_words
from qtalign.scoring.scorer import Scorer
from qtalign.tasks.specs import load_specs


def _bench():
    spec = importlib.util.spec_from_file_location("eval_throughput", ROOT / "benchmarks" / "eval_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("eval_throughput", mod)
    spec.loader.exec_module(mod)
    return mod


B = _bench()
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason='lm-evaluation-harness not installed (pip install "lm_eval>=0.4.8")')


@pytest.fixture(scope="module")
def specs():
    return load_specs()


def _groups(specs, langs=("en", "de"), n=5):
    return B.load_groups(specs, DataSource.demo(), ["emotion"], list(langs), "enout", n)


def test_build_requests_are_the_evaluated_prompts(specs):
    task = specs.task("emotion")
    items = load_items(task, "de", DataSource.demo())[:3]
    for method in ("first-token", "faithful", "sequence"):
        reqs = build_requests(task, "de", "enout", items, method)
        assert [r.key for r in reqs] == [f"emotion/enout/de/{it.index}" for it in items]
        assert [r.prefix + r.question for r in reqs] == [task.prompt("de", "enout", it.fields) for it in items]
        assert all(r.words == task.label_words("de", "enout") and r.forced == "" for r in reqs)
        assert len({r.group for r in reqs}) == 1
    # the Thai two-step is a faithful-only special case: forced prefix + remainders
    th = [Item(0, "th", {f: "x" for f in task.item_fields}, 0)]
    forced, words = scored_words(task, "th", "native", "faithful")
    assert forced and all(w and not w.startswith(forced) for w in words)
    r = build_requests(task, "th", "native", th, "faithful")[0]
    assert (r.forced, r.words) == (forced, words)
    r = build_requests(task, "th", "native", th, "first-token")[0]
    assert r.forced == "" and r.words == task.label_words("th", "native")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_official_method_agrees_with_faithful(request, specs, arch):
    tok = request.getfixturevalue(B_TOK[arch])
    model = tiny_model(arch, tok)
    groups = _groups(specs)
    scorer = Scorer(model, tok, "faithful", batch_size=3)
    n = 0
    for g in groups:
        reqs = build_requests(g.task, g.lang, g.variant, g.items, "faithful")
        official = B.official_scores(model, tok, reqs, random.Random(0))
        ours = B.ours_scores(scorer, build_requests(g.task, g.lang, g.variant, g.items, "faithful"))
        assert {k: v[0] for k, v in official.items()} == {k: v[0] for k, v in ours.items()}  # the same decisions
        for k, (_, mass) in official.items():  # from the same class masses (batched + prefix-cached vs batch 1)
            assert max(abs(a - b) for a, b in zip(ours[k][1], mass)) < 1e-5
        n += len(official)
    assert n == 10


B_TOK = {"llama": "spm_tokenizer", "qwen2": "bpe_tokenizer"}


@needs_lm_eval
def test_lm_eval_loglikelihoods_equal_sequence_scores(specs, spm_tokenizer, tmp_path):
    tok = spm_tokenizer
    model = tiny_model("llama", tok)
    g = _groups(specs, ("en",), 6)[0]
    lm = B.make_lm_eval(model, tok, batch_size=4)
    theirs = B.lm_eval_scores(lm, B.lm_eval_task(g, tmp_path))
    ours = {s.key: s.raw for s in Scorer(model, tok, "sequence", batch_size=4).score(
        build_requests(g.task, g.lang, g.variant, g.items, "sequence"))}
    assert set(theirs) == set(ours) and len(ours) == 6
    for k in ours:
        assert theirs[k] == pytest.approx(ours[k], abs=2e-4), k


def test_run_benchmark_end_to_end(specs, spm_tokenizer):
    model = tiny_model("llama", spm_tokenizer)
    groups = _groups(specs, ("en", "de"), 4)
    cols = B.COLUMNS if HAS_LM_EVAL else [c for c in B.COLUMNS if c != "lm-eval"]
    logs = []
    res = B.run_benchmark(model, spm_tokenizer, groups, batch_size=3, n_official=2, n_lm_eval=3, columns=cols, log=logs.append)
    assert res["items"] == {c: {"official": 4, "lm-eval": 6}.get(c, 8) for c in cols}
    assert all(r > 0 for r in res["items_per_s"].values())
    fo = res["agreement"]["faithful vs official"]
    assert (fo["agree"], fo["n"]) == (4, 4) and fo["max_abs_diff"] < 1e-5
    if HAS_LM_EVAL:
        sl = res["agreement"]["sequence vs lm-eval"]
        assert (sl["agree"], sl["n"]) == (6, 6) and sl["max_abs_diff"] < 2e-4
        assert "first-token/lm-eval" in res["ratios"]
    assert len(logs) == len(groups) * len(cols)
    table = B.format_table(res)
    assert "| official |" in table and "faithful vs official" in table


def test_cli_error_is_one_line(capsys):
    assert B.main(["--tasks", "no-such-task", "--skip-lm-eval", "--data-dir", str(DataSource.demo().data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-task" in err and "\n" not in err


def test_spaced_subsets_cover_the_list():
    xs = list(range(24))
    assert B.spaced(xs, 6) == [0, 4, 8, 12, 16, 20]
    assert B.spaced(xs, 5) == [0, 4, 9, 14, 19]
    assert B.spaced(xs, None) == xs and B.spaced(xs, 30) == xs


def _flops_module():
    spec = importlib.util.spec_from_file_location("qtalign_bench_flops", ROOT / "benchmarks" / "flops.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("qtalign_bench_flops", mod)
    spec.loader.exec_module(mod)
    return sys.modules["qtalign_bench_flops"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_needed_flops_match_torchs_flop_counter(request, arch):
    """The benchmark's FLOP formula against torch's FlopCounterMode on a real forward: a prompt run over a cached
    prefix (its body matmuls and its attention), then the head at the last position."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import DynamicCache

    F = _flops_module()
    tok = request.getfixturevalue(B_TOK[arch])
    model = tiny_model(arch, tok)
    model.config._attn_implementation = "eager"  # matmuls torch can count (its counter skips CPU SDPA kernels)
    shape = F.model_shape(model)
    assert shape.body_params == sum(p.numel() for n, p in model.model.layers.named_parameters() if n.endswith("proj.weight"))
    prefix, suffix = 11, 7
    ids = torch.randint(5, 100, (1, prefix + suffix))
    cache = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids[:, :prefix], cache=cache, use_cache=True)
        with FlopCounterMode(display=False) as fc:
            h = model.model(input_ids=ids[:, prefix:], cache=cache, use_cache=True).last_hidden_state
            torch.nn.functional.linear(h[:, -1], model.lm_head.weight[:3])  # three label columns
    counted = fc.get_total_flops()
    # eager attention multiplies the full rectangle (every query x every key, masked): the causal count is smaller
    rect = F.needed_flops(shape, suffix, [prefix + suffix] * suffix, 3)
    assert counted == pytest.approx(rect, rel=0.02)
    assert F.prompt_flops(shape, prefix, suffix, 3) < rect


def test_full_grid_rates_count_only_segments_timed_whole():
    """A segment resumed after a kill records only its resumed part's time: the grid's rates must leave it out (its
    items still count), and equal the brute-force rates over the other segments."""
    spec = importlib.util.spec_from_file_location("full_grid", ROOT / "benchmarks" / "full_grid.py")
    fg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fg)
    rng = random.Random(0)
    segs = [{"segment": f"emotion_{i}", "items": rng.randint(10, 500), "eval_s": rng.uniform(5, 50),
             "eval_cpu_s": rng.uniform(5, 40), "needed_tflop": rng.uniform(0.1, 10), "resumed": i == 3} for i in range(6)]
    whole = [s for s in segs if not s["resumed"]]
    t = fg.totals(segs, peak=100.0)
    assert t["items"] == sum(s["items"] for s in segs) and t["items_timed"] == sum(s["items"] for s in whole)
    cpu = sum(s["eval_cpu_s"] for s in whole)
    assert t["items_per_cpu_s"] == pytest.approx(t["items_timed"] / cpu)
    assert t["fraction_of_peak"] == pytest.approx(sum(s["needed_tflop"] for s in whole) * 1e3 / cpu / 100.0)
