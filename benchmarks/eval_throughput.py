"""Evaluation throughput: qtalign's scorer against (a) the official scripts' method and (b) lm-evaluation-harness.

Same loaded model, same items, same prompts, one process. Per task x language group, every method scores the
group's items in turn (interleaved by group, so that changes in machine load hit all methods alike), after an
untimed warm-up. Printed: items/s per method, the ratios ours/official and ours/lm-eval, and how often the
predictions agree.

- ours: ``scoring.Scorer`` (batched, length-sorted, prefix KV cache, logits only at the last position) over the
  requests ``evaluate.build_requests`` makes, in the three scoring methods first-token, faithful and sequence;
- official: the official eval scripts' loop (docs/notes_research.md §1): batch 1, ``tokenizer(prompt)``,
  ``model.forward(input_ids).logits`` at every position, softmax (fp32) over the full vocabulary, summed
  probability of ``faithful.official_candidates`` at the last position, random tie-break, no ``torch.no_grad``;
  it must agree with ours in ``faithful`` mode;
- lm-eval: lm-evaluation-harness 0.4.x ``HFLM`` on the same model object, one ``ConfigurableTask`` per group over
  a JSON file of the same items (doc_to_text = our full prompt, choices = the label words, target_delimiter="",
  0-shot); its rule is the full-label log-likelihood, so it must agree with ours in ``sequence`` mode.

Run: ``python benchmarks/eval_throughput.py`` (see benchmarks/README.md, section "Evaluation throughput").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QTALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))
OURS = ("first-token", "faithful", "sequence")
COLUMNS = ("first-token", "faithful", "sequence", "official", "lm-eval")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from qtalign.eval.run import build_requests  # noqa: E402
from qtalign.scoring.faithful import official_candidates, official_decision  # noqa: E402
from qtalign.scoring.scorer import Scorer, ScoreRequest  # noqa: E402
from qtalign.tasks.groups import Group as TaskGroup  # noqa: E402


@dataclass
class Group:
    task: object  # TaskSpec
    lang: str
    variant: str
    items: list  # data.Item

    @property
    def name(self) -> str:
        return TaskGroup(self.task.name, self.variant, self.lang).name


@dataclass
class Timing:
    items: int = 0
    tokens: int = 0  # prompt tokens of the scored items (a length-independent measure of the work)
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time (less sensitive to other load on a shared machine)
    preds: dict = field(default_factory=dict)  # request key -> predicted class index
    raw: dict = field(default_factory=dict)  # request key -> per-class numbers (mass or log-likelihood)

    def add(self, n: int, tokens: int, s: float, cpu: float, scored: dict) -> None:
        self.items += n
        self.tokens += tokens
        self.seconds += s
        self.cpu_seconds += cpu
        self.preds.update({k: v[0] for k, v in scored.items()})
        self.raw.update({k: v[1] for k, v in scored.items()})

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")

    @property
    def token_rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def spaced(items: list, n: int | None) -> list:
    """n items spread evenly over the list (the slow baselines see the same length mix as the full set)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


# -- (a) the official method ---------------------------------------------------------------------------------
def official_scores(model, tokenizer, reqs: list[ScoreRequest], rng: random.Random | None = None) -> dict:
    """The official eval loop, re-implemented: one item at a time, full logits at every position, softmax over
    the full vocabulary, summed candidate-token probability at the last position, no ``torch.no_grad``.
    ``reqs`` are faithful-method requests (``forced`` = the Thai two-step's prefix, appended as
    ``tokenizer(prefix)`` with its default special tokens, as the script does). Returns key -> (pred, masses)."""
    rng = rng or random.Random(0)
    sets: dict[str, list[int]] = {}
    for r in reqs:  # the scripts build the candidate sets once, before the loop
        for w in r.words:
            if w not in sets:
                sets[w] = official_candidates(tokenizer, w)
    device = next(model.parameters()).device
    out = {}
    for r in reqs:
        input_ids = tokenizer(r.prefix + r.question, return_tensors="pt")["input_ids"].to(device)
        if r.forced:
            input_ids = torch.cat((input_ids, tokenizer(r.forced, return_tensors="pt")["input_ids"].to(device)), dim=-1)
        logits = model.forward(input_ids).logits.float()  # transformers 4.38 Mistral/Qwen2 return fp32 logits
        probs = torch.nn.functional.softmax(logits, dim=-1)
        mass = [sum(probs[0][-1][i].item() for i in sets[w]) for w in r.words]
        out[r.key] = (official_decision(mass, rng), mass)
    return out


