import json
import os
import subprocess
import sys

import pytest

from qtalign.eval.run import EvalConfig, evaluate
from qtalign.errors import QtalignError
from qtalign.engine.models import ModelConfig, load_model


def _cfg(model_dir, **kw):
    base = dict(model=ModelConfig(name=str(model_dir), dtype="fp32"), tasks=["emotion"], langs=["en", "zh", "de"],
                variants=["enout", "native"], data_files="demo", limit=12, batch_size=5)
    base.update(kw)
    return EvalConfig(**base)


def _preds(out):
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tiny_loaded(tiny_llama_dir):
    return load_model(ModelConfig(name=str(tiny_llama_dir), dtype="fp32"))


def test_end_to_end_outputs(tmp_path, tiny_llama_dir, tiny_loaded):
    out = tmp_path / "run"
    res = evaluate(_cfg(tiny_llama_dir), out, loaded=tiny_loaded, progress=False)
    recs = _preds(out)
    assert len(recs) == 3 * 2 * 12
    r = recs[0]
    assert set(r["scores"]) == {"positive", "negative"} and abs(sum(r["scores"].values()) - 1) < 1e-5
    assert set(r["cal_scores"]) == {"positive", "negative"} and r["pred"] in r["scores"]
    m = res["metrics"]["emotion"]["enout"]["langs"]["zh"]
    zh = [x for x in recs if x["lang"] == "zh" and x["variant"] == "enout"]
    assert m["n"] == 12 and m["acc"] == sum(x["correct"] for x in zh) / 12
    assert m["ci_low"] <= m["acc"] <= m["ci_high"]
    assert res["metrics"]["emotion"]["native"]["avg"]["all"]["n_langs"] == 3
    for name in ("run.json", "results.json", "table.md", "table.csv", "labels.md", "labels.json"):
        assert (out / name).exists(), name
    assert res["environment"]["torch"] and res["model"]["name"] == str(tiny_llama_dir)
    # a second call with the same config returns the finished results without recomputing
    assert evaluate(_cfg(tiny_llama_dir), out, loaded=tiny_loaded, progress=False)["fingerprint"] == res["fingerprint"]


def test_resume_after_interruption_recomputes_nothing_finished(tmp_path, tiny_llama_dir, tiny_loaded, monkeypatch):
    ref_out = tmp_path / "ref"
    evaluate(_cfg(tiny_llama_dir), ref_out, loaded=tiny_loaded, progress=False)
    ref = _preds(ref_out)

    import qtalign.eval.run as ev

    real_score = ev.Scorer.score
    seen = {"n": 0}

    def dying_score(self, reqs, progress=None):
        for s in real_score(self, reqs, progress):
            if not isinstance(s.key, tuple):  # content-free keys are tuples
                seen["n"] += 1
                if seen["n"] > 30:
                    raise KeyboardInterrupt
            yield s

    monkeypatch.setattr(ev.Scorer, "score", dying_score)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # no store: the run dir alone must resume
        evaluate(_cfg(tiny_llama_dir, store=False), out, loaded=tiny_loaded, progress=False)
    assert not (out / "results.json").exists()  # nothing half-done looks finished
    partial = _preds(out)
    assert 0 < len(partial) < len(ref)
    monkeypatch.setattr(ev.Scorer, "score", real_score)
    # resume with another batch size: allowed, results do not depend on it
    res = evaluate(_cfg(tiny_llama_dir, batch_size=3, store=False), out, loaded=tiny_loaded, progress=False)
    assert res["timing"]["items_scored_this_run"] == len(ref) - len(partial)
    got = _preds(out)
    assert [r["key"] for r in got] == [r["key"] for r in ref]
    for a, b in zip(got, ref):
        assert a["pred"] == b["pred"] and a["cal_pred"] == b["cal_pred"]
        assert max(abs(a["scores"][c] - b["scores"][c]) for c in a["scores"]) < 1e-5


