"""The report's pages: Markdown tables, figures saved as PNG, report.md and its self-contained
report.html (images embedded as data: URIs). Shared by the search, cross-validation and comparison
reports."""
from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path
from typing import Any

import markdown as markdown_lib  # Markdown -> report.html (`markdown` below is the table helper)
import matplotlib.pyplot as plt
import pandas as pd
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

from .folders import write_png, write_text


def save_figure(fig, path: Path) -> str:
    write_png(path, fig)
    plt.close(fig)
    return path.name


def markdown(df: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.4g}"        # NaN: no statistic (the best, or too few folds)
        return str(v)
    rows = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    rows += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(rows)


HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #bbb;padding:3px 8px}
th{background:#f0f0f0}img{max-width:100%}code{background:#f4f4f4;padding:1px 3px}"""


def write_markdown_report(exp: Path, text: str) -> Path:
    """report.md, and beside it report.html: the same content, self-contained (its images embedded)."""
    path = write_text(exp / "report.md", text)
    write_text(exp / "report.html", markdown_to_html(text, exp, title=exp.name))
    return path


def markdown_to_html(text: str, folder: Path, title: str) -> str:
    """Markdown (tables included) -> one HTML page whose local images are base64 data: URIs."""
    body = markdown_lib.markdown(text, extensions=["tables", "fenced_code", EmbedImages(folder)])
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


class _EmbedImagesProcessor(Treeprocessor):
    def __init__(self, md, folder: Path):
        super().__init__(md)
        self.folder = folder

    def run(self, root) -> None:
        for img in root.iter("img"):
            src = img.get("src", "")
            path = self.folder / src
            if not src or ":" in src or not path.is_file():          # data:, http(s):, missing: left as they are
                continue
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            img.set("src", f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}")


class EmbedImages(Extension):
    """Markdown extension: images named relative to `folder` become data: URIs (a self-contained page)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def extendMarkdown(self, md) -> None:
        md.treeprocessors.register(_EmbedImagesProcessor(md, self.folder), "embed_images", 0)  # after 'inline'
