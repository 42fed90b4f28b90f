"""The report document: Markdown blocks and figures; rendered as report.md (figures linked) and as a self-contained
report.html (figures embedded as base64, no external CSS or JS)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

HTML_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:0.25em 0.55em;vertical-align:top}
th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;border:1px solid #eee}
pre{background:#f6f8fa;padding:0.8em;overflow-x:auto;font-size:0.85em}code{background:#f6f8fa;padding:0 0.2em}
h1{border-bottom:2px solid #1f77b4}h2{border-bottom:1px solid #ddd;margin-top:2em}
"""


class Doc:
    """Markdown blocks; images are kept as paths so that the HTML can embed them."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.blocks: list[tuple[str, object]] = []

    def md(self, text: str) -> None:
        self.blocks.append(("md", text))

    def h(self, level: int, text: str) -> None:
        self.md("#" * level + " " + text)

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (Path(path), caption)))

    @property
    def title(self) -> str:
        return next((v[2:] for k, v in self.blocks if k == "md" and str(v).startswith("# ")), "qtalign report")

    def render(self, embed: bool) -> str:
        out = []
        for kind, v in self.blocks:
            if kind == "md":
                out.append(v)
                continue
            path, caption = v
            if embed:
                src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
            else:
                src = path.relative_to(self.run_dir).as_posix() if path.is_relative_to(self.run_dir) else str(path)
            cap = caption.replace("[", "(").replace("]", ")").replace("\n", " ")
            out.append(f"![{cap}]({src})\n\n*{cap}*")
        return "\n\n".join(out) + "\n"


def md_to_html(md: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"<style>{HTML_CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")