def official_predict(model, tokenizer, reqs: list[ScoreRequest], rng: random.Random | None = None) -> dict:
    return {k: v[0] for k, v in official_scores(model, tokenizer, reqs, rng).items()}


# -- ours ------------------------------------------------------------------------------------------------------
def ours_scores(scorer: Scorer, reqs: list[ScoreRequest]) -> dict:
    """key -> (pred, raw per-class numbers)."""
    return {s.key: (s.pred, s.raw) for s in scorer.score(reqs)}


def ours_predict(scorer: Scorer, reqs: list[ScoreRequest]) -> dict:
    return {k: v[0] for k, v in ours_scores(scorer, reqs).items()}


# -- (b) lm-evaluation-harness -----------------------------------------------------------------------------------
def lm_eval_task(group: Group, folder: Path, items: list | None = None):
    """A ConfigurableTask over a JSON file of the group's items: our full prompt, the label words as choices,
    the gold class index as target, no delimiter between the prompt's opening quote and the label."""
    from lm_eval.api.task import ConfigurableTask

    items = group.items if items is None else items
    reqs = build_requests(group.task, group.lang, group.variant, items, "sequence")
    docs = [{"key": r.key, "text": r.prefix + r.question, "choices": list(r.words), "label": it.gold or 0}
            for r, it in zip(reqs, items)]
    name = "qtalign_bench_" + group.name.replace("/", "_") + f"_{len(items)}"
    path = folder / f"{name}.json"
    path.write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
    return ConfigurableTask(config={
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": lambda d: d["text"],
        "doc_to_choice": lambda d: d["choices"],
        "doc_to_target": lambda d: d["label"],
        "target_delimiter": "",
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc"}],
    })


@dataclass
class LmEval:
    lm: object  # HFLM on our model object
    manager: object  # a TaskManager without lm-eval's bundled tasks (indexing those takes ~10-50 s per call)


def make_lm_eval(model, tokenizer, batch_size: int) -> LmEval:
    import logging

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return LmEval(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), TaskManager(include_defaults=False))


def lm_eval_scores(le: LmEval, task) -> dict:
    """Request key -> lm-eval's log-likelihood of each choice (from the logged samples)."""
    import lm_eval

    res = lm_eval.simple_evaluate(model=le.lm, tasks=[task], task_manager=le.manager, log_samples=True, bootstrap_iters=0)
    return {s["doc"]["key"]: [float(fr[0]) for fr in s["filtered_resps"]] for s in res["samples"][task.config.task]}


def lm_eval_predict(le: LmEval, task) -> dict:
    """lm-eval's prediction (argmax log-likelihood, first class on ties, as its `acc`)."""
    return {k: v[0] for k, v in lm_eval_scored(le, task).items()}


def lm_eval_scored(le: LmEval, task) -> dict:
    return {k: (max(range(len(ll)), key=lambda i: (ll[i], -i)), ll) for k, ll in lm_eval_scores(le, task).items()}


# -- the benchmark ---------------------------------------------------------------------------------------------
def agreement(a: dict, b: dict) -> tuple[int, int]:
    """(matching predictions, items both scored)."""
    common = [k for k in a if k in b]
    return sum(a[k] == b[k] for k in common), len(common)


