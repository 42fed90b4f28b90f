"""Few-shot evaluation: tasks x languages x label variants, per-item records, resumable, data-parallel, and reused
from the shared result store (eval/store.py) when the same model, data, prompts and numerics were scored before.

Output dir layout:
    .qtalign.json       ownership marker (io.OutputDir): what qtalign wrote here
    run.json            config, fingerprint and what it covers (written before scoring)
    predictions.jsonl   one record per item (appended as batches finish: an interrupted run resumes from it)
    results.json        metrics, timings, environment (written last: its presence means the run finished)
    table.md/.csv       per-language accuracy with Wilson CIs, calibrated accuracy, AUC, group averages
    labels.md/.json     label-tokenisation report

Every input (options, data files, model config) is read and checked before a model is loaded or a file is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from qtalign.engine.models import LoadedModel, check_model, device_type, load_model, load_tokenizer, model_identity, resolve_source
from qtalign.errors import QtalignError, data_error
from qtalign.eval.config import EvalConfig
from qtalign.eval.metrics import compute_metrics, write_tables
from qtalign.eval.plan import Plan
from qtalign.eval.store import RECORD_VERSION, Store
from qtalign.io import OutputDir, claim_run, parse_jsonl, read_json, read_jsonl, repair_jsonl_tail, write_json, write_jsonl
from qtalign.scoring.faithful import official_correct, special_case
from qtalign.scoring.base import argmax
from qtalign.scoring.calibration import calibrate, content_free_requests, mean_probs
from qtalign.scoring.scorer import ScoreRequest, Scorer
from qtalign.tasks.groups import Group
from qtalign.tracking import check_available, eval_scalars, log_metrics

OUR_FILES = ("run.json", "predictions.jsonl", "results.json", "table.md", "table.csv", "labels.md", "labels.json", "lm_eval",
             "tracking")


def scored_words(task, lang: str, variant: str, method: str) -> tuple[str, list[str]]:
    """(forced text after the answer cue, label words scored per class) for a task x language x variant: the
    label words, except for a faithful special case (the Thai two-step), which forces the common prefix."""
    if method == "faithful" and (case := special_case(task, lang, variant)):
        return case["forced_prefix"], [case["continuation_label_words"][c] for c in task.classes]
    return "", list(task.label_words(lang, variant))


def build_requests(task, lang: str, variant: str, items: list, method: str) -> list[ScoreRequest]:
    """The score requests of one task x language x variant, one per item, in item order (what `evaluate` scores;
    also used by benchmarks/eval_throughput.py)."""
    forced, scored = scored_words(task, lang, variant, method)
    g = Group(task.name, variant, lang)
    reqs = []
    for it in items:
        prefix, q = task.prompt_parts(lang, variant, it.fields)
        reqs.append(ScoreRequest(g.key(it.index), g.name, prefix, q, list(scored), forced=forced))
    return reqs


# ------------------------------------------------------------------------------------------------------------------
# planning: items, fingerprints, what is already done


def store_keys(plan: Plan) -> dict[Group, str]:
    """The shared store's key of each group of an evaluation's plan: its scoring settings with the plan's hashes."""
    cfg = plan.cfg
    device = device_type(cfg.model.device) if cfg.backend == "torch" else cfg.backend  # a server: its identity is in the model
    scoring = {"method": cfg.method, "calibrate": cfg.calibrate, "device": device, "records": RECORD_VERSION}
    if cfg.method == "sequence":
        scoring["length_norm"] = cfg.length_norm
    if cfg.method == "faithful":
        scoring["seed"] = cfg.seed
    return plan.store_keys(scoring)


def _claim(out: OutputDir, plan: Plan, overwrite: bool, shards: list[str] = ()) -> dict | None:
    """The finished results when they are already there; else None, the folder claimed for this run (io.claim_run)
    and the processes' ``shards`` recorded (main process; evaluate shares the outcome)."""
    from qtalign.eval.interop import lm_eval_dir

    out.check()
    lm_eval_dir(out.path).check()  # written last: refused now, not after scoring
    lm_eval_dir(out.path, plan.cfg.model.name).check()
    record = {"fingerprint": plan.fingerprint, "covers": plan.covers(), "config": plan.cfg.model_dump(mode="json"),
              "started": time.time()}
    finished = claim_run(out, record, "results.json", OUR_FILES, "evaluation",
                         "an evaluation with a different config, data or model", overwrite, ("predictions.rank*.jsonl",))
    if finished is None and shards:
        out.record(*shards)
    return finished


