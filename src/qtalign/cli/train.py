"""`qtalign train` (options generated from TrainConfig: every field is a flag of the same name, e.g.
``--learning-rate``) and `qtalign merge`."""

from __future__ import annotations

import os

import json

from qtalign.cli.options import add_common, add_config_options, add_model_options, build_config, model_values, save_config


def configure_parser(p, name: str) -> None:
    from qtalign.train.config import TrainConfig

    add_model_options(p)
    if name == "merge":
        p.add_argument("--out", required=True, type=os.path.expanduser, help="merged model dir to write (a new folder, or one qtalign wrote)")
        return
    add_config_options(p, TrainConfig, skip={"model"}, title="training")
    add_common(p, out_help="output dir (resumable: rerun the same command after a kill)")


def run_cli(args) -> int:
    from qtalign.errors import QtalignError

    if args.command == "merge":
        from qtalign.engine.models import ModelConfig
        from qtalign.train.merge import merge

        ov = model_values(args)
        adapter = ov.pop("adapter", None)
        if not adapter:
            raise QtalignError("merge: --adapter DIR is required")
        dtype = ov.pop("dtype", "bf16")
        ov.pop("merge_adapter", None)
        print(f"wrote {merge(ModelConfig(**ov), adapter, args.out, dtype)}")
        return 0
    from qtalign.train.config import TrainConfig

    cfg = build_config(TrainConfig, args, section="train")
    if args.save_config:
        save_config(cfg, args.save_config, "train")
        return 0
    from qtalign.train.recipe import _world, train

    res = train(cfg, None, args.out, overwrite=args.overwrite)
    if _world()[0] == 0:
        print(res["tables"][0]["markdown"])
        print(json.dumps({"out": args.out, "adapter": res["adapter"], "timing_s": res["timing_s"]}))
    return 0