def test_changed_config_in_same_dir_is_refused(tmp_path, tiny_llama_dir, tiny_loaded):
    out = tmp_path / "run"
    evaluate(_cfg(tiny_llama_dir, limit=4), out, loaded=tiny_loaded, progress=False)
    with pytest.raises(QtalignError, match="different config"):
        evaluate(_cfg(tiny_llama_dir, limit=5), out, loaded=tiny_loaded, progress=False)


def test_config_validation_errors():
    with pytest.raises(Exception, match="unknown label variant"):
        EvalConfig(variants=["weird"])
    with pytest.raises(Exception, match="Extra inputs"):
        EvalConfig(bogus=1)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="batch_size\n  Input should be greater than or equal to 1"):
        EvalConfig(batch_size=0)


def _engine_batches(lm, reqs, **kw):
    from qtalign.engine.forward import Engine, encode_prompts
    from qtalign.scoring.scorer import Scorer
    from qtalign.tokenids import pad_id

    enc = encode_prompts(lm.tokenizer, Scorer(lm.model, lm.tokenizer).prompts(reqs))
    return enc, Engine(lm.model, pad_id=pad_id(lm.tokenizer), **kw).order(enc)


def _requests(langs=("en", "zh", "de"), variants=("native", "enout"), n=9):
    from qtalign.eval.run import build_requests
    from qtalign.tasks.items import DataSource, select_items
    from qtalign.tasks.specs import load_specs

    task = load_specs().task("emotion")
    src = DataSource.from_options(None, "demo", "test")
    return [r for lang in langs for v in variants
            for r in build_requests(task, lang, v, select_items(task, lang, src, None, n, set()), "first-token")]


def test_batch_tokens_pack_each_group_within_its_budget(tiny_loaded):
    reqs = _requests()
    for budget in (1, 150, 400, 2000):
        enc, batches = _engine_batches(tiny_loaded, reqs, batch_size=5, batch_tokens=budget)
        assert sorted(e.key for b in batches for e in b) == sorted(e.key for e in enc)
        for i, b in enumerate(batches):
            width = len(b[0].ids)  # prefix + the longest suffix: the batch's first prompt
            assert all(e.group == b[0].group for e in b) and all(len(e.ids) <= width for e in b)
            assert len(b) == 1 or len(b) * width <= budget  # within the budget, or one prompt alone
            nxt = batches[i + 1] if i + 1 < len(batches) else None
            if nxt is not None and nxt[0].group == b[0].group:  # packed greedily: the next prompt did not fit
                assert (len(b) + 1) * width > budget
    sizes = {len(b) for b in _engine_batches(tiny_loaded, reqs, batch_tokens=400)[1]}
    assert len(sizes) > 1 and max(sizes) > 1  # counts follow the lengths, not a fixed number
    # without batch_tokens, batches are batch_size prompts as always
    assert {len(b) for b in _engine_batches(tiny_loaded, reqs, batch_size=4)[1]} <= {1, 2, 3, 4}


@pytest.mark.parametrize("method", ["first-token", "sequence"])
def test_scores_do_not_depend_on_batch_size_or_batch_tokens(tiny_loaded, method):
    import copy

    import numpy as np

    from qtalign.scoring.scorer import Scorer

    reqs = _requests()
    runs = [dict(batch_size=1), dict(batch_size=4), dict(batch_size=64), dict(batch_tokens=1), dict(batch_tokens=300),
            dict(batch_tokens=100_000)]
    out = []
    for kw in runs:
        scorer = Scorer(tiny_loaded.model, tiny_loaded.tokenizer, method, kw.get("batch_size", 8),
                        batch_tokens=kw.get("batch_tokens"))
        out.append({s.key: s for s in scorer.score(copy.deepcopy(reqs))})
    ref = out[0]
    for kw, got in zip(runs[1:], out[1:]):
        assert got.keys() == ref.keys(), kw
        for k in ref:
            assert got[k].pred == ref[k].pred, (kw, k)
            np.testing.assert_allclose(got[k].raw, ref[k].raw, rtol=1e-5, atol=1e-6, err_msg=str(kw))