def _done(out: Path, plan: Plan, store: Store | None) -> tuple[dict[str, dict], int]:
    """Records already computed for this plan: in the run dir (a resumed run), then in the shared store."""
    want = plan.keys()
    done = {r["key"]: r for p in [out / "predictions.jsonl", *sorted(out.glob("predictions.rank*.jsonl"))]
            for r in read_jsonl(p) if r.get("key") in want}
    n_store = 0
    if store is not None:
        keys = store_keys(plan)
        for g, its in plan.items.items():
            stored = store.records(keys[g])
            for it in its:
                k = g.key(it.index)
                if k not in done and it.index in stored and stored[it.index].get("key") == k:
                    done[k] = stored[it.index]
                    n_store += 1
    return done, n_store


# ------------------------------------------------------------------------------------------------------------------
# scoring


def _record(task, g: Group, it, s, cf, method: str) -> dict:
    rec = {
        "key": g.key(it.index), "task": g.task, "variant": g.variant, "lang": g.lang, "index": it.index, "id": it.id,
        "gold": task.classes[it.gold], "pred": task.classes[s.pred], "correct": s.pred == it.gold,
        "scores": dict(zip(task.classes, [round(x, 6) for x in s.probs])),
        ("logprobs" if method == "sequence" else "mass"): dict(zip(task.classes, [float(f"{x:.6g}") for x in s.raw])),
    }
    if cf is not None:
        cal = calibrate(s.probs, cf)
        cp = argmax(cal)
        rec.update(cal_scores=dict(zip(task.classes, [round(x, 6) for x in cal])), cal_pred=task.classes[cp],
                   cal_correct=cp == it.gold)
    if method == "faithful":
        rec["official_correct"] = official_correct(task, g.lang, g.variant, s.pred, it.gold_word)
    rec.update(s.extra)
    return rec


def _check_context(scorer: Scorer, plan: Plan, todo: dict[Group, list]) -> None:
    """Before any item is scored: every prompt (with its label) fits the model's context, else one line naming the
    file, the record and the length (a 100,000-character review is refused, not allocated)."""
    for g, items in todo.items():
        task = plan.specs.task(g.task)
        hit = scorer.too_long(build_requests(task, g.lang, g.variant, items, plan.cfg.method))
        if hit is not None:
            r, n = hit
            source = plan.cfg.source()
            where = source.path(task, g.lang) or source.describe()
            raise data_error(where, f"the prompt is {n} tokens long with its label, more than the model's context "
                             f"({scorer.context} positions); shorten the text or leave the item out (exclude_items)",
                             record={g.key(it.index): it.index for it in items}[r.key])


def _score_groups(scorer: Scorer, plan: Plan, todo: dict[Group, list], shard: Path, progress) -> dict[str, dict]:
    """Score the items still to do, group by group, appending each batch's records to ``shard``. Returns per group
    the wall seconds ('wall') and this process's CPU seconds ('cpu': on a shared machine, what the scoring itself
    cost, whatever else ran)."""
    cfg, timings = plan.cfg, {"wall": {}, "cpu": {}}
    repair_jsonl_tail(shard)
    import json

    with open(shard, "a", encoding="utf-8") as f:
        for g, items in todo.items():
            if not items:
                continue
            t0, c0 = time.time(), time.process_time()
            task = plan.specs.task(g.task)
            forced, scored = scored_words(task, g.lang, g.variant, cfg.method)
            cf = None
            if cfg.calibrate:
                cf = mean_probs(list(scorer.score(content_free_requests(task, g.lang, g.variant, g.name, scored, forced))))
            reqs = build_requests(task, g.lang, g.variant, items, cfg.method)
            by_key = {r.key: it for r, it in zip(reqs, items)}
            for s in scorer.score(reqs):
                f.write(json.dumps(_record(task, g, by_key[s.key], s, cf, cfg.method), ensure_ascii=False) + "\n")
                progress.advance(1)
            f.flush()
            timings["wall"][g.name] = round(time.time() - t0, 3)
            timings["cpu"][g.name] = round(time.process_time() - c0, 3)
    return timings


