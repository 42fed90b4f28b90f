"""Reliability under bad input and faults (docs/reliability.md): qtalign never deletes or overwrites what it did not
write, never shows a stale result as current, and ends every user error with one line naming the problem (exit 2, no
traceback, nothing written outside --out). One regression test per class of failure found, then a fuzz-style sweep of
malformed inputs through the CLI entry point, in process."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from qtalign.cli import main
from qtalign.errors import QtalignError
from qtalign.tasks.items import demo_data_dir


def cli(argv: list[str]) -> tuple[int, list[str], str]:
    """(exit code, stderr lines, stdout) of `qtalign argv`, in process."""
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue().strip().splitlines(), out.getvalue()


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def demo_copy(dst: Path) -> Path:
    shutil.copytree(demo_data_dir(), dst)
    return dst


# ------------------------------------------------------------------------------------------------------------------
# deletes what it did not write


def test_run_never_removes_a_users_folder_named_like_a_stage(tmp_path, tiny_llama_dir):
    rd = tmp_path / "run"
    (rd / "data").mkdir(parents=True)
    (rd / "data" / "notes.txt").write_text("mine")
    rc, err, _ = cli(["run", "demo", "--out", rd, f"model.name={tiny_llama_dir}", "model.dtype=fp32"])
    assert rc == 2 and "was not written by qtalign" in err[-1] and len(err) == 1
    assert (rd / "data" / "notes.txt").read_text() == "mine" and sorted(x.name for x in rd.iterdir()) == ["data"]


def test_a_folder_the_user_adds_inside_an_owned_run_dir_is_refused_not_removed(tmp_path, tiny_llama_dir):
    from qtalign.experiment.config import ExperimentConfig
    from qtalign.experiment.runner import Experiment

    from test_experiment import tiny_dict

    rd = tmp_path / "run"
    d = tiny_dict(tiny_llama_dir, rd)
    d["stages"] = ["data", "eval", "report"]
    Experiment(ExperimentConfig.model_validate(d), log=lambda s: None).run()
    shutil.rmtree(rd / "eval")
    (rd / "eval").mkdir()
    (rd / "eval" / "mine.txt").write_text("x")  # the user's folder, where qtalign's was (without qtalign's marker)
    before = snapshot(rd)
    with pytest.raises(QtalignError, match="eval: the folder exists and was not written by qtalign"):
        Experiment(ExperimentConfig.model_validate(d), log=lambda s: None).run()
    assert (rd / "eval" / "mine.txt").read_text() == "x" and snapshot(rd) == before  # refused before anything ran


# every kind of folder qtalign owns inside a run dir, and the files a user might put beside its own
USER_FILES = ("notes.md", "data/notes.txt", "train/notes.txt", "train/adapter/notes.txt", "eval/notes.txt",
              "eval/base/notes.txt", "eval/base/lm_eval/notes.txt", "eval/base/lm_eval/{model}/notes.txt",
              "eval/tuned/notes.txt", "lens/notes.txt", "geometry/notes.txt", "report/notes.txt")


def _put_user_files(rd: Path, model: str) -> dict[str, str]:
    files = {}
    for rel in USER_FILES:
        p = rd / rel.format(model=model.replace("/", "__"))
        assert p.parent.is_dir(), p.parent
        p.write_text(f"the user's {rel}")
        files[str(p)] = p.read_text()
    return files


def test_reruns_clear_only_qtaligns_own_files_in_every_folder_it_owns(tmp_path, tiny_llama_dir):
    """A config change that reruns every unit, then `run --force all`: every file a user put beside qtalign's, in
    every kind of folder qtalign owns (unit folders, the adapter, the lm-eval layout, the report's figures), stays;
    qtalign's own files of the earlier run are cleared (a dated lm-eval file of the earlier run is gone)."""
    from test_experiment import tiny_dict, write_cfg

    rd = tmp_path / "run"
    d = tiny_dict(tiny_llama_dir, rd)
    d["train"]["max_steps"] = 1
    rc, err, _ = cli(["run", write_cfg(tmp_path, d)])
    assert rc == 0, err
    user = _put_user_files(rd, str(tiny_llama_dir))
    lm_eval = rd / "eval" / "base" / "lm_eval" / str(tiny_llama_dir).replace("/", "__")
    old_dated = sorted(p.name for p in lm_eval.glob("results_*.json"))
    assert old_dated
    d["seed"] = 1  # every unit reruns
    rc, err, _ = cli(["run", write_cfg(tmp_path, d)])
    assert rc == 0, err
    exp = json.loads((rd / "experiment.json").read_text())
    assert set(exp["last_run"].values()) == {"ran"} and len(exp["last_run"]) == 7
    assert {p: Path(p).read_text() for p in user} == user
    assert not set(old_dated) & {p.name for p in lm_eval.glob("results_*.json")}  # the earlier run's files went
    rc, err, _ = cli(["run", write_cfg(tmp_path, d), "--force", "all"])
    assert rc == 0, err
    assert set(json.loads((rd / "experiment.json").read_text())["last_run"].values()) == {"ran"}
    assert {p: Path(p).read_text() for p in user} == user
    assert (rd / "train" / "adapter" / "adapter_config.json").is_file() and (rd / "report" / "headline.png").is_file()


def test_overwrite_clears_only_qtaligns_own_files(tmp_path, tiny_llama_dir):
    """`eval --overwrite` and `train --overwrite` replace what qtalign wrote in their folder and its subfolders (the
    lm-eval layout, the adapter, the checkpoints), and nothing a user put there."""
    ev = tmp_path / "ev"
    args = ["eval", "--model", tiny_llama_dir, "--dtype", "fp32", "--data-files", "demo", "--tasks", "emotion", "--langs",
            "en", "--limit", "2", "--no-store", "--out", ev]
    assert cli(args)[0] == 0
    lm_eval = ev / "lm_eval" / str(tiny_llama_dir).replace("/", "__")
    user = {}
    for p in (ev / "mine.txt", ev / "lm_eval" / "mine.txt", lm_eval / "mine.txt"):
        p.write_text("mine")
        user[p] = "mine"
    assert cli([*args, "--overwrite"])[0] == 0
    assert {p: p.read_text() for p in user} == user and (ev / "results.json").is_file()
    assert len(list(lm_eval.glob("results_*.json"))) == 1
    assert cli(["build-data", "--task", "emotion", "--sources", "zh", "--data-files", "demo", "--items", "60:70",
                "--out", tmp_path / "qt"])[0] == 0
    tr = tmp_path / "tr"
    targs = ["train", "--model", tiny_llama_dir, "--dtype", "fp32", "--data", next((tmp_path / "qt").glob("*.jsonl")),
             "--max-steps", "1", "--batch-size", "2", "--per-device-batch-size", "2", "--val-size", "0", "--out", tr]
    assert cli(targs)[0] == 0
    for p in (tr / "mine.txt", tr / "adapter" / "mine.txt", tr / "checkpoints" / "mine.txt"):
        p.write_text("mine")
        user[p] = "mine"
    assert cli([*targs, "--overwrite"])[0] == 0
    assert {p: p.read_text() for p in user} == user
    assert (tr / "adapter" / "adapter_model.safetensors").is_file() and (tr / "summary.json").is_file()


def test_report_is_never_written_into_a_folder_qtalign_does_not_own(tmp_path, tiny_llama_dir):
    """`qtalign report DIR` where DIR holds a run's files but no marker (the user's own copy, with their own report.md
    and report.html): refused in one line, nothing written; in an owned run dir, a report.md that is not qtalign's
    is refused, not written over."""
    from qtalign.experiment.config import ExperimentConfig
    from qtalign.experiment.runner import Experiment

    from test_experiment import tiny_dict

    rd = tmp_path / "run"
    d = tiny_dict(tiny_llama_dir, rd)
    d["stages"] = ["data", "eval", "report"]
    Experiment(ExperimentConfig.model_validate(d), log=lambda s: None).run()
    mine = tmp_path / "mine"
    shutil.copytree(rd, mine, ignore=shutil.ignore_patterns(".qtalign.json"))
    (mine / "report.md").write_text("my own report")
    (mine / "report.html").write_text("<p>my own report</p>")
    before = snapshot(mine)
    rc, err, _ = cli(["report", mine])
    assert rc == 2 and len(err) == 1 and "not written by qtalign" in err[0] and str(mine) in err[0]
    assert snapshot(mine) == before
    (rd / "report" / "my_figure.png").write_text("the user's figure")
    (rd / "report.md").unlink()
    marker = json.loads((rd / ".qtalign.json").read_text())
    marker["entries"].remove("report.md")  # the run dir's report.md is now the user's
    (rd / ".qtalign.json").write_text(json.dumps(marker))
    (rd / "report.md").write_text("my own report")
    rc, err, _ = cli(["report", rd])
    assert rc == 2 and "report.md: exists and was not written by qtalign" in err[-1]
    assert (rd / "report.md").read_text() == "my own report"
    assert (rd / "report" / "my_figure.png").read_text() == "the user's figure"


def _as_the_previous_version_left_it(rd: Path) -> None:
    """Markers as qtalign 0.1 wrote them: plain entry names, no markers in eval/, the adapter, the checkpoints or
    lm_eval/, and the report's figures not listed."""
    for m in rd.rglob(".qtalign.json"):
        folder = m.parent.relative_to(rd).as_posix()
        if folder in ("eval", "train/adapter", "train/checkpoints") or folder.endswith("/lm_eval"):
            m.unlink()
            continue
        d = json.loads(m.read_text())
        d["entries"] = ["stage.json"] if folder == "report" else [e.rstrip("/") for e in d["entries"]]
        m.write_text(json.dumps(d))


def test_run_dirs_of_the_previous_version_rerun(tmp_path, tiny_llama_dir):
    """A run dir whose markers are as the previous version left them (the running studies' run dirs) reruns after
    a config change and regenerates its report, and a user's file in it survives."""
    from qtalign.experiment.config import ExperimentConfig
    from qtalign.experiment.runner import Experiment

    from test_experiment import tiny_dict

    rd = tmp_path / "run"
    d = tiny_dict(tiny_llama_dir, rd)
    d["stages"] = ["data", "train", "eval", "report"]
    d["train"]["max_steps"] = 1
    Experiment(ExperimentConfig.model_validate(d), log=lambda s: None).run()
    _as_the_previous_version_left_it(rd)
    assert cli(["report", rd])[0] == 0  # the old figures are qtalign's: replaced
    _as_the_previous_version_left_it(rd)
    (rd / "data" / "notes.txt").write_text("mine")
    d["seed"] = 1
    out = Experiment(ExperimentConfig.model_validate(d), log=lambda s: None).run()
    assert set(out.values()) == {"ran"} and (rd / "data" / "notes.txt").read_text() == "mine"
    assert (rd / "report" / "headline.png").is_file() and (rd / "train" / "adapter" / "adapter_config.json").is_file()


def test_merge_refuses_a_folder_it_did_not_write(tmp_path, tiny_llama_dir):
    user = tmp_path / "models"
    user.mkdir()
    (user / "precious.bin").write_bytes(b"1")
    (tmp_path / "adp").mkdir()
    (tmp_path / "adp" / "adapter_config.json").write_text("{}")
    (tmp_path / "adp" / "adapter_model.safetensors").write_bytes(b"")
    rc, err, _ = cli(["merge", "--model", tiny_llama_dir, "--adapter", tmp_path / "adp", "--out", user])
    assert rc == 2 and "not written by qtalign" in err[-1]
    assert (user / "precious.bin").read_bytes() == b"1"


# ------------------------------------------------------------------------------------------------------------------
# stale results


def test_a_killed_rerun_with_a_changed_config_leaves_no_old_report_looking_final(tmp_path, tiny_llama_dir, monkeypatch):
    from qtalign.experiment.config import ExperimentConfig
    from qtalign.experiment.runner import Experiment

    from test_experiment import tiny_dict

    rd = tmp_path / "run"
    d = tiny_dict(tiny_llama_dir, rd)
    d["stages"] = ["data", "eval", "report"]
    Experiment(ExperimentConfig.model_validate(d), log=lambda s: None).run()
    assert (rd / "report.md").exists()
    import qtalign.eval.run as ev

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", killed)
    d["eval"]["items"] = "0:4"
    with pytest.raises(KeyboardInterrupt):
        Experiment(ExperimentConfig.model_validate(d), log=lambda s: None).run()
    assert not any((rd / f).exists() for f in ("report.md", "report.html", "stats.json"))
    assert json.loads((rd / "eval" / "base" / "stage.json").read_text())["status"] != "done"
    assert "0:4" in (rd / "config.yaml").read_text()


def test_overlap_is_found_in_a_byte_identical_copy_in_another_folder(tmp_path):
    from qtalign.experiment.config import ExperimentConfig
    from qtalign.experiment.runner import Experiment

    from test_experiment import tiny_dict

    train_data = demo_copy(tmp_path / "train_copy")
    eval_data = demo_copy(tmp_path / "eval_copy")
    d = tiny_dict("m", tmp_path / "run")
    d["data"] = {"task": "emotion", "data_files": str(train_data / "{task}" / "{lang}.jsonl"), "sources": ["zh"], "target": "en",
                 "items": "0:20"}
    d["eval"] = {"tasks": ["emotion"], "data_files": str(eval_data / "{task}" / "{lang}.jsonl"), "langs": ["en", "zh"], "items": "0:10"}
    with pytest.raises(QtalignError, match="10 evaluation items are also training items"):
        Experiment(ExperimentConfig.model_validate(d)).units()  # the data stage's plan checks the overlap


# ------------------------------------------------------------------------------------------------------------------
# writes outside its output; tracebacks


def test_compare_labels_cannot_write_outside_out(tmp_path, tiny_llama_dir):
    rc, err, _ = cli(["lens", "--model", tiny_llama_dir, "--data-files", "demo", "--langs", "en,zh",
                      "--compare", f"../../evil={tmp_path}", "--out", tmp_path / "lens"])
    assert rc == 2 and "must be a plain name" in err[-1]
    assert not (tmp_path / "lens").exists() and not list(tmp_path.parent.glob("evil*"))


def test_truncated_weights_and_mismatched_adapters_are_one_line(tmp_path, tiny_llama_dir):
    bad = tmp_path / "trunc"
    shutil.copytree(tiny_llama_dir, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:4000])
    rc, err, _ = cli(["eval", "--model", bad, "--dtype", "fp32", "--data-files", "demo", "--langs", "en", "--tasks",
                      "emotion", "--out", tmp_path / "o"])
    assert rc == 2 and len(err) == 1 and "cannot load" in err[0]
    # an adapter trained for other target modules than the model has
    from peft import LoraConfig, get_peft_model

    from qtalign.engine.models import ModelConfig, load_model

    lm = load_model(ModelConfig(name=str(tiny_llama_dir), dtype="fp32"))
    get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adp")
    cfg = json.loads((tmp_path / "adp" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_proj"]
    (tmp_path / "adp" / "adapter_config.json").write_text(json.dumps(cfg))
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, "--dtype", "fp32", "--adapter", tmp_path / "adp", "--data-files", "demo",
                      "--tasks", "emotion", "--langs", "en", "--limit", "2", "--no-store", "--out", tmp_path / "o2"])
    assert rc == 2 and "does not fit the model" in err[-1] and not any("Traceback" in x for x in err)


