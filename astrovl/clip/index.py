"""A searchable archive of image embeddings (faiss) with astropy-table metadata."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table, vstack

from ..exceptions import CheckpointError, IndexMismatchError, ModelNotFoundError
from ..utils.files import atomic_directory
from .chunks import ChunkedRows
from .identity import digest_from_model_id
from .loading import describe_source

__all__ = ["EmbeddingIndex", "recorded_image_root"]

log = logging.getLogger(__name__)

MANIFEST = "index.json"
VECTORS = "vectors.safetensors"
METADATA = "metadata.ecsv"
FAISS_FILE = "index.faiss"
FORMAT = "astrovl-embedding-index"
#: kind of the output folder an index is saved in (see :func:`astrovl.utils.files.check_output_dir`)
OUTPUT_KIND = "index"
KINDS = ("exact", "hnsw", "ivf")
IVF_TRAIN_POINTS_PER_CELL = 64
IVF_TRAIN_SAMPLE = 100_000


class EmbeddingIndex:
    """Nearest-neighbour search over unit-norm embeddings with row metadata.

    Search is by inner product (cosine similarity for unit vectors) with faiss:
    exact (``IndexFlatIP``) by default, or approximate for large archives:
    ``"hnsw"`` (``IndexHNSWFlat``) or ``"ivf"`` (``IndexIVFFlat``). Vectors are
    stored unquantized in both approximate modes, so text queries, which sit
    away from the image vectors because of the image/text modality gap, are
    scored exactly against the candidates the structure visits.

    Parameters
    ----------
    dim : int
        Embedding dimension.
    kind : {"exact", "hnsw", "ivf"}
    embedder : CLIPEmbedder, optional
        Needed for text and image queries. The index records its identity (weights
        digest) and how to load it again (:attr:`model_info`).
    model_id : str, optional
        Identity of the model whose vectors are stored, when no embedder is given.
    device : str, optional
        Device of the embedder when the index loads its recorded model itself.
    hnsw_m, ef_search, nlist, nprobe : int
        Parameters of the approximate structures.
    image_root : path, optional
        The folder the image files named in the metadata lie under. Saved with
        the index (relative to the index folder); viewers such as the napari
        plugin and ``astrovl serve`` open files only under it.

    Notes
    -----
    An index remembers the model that made its vectors: its ``model_id``, its
    weights digest and its source (a directory, an open_clip name and tag, or a
    hub repository and revision; see :mod:`astrovl.clip.loading`). An index
    loaded without an embedder loads that model the first time :attr:`embedder`
    is used (a text or image query), once, also when several threads ask at the
    same time, and checks that its weights are still the ones that built the
    index.
    """

    def __init__(self, dim: int, *, kind: str = "exact", embedder=None, model_id: str | None = None,
                 device=None, hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 200,
                 nlist: int | None = None, nprobe: int = 32,
                 image_root: str | os.PathLike | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not known; use one of {KINDS}")
        if int(dim) < 1:
            raise ValueError(f"dim={dim!r} must be positive")
        self.dim = int(dim)
        self.kind = kind
        #: folder the image files of the metadata lie under (absolute), or None
        self.image_root: str | None = str(Path(image_root).expanduser().resolve()) if image_root else None
        #: folder the index was loaded from or last saved to, or None
        self.directory: Path | None = None
        self.device = device
        self._embedder = None
        self._embedder_lock = threading.Lock()
        self._model: dict = {"id": model_id, "digest": digest_from_model_id(model_id)} if model_id else {}
        if embedder is not None:
            self.embedder = embedder
        self.params = {"hnsw_m": int(hnsw_m), "ef_search": int(ef_search),
                       "ef_construction": int(ef_construction), "nlist": nlist, "nprobe": int(nprobe)}
        self._vec = ChunkedRows(np.concatenate)
        self._meta = ChunkedRows(_stack_tables)
        self._faiss = None

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, embedder, images, metadata: Table | dict | None = None, *, batch_size: int = 64,
              approximate: str | None = None, client=None, shard_size: int = 1024,
              progress: bool = True, **params) -> EmbeddingIndex:
        """Embed ``images`` with ``embedder`` and index them.

        Parameters
        ----------
        embedder : CLIPEmbedder
        images : image inputs, a list of them, or a dataset
        metadata : astropy.table.Table or dict of columns, optional
            One row per image (e.g. path, obs_id, proposal_id, ra, dec). By default
            a ``source`` column records where each image came from.
        batch_size : int
        approximate : {None, "hnsw", "ivf"}
            ``None`` gives exact search.
        client : dask.distributed.Client, optional
            Embed shards of ``shard_size`` images on a dask cluster (one worker per
            GPU in real use). Image inputs must then be paths (or other picklable
            inputs), and the workers must see the same file system.
        progress : bool
        **params
            Other arguments of the constructor (``hnsw_m``, ``nlist``,
            ``image_root``...).

        Returns
        -------
        EmbeddingIndex
        """
        from ..imaging.inputs import as_image_list

        items, _ = as_image_list(images)
        if not items:
            raise ValueError("no images to index: the input is empty")
        meta = cls._metadata_for(items, metadata)
        if client is not None:
            from .sharded import embed_on_cluster

            vectors = embed_on_cluster(client, embedder, items, batch_size=batch_size,
                                       shard_size=shard_size)
        else:
            vectors = cls._embed_streaming(embedder, items, batch_size, shard_size, progress)
        index = cls(embedder.embed_dim, kind=approximate or "exact", embedder=embedder, **params)
        index.add(vectors, meta)
        return index

    @staticmethod
    def _embed_streaming(embedder, items, batch_size, shard_size, progress) -> np.ndarray:
        from ..utils.progress import progress_bar

        out = np.empty((len(items), embedder.embed_dim), dtype=np.float32)
        bar = progress_bar(total=len(items), enabled=progress, desc="indexing images", unit="img")
        for start in range(0, len(items), shard_size):
            chunk = items[start:start + shard_size]
            out[start:start + len(chunk)] = embedder.embed_images(chunk, batch_size=batch_size,
                                                                   progress=False)
            bar.update(len(chunk))
        bar.close()
        return out

    @staticmethod
    def _metadata_for(items: list, metadata) -> Table:
        if metadata is None:
            from ..imaging.inputs import describe_input

            return Table({"source": [describe_input(x) for x in items]})
        meta = metadata if isinstance(metadata, Table) else Table(dict(metadata))
        if len(meta) != len(items):
            raise ValueError(
                f"metadata has {len(meta)} rows but there are {len(items)} images; give one "
                "metadata row per image"
            )
        return meta

    def add(self, vectors: np.ndarray, metadata: Table | dict | None = None) -> None:
        """Add vectors (``(N, dim)``, normalized here) with ``N`` metadata rows."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise IndexMismatchError(
                f"vectors of shape {vectors.shape} do not fit an index of dimension {self.dim}"
            )
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or inf")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError("vectors contain all-zero rows")
        vectors = np.ascontiguousarray(vectors / norms, dtype=np.float32)
        if metadata is None:
            meta = Table({"source": [f"vector {len(self) + i}" for i in range(len(vectors))]})
        else:
            meta = metadata if isinstance(metadata, Table) else Table(dict(metadata))
        if len(meta) != len(vectors):
            raise ValueError(f"{len(meta)} metadata rows for {len(vectors)} vectors; give one row per vector")
        self._vec.append(vectors)  # amortised: no concatenation of everything per call
        self._meta.append(meta.copy())
        if self._faiss is not None and self._faiss.is_trained:
            self._faiss.add(vectors)
        else:
            self._faiss = None  # (re)built lazily with all vectors

    def __len__(self) -> int:
        return len(self._vec)

    @property
    def metadata(self) -> Table:
        """The metadata table, one row per vector."""
        table = self._meta.compact()
        return table if table is not None else Table()

    @metadata.setter
    def metadata(self, table: Table) -> None:
        table = table if isinstance(table, Table) else Table(dict(table))
        if len(table) != len(self):
            raise ValueError(f"{len(table)} metadata rows for an index of {len(self)} vectors")
        self._meta.replace(table)

    # ------------------------------------------------------------------ the model
    @property
    def model_id(self) -> str | None:
        """Identity of the model whose vectors are stored (``"name@digest"``), if known."""
        return self._model.get("id")

    @property
    def model_info(self) -> dict:
        """What the index knows of its model: ``id``, ``name``, ``digest`` and ``source``."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._model.items()}

    @property
    def embedder(self):
        """The embedder of text and image queries.

        An index loaded without one loads its recorded model here on first use
        (thread-safe; once). None when the index has no recorded model source.

        Raises
        ------
        ModelNotFoundError, CheckpointError
            If the recorded model cannot be loaded.
        IndexMismatchError
            If the recorded source now holds other weights than the ones that
            built the index.
        """
        if self._embedder is None and self._model.get("source"):
            with self._embedder_lock:
                if self._embedder is None:
                    self._embedder = self._load_recorded_embedder()
        return self._embedder

    @embedder.setter
    def embedder(self, embedder) -> None:
        if embedder is None:
            self._embedder = None
            return
        if int(embedder.embed_dim) != self.dim:
            raise IndexMismatchError(
                f"the index holds {self.dim}-d vectors but the embedder makes {embedder.embed_dim}-d "
                f"ones; load the index with the model that built it ({self._needed_model()})"
            )
        if self._model and len(self):
            self._check_same_model(embedder)
        else:  # an empty index, or vectors of unknown origin: adopt this model
            self._model = _model_record(embedder)
        self._embedder = embedder

    def _needed_model(self) -> str:
        rec = self._model
        if not rec:
            return "unknown model"
        text = repr(rec.get("id"))
        if rec.get("source"):
            text += f", loadable with {describe_source(rec['source'])}"
        return text

    def _check_same_model(self, embedder) -> None:
        rec = self._model
        if rec.get("digest"):
            same = embedder.weights_digest == rec["digest"]
        else:  # an index written before weights digests were recorded
            src = embedder.source or {}
            same = rec.get("id") in (embedder.model_id,
                                     f"{src.get('name')}:{src.get('pretrained')}" if src else None)
        if not same:
            raise IndexMismatchError(
                f"the index was built with model {self._needed_model()} but the embedder is "
                f"{embedder.model_id!r} (other weights); queries would be meaningless. Load the "
                "model the index needs, or rebuild the index with this one"
            )

    def _load_recorded_embedder(self):
        from .embedder import CLIPEmbedder

        src = self._model["source"]
        kind = src.get("kind")
        log.info("loading the index's model: %s", describe_source(src))
        if kind == "directory":
            if not Path(src["path"]).is_dir():
                raise ModelNotFoundError(
                    f"the index's model directory {src['path']!r} no longer exists; put the model "
                    f"{self._model.get('id')!r} back there, or pass it as embedder= to EmbeddingIndex.load"
                )
            emb = CLIPEmbedder.from_pretrained(src["path"], device=self.device)
        elif kind == "open_clip":
            emb = CLIPEmbedder.from_pretrained(src["name"], src.get("pretrained"), device=self.device)
        elif kind == "hub":
            emb = CLIPEmbedder.from_pretrained(src["repo_id"], revision=src.get("revision"), device=self.device)
        else:
            raise CheckpointError(f"the index records a model source of unknown kind {kind!r}: {src}")
        if self._model.get("digest") and emb.weights_digest != self._model["digest"]:
            raise IndexMismatchError(
                f"the index was built with model {self._model.get('id')!r}, but {describe_source(src)} "
                f"now loads other weights ({emb.model_id!r}); restore that model, pass the right one "
                "as embedder=, or rebuild the index"
            )
        if int(emb.embed_dim) != self.dim:
            raise IndexMismatchError(f"{describe_source(src)} makes {emb.embed_dim}-d vectors; the index holds {self.dim}-d")
        return emb

    @property
    def vectors(self) -> np.ndarray:
        """The stored unit vectors ``(N, dim)`` (read-only view)."""
        stored = self._vec.compact()
        if stored is None:
            return np.zeros((0, self.dim), dtype=np.float32)
        v = stored.view(np.ndarray)
        v.flags.writeable = False
        return v

    def __repr__(self) -> str:
        return f"<EmbeddingIndex {len(self)} vectors dim={self.dim} kind={self.kind} model={self.model_id}>"

    # ------------------------------------------------------------------ faiss
    def _structure(self):
        """The faiss structure of an approximate index (built on first use)."""
        import faiss

        if self._faiss is not None:
            return self._faiss
        d, p = self.dim, self.params
        vectors = self.vectors
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p["ef_construction"]
            index.hnsw.efSearch = p["ef_search"]
        else:
            n = len(vectors)
            nlist = p["nlist"] or max(1, min(int(4 * np.sqrt(max(n, 1))), n // 39 if n >= 39 else 1))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, int(nlist), faiss.METRIC_INNER_PRODUCT)
            # k-means on all vectors up to IVF_TRAIN_SAMPLE, beyond that on a fixed-seed sample
            # of IVF_TRAIN_POINTS_PER_CELL per cell (faiss's default is 256): a million vectors
            # then train in about a minute on two cores instead of a quarter of an hour
            index.cp.max_points_per_centroid = max(IVF_TRAIN_POINTS_PER_CELL,
                                                   -(-IVF_TRAIN_SAMPLE // int(nlist)))
            if n:
                index.train(vectors)
            index.nprobe = min(p["nprobe"], int(nlist))
            self._ivf_quantizer = quantizer  # keep alive
        if len(vectors):
            index.add(vectors)
        self._faiss = index
        return index

    # ------------------------------------------------------------------ search
    def _query_vector(self, query) -> np.ndarray:
        if isinstance(query, str) and _names_image_file(query):
            query = Path(query)
        if isinstance(query, str):
            return self._query_embedder("a text query").embed_text([query])
        if isinstance(query, np.ndarray) and query.dtype.kind == "f" and query.shape[-1] == self.dim \
                and (query.ndim == 1 or (query.ndim == 2 and query.shape[0] == 1)):
            q = np.atleast_2d(query).astype(np.float32)
            return q / np.linalg.norm(q, axis=1, keepdims=True)
        return self._query_embedder("an image query").embed_images(query, progress=False)

    def _query_embedder(self, what: str):
        embedder = self.embedder
        if embedder is None:
            if self._model.get("id"):
                raise ValueError(
                    f"{what} needs the index's embedder, and the index's model ({self._model['id']!r}) "
                    "was never saved, so the index cannot load it: pass embedder= to "
                    "EmbeddingIndex.load (or save the model with save_pretrained before building)"
                )
            raise ValueError(
                f"{what} needs the index's embedder: build the index with one, or pass "
                "embedder= to EmbeddingIndex.load"
            )
        return embedder

    def search(self, query: Any, k: int = 10, *, ef_search: int | None = None,
               nprobe: int | None = None, rows=None, rerank=None, rerank_top: int | None = None) -> Table:
        """Return the ``k`` best matches for a text, an image or a vector.

        Parameters
        ----------
        query : str, image input or numpy.ndarray
            A text; anything :func:`~astrovl.load_image` accepts (a string naming an
            existing image or FITS file is read as an image, not as text); or an
            embedding of shape ``(dim,)`` or ``(1, dim)``.
        k : int
        ef_search : int, optional
            For ``kind="hnsw"``: the search breadth for this query only (default: the
            index's ``ef_search``). Larger is more accurate and slower.
        nprobe : int, optional
            For ``kind="ivf"``: the number of cells searched for this query only
            (default: the index's ``nprobe``). Larger is more accurate and slower.
        rows : array of int or bool, optional
            Search only these rows: positions, or a boolean mask of length
            ``len(index)``, e.g. from :meth:`rows_where`. Fewer than ``k`` rows
            come back when fewer are allowed.
        rerank : model, optional
            Re-order CLIP's best ``rerank_top`` results by this model's scores
            (an :class:`~astrovl.AstroLLaVA`, or any object with a
            ``rerank_scores(query, images)`` method) and return ``k`` of them; the
            query must be a text and the metadata must name the image files. See
            :func:`astrovl.clip.rerank.rerank_search`.
        rerank_top : int, optional
            CLIP candidates the model scores (default ``max(k, 50)``; at least ``k``).

        Returns
        -------
        astropy.table.Table
            ``rank``, ``score`` (cosine similarity), ``row`` (index position) and the
            metadata columns, best first. Re-ranked: ``rank`` (by the model),
            ``rerank_score``, ``score``, ``clip_rank``, ``row`` and the metadata.
        """
        if rerank is not None:
            from .rerank import rerank_search

            return rerank_search(self, query, k, rerank, rerank_top, ef_search=ef_search, nprobe=nprobe, rows=rows)
        if rerank_top is not None:
            raise ValueError("rerank_top= goes with rerank= (the model that re-scores CLIP's candidates)")
        if len(self) == 0:
            raise ValueError("the index is empty; add vectors or images first")
        k = int(k)
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        allowed = self._allowed_rows(rows)
        bitmap = None if allowed is None or self.kind == "exact" else np.packbits(allowed, bitorder="little")
        search_params = self._search_parameters(ef_search, nprobe, bitmap)
        q = self._query_vector(query)[:1]
        k = min(k, len(self) if allowed is None else int(allowed.sum()))
        if k == 0:
            scores, rows = np.zeros(0, np.float32), np.zeros(0, np.int64)
        elif self.kind == "exact":
            scores, rows = self._exact_search(q, k, allowed)
        else:
            scores, rows = self._structure().search(q, k, params=search_params)
            keep = rows[0] >= 0
            rows, scores = rows[0][keep], scores[0][keep]
        has_columns = bool(self._meta.chunks) and len(self._meta.chunks[0].colnames)
        out = Table(self._meta.take(rows), copy=True) if has_columns else Table()
        out.add_column(rows.astype(np.int64), name="row", index=0)
        out.add_column(scores.astype(np.float32), name="score", index=0)
        out.add_column(np.arange(1, len(rows) + 1), name="rank", index=0)
        return out

    def _exact_search(self, q: np.ndarray, k: int,
                      allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exhaustive inner-product search over the stored chunks (no second copy of the vectors).

        ``allowed`` (a boolean mask over all rows) restricts the search to those rows.
        """
        import faiss

        scores, rows = [], []
        for start, chunk in zip(self._vec.starts(), self._vec.chunks):
            positions = None
            if allowed is not None:
                positions = np.flatnonzero(allowed[start:start + len(chunk)])
                if not len(positions):
                    continue
                chunk = chunk[positions]
            d, i = faiss.knn(q, np.ascontiguousarray(chunk), min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
            scores.append(d[0])
            rows.append((i[0] if positions is None else positions[i[0]]) + start)
        merged = len(scores) > 1
        scores, rows = np.concatenate(scores), np.concatenate(rows)
        if merged:
            order = np.lexsort((rows, -scores))[:k]
            scores, rows = scores[order], rows[order]
        return scores, rows

    def _search_parameters(self, ef_search: int | None, nprobe: int | None,
                           bitmap: np.ndarray | None = None):
        """faiss search parameters for one call, or None to use the index's own.

        ``bitmap`` (packed little-endian bits, one per row) restricts the search;
        the caller keeps it alive until the search returns.
        """
        if ef_search is None and nprobe is None and bitmap is None:
            return None
        import faiss

        for name, value in (("ef_search", ef_search), ("nprobe", nprobe)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name}={value!r} must be >= 1")
        if (ef_search is not None and self.kind != "hnsw") or (nprobe is not None and self.kind != "ivf"):
            given = "ef_search" if ef_search is not None else "nprobe"
            raise ValueError(
                f"{given} does not apply to an index of kind {self.kind!r}: ef_search is for "
                "kind='hnsw' and nprobe for kind='ivf'"
            )
        kw = {} if bitmap is None else {"sel": faiss.IDSelectorBitmap(bitmap)}
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(ef_search or self.params["ef_search"]), **kw)
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=int(nprobe or self._structure().nprobe), **kw)
        return faiss.SearchParameters(**kw)

    def _allowed_rows(self, rows) -> np.ndarray | None:
        """``rows`` (positions or a boolean mask) as a boolean mask, or None for all rows."""
        if rows is None:
            return None
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise ValueError(
                    f"a boolean rows mask must have one entry per row ({len(self)}), not shape {rows.shape}"
                )
            return rows
        if rows.size and rows.dtype.kind not in "iu":
            raise ValueError(f"rows must be integer positions or a boolean mask, not {rows.dtype}")
        rows = rows.astype(np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"rows must lie in 0..{len(self) - 1}; got {rows.min()}..{rows.max()}")
        mask = np.zeros(len(self), dtype=bool)
        mask[rows] = True
        return mask

    def rows_where(self, where: dict) -> np.ndarray:
        """Positions of the rows whose metadata matches ``where``.

        Parameters
        ----------
        where : dict
            ``{column: value}`` or ``{column: [values]}``; a row matches when, for
            every column, its value written as text equals one of the values written
            as text (so ``{"proposal_id": "12345"}`` matches the integer 12345).
            Masked (missing) values never match.

        Returns
        -------
        numpy.ndarray
            int64 row positions, ascending; pass them to :meth:`search` as ``rows=``.

        Raises
        ------
        KeyError
            A column that the metadata lacks (the message lists the columns).
        """
        mask = np.ones(len(self), dtype=bool)
        for column, wanted in dict(where).items():
            if column not in self.metadata.colnames:
                raise KeyError(
                    f"the index metadata has no column {column!r}; its columns are "
                    f"{list(self.metadata.colnames)}"
                )
            values = [wanted] if isinstance(wanted, (str, bytes)) or np.ndim(wanted) == 0 else list(wanted)
            col = self.metadata[column]
            text = np.asarray(col).astype(str)
            match = np.isin(text, [str(v) for v in values])
            if getattr(col, "mask", None) is not None and np.ma.is_masked(col):
                match &= ~np.asarray(col.mask)
            mask &= match
        return np.flatnonzero(mask).astype(np.int64)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write vectors (safetensors), metadata (ECSV) and a JSON manifest, atomically.

        The folder is written under a temporary name and renamed into place once
        complete. An existing ``directory`` is replaced only when it is empty or
        an index saved earlier by astrovl; a folder holding anything else (your
        images, say) is refused and left untouched.

        Parameters
        ----------
        directory : path
            The index folder.

        Returns
        -------
        pathlib.Path
            ``directory``.

        Raises
        ------
        astrovl.exceptions.OutputDirectoryError
            ``directory`` holds files that are not an astrovl index; save into a
            new subfolder instead.
        """
        from safetensors.numpy import save_file

        from .. import __version__

        directory = Path(directory)
        with atomic_directory(directory, kind=OUTPUT_KIND, recognize=is_saved_index) as tmp:
            save_file({"vectors": np.ascontiguousarray(self.vectors)}, str(tmp / VECTORS))
            self.metadata.write(tmp / METADATA, format="ascii.ecsv")
            if self.kind != "exact" and len(self):
                import faiss

                faiss.write_index(self._structure(), str(tmp / FAISS_FILE))
            manifest = {"format": FORMAT, "format_version": 1, "astrovl_version": __version__,
                        "model_id": self.model_id, "model": self._model_manifest(directory),
                        "dim": self.dim, "count": len(self),
                        "metric": "inner_product", "kind": self.kind, "params": self.params}
            if self.image_root is not None:
                manifest["image_root"] = _relative_root(self.image_root, directory)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        self.directory = directory.resolve()
        return directory

    def _model_manifest(self, directory: Path) -> dict:
        rec = self.model_info
        src = rec.get("source")
        if src and src.get("kind") == "directory":
            # also relative to the index, so that an index moved with its model still finds it
            try:
                src["relative_path"] = os.path.relpath(src["path"], Path(directory).resolve())
            except ValueError:  # another drive
                src.pop("relative_path", None)
        return rec

    @classmethod
    def load(cls, directory: str | os.PathLike, embedder=None, *, device=None,
             mmap: bool = True) -> EmbeddingIndex:
        """Load an index written by :meth:`save`.

        Parameters
        ----------
        directory : path
        embedder : CLIPEmbedder, optional
            The model for text and image queries; it must be the model that built
            the index. Without it, the index loads its recorded model itself on the
            first text or image query (see :attr:`embedder`).
        device : str, optional
            Device for that recorded model.
        mmap : bool
            Map ``vectors.safetensors`` into memory read-only instead of reading it:
            loading is immediate, and the vectors live in the page cache (shared
            with other processes serving the same index, reclaimable) instead of
            in the private memory of the process. Vectors added later are kept in
            memory.

        Raises
        ------
        CheckpointError
            Missing, partial or corrupt directory.
        IndexMismatchError
            ``embedder`` is another model or has another dimension.
        """
        from safetensors.numpy import load_file

        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise CheckpointError(
                f"{str(directory)!r} is not an astrovl embedding index (no {MANIFEST}); build one "
                "with EmbeddingIndex.build(...).save(directory)"
            )
        try:
            manifest = json.loads((directory / MANIFEST).read_text("utf-8"))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}")
            vectors = _map_vectors(directory / VECTORS) if mmap else load_file(str(directory / VECTORS))["vectors"]
            metadata = Table.read(directory / METADATA, format="ascii.ecsv")
        except Exception as exc:
            raise CheckpointError(
                f"embedding index {str(directory)!r} is corrupt or incomplete ({exc}); rebuild it"
            ) from exc
        count, dim = int(manifest["count"]), int(manifest["dim"])
        if vectors.shape != (count, dim) or len(metadata) != count:
            raise CheckpointError(
                f"embedding index {str(directory)!r} is inconsistent: manifest says {count}x{dim}, "
                f"vectors are {vectors.shape}, metadata has {len(metadata)} rows; rebuild it"
            )
        params = manifest.get("params", {})
        index = cls(dim, kind=manifest.get("kind", "exact"), device=device, **params)
        index._model = _recorded_model(manifest, directory)
        index.directory = directory.resolve()
        root = manifest.get("image_root")
        if isinstance(root, str) and root:
            index.image_root = str((directory / Path(root).expanduser()).resolve())
        if vectors.dtype != np.float32:
            raise CheckpointError(f"embedding index {str(directory)!r} holds {vectors.dtype} vectors, not float32")
        index._vec.replace(vectors)
        index._meta.replace(metadata)
        if embedder is not None:
            index.embedder = embedder
        if index.kind != "exact" and (directory / FAISS_FILE).is_file():
            import faiss

            index._faiss = faiss.read_index(str(directory / FAISS_FILE))
            if index._faiss.ntotal != count:
                index._faiss = None
        return index


def is_saved_index(directory: Path) -> bool:
    """True for an index folder saved before output folders were marked."""
    try:
        return json.loads((directory / MANIFEST).read_text("utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _relative_root(root: str, directory: Path) -> str:
    """``root`` relative to the index folder (POSIX separators); absolute on another drive."""
    try:
        return Path(os.path.relpath(Path(root).resolve(), Path(directory).resolve())).as_posix()
    except ValueError:
        return str(root)


def _stack_tables(tables) -> Table:
    return vstack(list(tables), join_type="outer", metadata_conflicts="silent")


def _map_vectors(path: Path) -> np.ndarray:
    """The ``vectors`` tensor of a safetensors file as a read-only memory map.

    The safetensors layout: an 8-byte little-endian header length, the JSON
    header (dtype, shape and byte offsets of each tensor), then the data.
    """
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n < 100_000_000:
            raise ValueError(f"{path.name} has no safetensors header")
        header = json.loads(fh.read(n))
    spec = header.get("vectors") or {}
    if spec.get("dtype") != "F32" or len(spec.get("shape", ())) != 2:
        raise ValueError(f"{path.name} holds no 2-d float32 'vectors' tensor")
    shape = tuple(int(x) for x in spec["shape"])
    begin, end = (int(x) for x in spec["data_offsets"])
    if end - begin != shape[0] * shape[1] * 4 or 8 + n + end > path.stat().st_size:
        raise ValueError(f"{path.name} is truncated")
    if shape[0] == 0:
        return np.zeros(shape, dtype=np.float32)
    return np.memmap(path, dtype="<f4", mode="r", offset=8 + n + begin, shape=shape)


def _model_record(embedder) -> dict:
    """What an index records of the embedder that made its vectors."""
    return {"id": embedder.model_id, "name": embedder.model_name, "digest": embedder.weights_digest,
            "source": dict(embedder.source) if embedder.source else None}


def _recorded_model(manifest: dict, directory: Path) -> dict:
    """The model record of a manifest (older manifests have only ``model_id``)."""
    rec = manifest.get("model")
    if not isinstance(rec, dict):
        mid = manifest.get("model_id")
        return {"id": mid, "digest": digest_from_model_id(mid)} if mid else {}
    rec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in rec.items()}
    src = rec.get("source")
    if src and src.get("kind") == "directory":
        rel = src.pop("relative_path", None)
        if rel is not None and (Path(directory) / rel).is_dir():
            src["path"] = str((Path(directory) / rel).resolve())
    return rec


def _names_image_file(text: str) -> bool:
    """True if ``text`` is the path of an existing image or FITS file (not a text query)."""
    from ..imaging.inputs import IMAGE_SUFFIXES

    # any gzipped file counts too: it may be a gzipped FITS file with another name
    if len(text) > 4096 or "\n" in text or not text.lower().endswith((*IMAGE_SUFFIXES, ".gz")):
        return False
    try:
        return Path(text).is_file()
    except OSError:
        return False


def recorded_image_root(index, index_dir: str | os.PathLike | None) -> Path | None:
    """The image root recorded with an index (its ``image_root`` or its manifest's), if any.

    A relative root is taken relative to the index directory.
    """
    root = getattr(index, "image_root", None)
    if root is None and index_dir is not None:
        manifest = Path(index_dir) / "index.json"
        try:
            root = json.loads(manifest.read_text("utf-8")).get("image_root")
        except (OSError, ValueError, AttributeError):
            root = None
    if not root:
        return None
    root = Path(os.path.expanduser(str(root)))
    if not root.is_absolute() and index_dir is not None:
        root = Path(index_dir) / root
    return root.resolve()
