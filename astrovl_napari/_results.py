"""Result formatting and bookkeeping for the widgets (no Qt, no viewer).

Answers and classifications are stored in ``layer.metadata["astrovl"]`` as
lists of plain dicts (JSON-friendly), so they travel with the layer and can be
saved with it.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SearchHit",
    "parse_categories",
    "make_record",
    "store_record",
    "records_of",
    "format_conversation",
    "classification_rows",
    "hits_from_table",
    "resolve_image_path",
    "make_thumbnail",
]


def parse_categories(text: str) -> list[str]:
    """Parse a user category list: one per line, or separated by commas/semicolons.

    Blank entries and duplicates are dropped (first occurrence kept).

    Raises
    ------
    ValueError
        If no category is left.

    Examples
    --------
    >>> parse_categories("spiral galaxy\\nglobular cluster\\n\\nspiral galaxy")
    ['spiral galaxy', 'globular cluster']
    >>> parse_categories("nebula; planetary nebula, supernova remnant")
    ['nebula', 'planetary nebula', 'supernova remnant']
    """
    parts = re.split(r"[\n;,]+", text or "")
    out: list[str] = []
    for p in parts:
        p = " ".join(p.split())
        if p and p not in out:
            out.append(p)
    if not out:
        raise ValueError(
            "the category list is empty; write one category per line (or separate them with "
            "commas), or use the default Hubble categories"
        )
    return out


def make_record(kind: str, answer: str, *, question: str | None = None, model: str = "",
                region: str = "", bbox: Sequence[int] | None = None, **extra: Any) -> dict:
    """A JSON-friendly record of one model answer.

    Parameters
    ----------
    kind : {"caption", "question", "classification", "search"}
    answer : str
    question : str, optional
        The prompt or question asked.
    model : str
        Which model answered.
    region : str
        Which pixels were used (``layer[y0:y1, x0:x1]``).
    bbox : [y0, y1, x0, x1], optional
    """
    rec = {
        "kind": str(kind),
        "question": question,
        "answer": str(answer),
        "model": str(model),
        "region": str(region),
        "bbox": [int(v) for v in bbox] if bbox is not None else None,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    rec.update(extra)
    return rec


def store_record(metadata: dict, key: str, record: Mapping) -> list[dict]:
    """Append ``record`` to ``metadata["astrovl"][key]`` (created when missing); returns the list."""
    info = metadata.get("astrovl")
    if not isinstance(info, dict):
        info = {}
        metadata["astrovl"] = info
    items = info.get(key)
    if not isinstance(items, list):
        items = []
        info[key] = items
    items.append(dict(record))
    return items


def records_of(metadata: Mapping | None, key: str) -> list[dict]:
    """The records stored under ``metadata["astrovl"][key]`` (empty list when none)."""
    info = (metadata or {}).get("astrovl")
    if not isinstance(info, dict):
        return []
    items = info.get(key)
    return list(items) if isinstance(items, list) else []


def format_conversation(records: Sequence[Mapping]) -> str:
    """Plain text of captions and answers, oldest first (shown as plain text, never as HTML)."""
    blocks = []
    for rec in records:
        region = f" {rec.get('region')}" if rec.get("region") else ""
        if rec.get("kind") == "question":
            head = f"Q{region}: {rec.get('question', '')}"
        else:
            prompt = f" ({rec['question']})" if rec.get("question") else ""
            head = f"Caption{region}{prompt}:"
        blocks.append(f"{head}\n{rec.get('answer', '')}")
    return "\n\n".join(blocks)


def classification_rows(table) -> list[dict]:
    """Rows of a zero-shot table (``rank, category, score, probability``) as dicts, best first.

    Accepts the table of :meth:`astrovl.CLIPEmbedder.zero_shot` for one image.
    """
    if table is None or len(table) == 0:
        return []
    names = table.colnames
    rows = []
    for r in table:
        row = {"rank": int(r["rank"]), "category": str(r["category"]), "score": float(r["score"])}
        if "probability" in names:
            row["probability"] = float(r["probability"])
        rows.append(row)
    rows.sort(key=lambda d: d["rank"])
    return rows


@dataclass
class SearchHit:
    """One search result.

    Attributes
    ----------
    rank : int
    score : float
        Cosine similarity.
    row : int
        Row in the index.
    label : str
        Text shown in the result list.
    path : pathlib.Path or None
        The image file, when the index metadata names one that exists.
    metadata : dict
        The index metadata row.
    thumbnail : numpy.ndarray or None
        ``uint8`` RGB thumbnail (row 0 at the top).
    in_root : bool
        True when :attr:`path` lies under the image root the index records: only
        such files are opened (thumbnails included) without asking the user.
    """

    rank: int
    score: float
    row: int
    label: str
    path: Path | None = None
    metadata: dict = field(default_factory=dict)
    thumbnail: np.ndarray | None = None
    in_root: bool = False

    def text(self) -> str:
        """``"1.  0.842  m13.fits"``."""
        return f"{self.rank}.  {self.score:.3f}  {self.label}"


def resolve_image_path(value: Any, index_dir: str | os.PathLike | None = None) -> Path | None:
    """Find the image file an index metadata value names.

    Absolute paths are used as they are; relative ones are tried against the index
    directory, its parent and the current directory. Values that are not file
    names (``"<ndarray (64, 64)>"``) or that name no existing file give None.
    HDU suffixes written by :func:`astrovl.load_image` sources (``file.fits[1]``)
    are removed (:func:`astrovl.imaging.inputs.locate_image_file`).
    """
    from astrovl.imaging.inputs import locate_image_file

    return locate_image_file(value, index_dir=index_dir)


def is_under(path: str | os.PathLike | None, root: str | os.PathLike | None) -> bool:
    """True when ``path`` (resolved, links followed) lies under the folder ``root``."""
    from astrovl.utils.files import is_within

    return path is not None and root is not None and is_within(path, root)


def hits_from_table(table, index_dir: str | os.PathLike | None = None,
                    image_root: str | os.PathLike | None = None) -> list[SearchHit]:
    """Turn the table of :meth:`astrovl.EmbeddingIndex.search` into :class:`SearchHit` objects.

    ``image_root`` is the folder the index records for its images; hits whose
    file lies under it get ``in_root=True``.
    """
    from astrovl.imaging.inputs import PATH_COLUMNS

    hits = []
    meta_cols = [c for c in table.colnames if c not in ("rank", "score", "row")]
    for r in table:
        meta = {c: _plain(r[c]) for c in meta_cols}
        path = None
        label = None
        for col in PATH_COLUMNS:
            if col in meta:
                path = resolve_image_path(meta[col], index_dir)
                if label is None:
                    label = str(meta[col])
                if path is not None:
                    break
        if "name" in meta and meta["name"]:
            label = str(meta["name"])
        elif path is not None:
            label = path.name
        if label is None:
            label = f"row {int(r['row'])}"
        hits.append(SearchHit(rank=int(r["rank"]), score=float(r["score"]), row=int(r["row"]),
                              label=label, path=path, metadata=meta, in_root=is_under(path, image_root)))
    return hits


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if np.ma.is_masked(value):
        return None
    return value


def make_thumbnail(image, size: int = 96) -> np.ndarray:
    """A ``uint8`` RGB thumbnail (longest side ``size``) of any :func:`astrovl.load_image` input.

    FITS images are shown the right way up (as :meth:`astrovl.AstroImage.to_pil` does).
    """
    from PIL import Image

    from astrovl import AstroImage, load_image

    if size < 8:
        raise ValueError(f"thumbnail size {size} must be at least 8 pixels")
    img = image if isinstance(image, AstroImage) else load_image(image)
    pil = img.to_pil()
    pil.thumbnail((size, size), Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(pil.convert("RGB"), dtype=np.uint8))
