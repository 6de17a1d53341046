"""A tiny document model rendered twice: `summary.md` and a self-contained `summary.html`.

(The leaderboard, `report/index.html`, is analysis/leaderboard.py.)

Building the report once as a list of blocks keeps the markdown and the HTML page identical in content;
images are relative links in markdown and embedded as base64 in HTML, so the page opens from disk.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Cell:
    """One table cell; `bold` marks the best value of a column or group."""

    text: str
    bold: bool = False


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    caption: str = ""


@dataclass
class Block:
    """kind: h1 | h2 | h3 | p | code | table | image | details (a collapsed code listing)."""

    kind: str
    text: str = ""
    table: Table | None = None
    path: str = ""  # image file name, relative to the report directory
    extra: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ markdown


def to_markdown(blocks: list[Block]) -> str:
    """GitHub-flavoured markdown; images are relative links to the PNGs beside the file."""
    return "\n".join(_md(b) for b in blocks).rstrip() + "\n"


def _md(b: Block) -> str:
    if b.kind in ("h1", "h2", "h3"):
        return f"{'#' * int(b.kind[1])} {b.text}\n"
    if b.kind == "p":
        return f"{b.text}\n"
    if b.kind == "code":
        return f"```\n{b.text}\n```\n"
    if b.kind == "image":
        return f"![{b.text}]({b.path})\n\n*{b.text}* ([SVG]({Path(b.path).with_suffix('.svg').name}))\n"
    if b.kind == "details":
        body = "\n".join(b.extra)
        return f"<details><summary>{b.text}</summary>\n\n```\n{body}\n```\n\n</details>\n"
    if b.kind == "table" and b.table is not None:
        return _md_table(b.table)
    raise ValueError(f"unknown block kind {b.kind!r}")


def _md_table(t: Table) -> str:
    def cell(c: Cell) -> str:
        text = c.text.replace("|", "\\|")
        return f"**{text}**" if c.bold and text else text

    lines = ["| " + " | ".join(t.headers) + " |", "|" + "|".join("---" for _ in t.headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    caption = f"\n{t.caption}\n" if t.caption else ""
    return "\n".join(lines) + "\n" + caption


# ---------------------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{margin:1em 0 2em} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555} pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
.caption{font-size:.9em;color:#555;margin-top:-1em}
"""


def to_html(blocks: list[Block], title: str, image_dir: Path) -> str:
    """A standalone page: PNGs from `image_dir` are embedded, so no server and no side files are needed."""
    body = "\n".join(_html(b, image_dir) for b in blocks)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _html(b: Block, image_dir: Path) -> str:
    esc = html.escape
    if b.kind in ("h1", "h2", "h3"):
        return f"<{b.kind}>{esc(b.text)}</{b.kind}>"
    if b.kind == "p":
        return f"<p>{_inline(b.text)}</p>"
    if b.kind == "code":
        return f"<pre>{esc(b.text)}</pre>"
    if b.kind == "image":
        data = base64.b64encode((image_dir / b.path).read_bytes()).decode("ascii")
        svg = Path(b.path).with_suffix(".svg").name
        return (f"<figure><img alt=\"{esc(b.text)}\" src=\"data:image/png;base64,{data}\">"
                f"<figcaption>{esc(b.text)} (<a href=\"{esc(svg)}\">SVG</a>)</figcaption></figure>")
    if b.kind == "details":
        return f"<details><summary>{esc(b.text)}</summary><pre>{esc(chr(10).join(b.extra))}</pre></details>"
    if b.kind == "table" and b.table is not None:
        return _html_table(b.table)
    raise ValueError(f"unknown block kind {b.kind!r}")


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    rows = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in t.rows)
    caption = f"<p class=\"caption\">{_inline(t.caption)}</p>" if t.caption else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{caption}"


def _html_cell(c: Cell) -> str:
    text = html.escape(c.text)
    return f"<td><b>{text}</b></td>" if c.bold else f"<td>{text}</td>"


def _inline(text: str) -> str:
    """Escape, then render the one markdown construct used in prose: `code`."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