def test_out_that_cannot_be_written_is_one_line(tmp_path, tiny_llama_dir):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub", Path("/proc/qtalign-cannot-write-here")):
        rc, err, _ = cli(["eval", "--model", tiny_llama_dir, "--data-files", "demo", "--tasks", "emotion", "--langs", "en",
                          "--out", out])
        assert rc == 2 and len(err) == 1 and str(out) in err[0], (out, err)


def test_a_failed_run_does_not_block_the_corrected_one(tmp_path, tiny_llama_dir, monkeypatch):
    import qtalign.eval.run as ev

    out = tmp_path / "o"
    real = ev._score_groups

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ev, "_score_groups", broken)
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, "--dtype", "fp32", "--data-files", "demo", "--tasks", "emotion",
                      "--langs", "en", "--limit", "3", "--no-store", "--out", out])
    assert rc == 1 and "internal error" in err[-1]
    monkeypatch.setattr(ev, "_score_groups", real)
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, "--dtype", "fp32", "--data-files", "demo", "--tasks", "emotion",
                      "--langs", "en", "--limit", "4", "--no-store", "--out", out])  # a corrected config into the same --out
    assert rc == 0 and (out / "results.json").exists()


def test_trust_remote_code_from_a_config_warns(tmp_path, tiny_llama_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"eval:\n  model: {{name: {tiny_llama_dir}, trust_remote_code: true, dtype: fp32}}\n  tasks: [emotion]\n"
                   "  langs: [en]\n  data_files: demo\n  limit: 2\n")
    import qtalign.engine.models as models

    models._WARNED.clear()
    rc, err, _ = cli(["eval", "--config", cfg, "--out", tmp_path / "o"])
    assert rc == 0 and any("trust_remote_code is on" in x for x in err)


