"""Re-ranking CLIP search results with a vision-language model.

CLIP retrieves fast from millions of images with one vector per image; a
vision-language model (AstroLLaVA) looks at each candidate with the query in
mind, which is slower but sees more. :func:`rerank_search` combines them:
CLIP's best ``top`` images are scored again by the model, and the best ``k`` of
them by the model's score come back, with both scores (re-ranking the candidates
of a CLIP-style search is what AION-Search reports to nearly double the recall
of rare classes such as strong lenses).

The model is anything with a ``rerank_scores(query, images)`` method returning
one number per image, higher for a better fit (the :class:`RerankModel`
protocol); :meth:`astrovl.AstroLLaVA.rerank_scores` is the mean log-likelihood
per token of the query as the model's description of the image. This module does
not import :mod:`astrovl.llava`: any such object works.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import numpy as np
from astropy.table import Table

from ..exceptions import QueryError

__all__ = ["RerankModel", "DEFAULT_RERANK_TOP", "rerank_search", "rerank_hits", "check_rerank_model",
           "candidate_images"]

#: CLIP candidates scored again by the model when ``rerank_top`` is not given (at least ``k``).
DEFAULT_RERANK_TOP = 50


@runtime_checkable
class RerankModel(Protocol):
    """What :func:`rerank_search` needs of a model: one score per image for a text query."""

    def rerank_scores(self, query: str, images: list) -> Any:
        """Scores of ``images`` for ``query`` (higher is better), one per image."""


def candidate_images(index, table: Table, index_dir: str | os.PathLike | None = None) -> list:
    """The image files that the rows of a search result name (resolved paths).

    The first of :data:`~astrovl.imaging.inputs.PATH_COLUMNS` present in the
    metadata is read; relative paths are found under the index's image root,
    its folder and the folder above it (:func:`~astrovl.imaging.inputs.locate_image_file`).

    Raises
    ------
    QueryError
        When the metadata names no image files, or a row's file cannot be found.
    """
    from ..imaging.inputs import PATH_COLUMNS, locate_image_file

    column = next((c for c in PATH_COLUMNS if c in table.colnames), None)
    if column is None:
        raise QueryError(f"re-ranking reads the images of the candidates, but the index metadata has none of the "
                         f"columns {list(PATH_COLUMNS)} naming image files (columns: {table.colnames})")
    index_dir = index_dir if index_dir is not None else getattr(index, "directory", None)
    out = []
    for row, value in zip(table["row"], table[column]):
        path = locate_image_file(value, index_dir=index_dir, image_root=index.image_root)
        if path is None:
            raise QueryError(f"re-ranking reads the images of the candidates, but the image of row {int(row)} "
                             f"({column} = {str(value)!r}) was not found; check that the indexed files are still "
                             "there (relative paths are read under the index's image root)")
        out.append(path)
    return out


def rerank_search(index, query: str, k: int, model, top: int | None = None, **search_options) -> Table:
    """Search ``index`` with CLIP, then re-order CLIP's best ``top`` images by ``model``'s scores.

    Parameters
    ----------
    index : EmbeddingIndex
    query : str
        A text query (the model scores this text against each candidate image).
    k : int
        Results to return (at most ``top``).
    model : RerankModel
        An object with ``rerank_scores(query, images)``, e.g. an
        :class:`~astrovl.AstroLLaVA`.
    top : int, optional
        CLIP candidates to score again (default ``max(k, 50)``); at least ``k``,
        and at most the rows searched.
    **search_options
        Passed to :meth:`EmbeddingIndex.search` (``rows``, ``ef_search``, ``nprobe``, ``rerank_depth``).

    Returns
    -------
    astropy.table.Table
        ``rank`` (by the model), ``rerank_score``, ``score`` (CLIP's cosine
        similarity), ``clip_rank``, ``row`` and the metadata columns, best first.
    """
    check_rerank_model(model)
    if not isinstance(query, str):
        raise TypeError("re-ranking scores a text query against the images; give a text, not "
                        f"{type(query).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    top = max(k, DEFAULT_RERANK_TOP) if top is None else int(top)
    if top < k:
        raise ValueError(f"rerank_top={top} is smaller than k={k}; the model re-orders CLIP's best rerank_top "
                         "images and returns k of them, so give rerank_top >= k")
    hits = index.search(query, k=top, **search_options)
    scores = np.zeros(0)
    if len(hits):
        images = [str(p) for p in candidate_images(index, hits)]
        scores = model.rerank_scores(query, images)
    return rerank_hits(hits, scores, k)


def check_rerank_model(model) -> None:
    """Refuse an object without a ``rerank_scores(query, images)`` method (:class:`TypeError`)."""
    if not callable(getattr(model, "rerank_scores", None)):
        raise TypeError(f"rerank= takes a model with a rerank_scores(query, images) method (such as an "
                        f"AstroLLaVA), not {type(model).__name__}")


def rerank_hits(hits: Table, scores, k: int) -> Table:
    """Re-order CLIP's search result ``hits`` by the model's ``scores``; keep the best ``k``.

    Parameters
    ----------
    hits : astropy.table.Table
        A search result (``rank``, ``score``, ``row``, metadata), CLIP's best first.
    scores : array-like
        The model's score of each row of ``hits`` (higher is better); a
        non-finite score (an image the model could not read) ranks last.
    k : int
        Rows to keep.

    Returns
    -------
    astropy.table.Table
        ``rank`` (by the model), ``rerank_score``, ``score`` (CLIP's),
        ``clip_rank``, ``row`` and the metadata columns, best first; ties keep
        CLIP's order.

    Raises
    ------
    ValueError
        When there is not one score per row.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape != (len(hits),):
        raise ValueError(f"the model returned {scores.size} scores for {len(hits)} images")
    scores = np.where(np.isfinite(scores), scores, -np.inf)
    # best model score first; ties keep CLIP's order
    order = np.lexsort((np.asarray(hits["rank"]), -scores))[:int(k)]
    out = hits[order]
    out.rename_column("rank", "clip_rank")
    out.add_column(scores[order], name="rerank_score", index=0)
    out.add_column(np.arange(1, len(out) + 1), name="rank", index=0)
    columns = ["rank", "rerank_score", "score", "clip_rank", "row"]
    return out[columns + [c for c in out.colnames if c not in columns]]