def test_batch_tokens_through_evaluate_keep_the_fingerprint_and_the_records(tmp_path, tiny_llama_dir, tiny_loaded):
    a = evaluate(_cfg(tiny_llama_dir, store=False), tmp_path / "a", loaded=tiny_loaded, progress=False)
    b = evaluate(_cfg(tiny_llama_dir, store=False, batch_tokens=500), tmp_path / "b", loaded=tiny_loaded, progress=False)
    assert a["fingerprint"] == b["fingerprint"]  # how the work is split is not a result setting
    for x, y in zip(_preds(tmp_path / "a"), _preds(tmp_path / "b")):
        assert x["key"] == y["key"] and x["pred"] == y["pred"] and x["cal_pred"] == y["cal_pred"]
        assert max(abs(x["scores"][c] - y["scores"][c]) for c in x["scores"]) < 1e-5
    with pytest.raises(Exception, match="batch_tokens packs the native engine"):
        EvalConfig(backend="vllm", server_url="http://127.0.0.1:8000", batch_tokens=4096)
    p = _cli(["eval", "--model", str(tiny_llama_dir), "--batch-tokens", "0", "--out", str(tmp_path / "c")])
    assert p.returncode == 2 and "batch_tokens" in p.stderr and not (tmp_path / "c").exists()


def _cli(args, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "qtalign", *args], capture_output=True, text=True, env=env, timeout=600, **kw)


