"""`qtalign lens` and `qtalign geometry`: the same model/task/language/data options as `qtalign eval`, plus
`--compare-adapter [LABEL=]DIR` to analyse a tuned model (base + LoRA adapter) beside the base on the same items."""

from __future__ import annotations

import json
from pathlib import Path

from qtalign.cli import add_model_args, add_task_args, load_config_file, task_overrides, with_model_overrides
from qtalign.errors import QtalignError


def configure_parser(p, name: str) -> None:
    add_model_args(p)
    add_task_args(p)
    g = p.add_argument_group(f"{name} options")
    g.add_argument("--compare-adapter", action="append", metavar="[LABEL=]DIR",
                   help="also analyse the base model + this LoRA adapter (label default 'tuned') on the same items; repeatable")
    if name == "lens":
        g.add_argument("--keep-overlap", action="store_true", default=None,
                       help="keep items whose English and output-language token sets overlap (their shared mass is reported as 'overlap')")
    else:
        g.add_argument("--pools", help="comma list: prompt,query,last (default all three)")
        g.add_argument("--layers", help="comma list of layers for the scatter plots and pair heatmaps (default 5 evenly spaced)")
        g.add_argument("--reference", help="reference language for cosine similarity and per-layer heatmaps (default en)")
        g.add_argument("--save-vectors", action="store_true", default=None, help="also save the pooled vectors (float16)")
    g.add_argument("--seed", type=int)
    g.add_argument("--out", required=True, help="output folder (summary.json, arrays, figures)")
    g.add_argument("--save-config", help="write the resolved config as YAML and exit")


def parse_compare(values: list[str] | None) -> dict[str, str]:
    """['DIR', 'LABEL=DIR', ...] -> {label: dir} (an unlabelled first adapter is 'tuned')."""
    out: dict[str, str] = {}
    for i, v in enumerate(values or []):
        label, sep, path = v.partition("=")
        if not sep:
            label, path = ("tuned" if i == 0 else f"tuned{i + 1}"), v
        if not label or not path:
            raise QtalignError(f"--compare-adapter {v!r}: expected DIR or LABEL=DIR")
        if label in out:
            raise QtalignError(f"--compare-adapter: label '{label}' given twice")
        out[label] = path
    return out


def analysis_config(args, cls, extra_keys: tuple[str, ...] = ()):
    """Config file (flat or under a key named after the command) < command-line options."""
    d = load_config_file(getattr(args, "config", None))
    d = dict(d.get(args.command, d))
    d.update(task_overrides(args))
    for k in ("seed", *extra_keys):
        if getattr(args, k, None) is not None:
            d[k] = getattr(args, k)
    if getattr(args, "compare_adapter", None):
        d["compare"] = parse_compare(args.compare_adapter)
    with_model_overrides(d, args)
    return cls(**d)


def run_cli(args) -> int:
    import yaml

    if args.command == "lens":
        from qtalign.analysis.lens import LensConfig, run_lens

        cfg = analysis_config(args, LensConfig, ("keep_overlap",))
        run = run_lens
    else:
        from qtalign.analysis.geometry import GeometryConfig, run_geometry

        if args.pools:
            args.pools = [s.strip() for s in args.pools.split(",") if s.strip()]
        if args.layers:
            try:
                args.layers = [int(s) for s in args.layers.split(",") if s.strip()]
            except ValueError:
                raise QtalignError(f"--layers: expected a comma list of integers, got {args.layers!r}") from None
        cfg = analysis_config(args, GeometryConfig, ("pools", "layers", "reference", "save_vectors"))
        run = run_geometry
    if args.save_config:
        Path(args.save_config).write_text(yaml.safe_dump({args.command: cfg.model_dump()}, sort_keys=False, allow_unicode=True),
                                          encoding="utf-8")
        print(f"wrote {args.save_config}")
        return 0
    s = run(cfg, args.out)
    for t in s["tables"]:
        print(f"### {t['title']}\n\n{t['markdown']}\n")
    print(json.dumps({"out": args.out, "figures": len(s["figures"]), "timing_s": s["timing_s"]}))
    return 0
