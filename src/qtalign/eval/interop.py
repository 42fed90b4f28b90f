"""Results in the layouts other tools read.

- lm-evaluation-harness: ``qtalign eval`` also writes ``lm_eval/<model>/results_<date>.json`` (lm-eval's aggregated
  results layout: one task per task x language x variant, e.g. ``emotion_de_enout``, with ``acc``, calibrated
  accuracy and AUC and their standard errors, configs, versions, n-shot, n-samples; the macro averages as groups) and
  ``samples_<task>_<date>.jsonl`` (its per-sample layout), so that the tools built around lm-eval outputs read them.
- Hugging Face datasets: ``qtalign export`` writes each evaluation's per-item records as a parquet dataset.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from pathlib import Path

from qtalign.io import text_sha256

VERSION = 1.0


def task_name(task: str, lang: str, variant: str) -> str:
    return f"{task}_{lang}_{variant}"


def _stderr(xs: list[float]) -> float:
    """lm-eval's mean_stderr: the sample standard deviation (n - 1) over sqrt(n)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def _model_name(results: dict) -> str:
    name = results.get("model", {}).get("name") or "model"
    return name.replace("/", "__")


def lm_eval_dir(out: Path, model_name: str | None = None):
    """The io.OutputDir of an evaluation's lm-eval layout: <out>/lm_eval/<model name, '/' as '__'> (<out>/lm_eval
    without a model name)."""
    from qtalign.io import OutputDir

    path = Path(out) / "lm_eval"
    return OutputDir(path / _model_name({"model": {"name": model_name}}) if model_name else path, "lm_eval",
                     option=f"{out}: lm_eval folder")


def claim_lm_eval_dir(out: Path, model_name: str):
    """Own <out>/lm_eval and its model's folder in it, each through a marker of its own (recorded as such in <out>'s
    marker when qtalign owns <out>)."""
    from qtalign.io import MARKER, OutputDir

    top = OutputDir(out).subdir("lm_eval", "lm_eval") if (Path(out) / MARKER).is_file() else lm_eval_dir(out).claim()
    top.option = lm_eval_dir(out).option
    return top.subdir(_model_name({"model": {"name": model_name}}), "lm_eval")


def lm_eval_results(results: dict, records: list[dict], n_shot: dict[str, int], date: str) -> dict:
    """The aggregated results of an evaluation in lm-evaluation-harness's results layout."""
    from qtalign.eval.metrics import record_auc

    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(task_name(r["task"], r["lang"], r["variant"]), []).append(r)
    res, cfgs, groups, subtasks = {}, {}, {}, {}
    for name, rs in by.items():
        t, v = rs[0]["task"], rs[0]["variant"]
        acc = [float(r["correct"]) for r in rs]
        entry = {"alias": name, "acc,none": sum(acc) / len(acc), "acc_stderr,none": _stderr(acc)}
        if "cal_correct" in rs[0]:
            cal = [float(r["cal_correct"]) for r in rs]
            entry.update({"acc_calibrated,none": sum(cal) / len(cal), "acc_calibrated_stderr,none": _stderr(cal)})
        entry["auc,none"] = record_auc(rs, list(rs[0]["scores"]))
        entry["auc_stderr,none"] = "N/A"
        res[name] = entry
        cfgs[name] = {"task": name, "tag": [f"qtalign_{t}_{v}"], "num_fewshot": n_shot.get(t, 0),
                      "output_type": "multiple_choice", "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                                                        for m in ("acc", "acc_calibrated", "auc")],
                      "metadata": {"version": VERSION, "qtalign_method": results.get("config", {}).get("method")}}
        subtasks.setdefault(f"qtalign_{t}_{v}", []).append(name)
    for g, names in subtasks.items():
        groups[g] = {"alias": g, **{f"{m},none": _mean([res[n].get(f"{m},none") for n in names]) for m in ("acc", "acc_calibrated", "auc")}}
    m = results.get("model", {})
    cfg = results.get("config", {})
    return {
        "results": res, "groups": groups, "group_subtasks": subtasks, "configs": cfgs,
        "versions": {n: VERSION for n in res}, "n-shot": {n: cfgs[n]["num_fewshot"] for n in res},
        "higher_is_better": {n: {"acc": True, "acc_calibrated": True, "auc": True} for n in res},
        "n-samples": {n: {"original": len(by[n]), "effective": len(by[n])} for n in res},
        "config": {"model": "qtalign", "model_args": f"pretrained={m.get('name')},dtype={m.get('dtype')}",
                   "batch_size": cfg.get("batch_size"), "device": m.get("device"), "fewshot_seed": cfg.get("seed")},
        "git_hash": (results.get("environment") or {}).get("git"), "date": date, "model_name": m.get("name"),
        "model_name_sanitized": _model_name(results),
        "task_hashes": {}, "qtalign_fingerprint": results.get("fingerprint"),
    }


