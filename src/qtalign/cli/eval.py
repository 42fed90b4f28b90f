"""`qtalign eval` and `qtalign labels`."""

from __future__ import annotations

import json
from pathlib import Path

from qtalign.cli import add_model_args, add_task_args, load_config_file, task_overrides, with_model_overrides


def configure_parser(p, name: str) -> None:
    add_model_args(p)
    add_task_args(p)
    if name == "eval":
        g = p.add_argument_group("scoring and output")
        g.add_argument("--method", choices=["first-token", "faithful", "sequence"], help="scoring rule (default first-token)")
        g.add_argument("--length-norm", action="store_true", default=None, help="sequence: mean token log-prob")
        g.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=None)
        g.add_argument("--no-calibrate", dest="calibrate", action="store_false", default=None)
        g.add_argument("--out", required=True, help="output dir (resumable)")
        g.add_argument("--overwrite", action="store_true", help="discard a previous run in --out")
        g.add_argument("--save-config", help="write the resolved config as YAML and exit")
    else:
        p.add_argument("--out", help="write labels.md/labels.json here (default: print markdown)")


def eval_config(args):
    from qtalign.eval.config import EvalConfig

    d = load_config_file(getattr(args, "config", None))
    d = d.get("eval", d)
    d.update(task_overrides(args))
    for k in ("method", "length_norm", "prefix_cache", "calibrate"):
        if getattr(args, k, None) is not None:
            d[k] = getattr(args, k)
    with_model_overrides(d, args)
    return EvalConfig(**d)


def run_cli(args) -> int:
    cfg = eval_config(args)
    if args.command == "labels":
        from qtalign.eval.labels import label_report, write_label_report
        from qtalign.eval.run import _tokenizer
        from qtalign.tasks.specs import load_specs

        specs = load_specs(cfg.prompts)
        langs = sorted({c for t in cfg.tasks for c in specs.resolve_langs(cfg.langs, t)}, key=specs.order.index)
        rows = label_report(_tokenizer(cfg), specs, cfg.tasks, langs, cfg.variants)
        out = Path(args.out) if args.out else Path(".")
        if args.out:
            out.mkdir(parents=True, exist_ok=True)
            write_label_report(rows, out)
            print(f"wrote {out / 'labels.md'}")
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                write_label_report(rows, Path(d))
                print((Path(d) / "labels.md").read_text())
        return 0
    if args.save_config:
        import yaml

        Path(args.save_config).write_text(yaml.safe_dump({"eval": cfg.model_dump()}, sort_keys=False, allow_unicode=True))
        print(f"wrote {args.save_config}")
        return 0
    from qtalign.eval.run import evaluate

    res = evaluate(cfg, args.out, overwrite=args.overwrite)
    if res:
        print((Path(args.out) / "table.md").read_text())
        print(json.dumps({"out": args.out, "eval_s": res["timing"]["eval_s"]}))
    return 0
