"""`qtalign report RUN_DIR` (the report again from a run dir's artifacts, e.g. an export), `qtalign compare RUN ...`
(runs side by side) and `qtalign card CLAIMS --out FILE` (the reproduction card from published results)."""

from __future__ import annotations

import os


def configure_parser(p, name: str) -> None:
    if name == "card":
        p.add_argument("claims", metavar="CLAIMS", help="the claims file (YAML; its measurements name result folders "
                       "beside it), e.g. docs/results/claims.yaml")
        p.add_argument("--out", required=True, help="the card's Markdown file, e.g. docs/reproduction.md")
        return
    if name == "report":
        p.add_argument("run_dir", metavar="RUN_DIR", help="a run dir of `qtalign run`, or an export of one")
        p.add_argument("--export", metavar="DIR", type=os.path.expanduser, help="then copy the report, its figures, the small result files and "
                       "the per-item predictions (compressed) to DIR, as `qtalign run --export` does")
        return
    p.add_argument("runs", nargs="+", metavar="RUN", help="run dirs (or exports) to compare; LABEL=RUN names a column")
    p.add_argument("--out", required=True, type=os.path.expanduser, help="folder for compare.md, compare.html, compare.json and the figure")
    p.add_argument("--title", help="title of the comparison")
    p.add_argument("--which", choices=["base", "tuned", "both", "change"], default="base",
                   help="which evaluation of each run to compare (default base; both: base and tuned side by side; "
                   "change: the paired change tuned - base with intervals and tests, per run: the study summary)")


def run_cli(args) -> int:
    from pathlib import Path

    from qtalign.errors import QtalignError

    if args.command == "card":
        from qtalign.report.card import write_card

        print(f"wrote {write_card(args.claims, args.out)}")
        return 0
    if args.command == "report":
        from qtalign.report.build import write_report

        rd = Path(args.run_dir)
        if not (rd / "eval" / "base" / "results.json").is_file() and not (rd / "experiment.json").is_file():
            raise QtalignError(f"{rd}: not a run dir (no experiment.json and no eval/base/results.json)")
        md, html = write_report(rd)
        print(f"wrote {md} and {html}")
        if args.export:
            from qtalign.report.export import export_run

            print(f"exported to {export_run(rd, args.export)}")
        return 0
    from qtalign.report.compare import compare_runs

    out = compare_runs(args.runs, args.out, title=args.title, which=args.which)
    print(f"wrote {out / 'compare.md'} and {out / 'compare.html'}")
    return 0
