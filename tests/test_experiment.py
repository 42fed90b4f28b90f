"""`qtalign run` (qtalign.experiment): config validation and round trips, bundled configs, overrides and extends,
train/eval overlap detection, and a whole run on a tiny random Llama with the demo data: stage skipping,
re-running what a change invalidates, resuming an interrupted stage, --stages subsets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import OFFICIAL, needs_shared
from qtalign.cli import main
from qtalign.errors import QtalignError
from qtalign.experiment.config import ExperimentConfig, apply_overrides, dump_config, list_configs, load_experiment, stage_config
from qtalign.experiment.runner import Experiment


def tiny_dict(model_dir, out) -> dict:
    return {
        "name": "tiny",
        "out": str(out),
        "seed": 0,
        "model": {"name": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "data": {"task": "emotion", "data_files": "demo", "sources": ["zh", "de"], "target": "en", "items": "60:120", "rows_per_lang": 6},
        "train": {"max_steps": 2, "batch_size": 4, "per_device_batch_size": 4, "learning_rate": 5e-3, "val_size": 0,
                  "cutoff_len": 128},
        "eval": {"tasks": ["emotion"], "data_files": "demo", "langs": ["en", "zh", "sw"], "items": "0:6", "batch_size": 4},
        "lens": {"tasks": ["emotion"], "data_files": "demo", "langs": ["en", "zh"], "limit": 3},
        "geometry": {"tasks": ["emotion"], "data_files": "demo", "langs": ["en", "zh", "de"], "limit": 4, "pools": ["last"]},
    }


def write_cfg(tmp_path: Path, d: dict, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------------------------------
# config validation


def test_bundled_configs_validate_and_round_trip():
    names = list_configs()
    assert "demo" in names and "paper/zhde_en" in names and "studies/emotion_zhde_en_gemma" in names
    for n in names:
        cfg = load_experiment([n], extra={"data_dir": "/data/official"})
        again = ExperimentConfig.model_validate(yaml.safe_load(dump_config(cfg)))
        assert again == cfg, n
        assert ExperimentConfig.model_validate_json(cfg.model_dump_json()) == cfg
        assert "{data_dir}" not in dump_config(cfg)


def test_default_config_is_the_demo(tmp_path):
    cfg = load_experiment(None)
    assert cfg.name == "demo" and cfg.model.name == "gemma-3-270m"
    assert cfg.stages == ["data", "train", "eval", "lens", "geometry", "report"]
    assert cfg.data.data_files == "demo" and cfg.eval.data_files == "demo"


def test_paper_configs_settings():
    cfg = load_experiment(["paper/zhde_en"], extra={"data_dir": "/d/official"})
    assert cfg.data.question_files == ["/d/official/snli/snli_zh10k_train_question.json", "/d/official/snli/snli_de10k_train_question.json"]
    assert cfg.prompts == ["/d/official/../paper_prompts.json"]
    assert cfg.eval.variants == ["enout", "native", "irrelevant"] and cfg.eval.tasks == ["emotion", "snli", "paws"]
    assert cfg.train.learning_rate == 5e-5 and cfg.train.epochs == 3
    # a model fragment merged after the experiment
    cfg2 = load_experiment(["paper/zhde_en", "paper/model/mistral-7b"], extra={"data_dir": "/d"})
    assert cfg2.model.name == "mistralai/Mistral-7B-v0.1" and cfg2.data.question_files == [
        "/d/snli/snli_zh10k_train_question.json", "/d/snli/snli_de10k_train_question.json"]
    assert load_experiment(["paper/en2zh"], extra={"data_dir": "/d"}).data.target == "zh"


@pytest.mark.parametrize("override, key", [
    ("train.epoch=1", "train.epoch"),            # unknown key in a section
    ("bogus=1", "bogus"),                        # unknown top-level key
    ("train.lora_r=0", "train.lora_r"),          # bad value
    ("eval.method=argmax", "eval.method"),       # not a choice
    ("stages=data,tune", "stages"),              # unknown stage
    ("eval.model.name=x", "eval.model"),         # the model is set once, at the top level
    ("train.data=x.jsonl", "train.data"),        # the experiment trains on its own data stage
])
def test_validation_errors_name_file_and_key(tmp_path, override, key):
    p = write_cfg(tmp_path, tiny_dict("m", tmp_path / "run"))
    with pytest.raises(QtalignError) as e:
        load_experiment([str(p)], [override])
    msg = str(e.value)
    assert str(p) in msg and f"'{key}" in msg and "\n" not in msg


def test_unknown_key_in_file_and_missing_data_dir(tmp_path):
    d = tiny_dict("m", tmp_path / "run")
    d["eval"]["langz"] = ["en"]
    with pytest.raises(QtalignError, match=r"exp.yaml.*'eval.langz': unknown key"):
        load_experiment([str(write_cfg(tmp_path, d))])
    with pytest.raises(QtalignError, match="data_dir"):
        load_experiment(["paper/zhde_en"])  # uses {data_dir}, none given
    with pytest.raises(QtalignError, match="no such config"):
        load_experiment(["no/such/config"])
    with pytest.raises(QtalignError, match="needs stage 'data'"):
        load_experiment([str(write_cfg(tmp_path, tiny_dict("m", tmp_path)))], ["stages=train,eval"])


def test_overrides_and_extends(tmp_path):
    d = apply_overrides({"train": {"epochs": 3}}, ["train.epochs=1", "eval.langs=en,zh", "eval.limit=5", "report.title=a b"])
    assert d == {"train": {"epochs": 1}, "eval": {"langs": "en,zh", "limit": 5}, "report": {"title": "a b"}}
    with pytest.raises(QtalignError, match="not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
    parent = write_cfg(tmp_path, tiny_dict("m", tmp_path / "run"), "parent.yaml")
    child = write_cfg(tmp_path, {"extends": parent.name, "name": "child", "eval": {"langs": ["en"]}}, "child.yaml")
    cfg = load_experiment([str(child)], ["eval.limit=2"])
    assert cfg.name == "child" and cfg.eval.langs == ["en"] and cfg.eval.limit == 2
    assert cfg.eval.items == "0:6" and cfg.data.sources == ["zh", "de"]  # inherited, merged key by key
    loop = write_cfg(tmp_path, {"extends": "loop.yaml"}, "loop.yaml")
    with pytest.raises(QtalignError, match="circular"):
        load_experiment([str(loop)])


def test_stage_configs_get_top_level_fields(tmp_path):
    cfg = ExperimentConfig.model_validate({**tiny_dict("m", tmp_path), "seed": 7, "data_dir": "/dd", "prompts": ["p.json"]})
    e = Experiment(cfg)
    ec = stage_config(cfg, "eval", model=e.models.config("tuned").model_dump())
    assert ec.seed == 7 and ec.model.adapter == str(tmp_path / "train" / "adapter") and ec.prompts == ["p.json"]
    assert ec.data_dir == "/dd" and stage_config(cfg, "data").seed == 7 and stage_config(cfg, "train").model.name == "m"
    assert stage_config(cfg, "eval").model.adapter is None


# ------------------------------------------------------------------------------------------------------------------
# overlap


def overlap_of(cfg: ExperimentConfig) -> dict:
    """The train/eval overlap check the data stage's plan records (raises on a shared item)."""
    return next(u.plan for u in Experiment(cfg).units() if u.stage == "data").overlap