def evaluation_identity(cfg: EvalConfig, loaded=None, backend=None) -> dict:
    """The model identity an evaluation's fingerprint and store keys record: the loaded model's, else the config's
    (checked first); a server's engine, version and model are added, so its records never mix with another engine's."""
    if cfg.backend != "torch" and backend is None:
        backend = _server_backend(cfg)
    if isinstance(loaded, LoadedModel) and backend is None:
        model_id = loaded.info.get("identity") or model_identity(cfg.model)
    else:
        check_model(cfg.model)
        model_id = model_identity(cfg.model)
    return {**model_id, "backend": backend.identity()} if backend is not None else model_id


def evaluate(cfg: EvalConfig, out: str | Path, loaded: LoadedModel | Callable[[], LoadedModel] | None = None,
             overwrite: bool = False, progress: bool = True, plan: Plan | None = None) -> dict:
    """Evaluate ``cfg`` into ``out``; returns the results dict (also results.json). ``loaded``: a loaded model, or a
    function returning one (called only when some item is not already in the run dir or the store). ``plan``: the
    plan of ``cfg`` for its model (``cfg.plan(evaluation_identity(cfg))``) when the caller made it already."""
    from transformers import set_seed

    from qtalign.engine.parallel import barrier_group, distributed_state, finish_barrier, on_main_then_share
    from qtalign.environment import environment
    from qtalign.progress import Progress

    check_available(cfg.report_to, cfg.tracking_dir)
    if cfg.store:
        Store().check()
    backend = _server_backend(cfg)  # None for the native engine
    # all data read and checked here, before any model or output
    plan = plan or cfg.plan(evaluation_identity(cfg, loaded, backend))
    model_id = plan.model
    state = distributed_state()
    group = barrier_group(state)  # made while the processes are in step; waited on at the end, however uneven
    out_dir = OutputDir(out, "eval")
    rank, world = state.process_index, state.num_processes
    # the processes' shards are recorded as the main process claims the folder, before any process writes one
    shards = [f"predictions.rank{r}.jsonl" for r in range(world)] if world > 1 else []
    finished = on_main_then_share(state, lambda: _claim(out_dir, plan, overwrite, shards))
    if finished is not None:
        return finished if state.is_main_process else {}
    set_seed(cfg.seed)
    store = Store().check() if cfg.store else None
    done, n_store = _done(out_dir.path, plan, None if overwrite else store)  # --overwrite recomputes everything
    todo = {g: [it for k, it in enumerate(its) if k % world == rank and g.key(it.index) not in done]
            for g, its in plan.items.items()}
    total = sum(len(x) for x in todo.values())

    t_load = time.time()
    lm = None
    if total and backend is not None:
        lm = _server_model(cfg, backend, model_id)
    elif total:
        lm = loaded if isinstance(loaded, LoadedModel) else (loaded() if callable(loaded) else load_model(cfg.model))
    t_load = time.time() - t_load
    shard = out_dir.path / (f"predictions.rank{rank}.jsonl" if world > 1 else "predictions.jsonl")
    timings: dict[str, dict] = {"wall": {}, "cpu": {}}
    if lm is not None:
        scorer = Scorer(backend or lm.model, lm.tokenizer, cfg.method, cfg.batch_size, cfg.prefix_cache, cfg.length_norm,
                        seed=cfg.seed, batch_tokens=cfg.batch_tokens)
        _check_context(scorer, plan, todo)
        with Progress("eval", total, enabled=progress, main=state.is_main_process) as bar:
            timings = _score_groups(scorer, plan, todo, shard, bar)
    finish_barrier(state, group)
    if not state.is_main_process:
        return {}
    return _finish(plan, out_dir, store, lm, done, n_store, total, timings, t_load, world, environment())


def _server_backend(cfg: EvalConfig):
    """The client of the configured vllm / sglang server, its identity read (None for the native engine)."""
    if cfg.backend == "torch":
        return None
    from qtalign.engine.backend import open_backend

    return open_backend(cfg.backend, cfg.server_url, batch_size=cfg.batch_size)