def run_benchmark(model, tokenizer, groups: list[Group], batch_size: int = 8, n_official: int | None = 6,
                  n_lm_eval: int | None = None, columns=COLUMNS, warmup: int = 2, log=print) -> dict:
    """Score every group with every method in ``columns`` (interleaved by group) and time it.
    ``n_official`` / ``n_lm_eval`` limit those methods to N items per group, evenly spaced (None: all)."""
    columns = [c for c in COLUMNS if c in columns]
    n_tokens = {}  # (group, item index) -> prompt tokens
    for g in groups:
        for r, it in zip(build_requests(g.task, g.lang, g.variant, g.items, "first-token"), g.items):
            n_tokens[g.name, it.index] = len(tokenizer(r.prefix + r.question)["input_ids"])
    scorers = {m: Scorer(model, tokenizer, m, batch_size=batch_size, prefix_cache=True) for m in OURS if m in columns}
    for g in groups:  # candidate sets are built once per label-word set (cached by the scorer), outside the timing
        if "first-token" in scorers:
            scorers["first-token"].plan(g.task.label_words(g.lang, g.variant))
    tmp = tempfile.TemporaryDirectory(prefix="qtalign_bench_")
    folder = Path(tmp.name)
    lm = None
    lm_tasks = {}
    if "lm-eval" in columns:
        lm = make_lm_eval(model, tokenizer, batch_size)
        for g in groups:  # dataset building (datasets' json loader) is set-up, not evaluation
            lm_tasks[g.name] = lm_eval_task(g, folder, spaced(g.items, n_lm_eval))

    def call(col: str, g: Group, items: list, lm_task=None) -> dict:
        if col in scorers:
            return ours_scores(scorers[col], build_requests(g.task, g.lang, g.variant, items, col))
        if col == "official":
            return official_scores(model, tokenizer, build_requests(g.task, g.lang, g.variant, items, "faithful"))
        return lm_eval_scored(lm, lm_task or lm_eval_task(g, folder, items))

    def subset(col: str, g: Group) -> list:
        return spaced(g.items, {"official": n_official, "lm-eval": n_lm_eval}.get(col))

    # warm-up: every method once on a couple of items (first-call costs: kernels, tables, lm-eval imports)
    g0 = groups[0]
    for col in columns:
        call(col, g0, g0.items[:warmup])
    timings = {c: Timing() for c in columns}
    per_task: dict[str, dict[str, Timing]] = {}
    load = [os.getloadavg()[0]]
    for gi, g in enumerate(groups):
        order = columns[gi % len(columns):] + columns[: gi % len(columns)]  # rotate the order across groups
        for col in order:
            items = subset(col, g)
            t0, c0 = time.perf_counter(), time.process_time()
            scored = call(col, g, items, lm_tasks.get(g.name) if col == "lm-eval" else None)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            ntok = sum(n_tokens[g.name, it.index] for it in items)
            timings[col].add(len(items), ntok, dt, dc, scored)
            per_task.setdefault(g.task.name, {}).setdefault(col, Timing()).add(len(items), ntok, dt, dc, {})
            log(f"  {g.name:<22} {col:<12} {len(items):>4} items {dt:8.2f} s  {len(items) / dt:7.2f} items/s")
        load.append(os.getloadavg()[0])
    tmp.cleanup()
    rates = {c: timings[c].rate for c in columns}
    cpu_rates = {c: timings[c].items / timings[c].cpu_seconds if timings[c].cpu_seconds > 0 else float("nan") for c in columns}

    def ratio_table(r: dict) -> dict:
        return {f"{m}/{base}": r[m] / r[base] for base in ("official", "lm-eval") if base in r for m in OURS if m in r}

    ratios = ratio_table(rates)
    token_rates = {c: timings[c].token_rate for c in columns}
    task_rates = {t: {c: tm.rate for c, tm in d.items()} for t, d in per_task.items()}
    pairs = [("faithful", "official"), ("first-token", "official"), ("sequence", "lm-eval"), ("first-token", "lm-eval"),
             ("first-token", "faithful"), ("first-token", "sequence")]
    agree = {}
    for a, b in pairs:
        if a in timings and b in timings:
            k, n = agreement(timings[a].preds, timings[b].preds)
            agree[f"{a} vs {b}"] = {"agree": k, "n": n, "rate": k / n if n else float("nan")}
            if (a, b) in (("faithful", "official"), ("sequence", "lm-eval")):  # same quantity on both sides
                ra, rb = timings[a].raw, timings[b].raw
                diffs = [abs(x - y) for key in ra if key in rb for x, y in zip(ra[key], rb[key])]
                agree[f"{a} vs {b}"]["max_abs_diff"] = max(diffs, default=float("nan"))
    return {
        "items": {c: timings[c].items for c in columns},
        "seconds": {c: round(timings[c].seconds, 3) for c in columns},
        "cpu_seconds": {c: round(timings[c].cpu_seconds, 3) for c in columns},
        "items_per_s": rates,
        "ratios": ratios,
        "prompt_tokens": {c: timings[c].tokens for c in columns},
        "prompt_tokens_per_s": token_rates,
        "token_ratios": ratio_table(token_rates),
        "items_per_cpu_s": cpu_rates,
        "cpu_ratios": ratio_table(cpu_rates),
        "per_task": {t: {"items_per_s": task_rates[t], "ratios": ratio_table(task_rates[t]),
                         "items": {c: tm.items for c, tm in per_task[t].items()}} for t in per_task},
        "agreement": agree,
        "load_avg_1min": {"min": min(load), "max": max(load), "samples": load},
        "predictions": {c: {str(k): v for k, v in timings[c].preds.items()} for c in columns},
    }