def test_overlap_detected_before_anything_runs(tmp_path):
    d = tiny_dict("not-a-model", tmp_path / "run")
    d["eval"]["items"] = "50:70"  # training items are 60..119
    cfg = ExperimentConfig.model_validate(d)
    with pytest.raises(QtalignError, match=r"train/eval overlap: task 'emotion': \d+ evaluation items"):
        Experiment(cfg).run()
    assert not (tmp_path / "run").exists()  # nothing was written, the model never loaded
    # exclusions resolve it; the record names the files and ranges
    d["eval"]["exclude_items"] = list(range(60, 70))
    ov = overlap_of(ExperimentConfig.model_validate(d))
    row = ov["tasks"][0]
    assert ov["overlap"] is False and row["n_shared"] == 0 and row["n_eval"] == 10 and "same item files" in row["note"]
    assert ov["seen_langs"] == ["en", "zh", "de"]
    # another task's evaluation items are a different data set
    d2 = tiny_dict("m", tmp_path)
    d2["data"] = {"task": "snli", "sources": ["de"], "data_files": str(tmp_path / "{task}_{lang}.jsonl")}
    for lang in ("de", "en"):
        (tmp_path / f"snli_{lang}.jsonl").write_text(
            "".join(json.dumps({"premise": f"p{i} {lang}", "hypothesis": f"h{i}"}) + "\n" for i in range(10)), encoding="utf-8")
    ov2 = overlap_of(ExperimentConfig.model_validate(d2))
    assert ov2["tasks"][0]["n_shared"] == 0 and "different data set" in ov2["tasks"][0]["note"]