def _server_model(cfg: EvalConfig, backend, model_id: dict) -> LoadedModel:
    """A served model: the tokenizer here (tokenisation stays in qtalign), the weights on the server."""
    source, gguf = resolve_source(cfg.model)
    tok = load_tokenizer(source, gguf, cfg.model.trust_remote_code, cfg.model.revision)
    info = {**_model_info(cfg.model, model_id), "source": source, "server": {"url": backend.url, "stats": backend.stats}}
    return LoadedModel(None, tok, info)


def _finish(plan: Plan, out_dir: OutputDir, store, lm, done: dict, n_store: int, total: int, timings: dict,
            t_load: float, world: int, env: dict) -> dict:
    """Merge the records, write predictions (in group and item order), the label report, the tables, the store's new
    records and results.json (last)."""
    out = out_dir.path
    records, want = dict(done), plan.keys()
    for p in [out / "predictions.jsonl", *sorted(out.glob("predictions.rank*.jsonl"))]:
        records.update({r["key"]: r for r in read_jsonl(p) if r.get("key") in want})
    recs = [records[g.key(it.index)] for g, its in plan.items.items() for it in its if g.key(it.index) in records]
    missing = len(plan.keys()) - len(recs)
    if missing:
        raise QtalignError(f"{out}: {missing} items have no record after scoring (a process failed?); rerun to resume")
    write_jsonl(out / "predictions.jsonl", recs)
    out_dir.remove(*[p.name for p in out.glob("predictions.rank*.jsonl") if out_dir.is_ours(p.name)])
    if store is not None:
        keys = store_keys(plan)
        for g, its in plan.items.items():
            store.add(keys[g], [records[g.key(it.index)] for it in its],
                      {"group": g.name, "covers": {**plan.covers(), "data_sha256": plan.data[f"{g.task}/{g.lang}"]}})
    specs = plan.specs
    classes = {t: specs.task(t).classes for t in plan.cfg.tasks}
    metrics = compute_metrics(recs, classes, plan.resource(), specs.order)
    _write_labels(plan, lm, out)
    results = {
        "config": plan.cfg.model_dump(mode="json"),
        "fingerprint": plan.fingerprint,
        "covers": plan.covers(),
        "model": lm.info if lm is not None else _model_info(plan.cfg.model, plan.model),
        "environment": env,
        "seed": plan.cfg.seed,
        "processes": world,
        "skipped": plan.skipped,
        "languages": {c: {"name": specs.language(c).english_name, "resource_group": specs.language(c).resource_group}
                      for c in sorted({g.lang for g in plan.groups}, key=specs.order.index)},
        "finished": time.time(),
        "timing": {"model_load_s": round(t_load, 2), "groups_s": timings["wall"], "items_scored_this_run": total,
                   "items_from_store": n_store, "eval_s": round(sum(timings["wall"].values()), 2),
                   "groups_cpu_s": timings["cpu"], "eval_cpu_s": round(sum(timings["cpu"].values()), 2)},
        "metrics": metrics,
        "clusters": plan.clusters(),
    }
    write_tables(metrics, plan.resource(), out)
    _write_lm_eval(plan, out, results, recs)
    if plan.cfg.report_to:
        log_metrics(plan.cfg.report_to, plan.cfg.tracking_dir or out / "tracking", eval_scalars(metrics), run_name=out.name)
    write_json(out / "results.json", results)
    return results


def _write_lm_eval(plan: Plan, out: Path, results: dict, recs: list[dict]) -> None:
    """The same results in lm-evaluation-harness's results and per-sample layouts (eval/interop.py)."""
    from qtalign.eval.interop import write_lm_eval

    items, prompts = {}, {}
    for g, its in plan.items.items():
        task = plan.specs.task(g.task)
        for it in its:
            items[g.key(it.index)] = it.fields
            prompts[g.key(it.index)] = task.prompt(g.lang, g.variant, it.fields)
    n_shot = {t: plan.specs.task(t).n_shot for t in plan.cfg.tasks}
    write_lm_eval(out, results, recs, n_shot, items, prompts)