def test_config_errors_name_the_file_and_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval:\n  tasks: [emotion]\n  limit: zero\n")
    rc, err, _ = cli(["eval", "--config", cfg, "--out", tmp_path / "o"])
    assert rc == 2 and str(cfg) in err[-1] and "eval" in err[-1] and "'limit'" in err[-1]


# ------------------------------------------------------------------------------------------------------------------
# found by review: ownership by content and kind, stale identities, YAML words, the statistics' units


def test_a_users_results_json_does_not_make_a_folder_qtaligns(tmp_path, tiny_llama_dir):
    """A folder without qtalign's marker is not qtalign's, whatever its files are called: a user's results.json
    and predictions.jsonl there are refused, not taken over, and nothing in the folder is touched."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"accuracy": 0.9}))
    (out / "predictions.jsonl").write_text("my predictions\n")
    before = snapshot(out)
    rc, err, _ = cli(["eval", "--model", tiny_llama_dir, "--dtype", "fp32", "--data-files", "demo", "--tasks", "emotion",
                      "--langs", "en", "--limit", "2", "--no-store", "--out", out])
    assert rc == 2 and len(err) == 1 and "not written by qtalign" in err[0]
    assert snapshot(out) == before


def test_an_output_of_another_kind_is_refused(tmp_path, tiny_llama_dir):
    """A folder another qtalign command owns (an evaluation's, given to merge; a merge's, given to eval) is refused in
    one line with both kinds named, and nothing in it changes."""
    ev = tmp_path / "ev"
    rc, _, _ = cli(["eval", "--model", tiny_llama_dir, "--dtype", "fp32", "--data-files", "demo", "--tasks", "emotion",
                    "--langs", "en", "--limit", "2", "--no-store", "--out", ev])
    assert rc == 0
    before = snapshot(ev)
    from peft import LoraConfig, get_peft_model

    from qtalign.engine.models import ModelConfig, load_model

    lm = load_model(ModelConfig(name=str(tiny_llama_dir), dtype="fp32"))
    get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adp")
    rc, err, _ = cli(["merge", "--model", tiny_llama_dir, "--adapter", tmp_path / "adp", "--out", ev])
    assert rc == 2 and len(err) == 1 and "holds a qtalign eval output" in err[0]
    assert snapshot(ev) == before


def test_writing_never_takes_over_a_name_that_is_not_ours(tmp_path):
    from qtalign.io import OutputDir

    od = OutputDir(tmp_path / "o", "eval").claim()
    (od.path / "table.md").write_text("the user's table")  # put there after qtalign claimed the folder
    with pytest.raises(QtalignError, match="table.md: exists and was not written by qtalign"):
        od.record("table.md")
    assert (od.path / "table.md").read_text() == "the user's table" and not od.is_ours("table.md")


def test_removal_descends_into_owned_folders_and_leaves_everything_else(tmp_path):
    """io.OutputDir, without a model: removing an owned folder removes what the markers list, recursively (a folder
    left empty goes, one holding a user's file stays with its marker); a folder listed as written whole goes whole;
    a folder of the user's put where qtalign's marked one was is not touched; an atomic write over a user's file in an
    owned folder is refused."""
    from qtalign.io import LOCK, MARKER, OutputDir, write_text

    run = OutputDir(tmp_path / "run", "experiment").claim()
    base = run.subdir("eval/base", "eval")
    lm = base.subdir("lm_eval/m", "lm_eval")
    for od, name in ((base, "results.json"), (lm, "results_1.json"), (run, "config.yaml")):
        write_text(od.path / name, "{}")
    run.record("checkpoints")
    (run.path / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run.path / "checkpoints" / "checkpoint-1" / "w.bin").write_text("w")
    (lm.path / "notes.txt").write_text("mine")
    (base.path / "other").mkdir()  # a folder of the user's, beside qtalign's
    (base.path / "other" / "x.txt").write_text("mine")
    run.remove("eval", "checkpoints", "config.yaml")
    left = sorted(p.relative_to(run.path).as_posix() for p in run.path.rglob("*") if p.is_file() and p.name != LOCK)
    assert left == [MARKER, f"eval/{MARKER}", f"eval/base/{MARKER}", f"eval/base/lm_eval/{MARKER}",
                    f"eval/base/lm_eval/m/{MARKER}", "eval/base/lm_eval/m/notes.txt", "eval/base/other/x.txt"]
    import shutil

    shutil.rmtree(run.path / "eval")
    (run.path / "eval" / "base").mkdir(parents=True)  # the user's folder where qtalign's (marked) one was
    (run.path / "eval" / "base" / "results.json").write_text("the user's")
    run.remove("eval", "eval/base")
    assert (run.path / "eval" / "base" / "results.json").read_text() == "the user's"
    with pytest.raises(QtalignError, match="eval: the folder exists and was not written by qtalign"):
        run.subdir("eval/base", "eval")
    (run.path / "mine.json").write_text("the user's")
    with pytest.raises(QtalignError, match="mine.json: exists and was not written by qtalign"):
        write_text(run.path / "mine.json", "{}")
    assert (run.path / "mine.json").read_text() == "the user's"


def test_yaml_words_that_are_language_codes_stay_strings(tmp_path):
    """YAML 1.1 reads `no` (Norwegian) as False and `on` as True; qtalign's configs and overrides read them as words."""
    from qtalign.experiment.config import load_experiment

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\nstages: [eval]\nmodel: m\neval:\n  tasks: [emotion]\n  langs: [en, no, sv]\n  data_files: demo\n")
    e = load_experiment([str(cfg)], overrides=["geometry.langs=[en,no]"])
    assert e.eval.langs == ["en", "no", "sv"] and e.geometry.langs == ["en", "no"] and e.model.name == "m"


def test_train_settings_transformers_would_reject_fail_before_anything_is_written(tmp_path, tiny_llama_dir):
    assert cli(["build-data", "--task", "emotion", "--sources", "zh", "--data-files", "demo", "--items", "60:70",
                "--out", tmp_path / "qt"])[0] == 0
    data = next((tmp_path / "qt").glob("*.jsonl"))
    for opt, val, msg in (("--optim", "adamw_nope", "unknown optim 'adamw_nope'"),
                          ("--per-device-batch-size", "3", "not a multiple of per_device_batch_size 3")):
        rc, err, _ = cli(["train", "--model", tiny_llama_dir, "--dtype", "fp32", "--data", data, opt, val,
                          "--out", tmp_path / "t"])
        assert rc == 2 and len(err) == 1 and msg in err[0], (opt, err)
        assert not (tmp_path / "t").exists()


def test_an_adapter_is_identified_by_its_weights_not_its_readme(tmp_path, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    from qtalign.engine.models import ModelConfig, adapter_sha256, load_model

    lm = load_model(ModelConfig(name=str(tiny_llama_dir), dtype="fp32"))
    get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adp")
    a = adapter_sha256(tmp_path / "adp")
    (tmp_path / "adp" / "README.md").write_text("edited notes")
    assert adapter_sha256(tmp_path / "adp") == a
    w = tmp_path / "adp" / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    assert adapter_sha256(tmp_path / "adp") != a


def test_clusters_are_recorded_and_widen_the_bootstrap(tmp_path, tiny_llama_dir):
    """SNLI items come in premise triples: the evaluation records each item's cluster, and the paired bootstrap
    resamples whole clusters; with perfectly correlated items inside a cluster its interval is wider than the
    item-level one (the item-level one overstates the evidence)."""
    from qtalign.eval.config import EvalConfig
    from qtalign.eval.run import evaluate
    from qtalign.engine.models import ModelConfig
    from qtalign.report.paired import compare

    premises = [f"Premise number {k}." for k in range(4)]
    en = [{"premise": p, "hypothesis": h, "answer": a} for p in premises
          for h, a in (("A thing.", "entailment"), ("Maybe.", "neutral"), ("No thing.", "contradiction"))]
    (tmp_path / "d" / "snli").mkdir(parents=True)
    (tmp_path / "d" / "snli" / "snli_en600_test.json").write_text(json.dumps(en))
    cfg = EvalConfig(model=ModelConfig(name=str(tiny_llama_dir), dtype="fp32"), tasks=["snli"], langs=["en"],
                     variants=["enout"], data_dir=str(tmp_path / "d"), store=False, batch_size=4)
    res = evaluate(cfg, tmp_path / "o", progress=False)
    assert res["clusters"] == {"snli": {k: k // 3 for k in range(12)}}
    # the report's unit: clusters of items, from what eval recorded
    base = {f"snli/en/{k}": {"task": "snli", "variant": "enout", "lang": "en", "index": k, "gold": "entailment",
                             "correct": False, "scores": {"entailment": .2, "neutral": .4, "contradiction": .4}}
            for k in range(12)}
    tuned = {key: {**r, "correct": r["index"] // 3 in (0, 1)} for key, r in base.items()}
    by_item = compare(base, tuned, {"en": "high"}, set())[0]
    by_cluster = compare(base, tuned, {"en": "high"}, set(), res["clusters"])[0]
    assert by_item.units() != by_cluster.units() and len(by_cluster.units()) == 4
    (_, lo_i, hi_i), (_, lo_c, hi_c) = by_item.boot("raw", 2000), by_cluster.boot("raw", 2000)
    assert hi_c - lo_c > hi_i - lo_i


# ------------------------------------------------------------------------------------------------------------------
# the fuzz-style sweep


def _bad_files(root: Path) -> dict[str, Path]:
    recs = [json.loads(x) for x in (demo_data_dir() / "emotion" / "en.jsonl").read_text(encoding="utf-8").splitlines()]
    files = {
        "latin1": ('{"input": "caf\xe9", "answer": "positive"}\n'.encode("latin-1"), "jsonl"),
        "object": (json.dumps(recs[0]).encode(), "json"),
        "empty": (b"", "jsonl"),
        "garbage": (b"\x00\x01 not json at all", "jsonl"),
        "bad_label": ("".join(json.dumps({**r, "answer": "maybe"}) + "\n" for r in recs[:5]).encode(), "jsonl"),
        "no_field": ("".join(json.dumps({"answer": r["answer"]}) + "\n" for r in recs[:5]).encode(), "jsonl"),
        "number_text": ("".join(json.dumps({**r, "input": 3}) + "\n" for r in recs[:5]).encode(), "jsonl"),
        "empty_text": ("".join(json.dumps({**r, "input": " "}) + "\n" for r in recs[:5]).encode(), "jsonl"),
        "array_of_lists": (b"[[1, 2], [3]]", "json"),
    }
    out = {}
    for name, (data, ext) in files.items():
        p = root / "bad" / name / "emotion" / f"en.{ext}"
        p.parent.mkdir(parents=True)
        p.write_bytes(data)
        out[name] = p
    return out


def _cases(root: Path, model: Path) -> list[list]:
    bad = _bad_files(root)
    m = ["--model", model, "--dtype", "fp32"]
    ev = ["eval", *m, "--data-files", "demo", "--tasks", "emotion", "--langs", "en"]
    cases = [["eval", *m, "--data-files", str(p.parent.parent / "{task}" / f"{{lang}}{p.suffix}"), "--tasks", "emotion", "--langs", "en"]
             for p in bad.values()]
    cases += [ev + [opt, val] for opt, val in itertools.chain(
        (("--items", v) for v in ("5:2", "5", "a:b", "3:3", "900:", "0:9999", "::", "1:2:3", "emotion=9:1")),
        (("--limit", v) for v in ("0", "-1", "x")), (("--langs", v) for v in ("xx", "en,zz")), (("--tasks", v) for v in ("nope",)), (("--variants", v) for v in ("", ",")),
        (("--variants", v) for v in ("weird",)), (("--method", v) for v in ("best",)), (("--device", v) for v in ("foo", "cuda:x", "cuda")),
        (("--batch-size", v) for v in ("0", "two")), (("--data-files", v) for v in ("{task}/{x}.jsonl", "hf:")),
        (("--model", v) for v in ("nosuchmodel", str(root / "missing_dir"), str(root / "x.gguf"), str(root / "bad" / "garbage" / "emotion" / "en.jsonl"))),
        (("--adapter", v) for v in (str(root / "nope"), str(root))), (("--prompts", v) for v in (str(root / "nope.json"), str(bad["garbage"]))),
        (("--config", v) for v in (str(root / "nope.yaml"), str(bad["garbage"]))),
    )]
    tr = ["train", *m, "--data", str(bad["object"])]
    cases += [tr, tr[:-1] + [str(root / "none.jsonl")]]
    cases += [["train", *m, "--data", str(demo_data_dir() / "emotion" / "en.jsonl"), opt, val] for opt, val in (
        ("--lr-scheduler", "bogus"), ("--learning-rate", "-1"), ("--lora-r", "0"), ("--template", "fancy"), ("--report-to", "nope"),
        ("--batch-size", "3"), ("--val-size", "-2"), ("--target-modules", ""), ("--val-data", str(root / "none.jsonl")))]
    cases += [["build-data", "--task", "emotion", "--sources", s, "--data-files", "demo"] for s in ("xx", "en", "zh:de")]
    cases += [["build-data", "--question-files", str(bad["object"])], ["build-data", "--task", "nope", "--sources", "zh"],
              ["build-data", "--task", "emotion", "--sources", "zh", "--data-files", "demo", "--exclude-items", "a:b"],
              ["build-data", "--task", "emotion", "--sources", "zh", "--data-files", "demo", "--exclude-file", str(bad["garbage"])]]
    cases += [["lens", *m, "--data-files", "demo", "--langs", "en,zh", "--compare", v] for v in ("../x=y", "a=", "base=d", ".hidden=d")]
    cases += [["geometry", *m, "--data-files", "demo", "--langs", "en,zh", opt, v] for opt, v in (
        ("--pools", "mean"), ("--layers", "a,b"), ("--reference", "fr"))]
    cases += [["geometry", *m, "--data-files", "demo", "--langs", "zh"]]
    cases += [["run", "no/such/config"], ["run", "demo", "train.lora_r=0"], ["run", "demo", "eval.bogus=1"], ["run", "demo", "=3"],
              ["run", "demo", "--stages", "tune"], ["run", "demo", "data.model=x"], ["run", str(bad["garbage"])],
              ["report", root / "nope"], ["compare", root / "nope"], ["export", root]]
    # the classes of issue 25: non-finite or absurd numbers, out-of-range seeds, imports and cards of nothing
    cases += [ev + [opt, val] for opt, val in (("--batch-size", "1e12"), ("--seed", "-1"), ("--seed", str(2**40)),
                                               ("--limit", "inf"), ("--batch-tokens", "nan"))]
    cases += [["train", *m, "--data", str(demo_data_dir() / "emotion" / "en.jsonl"), opt, val] for opt, val in (
        ("--learning-rate", "inf"), ("--learning-rate", "nan"), ("--lora-r", "1e9"), ("--epochs", "inf"),
        ("--max-steps", "1e15"), ("--seed", "-3"))]
    cases += [["run", "demo", over] for over in ("train.learning_rate=inf", "eval.batch_size=1e12", "seed=-1",
                                                 "train.lora_alpha=nan", "seeds=0,-1")]
    cases += [["store", "import", root / "nope"], ["store", "import", root / "bad"], ["card", root / "nope.yaml"]]
    return cases


def test_fuzz_malformed_inputs_through_the_cli(tmp_path, tiny_llama_dir):
    root = tmp_path / "w"
    root.mkdir()
    (root / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    keep = root / "user_files"
    keep.mkdir()
    (keep / "a.txt").write_text("precious")
    cases = _cases(root, tiny_llama_dir)
    assert len(cases) > 70
    for i, case in enumerate(cases):
        out = root / f"out{i}"
        argv = case if case[0] in ("report", "compare", "export", "models", "store") or "--out" in case else case + ["--out", out]
        if case[0] in ("compare", "export") and "--out" not in case:
            argv = case + ["--out", out]
        before = snapshot(root, skip=out)
        rc, err, _ = cli(argv)
        assert rc == 2, (" ".join(str(a) for a in argv[7:]), rc)
        assert err and "error" in err[-1] and len(err[-1]) > 20, (argv, err)
        assert not any("Traceback" in x for x in err), (argv, err)
        assert snapshot(root, skip=out) == before, argv  # nothing written or removed outside --out
        assert not (out / "results.json").exists() and not (out / "summary.json").exists()
    assert (keep / "a.txt").read_text() == "precious"