@needs_shared
def test_overlap_official_question_files_recorded():
    cfg = load_experiment(["studies/snli_zhde_en_gemma"], ["data.rows_per_lang=5", "eval.tasks=snli", "eval.langs=en,de"],
                          extra={"data_dir": str(OFFICIAL)})
    ov = overlap_of(cfg)
    assert ov["n_train_rows"] == 10 and ov["seen_langs"] == ["en", "zh", "de"]
    assert "question files" in ov["tasks"][0]["note"] and ov["tasks"][0]["n_eval"] == 30


# ------------------------------------------------------------------------------------------------------------------
# a whole run on a tiny model


def _stage(run: Path, folder: str) -> dict:
    return json.loads((run / folder / "stage.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "run"
    cfg = ExperimentConfig.model_validate(tiny_dict(tiny_llama_dir, out))
    outcome = Experiment(cfg, log=lambda s: None).run()
    return cfg, out, outcome


def test_run_writes_every_stage(tiny_run):
    cfg, out, outcome = tiny_run
    assert outcome == {k: "ran" for k in ("data", "train", "eval/base", "eval/tuned", "lens", "geometry", "report")}
    for f in ("config.yaml", "experiment.json", "data/train.jsonl", "train/adapter/adapter_config.json", "eval/base/results.json",
              "eval/tuned/predictions.jsonl", "lens/summary.json", "geometry/summary.json", "report.md", "report.html", "stats.json"):
        assert (out / f).exists(), f
    from qtalign.experiment.runner import REPORT_OUTPUTS
    from qtalign.report.build import OUTPUTS

    assert REPORT_OUTPUTS == OUTPUTS  # the runner removes and guards what the report writes
    assert ExperimentConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text())) == cfg
    exp = json.loads((out / "experiment.json").read_text())
    assert exp["overlap"]["overlap"] is False and exp["seen_langs"] == ["en", "zh", "de"]
    assert exp["environment"]["torch"] and exp["config"]["seed"] == 0
    tuned = json.loads((out / "eval" / "tuned" / "results.json").read_text())
    assert tuned["model"]["adapter"] == str(out / "train" / "adapter") and tuned["model"]["merged"] is False
    assert json.loads((out / "eval" / "base" / "results.json").read_text())["model"]["adapter"] is None
    assert all(_stage(out, f)["status"] == "done" for f in ("data", "train", "eval/base", "eval/tuned", "lens", "geometry", "report"))
    # the tuned model differs from the base model (the adapter is applied)
    preds = [json.loads(x) for x in (out / "eval" / "base" / "predictions.jsonl").read_text().splitlines()]
    tpreds = [json.loads(x) for x in (out / "eval" / "tuned" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(tpreds) == 18 and [p["scores"] for p in preds] != [p["scores"] for p in tpreds]


def test_one_fingerprint_per_unit(tiny_run):
    """A unit's stage.json records the fingerprint its own outputs record: an evaluation's run.json and results.json
    (the tuned one's covers the trained adapter's content), an analysis's summary.json (which covers the data); the
    data stage's summary records the overlap check and the seen languages the run recorded."""
    cfg, out, _ = tiny_run
    for which in ("base", "tuned"):
        fp = _stage(out, f"eval/{which}")["fingerprint"]
        res = json.loads((out / "eval" / which / "results.json").read_text())
        assert fp == res["fingerprint"] == json.loads((out / "eval" / which / "run.json").read_text())["fingerprint"]
    assert _stage(out, "eval/base")["fingerprint"] != _stage(out, "eval/tuned")["fingerprint"]
    for name in ("lens", "geometry"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert _stage(out, name)["fingerprint"] == summary["fingerprint"]
        assert set(summary["covers"]["model"]) == {"base", "tuned"} and summary["covers"]["data_sha256"]
    exp = json.loads((out / "experiment.json").read_text())
    data = json.loads((out / "data" / "summary.json").read_text())
    assert data["overlap"] == exp["overlap"] and data["seen_langs"] == exp["seen_langs"] == ["en", "zh", "de"]


def test_a_run_builds_its_records_once_and_writes_each_record_file_once(fresh, monkeypatch):
    """The question records are built once per run (the overlap check and the data stage share them); a run that
    skips everything writes experiment.json twice and each stage.json once; a rerun of the data stage builds once."""
    import qtalign.experiment.runner as runner
    import qtalign.qtdata.build as build

    cfg, out = fresh
    builds, writes = [], []
    real_build, real_write = build.build_records, runner.write_json
    monkeypatch.setattr(build, "build_records", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    monkeypatch.setattr(runner, "write_json", lambda p, d: writes.append(Path(p).relative_to(out).as_posix()) or real_write(p, d))
    assert set(Experiment(cfg, log=lambda s: None).run().values()) == {"skipped"}
    assert len(builds) == 1 and writes.count("experiment.json") == 2
    stage_files = [w for w in writes if w.endswith("stage.json")]
    assert sorted(stage_files) == sorted(set(stage_files)) and len(stage_files) == 7
    builds.clear()
    assert Experiment(cfg, log=lambda s: None).run(["data"], force=["data"]) == {"data": "ran"}
    assert len(builds) == 1 and (out / "data" / "train.jsonl").is_file()


@pytest.fixture
def fresh(tiny_run, tmp_path):
    """A copy of the finished tiny run in a new place (each test starts from the same finished state)."""
    cfg, out, _ = tiny_run
    new = tmp_path / "run"
    shutil.copytree(out, new)
    return cfg.model_copy(update={"out": str(new)}), new


def test_rerun_skips_and_changes_rerun_only_what_they_invalidate(fresh):
    cfg, out = fresh
    log: list[str] = []
    assert set(Experiment(cfg, log=log.append).run().values()) == {"skipped"}
    assert all("skipped" in line for line in log)
    # a batch size does not change results: still skipped
    cfg_bs = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"batch_size": 2})})
    assert set(Experiment(cfg_bs, log=lambda s: None).run().values()) == {"skipped"}
    # an evaluation change reruns both evaluations and the report, nothing else
    cfg2 = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"items": "0:4"})})
    outcome = Experiment(cfg2, log=lambda s: None).run()
    assert outcome == {"data": "skipped", "train": "skipped", "eval/base": "ran", "eval/tuned": "ran", "lens": "skipped",
                       "geometry": "skipped", "report": "ran"}
    assert len((out / "eval" / "base" / "predictions.jsonl").read_text().splitlines()) == 12
    # a training change reruns training and everything that uses the tuned model
    cfg3 = cfg2.model_copy(update={"train": cfg2.train.model_copy(update={"learning_rate": 1e-3})})
    outcome = Experiment(cfg3, log=lambda s: None).run()
    assert outcome == {"data": "skipped", "train": "ran", "eval/base": "skipped", "eval/tuned": "ran", "lens": "ran",
                       "geometry": "ran", "report": "ran"}
    # --force reruns a stage that is up to date
    assert Experiment(cfg3, log=lambda s: None).run(force=["data"])["data"] == "ran"


