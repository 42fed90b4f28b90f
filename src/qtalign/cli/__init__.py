"""Command line: `qtalign <command> ...` (also `python -m qtalign` and `accelerate launch -m qtalign`).

Each stage module contributes `configure_parser(parser)` and `run_cli(args) -> int`; this file holds the option
groups that several commands share (model, data/task selection) so they read the same everywhere.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from qtalign.errors import QtalignError

# command -> (module, help). Modules import their heavy dependencies lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("qtalign.cli.eval", "few-shot evaluation over tasks x languages x label variants"),
    "labels": ("qtalign.cli.eval", "label-tokenisation report for a model"),
    "lens": ("qtalign.cli.analysis", "language logit lens: English vs output-language label probability per layer"),
    "geometry": ("qtalign.cli.analysis", "cross-lingual representation geometry per layer (PCA, PC1 correlation, cosine, CKA)"),
    "build-data": ("qtalign.qtdata.build", "question-translation training data (the paper's alignment records)"),
    "train": ("qtalign.train.recipe", "LoRA instruction tuning on question-translation data (resumable; accelerate launch for data parallel)"),
    "merge": ("qtalign.train.recipe", "merge a LoRA adapter into its base model (in fp32) and save it"),
    "models": ("qtalign.cli.models", "list the embedded models: installed, converted, size, licence"),
    "run": ("qtalign.experiment.runner", "one-command experiment: data, tuning, evaluation, analyses and report (default: the demo)"),
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="embedded model (gemma-3-270m, the default; qwen2.5-coder-0.5b; qwen2.5-coder-1.5b: "
                   "see `qtalign models`), hub id, local HF dir or .gguf file")
    g.add_argument("--gguf-file", help="GGUF file name inside --model")
    g.add_argument("--adapter", help="LoRA adapter dir, applied unmerged")
    g.add_argument("--merge-adapter", action="store_true", default=None, help="merge the adapter (in fp32) before use")
    g.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], help="weights/compute dtype (default bf16)")
    g.add_argument("--load-in-4bit", action="store_true", default=None, help="NF4 via bitsandbytes (CUDA only)")
    g.add_argument("--trust-remote-code", action="store_true", default=None)
    g.add_argument("--revision")
    g.add_argument("--device", help="auto | cpu | cuda")


def model_overrides(args) -> dict:
    keys = ["gguf_file", "adapter", "merge_adapter", "dtype", "load_in_4bit", "trust_remote_code", "revision", "device"]
    d = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "model", None):
        d["name"] = args.model
    return d


def with_model_overrides(d: dict, args) -> dict:
    """The config dict `d` with the command line's model options folded into its `model` section."""
    d["model"] = {**d.get("model", {}), **model_overrides(args)}
    return d


def add_task_args(p: argparse.ArgumentParser, variants: bool = True) -> None:
    g = p.add_argument_group("tasks and data")
    g.add_argument("--config", help="YAML/JSON config file; command-line options override it")
    g.add_argument("--tasks", help="comma list: emotion,snli,paws")
    g.add_argument("--langs", help="comma list of language codes, or all / high / low")
    if variants:
        g.add_argument("--variants", "--variant", dest="variants", help="comma list: enout,native,irrelevant")
    g.add_argument("--data-dir", help="folder in the official layout (e.g. ../shared/data/official)")
    g.add_argument("--data-files", help="path template with {task},{lang} (.json/.jsonl), 'demo', or hf:<dataset>")
    g.add_argument("--split", help="split for hf: datasets")
    g.add_argument("--prompts", action="append", help="spec file merged over the defaults (e.g. paper_prompts.json); repeatable")
    g.add_argument("--limit", type=int, help="first N items per language")
    g.add_argument("--items", help="item range START:END")
    g.add_argument("--batch-size", type=int)


def load_config_file(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise QtalignError(f"{p}: config file not found")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise QtalignError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise QtalignError(f"{p}: a config file must be a mapping")
    return d


def task_overrides(args, keys=("tasks", "langs", "variants", "data_dir", "data_files", "split", "prompts", "limit", "items", "batch_size")) -> dict:
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def validation_message(e: ValidationError, where: str = "config") -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    extra = "" if len(e.errors()) == 1 else f" (and {len(e.errors()) - 1} more)"
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    return f"{where}: field '{loc}': {msg}{extra}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(mod).configure_parser(p, name)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv and "run" in COMMANDS:
        argv = ["run"]  # `qtalign` alone runs the demo experiment
    args, rest = parser.parse_known_args(argv)
    # positionals may follow options (`qtalign run CONFIG --data-dir D key=value`): give them to the command
    if rest and isinstance(getattr(args, "args", None), list) and not any(r.startswith("-") for r in rest):
        args.args += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run_cli(args) or 0)
    except QtalignError as e:
        print(f"qtalign {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"qtalign {args.command}: error: {validation_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qtalign {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
