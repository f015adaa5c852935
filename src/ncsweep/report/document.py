"""One document model rendered twice, as Markdown and as HTML, so the two never drift."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import pandas as pd

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 2em auto; line-height: 1.4; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }}
img {{ max-width: 100%; }}
.warning {{ background: #fee; border: 2px solid #c00; padding: 0.5em 1em; }}
</style></head><body>
{body}
</body></html>
"""


@dataclass
class Document:
    """Blocks of a report: headings, paragraphs, bullet lists, tables, images."""

    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def rule(self) -> None:
        self.blocks.append(("rule", None))

    def warning(self, text: str) -> None:
        self.blocks.append(("warning", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", list(items)))

    def table(self, frame: pd.DataFrame, index: bool = True) -> None:
        self.blocks.append(("table", (frame, index)))

    def image(self, path: str, alt: str) -> None:
        self.blocks.append(("image", (path, alt)))

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown."""
        parts = [f"# {self.title}"]
        for kind, value in self.blocks:
            parts.append(_MARKDOWN[kind](value))
        return "\n\n".join(parts) + "\n"

    def to_html(self) -> str:
        """A standalone HTML page with the same content."""
        parts = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            parts.append(_HTML[kind](value))
        return _PAGE.format(title=html.escape(self.title), body="\n".join(parts))


def markdown_table(frame: pd.DataFrame, index: bool = True) -> str:
    """A pipe table without extra dependencies (pandas' to_markdown needs tabulate)."""
    shown = frame.reset_index() if index else frame
    if index and frame.index.name is None:
        shown = shown.rename(columns={"index": ""})
    header = [_md_cell(c) for c in shown.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in shown.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _md_cell(value: object) -> str:
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def inline_html(text: str) -> str:
    """Escape, then turn **bold** and `code` into tags."""
    escaped = html.escape(text)
    return _CODE.sub(r"<code>\1</code>", _BOLD.sub(r"<strong>\1</strong>", escaped))


_MARKDOWN = {
    "heading": lambda v: f"{'#' * v[0]} {v[1]}",
    "paragraph": lambda v: v,
    "rule": lambda v: "---",
    "warning": lambda v: f"> **WARNING:** {v}",
    "bullets": lambda v: "\n".join(f"- {item}" for item in v),
    "table": lambda v: markdown_table(*v),
    "image": lambda v: f"![{v[1]}]({v[0]})",
}
_HTML = {
    "heading": lambda v: f"<h{v[0]}>{inline_html(v[1])}</h{v[0]}>",
    "paragraph": lambda v: f"<p>{inline_html(v)}</p>",
    "rule": lambda v: "<hr>",
    "warning": lambda v: f'<p class="warning"><strong>WARNING:</strong> {inline_html(v)}</p>',
    "bullets": lambda v: "<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in v) + "</ul>",
    "table": lambda v: v[0].to_html(index=v[1], na_rep="", border=0),
    "image": lambda v: f'<p><img src="{html.escape(v[0])}" alt="{html.escape(v[1])}"></p>',
}