def test_interrupted_stage_resumes(fresh, monkeypatch):
    cfg, out = fresh  # a moved run dir: nothing reruns (the paths are not part of the fingerprints)
    assert set(Experiment(cfg, log=lambda s: None).run().values()) == {"skipped"}
    # simulate a kill in the middle of the tuned evaluation: results missing, predictions cut, status running
    tdir = out / "eval" / "tuned"
    (tdir / "results.json").unlink()
    lines = (tdir / "predictions.jsonl").read_text().splitlines()
    (tdir / "predictions.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:20])  # + a line cut mid-write
    sj = _stage(out, "eval/tuned")
    (tdir / "stage.json").write_text(json.dumps({**sj, "status": "running"}))
    outcome = Experiment(cfg, log=lambda s: None).run()
    assert outcome["eval/tuned"] == "ran" and outcome["eval/base"] == "skipped" and outcome["train"] == "skipped"
    res = json.loads((tdir / "results.json").read_text())
    assert res["timing"]["items_scored_this_run"] == 18 - 6  # resumed, not restarted
    assert len((tdir / "predictions.jsonl").read_text().splitlines()) == 18
    # a stage that raises is left 'running' and is resumed by the next run
    import qtalign.analysis.lens

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qtalign.analysis.lens, "run_lens", boom)
    with pytest.raises(KeyboardInterrupt):
        Experiment(cfg, log=lambda s: None).run(force=["lens"])
    assert _stage(out, "lens")["status"] == "running"
    monkeypatch.undo()
    outcome = Experiment(cfg, log=lambda s: None).run()
    assert outcome["lens"] == "ran" and outcome["geometry"] == "skipped" and _stage(out, "lens")["status"] == "done"


