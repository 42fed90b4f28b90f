"""Results in other tools' layouts, read back with those tools' own code: lm-evaluation-harness's results table
formatter and file-name helpers, and Hugging Face datasets' parquet loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtalign.cli import main
from qtalign.engine.models import ModelConfig, load_model
from qtalign.eval.config import EvalConfig
from qtalign.eval.run import evaluate


@pytest.fixture(scope="module")
def eval_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interop") / "eval"
    cfg = EvalConfig(model=ModelConfig(name=str(tiny_llama_dir), dtype="fp32"), tasks=["emotion"], langs=["en", "de"],
                     variants=["enout", "native"], data_files="demo", limit=6, batch_size=4)
    evaluate(cfg, out, loaded=load_model(cfg.model), progress=False)
    return out


def _preds(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def test_lm_eval_reads_the_results_layout(eval_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.utils import get_file_task_name, get_results_filenames, get_sample_results_filenames, make_table

    files = [str(p) for p in (eval_dir / "lm_eval").rglob("*") if p.is_file()]
    res_files = get_results_filenames(files)
    assert len(res_files) == 1
    res = json.loads(Path(res_files[0]).read_text(encoding="utf-8"))
    table = make_table(res)
    names = {f"emotion_{lang}_{v}" for lang in ("en", "de") for v in ("enout", "native")}
    assert set(res["results"]) == names
    preds = _preds(eval_dir)
    for name in names:
        t, lang, v = name.split("_")
        rs = [r for r in preds if r["lang"] == lang and r["variant"] == v]
        acc = sum(r["correct"] for r in rs) / len(rs)
        assert res["results"][name]["acc,none"] == pytest.approx(acc)
        assert res["n-samples"][name]["effective"] == len(rs) and res["n-shot"][name] == 2
        row = next(line for line in table.splitlines() if line.split("|")[1].strip().removeprefix("- ") == name)
        assert f"{acc:.4f}" in row
    assert make_table(res, column="groups")  # the macro averages as groups
    samples = get_sample_results_filenames(files)
    assert {get_file_task_name(Path(f).name) for f in samples} == names
    for f in samples:
        name = get_file_task_name(Path(f).name)
        recs = [json.loads(x) for x in Path(f).read_text(encoding="utf-8").splitlines()]
        t, lang, v = name.split("_")
        ours = {r["index"]: r for r in preds if r["lang"] == lang and r["variant"] == v}
        assert {s["doc_id"] for s in recs} == set(ours)
        for s in recs:
            assert s["acc"] == float(ours[s["doc_id"]]["correct"]) and s["doc"]["input"]
            assert s["arguments"][0][0].endswith('"') and len(s["arguments"]) == 2


def test_export_is_a_datasets_parquet_dataset(eval_dir, tmp_path, capsys):
    import datasets

    assert main(["export", str(eval_dir), "--out", str(tmp_path / "x")]) == 0
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "x" / "eval.parquet"), split="train")
    preds = _preds(eval_dir)
    assert ds.num_rows == len(preds)
    for row, r in zip(ds, preds):
        assert row["key"] == r["key"] and row["pred"] == r["pred"] and row["correct"] == r["correct"]
        assert row["classes"] == list(r["scores"]) and row["scores"] == pytest.approx([r["scores"][c] for c in row["classes"]])
        assert row["cal_scores"] == pytest.approx([r["cal_scores"][c] for c in row["classes"]])
    # a folder of someone else's is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    assert main(["export", str(eval_dir), "--out", str(foreign)]) == 2
    assert (foreign / "mine.txt").read_text() == "x" and not (foreign / "eval.parquet").exists()


def _lm_eval_write(eval_dir: Path, out: Path, finished: float) -> Path:
    from qtalign.eval.interop import write_lm_eval

    results = {**json.loads((eval_dir / "results.json").read_text(encoding="utf-8")), "finished": finished}
    return write_lm_eval(out, results, _preds(eval_dir), {"emotion": 2}, {}, {})


def test_lm_eval_folder_replaces_only_its_own_files(eval_dir, tmp_path):
    from qtalign.io import LOCK, MARKER

    folder = _lm_eval_write(eval_dir, tmp_path, 1.7e9)
    first = sorted(p.name for p in folder.iterdir() if p.name not in (MARKER, LOCK))
    assert len(first) == 5 and sum(n.startswith("results_") for n in first) == 1
    (folder / "notes.txt").write_text("mine")
    _lm_eval_write(eval_dir, tmp_path, 1.8e9)  # another date: other file names
    second = sorted(p.name for p in folder.iterdir() if p.name not in (MARKER, LOCK, "notes.txt"))
    assert len(second) == 5 and not set(first) & set(second)  # the earlier files are gone, not left beside
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(json.loads((folder / MARKER).read_text())["entries"]) == second


def test_a_foreign_lm_eval_folder_is_refused_before_scoring(tiny_llama_dir, tmp_path):
    import shutil

    from qtalign.errors import QtalignError

    model = ModelConfig(name=str(tiny_llama_dir), dtype="fp32")
    cfg = EvalConfig(model=model, tasks=["emotion"], langs=["en"], variants=["enout"], data_files="demo", limit=2)
    out = tmp_path / "eval"
    evaluate(cfg, out, loaded=load_model(model), progress=False)
    folder = out / "lm_eval" / str(tiny_llama_dir).replace("/", "__")
    shutil.rmtree(folder)  # the user puts a folder of their own in its place
    folder.mkdir()
    (folder / "mine.txt").write_text("x")
    before = (out / "predictions.jsonl").read_bytes()

    def no_model():
        raise AssertionError("the model must not be loaded")

    with pytest.raises(QtalignError, match="lm_eval folder.*not written by qtalign"):
        evaluate(cfg, out, loaded=no_model, overwrite=True, progress=False)
    assert (folder / "mine.txt").read_text() == "x" and (out / "predictions.jsonl").read_bytes() == before