def _model_info(mc, identity: dict) -> dict:
    """results.json's model record when every record came from the run dir or the store (no model was loaded)."""
    return {"name": mc.name, "identity": identity, "adapter": mc.adapter, "merged": bool(mc.adapter and mc.merge_adapter),
            "dtype": mc.dtype, "loaded": False}


def _write_labels(plan: Plan, lm, out: Path) -> None:
    from qtalign.eval.labels import label_report, write_label_report

    tok = lm.tokenizer if lm is not None else _tokenizer(plan.cfg)
    langs = sorted({g.lang for g in plan.groups}, key=plan.specs.order.index)
    write_label_report(label_report(tok, plan.specs, plan.cfg.tasks, langs, plan.cfg.variants), out)


def _tokenizer(cfg: EvalConfig):
    source, gguf = resolve_source(cfg.model)
    return load_tokenizer(source, gguf, cfg.model.trust_remote_code, cfg.model.revision)


# ------------------------------------------------------------------------------------------------------------------
# seeding the store from a published evaluation


def _recorded_config(src: Path, run: dict) -> EvalConfig:
    """The config a finished evaluation recorded; only the native engine's (a server's identity cannot be checked)."""
    from pydantic import ValidationError

    if "fingerprint" not in run or "config" not in run:
        raise QtalignError(f"{src / 'results.json'}: no fingerprint or config; not written by qtalign")
    try:
        recorded = EvalConfig.model_validate(run["config"])
    except ValidationError as e:
        raise QtalignError(f"{src / 'results.json'}: config: {e.errors()[0]['msg']}") from None
    if recorded.backend != "torch":
        raise QtalignError(f"{src}: scored by a {recorded.backend} server, whose identity cannot be checked here; only "
                           "evaluations of the native engine (backend torch) are imported")
    return recorded


RECORDS_DIGEST = "predictions.sha256"  # an export's digest of its per-item records (the uncompressed JSONL)


def records_bytes(folder: Path) -> bytes | None:
    """The per-item records of an evaluation folder as written (predictions.jsonl, or the export's .gz unpacked)."""
    import gzip

    if (folder / "predictions.jsonl").is_file():
        return (folder / "predictions.jsonl").read_bytes()
    if (folder / "predictions.jsonl.gz").is_file():
        return gzip.decompress((folder / "predictions.jsonl.gz").read_bytes())
    return None


def check_records_digest(folder: Path) -> bytes | None:
    """An export's records must match the digest it carries (a cut or edited file is refused, naming it). Returns the
    records' bytes it checked (None without a digest): the caller parses those, never a second read of the file."""
    from qtalign.io import bytes_sha256

    if not (folder / RECORDS_DIGEST).is_file():
        return None
    want = (folder / RECORDS_DIGEST).read_text(encoding="utf-8").split()[0]
    try:
        data = records_bytes(folder)
    except (OSError, EOFError) as e:  # a cut or damaged .gz
        raise QtalignError(f"{folder}: its predictions cannot be read ({type(e).__name__}); not imported") from None
    got = None if data is None else bytes_sha256(data)
    if got != want:
        raise QtalignError(f"{folder}: its predictions do not match the sha256 in {RECORDS_DIGEST} (changed or cut "
                           "since export); not imported")
    return data


def check_record(r: dict, gold: str | None, method: str, where: str) -> None:
    """A record that is consistent in itself: its gold is the data's, its correctness follows from prediction and gold,
    and (where the rule decides by the highest score: first-token, sequence) its prediction has the highest score, as
    its calibrated prediction has the highest calibrated score. One line naming the record and field otherwise."""
    def bad(field: str, why: str) -> QtalignError:
        return QtalignError(f"{where}: field '{field}': {why}; not imported")

    if gold is not None and r.get("gold") != gold:
        raise bad("gold", f"{r.get('gold')!r}, but the data's gold label is {gold!r}")
    for pred, correct, scores in (("pred", "correct", "scores"), ("cal_pred", "cal_correct", "cal_scores")):
        if pred not in r:
            continue
        if correct in r and bool(r[correct]) != (r[pred] == r.get("gold")):
            raise bad(correct, f"{r[correct]!r} does not follow from {pred} {r[pred]!r} and gold {r.get('gold')!r}")
        sc = r.get(scores)
        if method != "faithful" and isinstance(sc, dict) and sc:
            if r[pred] not in sc or sc[r[pred]] < max(sc.values()):
                raise bad(pred, f"{r[pred]!r} is not the class with the highest {scores} ({max(sc, key=sc.get)!r})")