def test_stage_subsets(fresh):
    cfg, out = fresh
    assert Experiment(cfg, log=lambda s: None).run(["report"]) == {"report": "skipped"}
    # a subset whose input is out of date is refused, naming what to run
    cfg2 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 1})})
    with pytest.raises(QtalignError, match=r"stage 'train' is needed by eval/tuned.*--stages train"):
        Experiment(cfg2, log=lambda s: None).run(["eval"])
    with pytest.raises(QtalignError, match="unknown stage"):
        Experiment(cfg2, log=lambda s: None).run(["tune"])
    # a report over outputs that this config did not produce says so
    assert Experiment(cfg2, log=lambda s: None).run(["report"]) == {"report": "ran"}
    md = (out / "report.md").read_text()
    assert "**Warning:** the outputs of train, eval/tuned, lens, geometry" in md
    assert Experiment(cfg, log=lambda s: None).run(["report"]) == {"report": "ran"}
    assert "Warning" not in (out / "report.md").read_text()
    # an experiment without training evaluates the base model only
    cfg3 = cfg.model_copy(update={"stages": ["eval", "report"], "out": str(out.parent / "base_only")})
    assert Experiment(cfg3, log=lambda s: None).run() == {"eval/base": "ran", "report": "ran"}
    assert not (out.parent / "base_only" / "eval" / "tuned").exists()


