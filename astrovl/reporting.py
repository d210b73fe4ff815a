"""Self-contained HTML reports (images embedded as PNG, every text escaped)."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .utils.files import atomic_write_text

__all__ = ["HTMLReport", "png_data_uri"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 1.6em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #eee; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; } .cell { width: 150px; font-size: 12px; }
.cell img { width: 150px; height: 150px; object-fit: contain; background: #000; display: block; }
.query { margin: 1em 0 0.3em 0; font-weight: bold; } .note { color: #555; font-size: 0.9em; }
figure { margin: 0.5em 0; } figure img { max-width: 100%; }
"""


def png_data_uri(image: Any) -> str:
    """Encode an image as a ``data:image/png;base64`` URI.

    Parameters
    ----------
    image : numpy.ndarray, PIL.Image.Image, matplotlib.figure.Figure or AstroImage
        Float arrays are taken to be in ``[0, 1]``; ``AstroImage`` uses ``to_pil()``.
    """
    from PIL import Image

    buf = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    else:
        if hasattr(image, "to_pil"):
            pil = image.to_pil()
        elif isinstance(image, Image.Image):
            pil = image
        else:
            arr = np.asarray(image)
            if arr.dtype != np.uint8:
                arr = np.clip(np.nan_to_num(arr) * 255.0, 0, 255).astype(np.uint8)
            pil = Image.fromarray(arr)
        pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value: Any) -> tuple[str, bool]:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}", True
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value)), True
    return str(value), False


class HTMLReport:
    """Build a single-file HTML report.

    Every piece of text added is HTML-escaped; images are embedded as base64 PNG,
    so the file can be moved or mailed on its own.
    """

    def __init__(self, title: str):
        self.title = title
        self._parts: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        """Add a section heading."""
        level = min(max(int(level), 1), 6)
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, css_class: str | None = None) -> None:
        """Add a paragraph of plain (escaped) text."""
        cls = f' class="{html.escape(css_class, quote=True)}"' if css_class else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, rows: Sequence[dict] | Any, columns: Sequence[str] | None = None) -> None:
        """Add a table from an astropy Table or a list of dicts."""
        if hasattr(rows, "colnames"):
            columns = list(columns or rows.colnames)
            rows = [{c: r[c] for c in columns} for r in rows]
        rows = list(rows)
        if columns is None:
            columns = list(rows[0]) if rows else []
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = []
        for r in rows:
            cells = []
            for c in columns:
                text, num = _fmt(r.get(c, ""))
                cls = ' class="num"' if num else ""
                cells.append(f"<td{cls}>{html.escape(text)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        self._parts.append(f"<table><tr>{head}</tr>{''.join(body)}</table>")

    def figure(self, image: Any, caption: str = "") -> None:
        """Add an image or matplotlib figure with an optional caption."""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(
            f'<figure><img alt="{html.escape(caption, quote=True)}" src="{png_data_uri(image)}">{cap}</figure>'
        )

    def image_grid(self, items: Iterable[tuple[Any, str]], title: str | None = None) -> None:
        """Add a grid of ``(image, caption)`` thumbnails."""
        if title:
            self._parts.append(f'<div class="query">{html.escape(title)}</div>')
        cells = []
        for image, caption in items:
            cells.append(
                f'<div class="cell"><img alt="{html.escape(caption, quote=True)}" '
                f'src="{png_data_uri(image)}"><div>{html.escape(caption)}</div></div>'
            )
        self._parts.append('<div class="grid">' + "".join(cells) + "</div>")

    def render(self) -> str:
        """Return the whole document as a string."""
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>" + "\n".join(self._parts) + "</body></html>\n"
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write the report atomically and return its path."""
        path = Path(path)
        atomic_write_text(path, self.render())
        return path