def _mean(xs) -> float:
    xs = [x for x in xs if isinstance(x, float) and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def lm_eval_samples(records: list[dict], items: dict, prompts: dict) -> dict[str, list[dict]]:
    """Per task name, lm-eval's per-sample records: the document (the item's fields), the target class, the arguments
    (the prompt and each label word), the per-class responses (the scores qtalign decided on) and the metrics."""
    out: dict[str, list[dict]] = {}
    for r in records:
        classes = list(r["scores"])
        doc = items.get(r["key"], {})
        prompt = prompts.get(r["key"], "")
        target = classes.index(r["gold"])
        raw = r.get("mass") or r.get("logprobs") or r["scores"]
        s = {"doc_id": r["index"], "doc": doc, "target": target,
             "arguments": [[prompt, c] for c in classes], "resps": [[[raw[c], classes[k] == r["pred"]]] for k, c in enumerate(classes)],
             "filtered_resps": [[raw[c], classes[k] == r["pred"]] for k, c in enumerate(classes)], "filter": "none",
             "metrics": ["acc"] + (["acc_calibrated"] if "cal_correct" in r else []),
             "doc_hash": text_sha256(json.dumps(doc, indent=2, ensure_ascii=False)),
             "prompt_hash": text_sha256(prompt), "target_hash": text_sha256(str(target)), "acc": float(r["correct"])}
        if "cal_correct" in r:
            s["acc_calibrated"] = float(r["cal_correct"])
        out.setdefault(task_name(r["task"], r["lang"], r["variant"]), []).append(s)
    return out


def write_lm_eval(out: Path, results: dict, records: list[dict], n_shot: dict[str, int], items: dict, prompts: dict) -> Path:
    """lm_eval/<model>/results_<date>.json and samples_<task>_<date>.jsonl, in a folder owned through io.OutputDir:
    the files an earlier evaluation wrote there are replaced, anything else in it is left alone."""
    from qtalign.io import write_json, write_jsonl

    date = datetime.fromtimestamp(results.get("finished") or time.time()).isoformat().replace(":", "-")
    folder = claim_lm_eval_dir(out, results.get("model", {}).get("name") or "model")
    folder.clear()
    samples = lm_eval_samples(records, items, prompts)
    agg = lm_eval_results(results, records, n_shot, date)
    agg["task_hashes"] = {n: text_sha256("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in ss))
                          for n, ss in samples.items()}
    write_json(folder.file(f"results_{date}.json"), agg, indent=2)
    for name, ss in samples.items():
        write_jsonl(folder.file(f"samples_{name}_{date}.jsonl"), ss)
    return folder.path


# ------------------------------------------------------------------------------------------------------------------
# datasets


def flat_record(r: dict) -> dict:
    """A per-item record with its per-class dictionaries as parallel lists (one schema for every task)."""
    classes = list(r["scores"])
    out = {k: v for k, v in r.items() if not isinstance(v, dict)}
    out["classes"] = classes
    for k in ("scores", "cal_scores", "mass", "logprobs"):
        if isinstance(r.get(k), dict):
            out[k] = [float(r[k][c]) for c in classes]
    if "label_tokens" in out and not isinstance(out["label_tokens"], list):
        out["label_tokens"] = list(out["label_tokens"])
    return out


def write_parquet(records: list[dict], path: Path) -> Path:
    """The records as a Hugging Face ``datasets`` parquet file (written atomically)."""
    import datasets

    from qtalign.io import write_bytes

    rows = [flat_record(r) for r in records]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    ds = datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])
    tmp = path.with_name(f".{path.name}.tmp")
    ds.to_parquet(str(tmp))
    write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return path
