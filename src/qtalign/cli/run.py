"""`qtalign run [CONFIG ...] [key=value ...]`: the one-command experiment. The model options set `model.*`; the task
options set `eval.*`; `--data-dir`, `--prompts`, `--seed`, `--out` set the top-level keys."""

from __future__ import annotations

import os

import time

from qtalign.cli.options import _flatten, add_config_options, add_model_options, model_values

EVAL_OPTIONS = ["tasks", "langs", "variants", "limit", "items", "data_files", "split", "batch_size", "batch_tokens"]
TOP_OPTIONS = ["data_dir", "prompts", "seed", "out", "report_to"]


def configure_parser(p, name: str) -> None:
    from qtalign.eval.config import EvalConfig
    from qtalign.experiment.config import STAGES, ExperimentConfig

    p.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                   help="config files or bundled names (default: demo; see --list; several are merged left to right, "
                        "e.g. paper/zhde_en paper/model/qwen1.5-4b) and dotted overrides such as train.epochs=1 eval.langs=en,zh")
    g = p.add_argument_group("run")
    g.add_argument("--config", help="an experiment config file (the same as giving it as CONFIG)")
    add_config_options(g, ExperimentConfig, only=TOP_OPTIONS)
    g.add_argument("--stages", help=f"comma list: run only these stages ({','.join(STAGES)}); the others must be up to date")
    g.add_argument("--force", help="comma list of stages to rerun even when up to date ('all' for every stage)")
    g.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    g.add_argument("--list", action="store_true", help="list the bundled configs and exit")
    g.add_argument("--export", metavar="DIR", type=os.path.expanduser, help="after the run, copy the report, its figures, the small results and "
                   "the per-item predictions (compressed; no adapters, arrays or checkpoints) to DIR")
    add_model_options(p)
    add_config_options(p, EvalConfig, only=EVAL_OPTIONS, title="evaluation (eval.*)")


def cli_overrides(args) -> dict:
    """The command line's options as dotted config keys."""
    extra = {f"model.{k}": v for k, v in model_values(args).items()}
    for key, k in [*((f"eval.{k}", k) for k in EVAL_OPTIONS), *((k, k) for k in TOP_OPTIONS)]:
        if getattr(args, k, None) is not None:
            extra[key] = _flatten(getattr(args, k))
    return extra


def split_args(args: list[str], config: str | None) -> tuple[list[str], list[str]]:
    """(config names, key=value overrides): a dotted key never contains a path separator or a config suffix."""
    configs, overrides = ([config] if config else []), []
    for a in args:
        key = a.split("=", 1)[0]
        (overrides if "=" in a and "/" not in key and not key.endswith((".yaml", ".yml", ".json")) else configs).append(a)
    return configs, overrides


def run_cli(args) -> int:
    from qtalign.experiment.config import dump_config, list_configs, load_experiment, resolve_config_path
    from qtalign.tasks.items import comma_list

    if args.list:
        for n in list_configs():
            first = resolve_config_path(n).read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
            print(f"{n:34s} {first}")
        return 0
    configs, overrides = split_args(args.args, args.config)
    cfg = load_experiment(configs or None, overrides, cli_overrides(args))
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from qtalign.experiment.parallel import run_processes

    t0 = time.time()
    if not run_processes(cfg, comma_list(args.stages) if args.stages else None, comma_list(args.force) if args.force else None):
        return 0  # another process of a several-process run: the main one owns the run dir and reports
    rd = cfg.run_dir
    if args.export:
        from qtalign.report.export import export_run

        print(f"exported the report and its predictions to {export_run(rd, args.export)}")
    print(f"done in {time.time() - t0:.0f} s: {rd}" + (f"; report: {rd / 'report.html'}" if (rd / "report.html").exists() else ""))
    return 0