def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path, tiny_llama_dir):
    bad = tmp_path / "emotion" / "en.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"input": "ok", "answer": "positive"}\n{"answer": "negative"}\n')
    p = _cli(["eval", "--model", str(tiny_llama_dir), "--dtype", "fp32", "--tasks", "emotion", "--langs", "en",
              "--data-dir", str(tmp_path), "--data-files", "{task}/{lang}.jsonl", "--out", str(tmp_path / "o")])
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("qtalign")]
    assert err == [f"qtalign eval: error: {bad}: record 1: field 'input': missing"]
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.slow
def test_two_processes_give_the_same_results(tmp_path, tiny_llama_dir):
    """Data-parallel evaluation with accelerate on 2 CPU processes equals the single-process run."""
    common = ["--model", str(tiny_llama_dir), "--dtype", "fp32", "--tasks", "emotion", "--langs", "en,de",
              "--variants", "enout", "--data-files", "demo", "--limit", "10"]
    one = _cli(["eval", *common, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    # the race CI hit, made certain: the main process holds its marker's temporary file for 3 s before the marker is
    # in place; the other process, 1.5 s late, read the folder meanwhile and took it for someone else's
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, time\n"
        "from pathlib import Path\n"
        "if os.environ.get('RANK') == '0':\n"
        "    from qtalign import io\n"
        "    _write = io.write_bytes\n"
        "    def write_bytes(path, data):\n"
        "        p = Path(path)\n"
        "        if p.name == '.qtalign.json' and not p.exists():\n"
        "            p.parent.mkdir(parents=True, exist_ok=True)\n"
        "            io._tmp_name(p).write_bytes(data)\n"
        "            time.sleep(3)\n"
        "        return _write(path, data)\n"
        "    io.write_bytes = write_bytes\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from qtalign import io\n"
        "    _check = io.OutputDir.check\n"
        "    def check(self, *a, **k):\n"
        "        time.sleep(1.5)\n"
        "        return _check(self, *a, **k)\n"
        "    io.OutputDir.check = check\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qtalign", "eval", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _preds(tmp_path / "one"), _preds(tmp_path / "two")
    assert [r["key"] for r in a] == [r["key"] for r in b] and len(a) == 20
    for x, y in zip(a, b):
        assert x["pred"] == y["pred"] and max(abs(x["scores"][c] - y["scores"][c]) for c in x["scores"]) < 1e-5
    res = json.loads((tmp_path / "two" / "results.json").read_text())
    assert res["processes"] == 2


# -- the shared result store and fingerprints that cover data and model -----------------------------------------


def _copy_demo(dst):
    import shutil

    from qtalign.tasks.items import demo_data_dir

    shutil.copytree(demo_data_dir(), dst)
    return dst


def _no_model():
    raise AssertionError("every record should have come from the store: the model must not be loaded")


def test_store_serves_later_runs_without_loading_the_model(tmp_path, tiny_llama_dir, tiny_loaded):
    ref = evaluate(_cfg(tiny_llama_dir), tmp_path / "a", loaded=tiny_loaded, progress=False)
    n = sum(m["n"] for t in ref["metrics"].values() for v in t.values() for m in v["langs"].values())
    assert ref["timing"]["items_from_store"] == 0 and ref["timing"]["items_scored_this_run"] == n
    res = evaluate(_cfg(tiny_llama_dir, batch_size=2), tmp_path / "b", loaded=_no_model, progress=False)
    assert res["timing"]["items_from_store"] == n and res["timing"]["items_scored_this_run"] == 0
    assert _preds(tmp_path / "b") == _preds(tmp_path / "a")
    assert json.dumps(res["metrics"]) == json.dumps(ref["metrics"])  # (NaN averages compare as text)
    assert res["model"]["loaded"] is False and res["model"]["identity"] == ref["model"]["identity"]
    # a subset of the same items is served from the same store entries
    sub = evaluate(_cfg(tiny_llama_dir, limit=5, langs=["zh"]), tmp_path / "c", loaded=_no_model, progress=False)
    assert sub["timing"]["items_from_store"] == 10
    assert _preds(tmp_path / "c") == [r for r in _preds(tmp_path / "a") if r["lang"] == "zh" and r["index"] < 5]


def test_store_is_not_used_when_data_model_or_numerics_change(tmp_path, tiny_llama_dir, tiny_loaded, monkeypatch):
    data = _copy_demo(tmp_path / "data")
    cfg = _cfg(tiny_llama_dir, data_files=None, data_dir=str(data / "emotion"), variants=["enout"], langs=["en", "zh"])
    cfg = cfg.model_copy(update={"data_files": "{lang}.jsonl"})
    evaluate(cfg, tmp_path / "a", loaded=tiny_loaded, progress=False)
    # same file names, one zh review changed: zh is recomputed, en still comes from the store
    p = data / "emotion" / "zh.jsonl"
    lines = p.read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[0])
    rec["input"] = rec["input"] + "！"
    p.write_text("\n".join([json.dumps(rec, ensure_ascii=False), *lines[1:]]) + "\n", encoding="utf-8")
    res = evaluate(cfg, tmp_path / "b", loaded=tiny_loaded, progress=False)
    assert res["timing"]["items_from_store"] == 12 and res["timing"]["items_scored_this_run"] == 12
    # another model (an fp32 vs bf16 load is another identity), another engine numerics version: nothing reused
    res = evaluate(cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bf16"})}), tmp_path / "c",
                   loaded=None, progress=False)
    assert res["timing"]["items_from_store"] == 0
    import qtalign.engine.forward as ev

    monkeypatch.setattr(ev, "NUMERICS_VERSION", "test-next")
    res = evaluate(cfg, tmp_path / "d", loaded=tiny_loaded, progress=False)
    assert res["timing"]["items_from_store"] == 0 and res["covers"]["numerics"] == "test-next"


def test_changed_gold_in_the_same_out_is_refused_then_recomputed(tmp_path, tiny_llama_dir, tiny_loaded):
    """Before fingerprints covered the data, this rerun exited 0 showing the old gold and predictions."""
    data = _copy_demo(tmp_path / "data")
    cfg = _cfg(tiny_llama_dir, data_files=str(data / "{task}" / "{lang}.jsonl"), langs=["en"], variants=["enout"], limit=6)
    out = tmp_path / "run"
    evaluate(cfg, out, loaded=tiny_loaded, progress=False)
    before = _preds(out)
    p = data / "emotion" / "en.jsonl"
    recs = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()]
    flip = {"positive": "negative", "negative": "positive"}
    for r in recs:
        r["answer"] = flip[r["answer"]]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    with pytest.raises(QtalignError, match="different config, data or model"):
        evaluate(cfg, out, loaded=tiny_loaded, progress=False)
    assert _preds(out) == before  # refused: nothing touched
    evaluate(cfg, out, loaded=tiny_loaded, overwrite=True, progress=False)
    after = _preds(out)
    assert [a["gold"] for a in after] == [flip[b["gold"]] for b in before]
    assert [a["pred"] for a in after] == [b["pred"] for b in before]  # the prompts did not change, only the gold


