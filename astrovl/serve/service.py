"""The search service behind ``astrovl serve``: queries, caches and answers as plain dicts.

Nothing here knows about HTTP; :func:`astrovl.serve.create_app` wraps a
:class:`SearchService` in a web application.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..exceptions import IndexMismatchError, QueryError
from .batching import MicroBatcher
from .defaults import DEFAULT_K, DEFAULT_MAX_IMAGE_PIXELS, MAX_K
from .images import RADEC_COLUMNS, IndexImages, LRUCache, json_value, recorded_image_root
from .parsing import is_sky_position, parse_count, parse_flag, parse_id

__all__ = ["SearchService", "DEFAULT_K", "MAX_K", "MAX_QUERY_CHARS", "LABEL_COLUMNS",
           "MAX_FILTER_TERMS", "MAX_FILTER_CHARS", "MASK_CACHE_BYTES"]

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000
#: metadata columns used, in this order, as the caption of a result
LABEL_COLUMNS = ("name", "title", "target_name", "target", "obs_id", "label", "object")
#: a column is offered as a filter when it has at most this many distinct values
MAX_FILTER_VALUES = 60
#: most ``column:value`` filter terms one request may give
MAX_FILTER_TERMS = 64
#: longest filter term (characters)
MAX_FILTER_CHARS = 256
#: memory kept by the cache of filter results (row positions), in bytes
MASK_CACHE_BYTES = 64 * 2**20


class SearchService:
    """Search an :class:`~astrovl.EmbeddingIndex` by text, image or example row.

    The model is used by one thread at a time (a lock); new query texts that
    arrive together are embedded in one batched pass; text embeddings of
    repeated queries come from a cache; everything else is safe to call from
    many threads at once.

    Parameters
    ----------
    index : EmbeddingIndex
    embedder : CLIPEmbedder, optional
        The model for text and image queries; default the index's own
        (``index.embedder``).
    index_dir : path, optional
        The directory the index was loaded from (relative image paths and the
        recorded image root are resolved against it).
    image_root : path, optional
        Serve only image files under this directory; default the root recorded
        with the index, else the directory common to the files it names.
    thumbnail_cache : path, optional
        Directory for cached thumbnails (default: astrovl's cache directory).
    thumbnail_size : int
        Longest side of thumbnails in pixels.
    max_k : int
        Largest number of results a query may ask for.
    text_cache_size : int
        Number of text embeddings kept for repeated queries.
    title : str, optional
        The name shown on the page; default the index directory's name (with its
        parent's when the directory is just called ``index``).
    max_image_pixels : int
        Pictures with more pixels are not decoded for thumbnails (413).
    text_batch : int
        Most new query texts embedded together in one pass of the text tower.
    text_batch_wait : float
        Seconds a new text waits for others to share its pass.
    text_queue : int
        Most texts waiting for the model; more are answered 503 (busy).
    reranker : AstroLLaVA, optional
        Re-order the results of text searches by this model's scores (anything
        with ``rerank_scores(query, images)``, see :mod:`astrovl.clip.rerank`):
        CLIP's best ``max(k, rerank_top)`` images are read and scored again, one
        vision pass each, in batches, and the best ``k`` by the model come back
        with both scores. A request may turn it off (``rerank=0``).
    rerank_top : int, optional
        CLIP candidates the re-ranking model scores (default
        :data:`~astrovl.clip.rerank.DEFAULT_RERANK_TOP`; at least ``k`` of a request).

    Raises
    ------
    ValueError
        No embedder is given and the index has none; ``rerank_top`` is not a
        whole number >= 1 or is given without ``reranker``; a ``reranker`` for an
        index whose metadata names no image files.
    TypeError
        ``reranker`` has no ``rerank_scores`` method.
    IndexMismatchError
        The embedder's dimension differs from the index's.
    """

    def __init__(self, index, embedder=None, *, index_dir: str | os.PathLike | None = None,
                 image_root: str | os.PathLike | None = None,
                 thumbnail_cache: str | os.PathLike | None = None, thumbnail_size: int = 256,
                 max_k: int = MAX_K, text_cache_size: int = 4096, title: str | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 text_batch: int = 32, text_batch_wait: float = 0.002, text_queue: int = 256,
                 reranker=None, rerank_top: int | None = None):
        if len(index) == 0:
            raise ValueError("the index is empty; there is nothing to serve")
        if embedder is None:
            embedder = index.embedder
        if embedder is None:
            raise ValueError(
                "serving an index needs the model that built it, for text and image queries; "
                "pass embedder= (or --model on the command line)"
            )
        if int(embedder.embed_dim) != int(index.dim):
            raise IndexMismatchError(
                f"the index holds {index.dim}-d vectors but the model makes {embedder.embed_dim}-d "
                f"ones; serve it with the model that built it ({index.model_id})"
            )
        if int(max_k) < 1:
            raise ValueError(f"max_k={max_k!r} must be >= 1")
        self.index = index
        self.embedder = embedder
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.max_k = int(max_k)
        self.title = str(title) if title else _default_title(self.index_dir)
        self.default_k = min(DEFAULT_K, self.max_k)
        root = image_root if image_root is not None else recorded_image_root(index, index_dir)
        self.images = IndexImages(index.metadata, index_dir=index_dir, image_root=root,
                                  cache_dir=thumbnail_cache, size=thumbnail_size,
                                  max_pixels=max_image_pixels)
        self.columns = list(index.metadata.colnames)
        self.filters = self._filter_options()
        self.label_column = next((c for c in LABEL_COLUMNS if c in self.columns), None)
        lower = {c.lower(): c for c in self.columns}
        self.radec_columns = next(((lower[a], lower[b]) for a, b in RADEC_COLUMNS
                                   if a in lower and b in lower), None)
        self._model_lock = threading.Lock()
        self._text_vectors = LRUCache(text_cache_size)
        self.text_batcher = MicroBatcher(self._embed_texts, max_batch=text_batch, max_wait=text_batch_wait,
                                         max_queue=text_queue, name="the text model")
        self._masks = LRUCache(128, max_bytes=MASK_CACHE_BYTES)
        self.reranker, self.rerank_top = self._check_reranker(reranker, rerank_top)
        self._rerank_lock = threading.Lock()
        self._warm_up()

    # ------------------------------------------------------------------ set-up
    def _warm_up(self) -> None:
        """Build the search structure and run the model once, before the first request."""
        self.index.search(np.asarray(self.index.vectors[0]), k=1)
        with self._model_lock:
            self.embedder.embed_text(["a telescope image"])

    def _check_reranker(self, reranker, rerank_top) -> tuple[object, int | None]:
        """The re-ranking model and its number of candidates, checked now rather than at a query."""
        from ..clip.rerank import DEFAULT_RERANK_TOP, check_rerank_model

        if reranker is None:
            if rerank_top is not None:
                raise ValueError("rerank_top goes with a re-ranking model (--rerank MODEL), which scores "
                                 "CLIP's best rerank_top images again")
            return None, None
        check_rerank_model(reranker)
        top = DEFAULT_RERANK_TOP if rerank_top is None else rerank_top
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
            raise ValueError(f"rerank_top={rerank_top!r} must be a whole number >= 1: the CLIP candidates the "
                             "re-ranking model scores again for each text search")
        if self.images.column is None:
            from ..imaging.inputs import PATH_COLUMNS

            raise ValueError("re-ranking reads the images of CLIP's candidates, but the index metadata has none "
                             f"of the columns {list(PATH_COLUMNS)} naming image files (columns: {self.columns}); "
                             "serve this index without a re-ranking model, or index image files")
        return reranker, int(top)

    def _filter_options(self) -> dict[str, list[str]]:
        """Metadata columns with few distinct text or integer values, and those values.

        A column is offered when it has 2 to ``MAX_FILTER_VALUES`` distinct values,
        and at most one per two rows (names and identifiers are not filters).
        """
        meta = self.index.metadata
        options = {}
        for name in meta.colnames:
            if name in ("path", "image", "source", "filename", "file"):
                continue
            col = meta[name]
            if col.ndim != 1 or np.asarray(col).dtype.kind not in "USOiub":
                continue
            data = np.asarray(col)
            if np.ma.is_masked(col):
                data = data[~np.asarray(col.mask)]
            values = np.unique(data.astype(str))
            if 1 < len(values) <= min(MAX_FILTER_VALUES, len(meta) // 2):
                options[name] = [str(v) for v in values]
        return options

    # ------------------------------------------------------------------ request checks
    def check_k(self, k) -> int:
        """``k`` as an int in ``1..max_k`` (default when None), or a 400 QueryError."""
        if k is None or (isinstance(k, str) and not k.strip()):
            return self.default_k
        try:
            return parse_count(k, "k", 1, self.max_k)
        except QueryError as exc:
            raise QueryError(f"{exc}; ask for 1 to {self.max_k} results") from None

    def check_text(self, text) -> str:
        """The query text with its whitespace collapsed, or a 400 QueryError."""
        text = " ".join(str(text or "").split())
        if not text:
            raise QueryError("the query text is empty; type what you are looking for")
        if len(text) > MAX_QUERY_CHARS:
            raise QueryError(f"the query text has {len(text)} characters; use at most {MAX_QUERY_CHARS}")
        return text

    def parse_filters(self, filters: Iterable[str] | None) -> dict[str, list[str]]:
        """Parse ``column:value`` strings (several values of one column are alternatives).

        Raises
        ------
        QueryError
            A string without ``:``, a column the metadata lacks, more than
            :data:`MAX_FILTER_TERMS` terms or one longer than :data:`MAX_FILTER_CHARS`.
        """
        where: dict[str, list[str]] = {}
        filters = list(filters or ())
        if len(filters) > MAX_FILTER_TERMS:
            raise QueryError(f"{len(filters)} filter terms were given; use at most {MAX_FILTER_TERMS}")
        for item in filters:
            if not isinstance(item, str) or len(item) > MAX_FILTER_CHARS:
                shown = repr(item)[:60]
                raise QueryError(f"filter {shown} is not a column:value text of at most "
                                 f"{MAX_FILTER_CHARS} characters")
            column, sep, value = item.partition(":")
            column = column.strip()
            if not sep or not column:
                raise QueryError(f"filter {item!r} is not of the form column:value "
                                 f"(e.g. {self._example_filter()})")
            if column not in self.columns:
                raise QueryError(f"unknown filter column {column!r}; the index has the columns "
                                 f"{self.columns}")
            where.setdefault(column, []).append(value.strip())
        return where

    def _example_filter(self) -> str:
        if self.filters:
            name, values = next(iter(self.filters.items()))
            return f"{name}:{values[0]}"
        return f"{self.columns[0]}:VALUE" if self.columns else "column:value"

    def _rows_for(self, where: dict[str, list[str]]):
        if not where:
            return None
        key = tuple(sorted((c, tuple(sorted(v))) for c, v in where.items()))
        rows = self._masks.get(key)
        if rows is None:
            rows = self.index.rows_where(where)
            self._masks.put(key, rows)
        return rows

    # ------------------------------------------------------------------ embeddings
    def text_vector(self, text: str) -> np.ndarray:
        """The unit embedding of ``text``.

        Repeated texts come from a cache; new texts wait (a few milliseconds at
        most) for others that arrive at the same time and are embedded with them
        in one batched pass of the text tower (:attr:`text_batcher`).

        Raises
        ------
        ServiceBusy
            Too many texts are already waiting for the model (a 503 answer).
        """
        vec = self._text_vectors.get(text)
        if vec is None:
            vec = self.text_batcher.submit(text).result()
            self._text_vectors.put(text, vec)
        return vec

    def _embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        """One pass of the text tower for a batch of texts (the model is entered by one thread at a time)."""
        with self._model_lock:
            return list(self.embedder.embed_text(texts))

    def image_vector(self, image) -> np.ndarray:
        """The unit embedding of an :class:`~astrovl.AstroImage` (one thread in the model at a time)."""
        with self._model_lock:
            return self.embedder.embed_images([image], progress=False, num_workers=0)[0]

    # ------------------------------------------------------------------ searches
    def search_text(self, text, k=None, filters: Sequence[str] | None = None, rerank=None) -> dict:
        """Search by a text; returns the JSON answer (see :meth:`_answer`).

        With a re-ranking model, CLIP's best ``max(k, rerank_top)`` results are
        re-ordered by the model (:meth:`_answer_reranked`); ``rerank`` (a yes/no
        switch, default on when the service has a model) turns it off or on.

        Raises
        ------
        QueryError
            400 for a bad text, ``k``, filter or switch, and for ``rerank`` on
            when the service has no re-ranking model.
        """
        t0 = time.perf_counter()
        text = self.check_text(text)
        k = self.check_k(k)
        where = self.parse_filters(filters)
        use_rerank = self.check_rerank(rerank)
        vec = self.text_vector(text)
        if use_rerank:
            return self._answer_reranked(vec, text, k, where, t0)
        return self._answer(vec, k, where, {"kind": "text", "text": text}, t0)

    def check_rerank(self, rerank) -> bool:
        """Whether a text search is re-ranked: the request's switch, else whether there is a model.

        Raises
        ------
        QueryError
            400 for a value that is no yes/no switch, or a request for
            re-ranking when the service has no model.
        """
        flag = parse_flag(rerank, "rerank")
        if flag and self.reranker is None:
            raise QueryError("this server does not re-rank: it was started without a re-ranking model "
                             "(astrovl serve INDEX --rerank MODEL); search without rerank")
        return self.reranker is not None if flag is None else flag

    def search_image(self, image, k=None, filters: Sequence[str] | None = None) -> dict:
        """Search by an image (an :class:`~astrovl.AstroImage`, e.g. from an upload)."""
        t0 = time.perf_counter()
        k = self.check_k(k)
        where = self.parse_filters(filters)
        vec = self.image_vector(image)
        return self._answer(vec, k, where, {"kind": "image", "name": str(image.source)}, t0)

    def search_like(self, row, k=None, filters: Sequence[str] | None = None) -> dict:
        """"More like this": the rows nearest to row ``row`` (itself left out)."""
        t0 = time.perf_counter()
        row = self.images.check_row(_as_row(row))
        k = self.check_k(k)
        where = self.parse_filters(filters)
        vec = np.asarray(self.index.vectors[row])
        return self._answer(vec, k, where, {"kind": "like", "id": row, "label": self.label(row)}, t0,
                            exclude=row)

    def _answer(self, vec, k, where, query, t0, exclude: int | None = None) -> dict:
        rows = self._rows_for(where)
        table = self.index.search(vec, k=k + (exclude is not None), rows=rows)
        if exclude is not None:
            table = table[table["row"] != exclude][:k]
        results = self._rows_json(table)
        return {"query": query, "k": k, "filters": where, "count": len(results),
                "results": results, "took_ms": round(1000 * (time.perf_counter() - t0), 2)}

    def _answer_reranked(self, vec, text: str, k: int, where, t0) -> dict:
        """CLIP's best ``max(k, rerank_top)`` rows re-ordered by the re-ranking model; ``k`` of them.

        Each result carries ``score`` (CLIP's), ``rerank_score`` (the model's;
        null for an image that could not be read, ranked last) and ``clip_rank``.
        """
        from ..clip.rerank import rerank_hits

        top = max(k, self.rerank_top)
        hits = self.index.search(vec, k=top, rows=self._rows_for(where))
        scores = self._rerank_scores(text, [int(r) for r in hits["row"]])
        results = self._rows_json(rerank_hits(hits, scores, k))
        return {"query": {"kind": "text", "text": text}, "k": k, "filters": where, "count": len(results),
                "results": results,
                "rerank": {"model": self._reranker_name(), "candidates": len(hits), "top": top},
                "took_ms": round(1000 * (time.perf_counter() - t0), 2)}

    def _rerank_scores(self, text: str, rows: list[int]) -> np.ndarray:
        """The re-ranking model's score of each row's image for ``text`` (-inf where the image is unreadable).

        The images are read as thumbnails are (only files under the image root);
        the model sees them all in one call (one vision pass per image, batched),
        one request at a time.
        """
        scores = np.full(len(rows), -np.inf)
        images, where = [], []
        for i, row in enumerate(rows):
            try:
                images.append(self.images.image(row))
            except QueryError as exc:
                log.warning("re-ranking leaves out item %d: %s", row, exc)
                continue
            where.append(i)
        if images:
            with self._rerank_lock:
                got = np.asarray(self.reranker.rerank_scores(text, images), dtype=np.float64).reshape(-1)
            if got.shape != (len(images),):
                raise ValueError(f"the re-ranking model returned {got.size} scores for {len(images)} images")
            scores[where] = got
        return scores

    def _reranker_name(self) -> str | None:
        source = getattr(self.reranker, "source", None)
        return str(source) if source is not None else type(self.reranker).__name__

    def _rows_json(self, table) -> list[dict]:
        extra = [c for c in ("rerank_score", "clip_rank") if c in table.colnames]
        meta_cols = [c for c in table.colnames if c not in ("rank", "score", "row", *extra)]
        columns = {c: table[c].tolist() for c in meta_cols + extra}
        out = []
        for i, (score, row) in enumerate(zip(table["score"].tolist(), table["row"].tolist())):
            metadata = {c: json_value(columns[c][i]) for c in meta_cols}
            ra, dec = self._position(row, metadata)
            item = {"id": int(row), "rank": i + 1, "score": round(float(score), 5),
                    "label": self._label(row, metadata), "metadata": metadata,
                    "ra": ra, "dec": dec, "has_image": self.images.has_image(row)}
            if extra:
                value = float(columns["rerank_score"][i])
                item["rerank_score"] = round(value, 5) if math.isfinite(value) else None
                item["clip_rank"] = int(columns["clip_rank"][i])
            out.append(item)
        return out

    # ------------------------------------------------------------------ items
    def label(self, row: int) -> str:
        """A short caption for ``row``."""
        row = self.images.check_row(row)
        metadata = {c: json_value(self.index.metadata[c][row]) for c in self.columns}
        return self._label(row, metadata)

    def _label(self, row: int, metadata: dict) -> str:
        if self.label_column is not None and metadata.get(self.label_column) not in (None, ""):
            return str(metadata[self.label_column])
        if self.images.column is not None and metadata.get(self.images.column):
            return os.path.basename(str(metadata[self.images.column])) or f"item {row}"
        return f"item {row}"

    def _position(self, row: int, metadata: dict) -> tuple[float | None, float | None]:
        if self.radec_columns is not None:
            ra, dec = (metadata.get(c) for c in self.radec_columns)
            if _finite(ra) and _finite(dec):
                return float(ra), float(dec)
        if self.images.column is None:
            return None, None
        return self.images.sky_position(row)

    def item(self, row) -> dict:
        """Metadata, FITS headers, pixel shape and sky position of one row."""
        row = self.images.check_row(_as_row(row))
        metadata = {c: json_value(self.index.metadata[c][row]) for c in self.columns}
        out = {"id": row, "label": self._label(row, metadata), "metadata": metadata,
               "ra": None, "dec": None, "has_image": False, "image": None}
        try:
            described = self.images.describe(row)
        except QueryError as exc:
            out["image_error"] = str(exc)
            described = {}
        else:
            out["has_image"] = True
            out["image"] = {k: described.get(k) for k in ("file", "format", "shape", "error")}
            out["hdus"] = described.get("hdus", [])
        ra, dec = self._position(row, metadata) if described or self.radec_columns else (None, None)
        out["ra"], out["dec"] = ra, dec
        if is_sky_position(ra, dec):  # catalogue sentinels (dec 99) are shown as given, not formatted
            out["sky"] = _sky_strings(ra, dec)
        return out

    def item_image(self, row) -> tuple:
        """The checked row number of item ``row`` and its :class:`~astrovl.AstroImage`.

        Raises
        ------
        QueryError
            404, 403 or 422, as for thumbnails.
        """
        row = self.images.check_row(_as_row(row))
        return row, self.images.image(row)

    def thumbnail(self, row, large: bool = False) -> tuple[bytes, str]:
        """PNG bytes and ETag of the thumbnail (or, ``large``, the preview) of ``row``."""
        return self.images.thumbnail(self.images.check_row(_as_row(row)), large)

    def info(self) -> dict:
        """What the index holds: size, model, dimension, columns and filter values."""
        emb = self.embedder
        return {"name": self.title,
                "count": len(self.index), "dim": int(self.index.dim), "kind": self.index.kind,
                "model": {"id": self.index.model_id or getattr(emb, "model_id", None),
                          "name": getattr(emb, "model_name", None),
                          "random": bool(self.index.model_info.get("random", getattr(emb, "random_weights", False)))},
                "columns": self.columns, "filters": self.filters,
                "label_column": self.label_column, "images": self.images.column is not None,
                "default_k": self.default_k, "max_k": self.max_k,
                "rerank": ({"model": self._reranker_name(), "top": self.rerank_top}
                           if self.reranker is not None else None)}


def _default_title(index_dir: Path | None) -> str:
    if index_dir is None:
        return "index"
    path = index_dir.resolve()
    if path.name.lower() in ("index", "idx") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def _as_row(value) -> int:
    return parse_id(value, "item id", status=400 if isinstance(value, bool) else 404)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sky_strings(ra: float, dec: float) -> dict:
    """Sexagesimal and galactic forms of a valid ICRS position (degrees; see ``is_sky_position``)."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs")
    g = c.galactic
    return {"ra_hms": c.ra.to_string(unit=u.hourangle, sep=":", precision=2, pad=True),
            "dec_dms": c.dec.to_string(unit=u.deg, sep=":", precision=1, alwayssign=True, pad=True),
            "l": round(float(g.l.deg), 5), "b": round(float(g.b.deg), 5)}
