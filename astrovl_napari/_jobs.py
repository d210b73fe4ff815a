"""The long-running work of the widgets, as generators (no Qt, no viewer).

Each job yields :class:`Step` objects (progress, and a chance to stop: napari's
``thread_worker`` checks for cancellation at every ``yield``) and returns its
result. The widgets run them with :func:`napari.qt.threading.create_worker`;
tests drive them with :func:`run_job`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._models import ModelRegistry, ModelSpec
from ._regions import RegionRequest
from ._results import SearchHit, classification_rows, hits_from_table, make_record, make_thumbnail

__all__ = [
    "Step",
    "BuildResult",
    "run_job",
    "find_images",
    "caption_job",
    "classify_job",
    "open_index_job",
    "build_index_job",
    "search_job",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """Progress report of a job: ``done`` of ``total`` units, with a message."""

    done: int
    total: int
    message: str = ""


@dataclass
class BuildResult:
    """Outcome of :func:`build_index_job`."""

    index: Any
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    saved_to: Path | None = None


def run_job(gen: Generator, on_step: Callable[[Step], None] | None = None) -> Any:
    """Run a job generator to completion in this thread and return its result."""
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_step is not None:
            on_step(step)


def find_images(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Image files (FITS and pictures) under ``folder``, sorted; hidden entries skipped.

    Raises
    ------
    NotADirectoryError
        If ``folder`` is not a directory.
    """
    from astrovl.imaging.inputs import is_image_name

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder; choose a folder of images")
    pattern = "**/*" if recursive else "*"
    out = []
    for p in root.glob(pattern):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and is_image_name(p):
            out.append(p)
    return sorted(out)


# ---------------------------------------------------------------------------- caption & ask
def caption_job(registry: ModelRegistry, spec: ModelSpec, region: RegionRequest, *,
                question: str | None = None, prompt: str | None = None,
                max_new_tokens: int = 200) -> Generator[Step, None, dict]:
    """Caption a region (``question=None``) or answer a question about it.

    Returns
    -------
    dict
        A record (see :func:`~astrovl_napari._results.make_record`) with the answer.
    """
    if question is not None and not question.strip():
        raise ValueError("the question is empty; type a question first")
    total = 3
    yield Step(0, total, f"loading {spec.normalized().describe()}")
    model = registry.get(spec)
    yield Step(1, total, f"reading {region.describe()}")
    image = region.load()
    yield Step(2, total, "generating")
    pil = image.to_pil()
    if question is not None:
        answer = model.ask(pil, question.strip(), max_new_tokens=int(max_new_tokens))
        kind, asked = "question", question.strip()
    else:
        answer = model.caption(pil, prompt=(prompt or None), max_new_tokens=int(max_new_tokens))
        kind, asked = "caption", (prompt or None)
    if isinstance(answer, (list, tuple)):
        answer = answer[0] if answer else ""
    yield Step(3, total, "done")
    return make_record(kind, str(answer).strip(), question=asked,
                       model=spec.normalized().describe(), region=region.describe(),
                       bbox=region.bbox.as_list())


# ---------------------------------------------------------------------------- classify
def classify_job(registry: ModelRegistry, spec: ModelSpec, region: RegionRequest, *,
                 categories: Sequence[str] | None = None, top_k: int = 5
                 ) -> Generator[Step, None, dict]:
    """Zero-shot classification of a region.

    Returns
    -------
    dict
        A record with ``kind="classification"``, ``answer`` (the best category)
        and ``rows`` (rank, category, score, probability), best first.
    """
    total = 3
    yield Step(0, total, f"loading {spec.normalized().describe()}")
    embedder = registry.get(spec)
    yield Step(1, total, f"reading {region.describe()}")
    image = region.load()
    yield Step(2, total, "classifying")
    cats = None if categories is None else list(categories)
    table = embedder.zero_shot(image.to_pil(), categories=cats, top_k=int(top_k))
    rows = classification_rows(table)
    yield Step(3, total, "done")
    n = len(cats) if cats is not None else None
    return make_record("classification", rows[0]["category"] if rows else "",
                       model=spec.normalized().describe(), region=region.describe(),
                       bbox=region.bbox.as_list(), rows=rows,
                       categories="default" if cats is None else cats, n_categories=n)


# ---------------------------------------------------------------------------- search
def open_index_job(registry: ModelRegistry, spec: ModelSpec, directory: str | os.PathLike
                   ) -> Generator[Step, None, Any]:
    """Load an :class:`~astrovl.EmbeddingIndex` directory with the CLIP model of ``spec``.

    Raises
    ------
    astrovl.exceptions.IndexMismatchError
        If the index was built with another model.
    """
    from astrovl.clip import EmbeddingIndex

    yield Step(0, 2, f"loading {spec.normalized().describe()}")
    embedder = registry.get(spec)
    yield Step(1, 2, f"opening {directory}")
    index = EmbeddingIndex.load(directory, embedder=embedder)
    yield Step(2, 2, f"{len(index)} images")
    return index


