"""Experiment report: `report.md` and a self-contained `report.html` (plots embedded as base64) from a run dir.

The report only reads what the stages wrote (report/read.py lists the artifacts). Its statistics are computed once into
<run dir>/stats.json (report/numbers.py), and the document is rendered from that file. Base and tuned predictions are
paired by item key; the change is tested with the exact McNemar test on the discordant pairs and bounded by paired
bootstrap intervals (report/paired.py). The paper's raw decision rule is the headline; calibrated accuracy and the
AUC of the raw class scores are reported beside it everywhere.
"""

from __future__ import annotations

from pathlib import Path

from qtalign.io import write_text
from qtalign.report import sections as S
from qtalign.report.html import Doc, md_to_html
from qtalign.report.numbers import build_stats
from qtalign.report.read import read_run

# (heading, section function), in report order; the headline (title, table, figure) comes first, without a heading
SECTION_FUNCS = (
    ("Configuration", S.configuration),
    ("Train/eval overlap check", S.overlap),
    ("Accuracy: base vs tuned", S.accuracy),
    ("Summaries", S.summaries),
    ("Retention", S.retention),
    ("Alignment or label prior?", S.alignment),
    ("Per-language accuracy", S.per_language),
    ("Training", S.training),
    ("Logit lens", S.lens),
    ("Representation geometry", S.geometry),
    ("Cross-lingual retrieval", S.cross_lingual_retrieval),
    ("Label tokenisation", S.labels),
    ("Question-translation data", S.data),
    ("Environment and timings", S.environment),
)
SECTIONS = tuple(name for name, _ in SECTION_FUNCS)
# the figures the sections draw into <run dir>/report/ (recorded as patterns: run dirs of earlier versions did not
# list them)
FIGURES = ("headline.png", "accuracy_*.png", "retrieval_*.png")
# the files the report writes into the run dir (beside its figures folder report/)
OUTPUTS = ("stats.json", "report.md", "report.html")


def render_report(run_dir: str | Path, stats: dict) -> Doc:
    """The report document of a run dir from its statistics (stats.json) and the stages' summaries; the per-item
    predictions are not read."""
    ctx = S.Ctx(read_run(run_dir, predictions=False), stats)
    doc = Doc(ctx.run.dir)
    S.header(doc, ctx)
    for name, fn in SECTION_FUNCS:
        doc.h(2, name)
        fn(doc, ctx)
    return doc


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write run_dir/stats.json (every statistic the report prints, computed from the run's artifacts), then
    run_dir/report.md (images linked) and run_dir/report.html (self-contained) rendered from it, and the report's
    figures into run_dir/report/; returns the two report paths. Only into a run dir or an export qtalign wrote (one
    with its marker): a stats.json, report.md, report.html or report/ of someone else's there is refused, never
    written over."""
    from qtalign.errors import QtalignError
    from qtalign.io import MARKER, OutputDir, read_json, write_json

    run_dir = Path(run_dir)
    if not (run_dir / MARKER).is_file():
        raise QtalignError(f"{run_dir}: not written by qtalign (no {MARKER}); qtalign writes a report only into a run "
                           "dir or export of its own")
    out = OutputDir(run_dir, option="report")
    out.record(*OUTPUTS)
    out.subdir("report", "report").declare(*FIGURES)
    write_json(run_dir / "stats.json", build_stats(read_run(run_dir)))
    doc = render_report(run_dir, read_json(run_dir / "stats.json"))  # rendered from the file, as a reader has it
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    write_text(md_path, doc.render(embed=False))
    write_text(html_path, md_to_html(doc.render(embed=True), doc.title))
    return md_path, html_path