def import_evaluation(src: str | Path, data_dir: str | None = None, prompts: list[str] | None = None,
                      adapter: str | None = None, store: Store | None = None) -> dict:
    """Add the per-item records of a finished evaluation folder (a run's ``eval/base``, or its ``--export`` copy with
    ``predictions.jsonl.gz``) to the shared store, after checking that they were computed under this machine's
    store keys: the folder's fingerprint is recomputed from its own config with this machine's data and prompt
    contents, model identity and engine numerics, and must equal the recorded one. ``data_dir`` / ``prompts`` /
    ``adapter`` say where those files are here when their paths differ from the recorded ones (paths are not
    results; contents are).
    Returns {"groups", "records", "added"}; a mismatch is one QtalignError naming the folder and what differs."""
    src = Path(src)
    run = read_json(src / "results.json")
    if run is None:
        what = "an unfinished evaluation" if read_json(src / "run.json") else "not an evaluation folder written by qtalign"
        raise QtalignError(f"{src}: {what} (no results.json); only finished evaluations are imported")
    recorded = _recorded_config(src, run)
    here = recorded.model_copy(update={k: v for k, v in {"data_dir": data_dir, "prompts": prompts}.items() if v})
    if adapter:
        here = here.model_copy(update={"model": here.model.model_copy(update={"adapter": adapter})})
    if here.model.adapter and not Path(here.model.adapter).expanduser().exists():
        raise QtalignError(f"{src}: its model's adapter {here.model.adapter} is not here; give its path with --adapter")
    model_id = model_identity(here.model)
    plan = here.plan(model_id)
    # the recorded config (its paths) with this machine's contents, model and numerics
    if plan.for_model(model_id, recorded).fingerprint != run["fingerprint"]:
        covers, numerics = run.get("covers", {}), plan.covers()["numerics"]
        if covers.get("numerics") != numerics:
            why = f"engine numerics {covers.get('numerics')} != {numerics} here"
        elif covers.get("model") != model_id:
            why = f"model {covers.get('model')} != {model_id} here"
        elif covers.get("data_sha256") != plan.data:
            bad = sorted(k for k in plan.data if covers.get("data_sha256", {}).get(k) != plan.data[k])
            why = f"data files differ here ({', '.join(bad[:4])}{' …' if len(bad) > 4 else ''})"
        else:
            why = "prompt or task-spec contents differ here"
        raise QtalignError(f"{src}: its records were computed under another store key ({why}); not imported")
    want = {g.key(it.index): (g, it) for g, its in plan.items.items() for it in its}
    checked = check_records_digest(src)
    records = parse_jsonl(checked.decode("utf-8").splitlines()) if checked is not None else \
        read_jsonl(src / "predictions.jsonl")
    by_group: dict[Group, list[dict]] = {}
    for i, r in enumerate(records, 1):
        g, it = want.get(r.get("key"), (None, None))
        if g is None or r.get("index") is None or g.key(r["index"]) != r["key"]:
            raise QtalignError(f"{src / 'predictions.jsonl'}: record {i}: key {r.get('key')!r} is not an item of this "
                               "evaluation's plan")
        check_record(r, plan.specs.task(g.task).classes[it.gold] if it.gold is not None else None, here.method,
                     f"{src / 'predictions.jsonl'}: record {i} ({r['key']})")
        by_group.setdefault(g, []).append(r)
    n = sum(len(v) for v in by_group.values())
    if n != len(want):
        raise QtalignError(f"{src / 'predictions.jsonl'}: {n} records for {len(want)} planned items; not imported")
    store = (store or Store()).check()
    keys = store_keys(plan)
    added = sum(store.add(keys[g], recs,
                          {"group": g.name, "imported_from": str(src),
                           "covers": {**plan.covers(), "data_sha256": plan.data[f"{g.task}/{g.lang}"]}})
                for g, recs in by_group.items())
    return {"groups": len(by_group), "records": n, "added": added}
