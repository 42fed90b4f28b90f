"""`qtalign lens` and `qtalign geometry`: evaluation's model/task/language/data options plus each analysis's own
(generated from LensConfig / GeometryConfig); `--compare LABEL=DIR` analyses the
base model + that LoRA adapter beside the base on the same items."""

from __future__ import annotations

import json

from qtalign.cli.options import add_common, add_config_options, add_model_options, build_config, save_config


def _cls(name: str):
    from qtalign.analysis.config import GeometryConfig, LensConfig

    return LensConfig if name == "lens" else GeometryConfig


def configure_parser(p, name: str) -> None:
    add_model_options(p)
    add_config_options(p, _cls(name), skip={"model"}, title=f"tasks, data and {name} options")
    add_common(p, out_help="output folder (summary.json, arrays, figures)", overwrite=False)


def run_cli(args) -> int:
    cfg = build_config(_cls(args.command), args, section=args.command)
    if args.save_config:
        save_config(cfg, args.save_config, args.command)
        return 0
    if args.command == "lens":
        from qtalign.analysis.lens import run_lens as run
    else:
        from qtalign.analysis.geometry import run_geometry as run
    s = run(cfg, args.out)
    for t in s["tables"]:
        print(f"### {t['title']}\n\n{t['markdown']}\n")
    print(json.dumps({"out": args.out, "figures": len(s["figures"]), "timing_s": s["timing_s"]}))
    return 0
