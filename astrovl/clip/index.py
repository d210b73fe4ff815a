"""A searchable archive of image embeddings (faiss) with astropy-table metadata."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table, vstack

from ..exceptions import CheckpointError, IndexMismatchError
from ..utils.files import atomic_directory
from .inputs import as_image_list, describe_input

__all__ = ["EmbeddingIndex"]

log = logging.getLogger(__name__)

MANIFEST = "index.json"
VECTORS = "vectors.safetensors"
METADATA = "metadata.ecsv"
FAISS_FILE = "index.faiss"
FORMAT = "astrovl-embedding-index"
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
        Needed for text and image queries.
    model_id : str, optional
        Identity of the model whose vectors are stored.
    hnsw_m, ef_search, nlist, nprobe : int
        Parameters of the approximate structures.
    """

    def __init__(self, dim: int, *, kind: str = "exact", embedder=None, model_id: str | None = None,
                 hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 200,
                 nlist: int | None = None, nprobe: int = 32):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not known; use one of {KINDS}")
        if int(dim) < 1:
            raise ValueError(f"dim={dim!r} must be positive")
        self.dim = int(dim)
        self.kind = kind
        self.embedder = embedder
        self.model_id = model_id or (embedder.model_id if embedder is not None else None)
        self.params = {"hnsw_m": int(hnsw_m), "ef_search": int(ef_search),
                       "ef_construction": int(ef_construction), "nlist": nlist, "nprobe": int(nprobe)}
        self.metadata = Table()
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)
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

        Returns
        -------
        EmbeddingIndex
        """
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
        self.metadata = meta.copy() if len(self.metadata) == 0 else vstack(
            [self.metadata, meta], join_type="outer", metadata_conflicts="silent")
        self._vectors = np.concatenate([self._vectors, vectors]) if len(self._vectors) else vectors
        if self._faiss is not None and (self.kind == "exact" or self._faiss.is_trained):
            self._faiss.add(vectors)
        else:
            self._faiss = None  # (re)built lazily with all vectors

    def __len__(self) -> int:
        return len(self._vectors)

    @property
    def vectors(self) -> np.ndarray:
        """The stored unit vectors ``(N, dim)`` (read-only view)."""
        v = self._vectors.view()
        v.flags.writeable = False
        return v

    def __repr__(self) -> str:
        return f"<EmbeddingIndex {len(self)} vectors dim={self.dim} kind={self.kind} model={self.model_id}>"

    # ------------------------------------------------------------------ faiss
    def _structure(self):
        import faiss

        if self._faiss is not None:
            return self._faiss
        d, p = self.dim, self.params
        if self.kind == "exact":
            index = faiss.IndexFlatIP(d)
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p["ef_construction"]
            index.hnsw.efSearch = p["ef_search"]
        else:
            n = len(self._vectors)
            nlist = p["nlist"] or max(1, min(int(4 * np.sqrt(max(n, 1))), n // 39 if n >= 39 else 1))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, int(nlist), faiss.METRIC_INNER_PRODUCT)
            # k-means on all vectors up to IVF_TRAIN_SAMPLE, beyond that on a fixed-seed sample
            # of IVF_TRAIN_POINTS_PER_CELL per cell (faiss's default is 256): a million vectors
            # then train in about a minute on two cores instead of a quarter of an hour
            index.cp.max_points_per_centroid = max(IVF_TRAIN_POINTS_PER_CELL,
                                                   -(-IVF_TRAIN_SAMPLE // int(nlist)))
            if n:
                index.train(self._vectors)
            index.nprobe = min(p["nprobe"], int(nlist))
            self._ivf_quantizer = quantizer  # keep alive
        if len(self._vectors):
            index.add(self._vectors)
        self._faiss = index
        return index

    # ------------------------------------------------------------------ search
    def _query_vector(self, query) -> np.ndarray:
        if isinstance(query, str) and _names_image_file(query):
            query = Path(query)
        if isinstance(query, str):
            if self.embedder is None:
                raise ValueError(
                    "a text query needs the index's embedder: build the index with one, or pass "
                    "embedder= to EmbeddingIndex.load"
                )
            return self.embedder.embed_text([query])
        if isinstance(query, np.ndarray) and query.dtype.kind == "f" and query.shape[-1] == self.dim \
                and (query.ndim == 1 or (query.ndim == 2 and query.shape[0] == 1)):
            q = np.atleast_2d(query).astype(np.float32)
            return q / np.linalg.norm(q, axis=1, keepdims=True)
        if self.embedder is None:
            raise ValueError(
                "an image query needs the index's embedder: build the index with one, or pass "
                "embedder= to EmbeddingIndex.load"
            )
        return self.embedder.embed_images(query, progress=False)

    def search(self, query: Any, k: int = 10, *, ef_search: int | None = None,
               nprobe: int | None = None) -> Table:
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

        Returns
        -------
        astropy.table.Table
            ``rank``, ``score`` (cosine similarity), ``row`` (index position) and the
            metadata columns, best first.
        """
        if len(self) == 0:
            raise ValueError("the index is empty; add vectors or images first")
        k = int(k)
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        structure = self._structure()
        search_params = self._search_parameters(ef_search, nprobe)
        q = self._query_vector(query)
        scores, rows = structure.search(q[:1], min(k, len(self)), params=search_params)
        keep = rows[0] >= 0
        rows, scores = rows[0][keep], scores[0][keep]
        out = self.metadata[rows] if len(self.metadata.colnames) else Table()
        out = Table(out, copy=True)
        out.add_column(rows.astype(np.int64), name="row", index=0)
        out.add_column(scores.astype(np.float32), name="score", index=0)
        out.add_column(np.arange(1, len(rows) + 1), name="rank", index=0)
        return out

    def _search_parameters(self, ef_search: int | None, nprobe: int | None):
        """faiss search parameters for one call, or None to use the index's own."""
        if ef_search is None and nprobe is None:
            return None
        import faiss

        for name, value in (("ef_search", ef_search), ("nprobe", nprobe)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name}={value!r} must be >= 1")
        if ef_search is not None and self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(ef_search))
        if nprobe is not None and self.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=int(nprobe))
        given = "ef_search" if ef_search is not None else "nprobe"
        raise ValueError(
            f"{given} does not apply to an index of kind {self.kind!r}: ef_search is for "
            "kind='hnsw' and nprobe for kind='ivf'"
        )

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write vectors (safetensors), metadata (ECSV) and a JSON manifest, atomically."""
        from safetensors.numpy import save_file

        from .. import __version__

        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            save_file({"vectors": np.ascontiguousarray(self._vectors)}, str(tmp / VECTORS))
            self.metadata.write(tmp / METADATA, format="ascii.ecsv")
            if self.kind != "exact" and len(self):
                import faiss

                faiss.write_index(self._structure(), str(tmp / FAISS_FILE))
            manifest = {"format": FORMAT, "format_version": 1, "astrovl_version": __version__,
                        "model_id": self.model_id, "dim": self.dim, "count": len(self),
                        "metric": "inner_product", "kind": self.kind, "params": self.params}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, embedder=None) -> EmbeddingIndex:
        """Load an index written by :meth:`save`.

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
            vectors = load_file(str(directory / VECTORS))["vectors"]
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
        if embedder is not None:
            if embedder.embed_dim != dim:
                raise IndexMismatchError(
                    f"the index holds {dim}-d vectors but the embedder makes {embedder.embed_dim}-d "
                    f"ones; load the index with the model that built it ({manifest.get('model_id')})"
                )
            if manifest.get("model_id") and embedder.model_id != manifest["model_id"]:
                raise IndexMismatchError(
                    f"the index was built with model {manifest['model_id']!r} but the embedder is "
                    f"{embedder.model_id!r}; queries would be meaningless. Load the same model or "
                    "rebuild the index"
                )
        params = manifest.get("params", {})
        index = cls(dim, kind=manifest.get("kind", "exact"), embedder=embedder,
                    model_id=manifest.get("model_id"), **params)
        index._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index.metadata = metadata
        if index.kind != "exact" and (directory / FAISS_FILE).is_file():
            import faiss

            index._faiss = faiss.read_index(str(directory / FAISS_FILE))
            if index._faiss.ntotal != count:
                index._faiss = None
        return index


_IMAGE_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".gz", ".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff",
                   ".bmp", ".webp")


def _names_image_file(text: str) -> bool:
    """True if ``text`` is the path of an existing image or FITS file (not a text query)."""
    if len(text) > 4096 or "\n" in text or not text.lower().endswith(_IMAGE_SUFFIXES):
        return False
    try:
        return Path(text).is_file()
    except OSError:
        return False
