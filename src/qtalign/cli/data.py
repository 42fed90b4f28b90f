"""`qtalign build-data`: options generated from QTDataConfig."""

from __future__ import annotations

import json

from qtalign.cli.options import add_common, add_config_options, build_config, save_config


def configure_parser(p, name: str) -> None:
    from qtalign.qtdata.config import QTDataConfig

    add_config_options(p, QTDataConfig, title="question-translation data")
    add_common(p, out_help="output folder", overwrite=False)


def run_cli(args) -> int:
    from qtalign.qtdata.config import QTDataConfig

    cfg = build_config(QTDataConfig, args, section="build_data")
    if args.save_config:
        save_config(cfg, args.save_config, "build_data")
        return 0
    from qtalign.qtdata.build import build_question_data

    stats = build_question_data(cfg, args.out)
    for w in stats["warnings"]:
        print(f"warning: {w}")
    print(json.dumps({"out": args.out, "rows": stats["rows"], "rows_per_source": stats["rows_per_source"],
                      "duplicates_removed": stats["duplicates_removed"], "excluded": stats["excluded"]}, ensure_ascii=False))
    return 0