def efficiency(model, tokenizer, groups: list[Group], res: dict, threads: int, peak: float, cached=OURS,
               seconds: str = "seconds") -> dict:
    """Needed FLOPs (benchmarks/flops.py) of the items each method scored, achieved FLOP/s and its fraction of the
    machine's bf16 matmul peak measured in the same run: prefix-cached methods compute each group's prefix once and
    every suffix (the methods in ``cached``); the official method and lm-eval compute every full prompt. ``seconds``:
    'seconds' (wall) or 'cpu_seconds' (with a peak measured per CPU second)."""
    from qtalign.engine.forward import encode_prompts

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flops import model_shape, prompt_flops

    shape = model_shape(model)
    scorer = Scorer(model, tokenizer, "first-token")
    per_item, prefix_once = {}, {}
    for g in groups:
        reqs = build_requests(g.task, g.lang, g.variant, g.items, "first-token")
        cols = sum(len(s) for s in scorer.candidates(scorer.plan(reqs[0].words)[1]).sets)
        for r, e, it in zip(reqs, encode_prompts(tokenizer, scorer.prompts(reqs)), g.items):
            p, n = e.prefix_len, len(e.ids)
            per_item[g.name, it.index] = {"cached": prompt_flops(shape, p, n - p, cols), "full": prompt_flops(shape, 0, n, cols)}
            prefix_once[g.name] = prompt_flops(shape, 0, p, 0)
    out = {"peak_gflops": peak, "threads": threads, "clock": "cpu" if seconds == "cpu_seconds" else "wall",
           "shape": shape.__dict__, "methods": {}}
    for c, keys in res["predictions"].items():
        cached_here = c in cached
        tot = 0.0
        seen_groups = set()
        for k in keys:
            gname, _, idx = k.rpartition("/")
            tot += per_item[gname, int(idx)]["cached" if cached_here else "full"]
            if cached_here and gname not in seen_groups:
                seen_groups.add(gname)
                tot += prefix_once[gname]
        gflops = tot / res[seconds][c] / 1e9 if res[seconds][c] else float("nan")
        out["methods"][c] = {"needed_tflop": tot / 1e12, "achieved_gflops": gflops, "fraction_of_peak": gflops / peak}
    return out


def efficiency_table(e: dict) -> str:
    per = " per CPU second" if e.get("clock") == "cpu" else ""
    lines = [f"bf16 matmul peak measured in this run: {e['peak_gflops']:.0f} GFLOP/s{per} at {e['threads']} thread(s)", "",
             "| method | needed TFLOP | achieved GFLOP/s | fraction of peak |", "|---|---:|---:|---:|"]
    for c, m in e["methods"].items():
        lines.append(f"| {c} | {m['needed_tflop']:.3f} | {m['achieved_gflops']:.0f} | {100 * m['fraction_of_peak']:.1f} % |")
    return "\n".join(lines)