def build_index_job(registry: ModelRegistry, spec: ModelSpec, paths: Sequence[str | os.PathLike], *,
                    save_to: str | os.PathLike | None = None, batch_size: int = 16,
                    image_root: str | os.PathLike | None = None
                    ) -> Generator[Step, None, BuildResult]:
    """Embed image files and index them, one batch per step.

    Unreadable files are skipped (listed in :attr:`BuildResult.skipped`). The
    metadata has a ``path`` (absolute) and a ``name`` column; the index records
    ``image_root`` (default: the folder common to all files) as its image root.
    With ``save_to`` the index is written there (atomically) at the end:
    ``save_to`` must be a new or empty folder, or an earlier index, which is
    checked before any image is embedded.

    Raises
    ------
    astrovl.exceptions.OutputDirectoryError
        ``save_to`` holds files that are not an astrovl index.
    """
    from astropy.table import Table

    from astrovl.clip import EmbeddingIndex
    from astrovl.clip.index import OUTPUT_KIND
    from astrovl.utils.files import check_output_dir

    paths = [Path(p).resolve() for p in paths]
    if not paths:
        raise ValueError("no image files to index: the folder holds no FITS or picture files")
    if save_to:
        check_output_dir(save_to, OUTPUT_KIND)
    if image_root is None:
        image_root = os.path.commonpath([str(p.parent) for p in paths])
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    total = len(paths)
    yield Step(0, total, f"loading {spec.normalized().describe()}")
    embedder = registry.get(spec)
    vectors: list[np.ndarray] = []
    kept: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for start in range(0, total, batch_size):
        chunk = paths[start:start + batch_size]
        try:
            vec = embedder.embed_images([str(p) for p in chunk], batch_size=batch_size, progress=False)
            vectors.append(vec)
            kept.extend(chunk)
        except Exception:  # one bad file fails the batch: retry one by one to find it
            for p in chunk:
                try:
                    vectors.append(embedder.embed_images([str(p)], progress=False))
                    kept.append(p)
                except Exception as exc:
                    log.warning("skipped %s: %s", p, exc)
                    skipped.append((p, f"{type(exc).__name__}: {exc}"))
        yield Step(min(start + len(chunk), total), total, f"embedded {len(kept)} of {total} images")
    if not kept:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped[:3])
        raise ValueError(f"none of the {total} images could be read ({reasons})")
    index = EmbeddingIndex(embedder.embed_dim, embedder=embedder, image_root=image_root)
    index.add(np.concatenate(vectors), Table({"path": [str(p) for p in kept],
                                              "name": [p.name for p in kept]}))
    saved = None
    if save_to:
        saved = Path(index.save(save_to))
    yield Step(total, total, f"indexed {len(kept)} images")
    return BuildResult(index=index, paths=kept, skipped=skipped, saved_to=saved)


def search_job(index, query: str | RegionRequest, *, k: int = 10, thumbnail_size: int = 96,
               index_dir: str | os.PathLike | None = None) -> Generator[Step, None, list[SearchHit]]:
    """Query an index by text or by a region and make thumbnails of the hits.

    Thumbnails are made only of files under the image root the index records
    (:func:`astrovl.clip.index.recorded_image_root`): a file named by an
    index's metadata is not opened outside it.

    Returns
    -------
    list of SearchHit
        Best first; ``thumbnail`` is None for hits whose image cannot be found or
        read, or lies outside the image root (``in_root`` False).
    """
    if isinstance(query, str):
        if not query.strip():
            raise ValueError("the text query is empty; type what to look for")
        q: Any = query.strip()
        what = repr(q)
    elif isinstance(query, RegionRequest):
        q = None
        what = query.describe()
    else:
        raise TypeError(f"a query is a text or a region, not {type(query).__name__}")
    yield Step(0, 1, f"searching for {what}")
    if q is None:
        q = query.load().to_pil()
    from astrovl.clip.index import recorded_image_root

    table = index.search(q, k=int(k))
    hits = hits_from_table(table, index_dir, recorded_image_root(index, index_dir))
    total = 1 + len(hits)
    yield Step(1, total, f"{len(hits)} results")
    for i, hit in enumerate(hits, start=1):
        if hit.path is not None and hit.in_root and thumbnail_size:
            try:
                hit.thumbnail = make_thumbnail(hit.path, thumbnail_size)
            except Exception as exc:  # thumbnails are a convenience: keep the hit
                log.info("no thumbnail for %s: %s", hit.path, exc)
        yield Step(1 + i, total, f"thumbnail {i} of {len(hits)}")
    return hits