def test_store_import_verifies_a_published_evaluation_then_serves_it(tmp_path, tiny_llama_dir, tiny_loaded, monkeypatch):
    """`qtalign store import`: an exported evaluation (predictions gzipped, data moved to another path) seeds the store
    so that a later run loads no model; changed data, changed numerics or a foreign record are refused, adding nothing."""
    import gzip
    import shutil

    from qtalign.cli import main
    from qtalign.eval.run import import_evaluation
    from qtalign.eval.store import Store

    data = _copy_demo(tmp_path / "data")
    cfg = _cfg(tiny_llama_dir, data_files=None, data_dir=str(data / "emotion"), variants=["enout"], langs=["en", "zh"],
               store=False).model_copy(update={"data_files": "{lang}.jsonl"})
    ref = evaluate(cfg, tmp_path / "a", loaded=tiny_loaded, progress=False)
    pub = tmp_path / "published"
    shutil.copytree(tmp_path / "a", pub)
    with open(pub / "predictions.jsonl", "rb") as f, gzip.open(pub / "predictions.jsonl.gz", "wb") as g:
        g.write(f.read())
    (pub / "predictions.jsonl").unlink()
    moved = tmp_path / "elsewhere"
    shutil.move(str(data), moved)
    store = Store()
    assert not any(store.root.rglob("records.jsonl"))

    # another engine numerics version: refused, nothing added
    import qtalign.engine.forward as ev

    with monkeypatch.context() as m:
        m.setattr(ev, "NUMERICS_VERSION", "test-next")
        with pytest.raises(QtalignError, match="engine numerics"):
            import_evaluation(pub, data_dir=str(moved / "emotion"))
    # one zh review changed here: refused, naming the file group
    p = moved / "emotion" / "zh.jsonl"
    original = p.read_text(encoding="utf-8")
    p.write_text(original.replace("。", "！", 1), encoding="utf-8")
    with pytest.raises(QtalignError, match=r"data files differ here \(emotion/zh\)"):
        import_evaluation(pub, data_dir=str(moved / "emotion"))
    p.write_text(original, encoding="utf-8")
    assert not any(store.root.rglob("records.jsonl"))

    # through the command line (exit 0), then a run at the new path loads no model and equals the original
    assert main(["store", "import", str(pub), "--data-dir", str(moved / "emotion")]) == 0
    here = cfg.model_copy(update={"data_dir": str(moved / "emotion"), "store": True, "batch_size": 3})
    res = evaluate(here, tmp_path / "b", loaded=_no_model, progress=False)
    assert res["timing"]["items_from_store"] == 24 and res["timing"]["items_scored_this_run"] == 0
    assert _preds(tmp_path / "b") == _preds(tmp_path / "a")
    assert json.dumps(res["metrics"]) == json.dumps(ref["metrics"])
    assert import_evaluation(pub, data_dir=str(moved / "emotion"))["added"] == 0  # idempotent

    # a record that is not an item of the plan: one error naming the file and the record
    lines = gzip.open(pub / "predictions.jsonl.gz", "rt", encoding="utf-8").read().splitlines()
    bad = json.loads(lines[3])
    bad["key"] = "emotion/enout/en/999"
    with gzip.open(pub / "predictions.jsonl.gz", "wt", encoding="utf-8") as g:
        g.write("\n".join([*lines[:3], json.dumps(bad), *lines[4:]]) + "\n")
    with pytest.raises(QtalignError, match=r"predictions.jsonl: record 4: key 'emotion/enout/en/999'"):
        import_evaluation(pub, data_dir=str(moved / "emotion"))
    # an unfinished evaluation is not imported
    (pub / "results.json").unlink()
    assert main(["store", "import", str(pub)]) == 2