def test_cli_run_print_config_and_export(fresh, tmp_path, capsys):
    cfg, out = fresh
    p = write_cfg(tmp_path, cfg.model_dump(mode="json"))
    assert main(["run", str(p), "eval.limit=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["eval"]["limit"] == 3 and printed["model"]["name"] == cfg.model.name
    assert main(["run", str(p), "--stages", "report", "--export", str(tmp_path / "exported")]) == 0
    exported = tmp_path / "exported"
    assert (exported / "report.html").exists() and (exported / "eval" / "base" / "results.json").exists()
    assert not (exported / "train" / "adapter").exists() and not (exported / "train" / "checkpoints").exists()
    # the exported tuned evaluation records its adapter's content hash: it verifies against the run's adapter
    from qtalign.eval.run import import_evaluation

    tuned = import_evaluation(exported / "eval" / "tuned", adapter=str(out / "train" / "adapter"))
    assert tuned["records"] > 0 and tuned["added"] in (0, tuned["records"])  # (0: the run's own evaluation stored them)
    assert import_evaluation(exported / "eval" / "tuned", adapter=str(out / "train" / "adapter"))["added"] == 0
    with pytest.raises(QtalignError, match="adapter"):
        import_evaluation(exported / "eval" / "tuned", adapter=str(exported / "train" / "missing"))
    other = tmp_path / "other_adapter"  # the same files with one weight byte changed: another model, refused
    __import__("shutil").copytree(out / "train" / "adapter", other)
    w = other / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
    with pytest.raises(QtalignError, match="another store key \\(model"):
        import_evaluation(exported / "eval" / "tuned", adapter=str(other))
    # the export carries the small adapter with a manifest: the run's identity, so the published tuned evaluation
    # verifies against it; a changed or cut byte is refused whenever it is loaded
    from qtalign.engine.models import adapter_sha256, check_adapter_dir

    assert sorted(p.name for p in (exported / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "qtalign_adapter.json"]
    assert adapter_sha256(exported / "adapter") == adapter_sha256(out / "train" / "adapter")
    assert import_evaluation(exported / "eval" / "tuned", adapter=str(exported / "adapter"))["records"] > 0
    cut = tmp_path / "cut_adapter"
    __import__("shutil").copytree(exported / "adapter", cut)
    w = cut / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))  # a readable file, one weight bit changed
    with pytest.raises(QtalignError, match="manifest"):
        check_adapter_dir(cut)
    w.write_bytes(w.read_bytes()[:-8])  # a cut file is refused too (it is not a readable safetensors file)
    with pytest.raises(QtalignError, match="adapter"):
        check_adapter_dir(cut)
    lm_eval = sorted(p.name.split("_")[0] for p in (out / "eval" / "base" / "lm_eval").rglob("*.json*"))
    assert "results" in lm_eval and "samples" in lm_eval  # the run has both; the export only the results
    assert sorted(p.name.split("_")[0] for p in (exported / "eval" / "base" / "lm_eval").rglob("*.json*")) == ["results"]
    for link in __import__("re").findall(r"!\[[^\]]*\]\(([^)]+)\)", (exported / "report.md").read_text()):
        assert (exported / link).exists(), link
    # the run's report.html embeds its figures; the export's links the copies it carries (not the same bytes twice)
    srcs = __import__("re").findall(r'<img src="([^"]+)"', (exported / "report.html").read_text())
    assert srcs and all((exported / src).is_file() for src in srcs)
    assert "data:image" in (out / "report.html").read_text() and "data:image" not in (exported / "report.html").read_text()
    # the report again from the run's artifacts, exported without rerunning anything; the export alone rebuilds it
    assert main(["report", str(out), "--export", str(tmp_path / "again")]) == 0
    again = tmp_path / "again"
    assert (again / "eval" / "base" / "predictions.jsonl.gz").is_file()
    first = (again / "report.md").read_text()
    assert main(["report", str(again)]) == 0
    assert (again / "report.md").read_text() == first
    assert main(["run", str(p), "train.lora_r=0"]) == 2
    assert "train.lora_r" in capsys.readouterr().err
    assert main(["run", "--list"]) == 0 and "paper/zhde_en" in capsys.readouterr().out


def test_arms_and_seeds_expand_into_runs_of_their_own(tmp_path):
    from qtalign.experiment.config import expand

    d = tiny_dict("m", tmp_path / "exp")
    cfg = ExperimentConfig.model_validate(d)
    assert expand(cfg) == [("tiny", cfg)]  # neither: the experiment itself
    cfg = ExperimentConfig.model_validate({**d, "seeds": "1,2", "arms": {"qt": {}, "copy": {"data.control": "copy"}}})
    runs = expand(cfg)
    assert [label for label, _ in runs] == ["qt/seed1", "qt/seed2", "copy/seed1", "copy/seed2"]
    for label, sub in runs:
        assert sub.run_dir == tmp_path / "exp" / label and sub.seed == int(label[-1]) and not sub.seeds and not sub.arms
        assert sub.data.control == ("copy" if label.startswith("copy") else "none")
        assert sub.model_dump(exclude={"out", "name", "seed", "data"}) == cfg.model_dump(exclude={"out", "name", "seed", "data", "arms", "seeds"}) | {"arms": {}, "seeds": []}
    assert [label for label, _ in expand(cfg.model_copy(update={"seeds": []}))] == ["qt", "copy"]
    with pytest.raises(QtalignError, match="arm 'bad'.*data.control"):
        expand(ExperimentConfig.model_validate({**d, "arms": {"bad": {"data.control": "mirror"}}}))
    for bad in ({"a/b": {}}, {"compare": {}}, {"x": {"seeds": [1]}}):
        with pytest.raises(Exception, match="arm"):
            ExperimentConfig.model_validate({**d, "arms": bad})


def test_seeds_run_as_resumable_runs_sharing_the_base_evaluation(tiny_llama_dir, tmp_path, capsys):
    from qtalign.experiment.runner import run_experiments

    d = tiny_dict(tiny_llama_dir, tmp_path / "exp")
    d.update(stages=["data", "train", "eval"], seeds=[3, 4])
    d["eval"].update(langs=["en", "zh"], items="0:4")
    cfg = ExperimentConfig.model_validate(d)
    dirs = run_experiments(cfg, log=lambda s: None)
    assert dirs == [tmp_path / "exp" / "seed3", tmp_path / "exp" / "seed4"]
    base = [json.loads((p / "eval" / "base" / "results.json").read_text()) for p in dirs]
    assert base[1]["timing"]["items_from_store"] == 8  # the second seed's base evaluation: all from the store
    assert [json.loads((p / "experiment.json").read_text())["config"]["seed"] for p in dirs] == [3, 4]
    adapters = [(p / "train" / "adapter" / "adapter_model.safetensors").read_bytes() for p in dirs]
    assert adapters[0] != adapters[1]  # another training seed, another adapter
    got = json.loads((tmp_path / "exp" / "compare" / "compare.json").read_text())
    assert list(got["runs"]) == ["seed3", "seed4"]
    s = got["seeds"]["(one arm)"]["emotion/enout"]["all"]["raw"]
    deltas = [got["changes"][lab]["emotion/enout"]["all"]["raw"]["delta"] for lab in ("seed3", "seed4")]
    assert s["mean"] == pytest.approx(sum(deltas) / 2) and s["sd"] == pytest.approx(abs(deltas[0] - deltas[1]) / 2 ** 0.5)
    assert "## Across training seeds" in (tmp_path / "exp" / "compare" / "compare.md").read_text()
    # resumable and reused: a second call reruns nothing
    lines = []
    run_experiments(cfg, log=lines.append)
    assert sum("skipped" in x for x in lines) == 2 * 4 and not any("running" in x for x in lines)


@pytest.mark.gemma
def test_demo_config_runs_on_gemma(tmp_path):
    """The bundled demo on the real embedded Gemma 3 270M, shrunk to a few items (the full demo is a long run)."""
    cfg = load_experiment(None, ["data.rows_per_lang=4", "train.max_steps=1", "train.val_size=0", "eval.items=0:2",
                                 "eval.langs=en,zh,sw", "lens.limit=2", "lens.langs=en,zh", "geometry.limit=3",
                                 "geometry.langs=en,zh", f"out={tmp_path / 'demo'}"])
    assert cfg.model.name == "gemma-3-270m"
    outcome = Experiment(cfg, log=lambda s: None).run()
    assert set(outcome.values()) == {"ran"} and len(outcome) == 7
    md = (tmp_path / "demo" / "report.md").read_text(encoding="utf-8")
    assert "has not run" not in md and "_No evaluation results" not in md
    lens = json.loads((tmp_path / "demo" / "lens" / "summary.json").read_text())
    assert lens["numbers"]["emotion/native/zh/kept"] == 2  # zh labels share no first token with English: kept


def test_store_import_refuses_edited_flipped_and_cut_records(fresh, tmp_path):
    """An export carries the digest of its records; `store import` checks it and every record's own consistency
    (gold against the data, correctness against prediction and gold, the prediction against its scores): flipped
    predictions, an edited gold label and a cut file are each refused with one line naming the file and record."""
    import gzip

    from qtalign.eval.run import import_evaluation

    cfg, out = fresh
    assert main(["report", str(out), "--export", str(tmp_path / "exp")]) == 0
    base = tmp_path / "exp" / "eval" / "base"
    assert (base / "predictions.sha256").is_file()
    assert import_evaluation(base)["records"] > 0  # the genuine export imports
    recs = [json.loads(x) for x in gzip.decompress((base / "predictions.jsonl.gz").read_bytes()).decode().splitlines()]

    def tampered(name, change, keep_digest=False):
        d = tmp_path / name
        shutil.copytree(base, d)
        rs = [dict(r) for r in recs]
        change(rs)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs).encode()
        (d / "predictions.jsonl.gz").write_bytes(gzip.compress(data, mtime=0))
        if not keep_digest:
            (d / "predictions.sha256").unlink()  # as if the editor knew to drop it: the records' own checks remain
        return d

    def flip(rs):  # every prediction the other way, kept consistent with 'correct': the scores give it away
        for r in rs:
            other = next(c for c in r["scores"] if c != r["pred"])
            r["pred"], r["correct"] = other, other == r["gold"]

    def regold(rs):
        r = rs[0]
        other = next(c for c in r["scores"] if c != r["gold"])
        r["gold"], r["correct"] = other, r["pred"] == other

    with pytest.raises(QtalignError, match=r"record 1 \(.*field 'pred'.*highest scores"):
        import_evaluation(tampered("flipped", flip))
    with pytest.raises(QtalignError, match=r"record 1 \(.*field 'gold'.*data's gold label"):
        import_evaluation(tampered("regold", regold))
    with pytest.raises(QtalignError, match="do not match the sha256"):
        import_evaluation(tampered("digest", flip, keep_digest=True))
    cut = tmp_path / "cut"
    shutil.copytree(base, cut)
    (cut / "predictions.jsonl.gz").write_bytes((cut / "predictions.jsonl.gz").read_bytes()[:-20])
    with pytest.raises(QtalignError, match="cannot be read|do not match"):
        import_evaluation(cut)