def _x(v) -> str:
    return "" if v is None else f"{v:.1f}×"


def format_table(res: dict) -> str:
    lines = ["| method | items | wall s | CPU s | items/s | ÷ official | ÷ lm-eval | prompt tokens/s | ÷ official | ÷ lm-eval |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, r in res["items_per_s"].items():
        ra, rt = res["ratios"], res["token_ratios"]
        lines.append(f"| {c} | {res['items'][c]} | {res['seconds'][c]:.1f} | {res['cpu_seconds'][c]:.1f} | {r:.3g} | "
                     f"{_x(ra.get(f'{c}/official'))} | {_x(ra.get(f'{c}/lm-eval'))} | {res['prompt_tokens_per_s'][c]:.0f} | "
                     f"{_x(rt.get(f'{c}/official'))} | {_x(rt.get(f'{c}/lm-eval'))} |")
    cr = res.get("cpu_ratios") or {}
    if cr:
        lines += ["", "Per CPU second (robust to other jobs on the machine): " + "; ".join(
            f"{k.replace('/', ' ÷ ')} {v:.1f}×" for k, v in cr.items())]
    if len(res["per_task"]) > 1:
        cols = list(res["items_per_s"])
        lines += ["", "| task | " + " | ".join(f"{c} items/s" for c in cols) + " | ours ÷ official | ours ÷ lm-eval |",
                  "|---|" + "---:|" * (len(cols) + 2)]
        for t, d in res["per_task"].items():
            ro = " / ".join(f"{m} {_x(d['ratios'].get(f'{m}/official'))}" for m in OURS if f"{m}/official" in d["ratios"])
            rl = " / ".join(f"{m} {_x(d['ratios'].get(f'{m}/lm-eval'))}" for m in OURS if f"{m}/lm-eval" in d["ratios"])
            lines.append(f"| {t} | " + " | ".join(f"{d['items_per_s'].get(c, float('nan')):.3g}" for c in cols) + f" | {ro} | {rl} |")
    lines += ["", "| predictions | agree | n | rate | max abs diff of the scores |", "|---|---:|---:|---:|---:|"]
    for name, a in res["agreement"].items():
        d = a.get("max_abs_diff")
        lines.append(f"| {name} | {a['agree']} | {a['n']} | {100 * a['rate']:.1f} % | {'' if d is None else f'{d:.2g}'} |")
    return "\n".join(lines)


def load_groups(specs, source, tasks: list[str], langs: list[str], variant: str, n: int | None, items: str | None = None) -> list[Group]:
    from qtalign.tasks.items import load_items, parse_range

    groups = []
    for t in tasks:
        task = specs.task(t)
        for lang in specs.resolve_langs(langs, t):
            if not source.exists(task, lang):
                print(f"skip {t}/{lang}: no data under {source.describe()}", file=sys.stderr)
                continue
            its = load_items(task, lang, source, parse_range(items))
            groups.append(Group(task, lang, variant, its[:n] if n else its))
    return groups


def build_parser() -> argparse.ArgumentParser:
    from qtalign.cli.options import add_model_options as add_model_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    g = p.add_argument_group("benchmark")
    default_data = SHARED / "official"
    g.add_argument("--tasks", default="emotion,snli", help="comma list of tasks (default emotion,snli)")
    g.add_argument("--langs", default="en,de,zh", help="comma list of language codes (default en,de,zh)")
    g.add_argument("--variant", default="enout", help="label variant (default enout, the paper's main setting)")
    g.add_argument("--n", type=int, default=24, help="items per task x language for our methods (default 24)")
    g.add_argument("--n-official", type=int, default=6, help="items per group for the (slow) official method (default 6)")
    g.add_argument("--n-lm-eval", type=int, default=8, help="items per group for lm-eval (default 8; 0 = --n)")
    g.add_argument("--items", help="item range START:END before --n (default: from the first item)")
    g.add_argument("--batch-size", type=int, default=8, help="batch size for ours and lm-eval (default 8)")
    g.add_argument("--data-dir", default=str(default_data) if default_data.exists() else None,
                   help=f"official layout folder (default {default_data}; the demo data when absent)")
    g.add_argument("--prompts", action="append",
                   help=f"spec file merged over the defaults (default {SHARED / 'paper_prompts.json'} when present)")
    g.add_argument("--skip-lm-eval", action="store_true", help="do not run lm-evaluation-harness")
    g.add_argument("--skip-official", action="store_true", help="do not run the official method")
    g.add_argument("--methods", default=",".join(OURS), help="our scoring methods to time (default all three)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads, the same for every method (default 1: on a shared, loaded 2-core machine "
                        "2 threads ran 5-25x slower and erratically; 0 = torch's default)")
    g.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time base of the efficiency figures: wall (a quiet machine) or cpu (this process's CPU seconds, "
                        "for the peak too: a machine shared with other jobs; default wall). Items/s are given in both")
    g.add_argument("--json", help="write the full results (with per-item predictions) here")
    return p


def main(argv: list[str] | None = None) -> int:
    from qtalign.cli.options import model_values as model_overrides
    from qtalign.tasks.items import DataSource
    from qtalign.errors import QtalignError
    from qtalign.engine.models import ModelConfig, load_model
    from qtalign.tasks.specs import load_specs

    args = build_parser().parse_args(argv)
    random.seed(0)
    torch.manual_seed(0)
    try:
        prompts = args.prompts or ([str(SHARED / "paper_prompts.json")] if (SHARED / "paper_prompts.json").exists() else [])
        specs = load_specs(prompts)
        source = DataSource(data_dir=args.data_dir) if args.data_dir else DataSource.demo()
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        langs = [x.strip() for x in args.langs.split(",") if x.strip()]
        groups = load_groups(specs, source, tasks, langs, args.variant, args.n, args.items)
        if not groups:
            raise QtalignError(f"nothing to benchmark: no data under {source.describe()} for {tasks} x {langs}")
        columns = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in columns if m not in OURS]
        if bad:
            raise QtalignError(f"--methods: unknown {bad} (choose from {', '.join(OURS)})")
        if not args.skip_official:
            columns.append("official")
        if not args.skip_lm_eval:
            try:
                import lm_eval  # noqa: F401
            except ImportError:
                raise QtalignError('lm-evaluation-harness is not installed: pip install "lm_eval>=0.4.8" (or --skip-lm-eval)') from None
            columns.append("lm-eval")
        cfg = ModelConfig(**model_overrides(args))
        if args.threads:
            torch.set_num_threads(args.threads)
        t0 = time.time()
        loaded = load_model(cfg)
    except QtalignError as e:
        print(f"eval_throughput: error: {e}", file=sys.stderr)
        return 2
    print(f"model {cfg.name} ({cfg.dtype}, {loaded.info['device']}) loaded in {time.time() - t0:.1f} s; torch threads "
          f"{torch.get_num_threads()}; {len(groups)} groups x {args.n} items from {source.describe()}; "
          f"batch size {args.batch_size}; load avg {os.getloadavg()[0]:.2f}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flops import matmul_peak, model_shape

    shape = model_shape(loaded.model)
    mm_shapes = [(512, shape.hidden, shape.ffn), (512, shape.ffn, shape.hidden)]
    peak0 = matmul_peak(torch.get_num_threads(), mm_shapes, clock=args.clock)
    res = run_benchmark(loaded.model, loaded.tokenizer, groups, args.batch_size, args.n_official or None,
                        args.n_lm_eval or None, columns)
    peak = max(peak0, matmul_peak(torch.get_num_threads(), mm_shapes, clock=args.clock))  # before and after: the better
    res["efficiency"] = efficiency(loaded.model, loaded.tokenizer, groups, res, torch.get_num_threads(), peak,
                                   seconds="cpu_seconds" if args.clock == "cpu" else "seconds")
    res["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    res["model"] = loaded.info
    res["torch_threads"] = torch.get_num_threads()
    print()
    print(format_table(res))
    print()
    print(efficiency_table(res["efficiency"]))
    la = res["load_avg_1min"]
    print(f"\n1-min load average during the run: {la['min']:.2f} to {la['max']:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, ensure_ascii=False, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
