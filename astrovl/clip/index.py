"""A searchable archive of image embeddings (faiss) with astropy-table metadata."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table, vstack

from ..exceptions import CheckpointError, IndexMismatchError, ModelNotFoundError
from ..utils.files import atomic_directory
from . import faiss_structures as fs
from .chunks import ChunkedRows
from .identity import digest_from_model_id
from .index_files import (  # noqa: F401  (the file names and OUTPUT_KIND are also importable from here)
    FAISS_FILE,
    FORMAT,
    MANIFEST,
    METADATA,
    OUTPUT_KIND,
    VECTOR_DTYPES,
    VECTORS,
    common_image_root,
    map_vectors,
    model_record,
    read_manifest,
    read_rows,
    recorded_image_root,
    recorded_model,
    write_manifest,
    write_vectors,
)
from .index_metadata import read_metadata, write_metadata
from .ivf_file import GrownStructure, write_from_lists
from .loading import describe_source

__all__ = ["EmbeddingIndex", "recorded_image_root", "common_image_root"]

log = logging.getLogger(__name__)

KINDS = fs.KINDS


class EmbeddingIndex:
    """Nearest-neighbour search over unit-norm embeddings with row metadata.

    Search is by inner product (cosine similarity for unit vectors) with faiss:
    exact (``IndexFlatIP``) by default, or approximate for large archives:
    ``"hnsw"`` (``IndexHNSWFlat``), ``"ivf"`` (``IndexIVFFlat``) or ``"ivfpq"``
    (``IndexIVFPQ``, optionally with an OPQ rotation; see
    :mod:`astrovl.clip.faiss_structures`). Vectors are stored unquantized in
    every mode, so text queries, which sit away from the image vectors because
    of the image/text modality gap, are scored exactly: ``"hnsw"`` and ``"ivf"``
    score the candidates they visit exactly, and ``"ivfpq"`` re-scores its
    ``rerank_depth`` best candidates exactly from the stored vectors.

    Parameters
    ----------
    dim : int
        Embedding dimension.
    kind : {"exact", "hnsw", "ivf", "ivfpq"}
    embedder : CLIPEmbedder, optional
        Needed for text and image queries. The index records its identity (weights
        digest) and how to load it again (:attr:`model_info`).
    model_id : str, optional
        Identity of the model whose vectors are stored, when no embedder is given.
    device : str, optional
        Device of the embedder when the index loads its recorded model itself.
    hnsw_m, ef_search, ef_construction : int
        Parameters of ``"hnsw"``.
    nlist, nprobe : int
        Cells of ``"ivf"`` and ``"ivfpq"`` (default: about ``4 sqrt(N)`` and
        ``sqrt(N)``), and cells searched per query.
    pq_m, pq_bits : int
        ``"ivfpq"``: bytes (sub-quantizers) per code, default ``dim / 8``, and
        bits per sub-quantizer (8).
    opq : bool
        ``"ivfpq"``: rotate the vectors (OPQ) before quantizing them.
    rerank_depth : int, optional
        ``"ivfpq"``: candidates re-scored exactly per query (at least ``k``;
        default: 512, or one per 6,000 vectors when the index holds more than
        3,072,000, following the index as it grows).
    vector_dtype : {"float32", "float16"}
        How the unit vectors are stored (float16 halves the disk and page cache;
        scores then differ from float32 ones by about 1e-3).
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
                 nlist: int | None = None, nprobe: int = 32, pq_m: int | None = None, pq_bits: int = 8,
                 opq: bool = False, rerank_depth: int | None = None, vector_dtype: str = "float32",
                 image_root: str | os.PathLike | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not known; use one of {KINDS}")
        if int(dim) < 1:
            raise ValueError(f"dim={dim!r} must be positive")
        if vector_dtype not in VECTOR_DTYPES:
            raise ValueError(f"vector_dtype={vector_dtype!r} is not known; use one of {list(VECTOR_DTYPES)}")
        if rerank_depth is not None and int(rerank_depth) < 1:
            raise ValueError(f"rerank_depth={rerank_depth!r} must be >= 1")
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
        if kind == "ivfpq":
            self.params.update(pq_m=pq_m, pq_bits=int(pq_bits), opq=bool(opq),
                               rerank_depth=None if rerank_depth is None else int(rerank_depth))
        self.params["vector_dtype"] = vector_dtype
        self._vec = ChunkedRows(np.concatenate)
        self._meta = ChunkedRows(_stack_tables)
        self._faiss = None
        self._faiss_file: Path | None = None  # the file a memory-mapped structure is read from
        self._grown: GrownStructure | None = None  # a mapped "ivf" structure that took new vectors

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, embedder, images, metadata: Table | dict | None = None, *, batch_size: int = 64,
              approximate: str | None = None, client=None, shard_size: int = 1024,
              progress: bool = True, directory: str | os.PathLike | None = None,
              **params) -> EmbeddingIndex:
        """Embed ``images`` with ``embedder`` and index them.

        Parameters
        ----------
        embedder : CLIPEmbedder
        images : image inputs, a list of them, or a dataset
        metadata : astropy.table.Table or dict of columns, optional
            One row per image (e.g. path, obs_id, proposal_id, ra, dec). By default
            a ``source`` column records where each image came from.
        batch_size : int
        approximate : {None, "hnsw", "ivf", "ivfpq"}
            ``None`` gives exact search.
        client : dask.distributed.Client, optional
            Embed shards of ``shard_size`` images on a dask cluster (one worker per
            GPU in real use). Image inputs must then be paths (or other picklable
            inputs), and the workers must see the same file system.
        progress : bool
        directory : path, optional
            With ``client``: the index folder, on a file system the workers share.
            The workers write their shards there (``staging/``), the index is
            written from them out of core, and the loaded (memory-mapped) index
            is returned; re-running after an interruption resumes from the
            shards already written (see :func:`astrovl.clip.archive.build_on_cluster`).
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
        if client is not None and directory is not None:
            from .archive import build_on_cluster

            build_on_cluster(client, embedder, items, directory, metadata=meta, kind=approximate or "exact",
                             batch_size=batch_size, shard_size=shard_size, progress=progress, **params)
            return cls.load(directory, embedder=embedder)
        if directory is not None:
            raise ValueError("directory= is for building on a cluster (with client=); save a local "
                             "build with index.save(directory)")
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
        stored = vectors if self.vector_dtype == "float32" else vectors.astype(self.vector_dtype)
        if metadata is None:
            meta = Table({"source": [f"vector {len(self) + i}" for i in range(len(vectors))]})
        else:
            meta = metadata if isinstance(metadata, Table) else Table(dict(metadata))
        if len(meta) != len(vectors):
            raise ValueError(f"{len(meta)} metadata rows for {len(vectors)} vectors; give one row per vector")
        if self._faiss_file is not None and self.kind != "ivf":  # mapped, read-only: read it to grow it
            self._faiss = fs.read_structure(self._faiss_file, self.kind)[0]
            self._faiss_file = None
        self._vec.append(stored)  # amortised: no concatenation of everything per call
        self._meta.append(meta.copy())
        if self._faiss_file is not None:  # a mapped "ivf" structure: its lists stay on disk
            if self._grown is None:
                self._grown = GrownStructure(self._faiss)
            self._grown.add(vectors)
        elif self._faiss is not None and self._faiss.is_trained:
            fs.add_block(self._faiss, vectors)
        else:
            self._faiss = None  # (re)built lazily with all vectors

    @property
    def vector_dtype(self) -> str:
        """How the vectors are stored: ``"float32"`` or ``"float16"``."""
        return self.params.get("vector_dtype", "float32")

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
        """What the index knows of its model: ``id``, ``name``, ``digest``, ``source`` and ``random``.

        ``random`` is True when the vectors were made by a model with random
        (untrained) weights, whose search results carry no meaning; it is
        missing from indexes saved before astrovl recorded it.
        """
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
            self._model = model_record(embedder)
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
        """The stored unit vectors ``(N, dim)`` (read-only view, of :attr:`vector_dtype`)."""
        stored = self._vec.compact()
        if stored is None:
            return np.zeros((0, self.dim), dtype=self.vector_dtype)
        v = stored.view(np.ndarray)
        v.flags.writeable = False
        return v

    def __repr__(self) -> str:
        return f"<EmbeddingIndex {len(self)} vectors dim={self.dim} kind={self.kind} model={self.model_id}>"

    # ------------------------------------------------------------------ faiss
    def _structure(self):
        """The faiss structure of an approximate index (built on first use)."""
        if self._faiss is None:
            self._faiss = fs.build_structure(self.kind, self.dim, self.params, self.vectors)
        return self._faiss

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
               nprobe: int | None = None, rows=None, rerank_depth: int | None = None, rerank=None,
               rerank_top: int | None = None) -> Table:
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
            For ``kind="ivf"`` or ``"ivfpq"``: the number of cells searched for this
            query only (default: the index's ``nprobe``). Larger is more accurate
            and slower.
        rows : array of int or bool, optional
            Search only these rows: positions, or a boolean mask of length
            ``len(index)``, e.g. from :meth:`rows_where`. Fewer than ``k`` rows
            come back when fewer are allowed.
        rerank_depth : int, optional
            For ``kind="ivfpq"``: how many candidates of the compressed search are
            re-scored exactly for this query only (default: the index's
            ``rerank_depth``; at least ``k``). Larger is more accurate and slower.
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

            return rerank_search(self, query, k, rerank, rerank_top, ef_search=ef_search, nprobe=nprobe, rows=rows,
                                 rerank_depth=rerank_depth)
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
        depth = self._rerank_depth(rerank_depth, k)
        q = self._query_vector(query)[:1]
        k = min(k, len(self) if allowed is None else int(allowed.sum()))
        if k == 0:
            scores, rows = np.zeros(0, np.float32), np.zeros(0, np.int64)
        elif self.kind == "exact":
            scores, rows = self._exact_search(q, k, allowed)
        else:
            scores, rows = self._structure().search(q, depth or k, params=search_params)
            keep = rows[0] >= 0
            rows, scores = rows[0][keep], scores[0][keep]
            if depth:
                scores, rows = self._rescore(q, rows, k)
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
        Memory-mapped or float16 vectors are scanned a block of rows at a time.
        """
        import faiss

        scores, rows = [], []
        for start, chunk in self._blocks():
            positions = None
            if allowed is not None:
                positions = np.flatnonzero(allowed[start:start + len(chunk)])
                if not len(positions):
                    continue
                chunk = chunk[positions]
            d, i = faiss.knn(q, np.ascontiguousarray(chunk, dtype=np.float32), min(k, len(chunk)),
                             metric=faiss.METRIC_INNER_PRODUCT)
            scores.append(d[0])
            rows.append((i[0] if positions is None else positions[i[0]]) + start)
        merged = len(scores) > 1
        scores, rows = np.concatenate(scores), np.concatenate(rows)
        if merged:
            order = np.lexsort((rows, -scores))[:k]
            scores, rows = scores[order], rows[order]
        return scores, rows

    def _blocks(self):
        """(first row, rows) of the stored vectors: the chunks, split into blocks of
        :func:`~astrovl.clip.faiss_structures.chunk_rows` rows where they are memory maps
        or not float32 (so that no scan reads a whole map into private memory)."""
        for start, chunk in zip(self._vec.starts(), self._vec.chunks):
            if isinstance(chunk, np.memmap) or chunk.dtype != np.float32:
                step = fs.chunk_rows(self.dim)
                for s in range(0, len(chunk), step):
                    yield start + s, chunk[s:s + step]
            else:
                yield start, chunk

    def set_search_defaults(self, *, nprobe: int | None = None, ef_search: int | None = None,
                            rerank_depth: int | None = None) -> None:
        """Change what a search uses when it does not say: for this index, and kept when it is saved.

        A server or a script that wants faster or more accurate answers than the
        index was built with sets them once (``astrovl serve --nprobe ...``)
        instead of passing them to every :meth:`search`.

        Parameters
        ----------
        nprobe : int, optional
            Cells searched (``"ivf"``, ``"ivfpq"``).
        ef_search : int, optional
            Search breadth (``"hnsw"``).
        rerank_depth : int, optional
            Candidates re-scored exactly (``"ivfpq"``); fixed from now on instead
            of following the index's size.

        Raises
        ------
        ValueError
            A value below 1, or one that does not apply to this kind of index.
        """
        fs.check_search_settings(self.kind, ef_search, nprobe)
        self._rerank_depth(rerank_depth, 1)  # checks it
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search), ("rerank_depth", rerank_depth)):
            if value is not None:
                self.params[name] = int(value)
        if self._faiss is not None:
            fs.apply_search_defaults(self._faiss, self.kind, self.params)

    def _rerank_depth(self, rerank_depth: int | None, k: int) -> int | None:
        """Candidates re-scored exactly by an ``"ivfpq"`` index (None for other kinds)."""
        if rerank_depth is not None:
            if self.kind != "ivfpq":
                raise ValueError(f"rerank_depth does not apply to an index of kind {self.kind!r}: "
                                 "it is for kind='ivfpq'")
            if int(rerank_depth) < 1:
                raise ValueError(f"rerank_depth={rerank_depth!r} must be >= 1")
        if self.kind != "ivfpq":
            return None
        return max(int(k), int(rerank_depth or self.params.get("rerank_depth") or fs.default_rerank_depth(len(self))))

    def _rescore(self, q: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best of the candidate ``rows`` by exact inner product with the stored vectors."""
        if not len(rows):
            return np.zeros(0, np.float32), rows
        exact = self._stored_rows(rows).astype(np.float32) @ q[0]
        order = np.lexsort((rows, -exact))[:k]
        return exact[order], rows[order]

    def _stored_rows(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of ``rows``; rows of a memory map are read from its file, not mapped."""
        which, local = self._vec.locate(rows)
        if len(which) and which.min() == which.max():  # one chunk (a loaded index not grown since)
            return _chunk_rows(self._vec.chunks[int(which[0])], local)
        out = np.empty((len(rows), self.dim), dtype=self.vector_dtype)
        for c in np.unique(which):
            sel = np.flatnonzero(which == c)
            out[sel] = _chunk_rows(self._vec.chunks[c], local[sel])
        return out

    def _search_parameters(self, ef_search: int | None, nprobe: int | None,
                           bitmap: np.ndarray | None = None):
        """faiss search parameters for one call, or None to use the index's own.

        ``bitmap`` (packed little-endian bits, one per row) restricts the search;
        the caller keeps it alive until the search returns.
        """
        return fs.search_parameters(self.kind, self.params, self._structure, ef_search, nprobe, bitmap)

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
        directory = Path(directory)
        with atomic_directory(directory, kind=OUTPUT_KIND) as tmp:
            # chunk by chunk: memory-mapped vectors and the ones added since are not joined in memory
            write_vectors(tmp / VECTORS, (c for _, c in self._blocks()), len(self), self.dim, self.vector_dtype)
            write_metadata(self.metadata, tmp)
            if self.kind != "exact" and len(self):
                import faiss

                if self._grown is not None:  # mapped lists and new ones, written cell after cell
                    write_from_lists(tmp / FAISS_FILE, self._faiss)
                elif self._faiss_file is not None:  # mapped from a file, unchanged since: copy it
                    shutil.copyfile(self._faiss_file, tmp / FAISS_FILE)
                else:
                    faiss.write_index(self._structure(), str(tmp / FAISS_FILE))
            write_manifest(tmp, directory, dim=self.dim, count=len(self), kind=self.kind,
                           params=self.params, model=self.model_info, image_root=self.image_root)
        self.directory = directory.resolve()
        return directory

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
            memory. The inverted lists of an ``"ivf"`` or ``"ivfpq"`` structure
            are mapped from ``index.faiss`` too (``faiss.IO_FLAG_MMAP``). Vectors
            added later join an ``"ivf"`` structure in memory beside its mapped
            lists (:class:`~astrovl.clip.ivf_file.GrownStructure`); an
            ``"ivfpq"`` structure (codes only) is read into memory first.

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
            manifest = read_manifest(directory)
            random_access = manifest.get("kind") == "ivfpq"  # re-ranking reads a few rows per query
            vectors = (map_vectors(directory / VECTORS, random_access=random_access) if mmap
                       else load_file(str(directory / VECTORS))["vectors"])
            metadata = read_metadata(directory)
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
        index._model = recorded_model(manifest, directory)
        index.directory = directory.resolve()
        root = manifest.get("image_root")
        if isinstance(root, str) and root:
            index.image_root = str((directory / Path(root).expanduser()).resolve())
        if vectors.dtype != np.dtype(index.vector_dtype):
            raise CheckpointError(f"embedding index {str(directory)!r} holds {vectors.dtype} vectors, "
                                  f"not {index.vector_dtype} as its manifest says; rebuild it")
        index._vec.replace(vectors)
        index._meta.replace(metadata)
        if embedder is not None:
            index.embedder = embedder
        if index.kind != "exact" and (directory / FAISS_FILE).is_file():
            index._faiss, mapped = fs.read_structure(directory / FAISS_FILE, index.kind, mmap=mmap)
            index._faiss_file = (directory / FAISS_FILE).resolve() if mapped else None
            fs.apply_search_defaults(index._faiss, index.kind, index.params)  # the manifest's, if changed since
            if index._faiss.ntotal != count:
                index._faiss, index._faiss_file = None, None
        return index


def _chunk_rows(chunk: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Rows of one chunk of stored vectors: read from the file of a memory map, indexed otherwise."""
    return read_rows(chunk, local) if isinstance(chunk, np.memmap) else chunk[local]


def _stack_tables(tables) -> Table:
    return vstack(list(tables), join_type="outer", metadata_conflicts="silent")


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