@needs_shared
def test_a_published_evaluation_imports_and_is_found_again_by_its_plan(tmp_path, monkeypatch):
    """The published base evaluations keep their store keys: one imports (its recorded fingerprint is recomputed by
    the plan from this machine's contents) and the plan of the same config finds every item in the store."""
    from conftest import ROOT

    from qtalign.engine.models import model_identity
    from qtalign.eval.config import EvalConfig
    from qtalign.eval.run import import_evaluation, store_keys
    from qtalign.eval.store import Store

    monkeypatch.setenv("QTALIGN_STORE", str(tmp_path / "store"))
    pub = ROOT / "docs" / "results" / "qwen05_snli_zhde_en_epyc" / "eval" / "base"
    got = import_evaluation(pub, data_dir=str(OFFICIAL))
    assert got["records"] == got["added"] == 8100
    recorded = json.loads((pub / "results.json").read_text())
    cfg = EvalConfig.model_validate(recorded["config"]).model_copy(update={"data_dir": str(OFFICIAL)})
    plan = cfg.plan(model_identity(cfg.model))
    assert plan.for_model(plan.model, EvalConfig.model_validate(recorded["config"])).fingerprint == recorded["fingerprint"]
    store, keys = Store(), store_keys(plan)
    assert all({it.index for it in its} <= set(store.records(keys[g])) for g, its in plan.items.items())
