"""`qtalign eval` and `qtalign labels`: options generated from EvalConfig."""

from __future__ import annotations

import json
from pathlib import Path

from qtalign.cli.options import add_common, add_config_options, add_model_options, build_config, save_config


def configure_parser(p, name: str) -> None:
    from qtalign.eval.config import EvalConfig

    add_model_options(p)
    g = p.add_argument_group("tasks, data and scoring")
    add_config_options(g, EvalConfig, skip={"model"} if name == "eval" else {"model", "method", "length_norm",
                                                                             "prefix_cache", "calibrate", "store",
                                                                             "backend", "server_url"})
    if name == "eval":
        add_common(p)
    else:
        add_common(p, out_required=False, overwrite=False, save=False,
                   out_help="write labels.md/labels.json here (default: print the markdown)")


def run_cli(args) -> int:
    from qtalign.eval.config import EvalConfig

    cfg = build_config(EvalConfig, args, section="eval")
    if args.command == "labels":
        return _labels(cfg, args.out)
    if args.save_config:
        save_config(cfg, args.save_config, "eval")
        return 0
    from qtalign.eval.run import evaluate

    res = evaluate(cfg, args.out, overwrite=args.overwrite)
    if res:
        print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
        print(json.dumps({"out": args.out, "eval_s": res["timing"]["eval_s"], "items_from_store": res["timing"]["items_from_store"]}))
    return 0


def _labels(cfg, out: str | None) -> int:
    from qtalign.eval.labels import label_report, label_markdown, write_label_report
    from qtalign.eval.run import _tokenizer
    from qtalign.io import OutputDir
    from qtalign.tasks.specs import load_specs

    specs = load_specs(cfg.prompts)
    langs = sorted({c for t in cfg.tasks for c in specs.resolve_langs(cfg.langs, t)}, key=specs.order.index)
    rows = label_report(_tokenizer(cfg), specs, cfg.tasks, langs, cfg.variants)
    if out:
        d = OutputDir(out, "labels").claim()
        d.record("labels.md", "labels.json")
        write_label_report(rows, d.path)
        print(f"wrote {d.path / 'labels.md'}")
    else:
        print(label_markdown(rows))
    return 0
