"""A tiny document model rendered twice: to Markdown (report.md) and to self-contained HTML.

Only what the report needs: headings, paragraphs, bullet lists, tables and images. Inline markup is
limited to **bold**, *italic* and `code`, which both renderers understand, so the two files say the same thing.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0 1.4em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: left; vertical-align: top; }
th { background: #f1f3f5; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure { margin: 1em 0 1.8em; }
figcaption { font-size: 0.9em; color: #555; }
code { background: #f4f4f4; padding: 0 0.2em; }
.note { color: #8a4b00; }
"""


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", list(items)))

    def table(self, frame: pd.DataFrame, empty: str = "(no rows)") -> None:
        if frame is None or frame.empty:
            self.para(empty)
        else:
            self.blocks.append(("table", frame.astype(str).reset_index(drop=True)))

    def image(self, path: Path, rel: str, caption: str) -> None:
        self.blocks.append(("image", (Path(path), rel, caption)))

    # -------------------------------------------------------------------- markdown
    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                out += ["#" * level + " " + text, ""]
            elif kind == "para":
                out += [value, ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in value] + [""]
            elif kind == "table":
                out += _md_table(value) + [""]
            elif kind == "image":
                _, rel, caption = value
                out += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
        return "\n".join(out).rstrip("\n") + "\n"

    # -------------------------------------------------------------------- html
    def to_html(self) -> str:
        out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
               f"<title>{html.escape(self.title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
               f"<h1>{_inline(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                out.append(f"<h{level}>{_inline(text)}</h{level}>")
            elif kind == "para":
                out.append(f"<p>{_inline(value)}</p>")
            elif kind == "bullets":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in value) + "</ul>")
            elif kind == "table":
                out.append(_html_table(value))
            elif kind == "image":
                path, _, caption = value
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                           f"<figcaption>{_inline(caption)}</figcaption></figure>")
        out += ["</body>", "</html>"]
        return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(frame: pd.DataFrame) -> list[str]:
    header = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return [header, rule, *body]


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_ITALIC = re.compile(r"(?<![*\w])\*(?!\s)([^*]+?)(?<!\s)\*(?![*\w])")


def _inline(text: str) -> str:
    escaped = html.escape(str(text), quote=False)
    escaped = _CODE.sub(r"<code>\1</code>", escaped)
    escaped = _BOLD.sub(r"<strong>\1</strong>", escaped)
    return _ITALIC.sub(r"<em>\1</em>", escaped)


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{_inline(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_inline(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
