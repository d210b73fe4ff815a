"""Archive-scale indexes: built out of core from embedding files, or on a dask cluster via files.

:func:`build_from_vector_files` turns ``.npy`` files of embeddings (computed
anywhere) into an index folder without holding the vectors in memory; and
:func:`build_on_cluster` has the workers of a :class:`dask.distributed.Client`
embed shards of images into files in the index folder's staging area, then
assembles those files the same way.

Memory
------
Building reads the vectors :func:`~astrovl.clip.faiss_structures.chunk_rows`
rows (32 MiB of float32) at a time with ordinary file reads (not memory maps, whose pages would
count as the process's own), so the peak memory is about

* the training sample of an ``"ivf"``/``"ivfpq"`` structure: at most
  ``max(100_000, 64 * nlist)`` rows as float32 (and faiss's copy of its residuals);
* one chunk (32 MiB of float32: 16384 rows at 512-d) and its normalised copy;
* the structure itself: ``N * (pq_m + 8)`` bytes for ``"ivfpq"``; for ``"ivf"``
  the centroids and the cell of each row (4 bytes), as its lists are written
  into the file in a second pass over the rows, chunk by chunk
  (:mod:`astrovl.clip.ivf_file`); but ``N * (dim * 4 + hnsw_m * 8)``
  bytes for ``"hnsw"`` (its graph is built over the full vectors in memory);
* the metadata table (one row per vector).

Disk: the vectors are written once (``N * dim * 4`` bytes, or 2 for float16)
plus the structure; a cluster build also keeps its shards (float32) until the
index is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from astropy.table import Table

from ..utils.files import atomic_directory, atomic_write, prepare_output_dir
from . import faiss_structures as fs
from . import ivf_file
from .index_files import (
    FAISS_FILE,
    OUTPUT_KIND,
    STAGING,
    VECTOR_DTYPES,
    VECTORS,
    model_record,
    write_manifest,
    write_vectors,
)
from .index_metadata import write_metadata
from .loading import ASTROVL_CONFIG

__all__ = ["RowFile", "read_vector_files", "build_from_vector_files", "write_index_from_rows",
           "build_on_cluster", "embed_shards_to_files"]

log = logging.getLogger(__name__)

METADATA_SUFFIXES = (".ecsv", ".parquet")


class RowFile:
    """Rows of a 2-d array stored raw in a file (a ``.npy`` file, the index's vectors).

    Slices are read with ordinary file reads, so reading a file chunk by chunk
    keeps only one chunk in the process's memory (the rest stays in the page
    cache, which is not the process's own).

    Parameters
    ----------
    path : path-like
    offset : int
        Byte offset of the first row.
    dtype : numpy.dtype
    shape : (int, int)
    """

    def __init__(self, path: str | os.PathLike, offset: int, dtype, shape: tuple[int, int]):
        self.path = Path(path)
        self.offset = int(offset)
        self.dtype = np.dtype(dtype)
        self.shape = (int(shape[0]), int(shape[1]))

    @classmethod
    def from_npy(cls, path: str | os.PathLike) -> RowFile:
        """The array of a ``.npy`` file (float32 or float16, 2-d, C order).

        Raises
        ------
        ValueError
            Not a readable ``.npy`` file, or an array of another shape, order or type.
        """
        path = Path(path)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{str(path)!r} is not a readable .npy file of embeddings ({exc})") from exc
        if not isinstance(arr, np.memmap) or arr.ndim != 2 or not arr.flags.c_contiguous:
            raise ValueError(f"{str(path)!r} holds an array of shape {arr.shape}; embedding files must "
                             "hold one 2-d C-ordered (N, dim) array, as np.save writes")
        if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4):
            raise ValueError(f"{str(path)!r} holds {arr.dtype} values; embedding files must be float32 "
                             "or float16 (convert with array.astype(np.float32))")
        return cls(path, arr.offset, arr.dtype, arr.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("a RowFile reads contiguous slices of rows only")
        start, stop, _ = item.indices(self.shape[0])
        n = max(0, stop - start)
        row_bytes = self.shape[1] * self.dtype.itemsize
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * row_bytes)
            data = np.fromfile(fh, dtype=self.dtype, count=n * self.shape[1])
        if data.size != n * self.shape[1]:
            raise ValueError(f"{str(self.path)!r} is truncated: rows {start}..{stop} are missing")
        return data.reshape(n, self.shape[1])


class _Rows:
    """Several row files (or arrays) read as one sequence of rows, in order."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.shape = (int(self.starts[-1]), int(self.parts[0].shape[1]) if self.parts else 0)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item) -> np.ndarray:
        start, stop, _ = item.indices(self.shape[0])
        pieces = []
        for i, part in enumerate(self.parts):
            a, b = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if a < b:
                pieces.append(np.asarray(part[int(a - self.starts[i]):int(b - self.starts[i])]))
        if not pieces:
            return np.zeros((0, self.shape[1]), dtype=np.float32)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def read_vector_files(paths: Sequence[str | os.PathLike]) -> tuple[list[RowFile], Table]:
    """The embedding files ``paths`` and their metadata, checked.

    Each ``NAME.npy`` may have a sibling metadata table ``NAME.ecsv`` or
    ``NAME.parquet`` with one row per vector; either every file has one or none
    has (then the metadata records ``file`` and ``file_row``).

    Raises
    ------
    ValueError
        No files, an unreadable file, another dimension than the first file's,
        metadata of the wrong length, or metadata for only some files.
    """
    if not paths:
        raise ValueError("no embedding files given; pass one or more .npy files of (N, dim) vectors")
    files = [RowFile.from_npy(p) for p in paths]
    dim = files[0].shape[1]
    for f in files:
        if f.shape[1] != dim:
            raise ValueError(f"{str(f.path)!r} holds {f.shape[1]}-d vectors but {str(files[0].path)!r} "
                             f"holds {dim}-d ones; all embedding files must come from one model")
    tables = [_sibling_metadata(f) for f in files]
    if any(t is None for t in tables) and any(t is not None for t in tables):
        without = [str(f.path) for f, t in zip(files, tables) if t is None]
        raise ValueError(f"some embedding files have metadata tables and {without[:3]} do not; give "
                         "every file a NAME.ecsv or NAME.parquet, or none")
    if tables[0] is None:
        names = np.concatenate([np.full(len(f), f.path.name) for f in files]) if files else []
        rows = np.concatenate([np.arange(len(f)) for f in files])
        return files, Table({"file": names, "file_row": rows})
    from astropy.table import vstack

    meta = tables[0] if len(tables) == 1 else vstack(tables, join_type="outer", metadata_conflicts="silent")
    return files, meta


def _sibling_metadata(f: RowFile) -> Table | None:
    for suffix in METADATA_SUFFIXES:
        path = f.path.with_suffix(suffix)
        if path.is_file():
            try:
                table = Table.read(path, format="ascii.ecsv") if suffix == ".ecsv" else _read_parquet(path)
            except Exception as exc:
                raise ValueError(f"the metadata table {str(path)!r} cannot be read ({exc})") from exc
            if len(table) != len(f):
                raise ValueError(f"the metadata table {str(path)!r} has {len(table)} rows but "
                                 f"{str(f.path)!r} holds {len(f)} vectors; give one row per vector")
            return table
    return None


def _read_parquet(path: Path) -> Table:
    """A parquet file as an astropy table, with pyarrow alone (nulls become masked values)."""
    from astropy.table import MaskedColumn

    from ..utils.imports import optional_import

    optional_import("pyarrow", purpose="reading parquet metadata tables")
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = pq.read_table(path)
    table = Table()
    for name in data.column_names:
        col = data.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            values = np.asarray(["" if v is None else v for v in col.to_pylist()], dtype=str)
        else:
            values = col.to_numpy(zero_copy_only=False)
        if col.null_count:
            table[name] = MaskedColumn(values, mask=col.is_null().to_numpy(zero_copy_only=False))
        else:
            table[name] = values
    return table


def _normalized(block: np.ndarray, first_row: int) -> np.ndarray:
    """Unit rows of ``block`` (float32); clear errors for non-finite or zero rows."""
    block = np.asarray(block, dtype=np.float32)
    bad = ~np.isfinite(block).all(axis=1)
    if bad.any():
        raise ValueError(f"vector {first_row + int(np.flatnonzero(bad)[0])} contains NaN or inf")
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"vector {first_row + int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros")
    return block / norms


def write_index_from_rows(directory: str | os.PathLike, parts: Sequence, metadata: Table, *,
                          kind: str = "exact", model: dict | None = None, vector_dtype: str = "float32",
                          image_root: str | None = None, progress: bool = True,
                          train_sample: int = fs.IVF_TRAIN_SAMPLE, **params) -> Path:
    """Write an index folder from rows read chunk by chunk (out of core), atomically.

    Parameters
    ----------
    directory : path-like
        The index folder (new, empty, or an earlier index, replaced once complete).
    parts : sequence of RowFile or arrays
        The vectors, in order (normalised here).
    metadata : astropy.table.Table
        One row per vector.
    kind : {"exact", "hnsw", "ivf", "ivfpq"}
    model : dict, optional
        The model record (:func:`~astrovl.clip.index_files.model_record`).
    vector_dtype : {"float32", "float16"}
    image_root : str, optional
    progress : bool
    train_sample : int
        Vectors an ``"ivf"`` or ``"ivfpq"`` structure trains on (at least 64 per cell).
    **params
        Structure parameters (see :class:`~astrovl.EmbeddingIndex`).

    Returns
    -------
    pathlib.Path
    """
    from ..utils.progress import progress_bar

    if kind not in fs.KINDS:
        raise ValueError(f"kind={kind!r} is not known; use one of {fs.KINDS}")
    if vector_dtype not in VECTOR_DTYPES:
        raise ValueError(f"vector_dtype={vector_dtype!r} is not known; use one of {list(VECTOR_DTYPES)}")
    rows = _Rows(parts)
    count, dim = rows.shape
    if count == 0:
        raise ValueError("there are no vectors to index")
    if len(metadata) != count:
        raise ValueError(f"{len(metadata)} metadata rows for {count} vectors; give one row per vector")
    all_params = fs.default_params()
    unknown = set(params) - set(all_params)
    if unknown:
        raise TypeError(f"unknown index parameters {sorted(unknown)}; known: {sorted(all_params)}")
    all_params.update(params)
    structure = None
    if kind != "exact":
        structure = fs.new_structure(kind, dim, all_params, count, train_sample=train_sample)
        _train_from_rows(structure, rows)
    directory = Path(directory)
    with atomic_directory(directory, kind=OUTPUT_KIND) as tmp:
        bar = progress_bar(total=count, enabled=progress, desc="writing the index", unit="vec")
        step = fs.chunk_rows(dim)

        cells = np.empty(count, dtype=np.int32) if kind == "ivf" else None  # an "ivf" file is written after

        def chunks():
            for start in range(0, count, step):
                block = _normalized(rows[start:start + step], start)
                if cells is not None:
                    cells[start:start + len(block)] = ivf_file.assign(structure, block)
                elif structure is not None:
                    fs.add_block(structure, block)
                bar.update(len(block))
                yield block

        write_vectors(tmp / VECTORS, chunks(), count, dim, vector_dtype)
        bar.close()
        if cells is not None:  # out of core: the rows again, written at their cells' places
            ivf_file.write_from_rows(tmp / FAISS_FILE, structure, cells,
                                     (_normalized(rows[s:s + step], s) for s in range(0, count, step)))
        elif structure is not None:
            import faiss

            faiss.write_index(structure, str(tmp / FAISS_FILE))
        structure = None  # freed before the metadata is written
        write_metadata(metadata, tmp)
        kept = {k: v for k, v in all_params.items()
                if kind == "ivfpq" or k not in ("pq_m", "pq_bits", "opq", "rerank_depth")}
        write_manifest(tmp, directory, dim=dim, count=count, kind=kind,
                       params={**kept, "vector_dtype": vector_dtype}, model=model or {},
                       image_root=image_root)
    return directory


def _train_from_rows(structure, rows: _Rows, seed: int = 1234) -> None:
    """Train ``structure`` on a fixed-seed sample of ``rows``, read chunk by chunk."""
    n = len(rows)
    size = fs.training_size(structure, n)
    if size == 0:
        return
    picked = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)) if size < n \
        else np.arange(n)
    sample = np.empty((size, rows.shape[1]), dtype=np.float32)
    filled = 0
    step = fs.chunk_rows(rows.shape[1])
    for start in range(0, n, step):
        lo, hi = np.searchsorted(picked, [start, start + step])
        if hi > lo:
            block = _normalized(rows[start:start + step], start)
            sample[filled:filled + hi - lo] = block[picked[lo:hi] - start]
            filled += hi - lo
    fs.train_on(structure, sample)


def build_from_vector_files(paths: Sequence[str | os.PathLike], directory: str | os.PathLike, *,
                            kind: str = "exact", model=None, device=None, vector_dtype: str = "float32",
                            progress: bool = True, **params) -> Path:
    """Build an index folder from ``.npy`` embedding files, out of core.

    Parameters
    ----------
    paths : sequence of path-like
        ``.npy`` files of ``(N_i, dim)`` float32 or float16 vectors, indexed in
        this order; each may have a sibling ``NAME.ecsv`` or ``NAME.parquet``
        metadata table with ``N_i`` rows.
    directory : path-like
        The index folder.
    kind : {"exact", "hnsw", "ivf", "ivfpq"}
    model : str, path or CLIPEmbedder, optional
        The model that made the vectors (a directory, hub id or open_clip name,
        loaded here to record its identity; or an embedder), so that the index
        answers text and image queries.
    device : str, optional
        Device of ``model`` when loaded here.
    vector_dtype : {"float32", "float16"}
    progress : bool
    **params
        Structure parameters (see :class:`~astrovl.EmbeddingIndex`).

    Returns
    -------
    pathlib.Path
        ``directory``.

    Raises
    ------
    ValueError
        Unreadable files, mixed dimensions, bad metadata, non-finite or zero vectors.
    IndexMismatchError
        ``model`` makes vectors of another dimension.
    """
    from ..exceptions import IndexMismatchError
    from ..utils.files import check_output_dir

    check_output_dir(directory, OUTPUT_KIND)
    files, metadata = read_vector_files(paths)
    record = None
    if model is not None:
        if isinstance(model, (str, os.PathLike)):
            from .embedder import CLIPEmbedder

            model = CLIPEmbedder.from_pretrained(str(model), device=device)
        if int(model.embed_dim) != files[0].shape[1]:
            raise IndexMismatchError(f"the model {model.model_id!r} makes {model.embed_dim}-d vectors but the "
                                     f"embedding files hold {files[0].shape[1]}-d ones")
        record = model_record(model)
    return write_index_from_rows(directory, files, metadata, kind=kind, model=record,
                                 vector_dtype=vector_dtype, progress=progress, **params)


# ---------------------------------------------------------------------- on a cluster
def _embed_shard_to_file(model_dir: str, items: list, path: str, batch_size: int, device: str | None) -> int:
    """Worker task: embed one shard with the saved model (loaded once per process) into ``path``.

    The file appears whole or not at all (written under a temporary name and
    renamed), so a worker killed mid-shard leaves no shard behind, and a shard
    computed twice is the same file.
    """
    from .embedder import CLIPEmbedder

    cache = _embed_shard_to_file.__dict__.setdefault("_cache", {})
    key = (model_dir, device)
    if key not in cache:
        cache[key] = CLIPEmbedder.from_pretrained(model_dir, device=device)
    vectors = cache[key].embed_images(items, batch_size=batch_size, progress=False)
    with atomic_write(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(vectors, dtype=np.float32))
    return len(vectors)


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}.npy"


def embed_shards_to_files(client, embedder, items: list, staging: str | os.PathLike, *, batch_size: int = 64,
                          shard_size: int = 1024, device: str | None = None,
                          progress: bool = True) -> list[Path]:
    """Embed ``items`` on the workers of ``client`` into shard files under ``staging``.

    Shard ``i`` (items ``i * shard_size`` to ``(i + 1) * shard_size``) goes to
    ``staging/shard-00000i.npy``. A plan file records the inputs, shard size and
    model; when it matches, shards already on disk are kept and only the missing
    ones are computed (so re-running after a kill resumes); otherwise the staging
    area is emptied first. The workers receive only their shard's inputs and
    return only a row count: the client never holds embeddings.

    Returns
    -------
    list of pathlib.Path
        The shard files, in input order.
    """
    from ..utils.imports import optional_import
    from ..utils.progress import progress_bar

    distributed = optional_import("distributed", purpose="embedding on a dask cluster")
    staging = Path(staging)
    plan = _plan(embedder, items, shard_size)
    plan_path = staging / "plan.json"
    try:
        same = json.loads(plan_path.read_text("utf-8")) == plan
    except (OSError, ValueError):
        same = False
    if not same and staging.exists():
        log.info("the staging area %s belongs to another build: starting over", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    model_dir = staging / "model"
    if not same or not (model_dir / ASTROVL_CONFIG).is_file():
        embedder.save_pretrained(model_dir, update_source=False)
        with atomic_write(plan_path, "w") as fh:
            fh.write(json.dumps(plan))
    paths = [staging / _shard_name(i) for i in range(0, -(-len(items) // shard_size))]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    log.info("%d of %d shards to embed (%d already on disk)", len(missing), len(paths), len(paths) - len(missing))
    futures = [client.submit(_embed_shard_to_file, str(model_dir), items[i * shard_size:(i + 1) * shard_size],
                             str(paths[i]), batch_size, device, key=f"astrovl-shard-{plan['digest'][:16]}-{i}",
                             pure=False)
               for i in missing]
    bar = progress_bar(total=len(paths), initial=len(paths) - len(missing), enabled=progress,
                       desc="embedding shards", unit="shard")
    try:
        for fut in distributed.as_completed(futures):
            fut.result()  # raises the worker's error
            bar.update(1)
            fut.release()
    finally:
        bar.close()
    return paths


def _plan(embedder, items: list, shard_size: int) -> dict:
    """What a staging area was made for: the inputs, the shard size and the model."""
    from ..imaging.inputs import describe_input

    h = hashlib.sha256()
    for item in items:
        h.update(describe_input(item).encode("utf-8", "surrogatepass") + b"\0")
    plan = {"count": len(items), "shard_size": int(shard_size), "inputs": h.hexdigest(),
            "model": embedder.weights_digest, "dim": int(embedder.embed_dim)}
    plan["digest"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    return plan


def build_on_cluster(client, embedder, items: list, directory: str | os.PathLike, *,
                     metadata: Table | None = None, kind: str = "exact", batch_size: int = 64,
                     shard_size: int = 1024, device: str | None = None, vector_dtype: str = "float32",
                     image_root: str | None = None, progress: bool = True, **params) -> Path:
    """Embed ``items`` on a dask cluster into the staging area of ``directory``, then write the index.

    The index folder ``directory`` must be on a file system the workers share
    with the client: the workers write their shards to ``directory/staging``
    (see :func:`embed_shards_to_files`), and the client assembles them out of
    core (see :func:`write_index_from_rows`). Re-running after an interruption
    resumes from the shards on disk. The staging area goes away with the old
    folder once the index is complete.

    Returns
    -------
    pathlib.Path
        ``directory``.
    """
    if not items:
        raise ValueError("no images to index: the input is empty")
    if metadata is None:
        from ..imaging.inputs import describe_input

        metadata = Table({"source": [describe_input(x) for x in items]})
    if len(metadata) != len(items):
        raise ValueError(f"metadata has {len(metadata)} rows but there are {len(items)} images; give one "
                         "metadata row per image")
    directory = prepare_output_dir(directory, OUTPUT_KIND)
    paths = embed_shards_to_files(client, embedder, items, directory / STAGING, batch_size=batch_size,
                                  shard_size=shard_size, device=device, progress=progress)
    files = [RowFile.from_npy(p) for p in paths]
    return write_index_from_rows(directory, files, metadata, kind=kind, model=model_record(embedder),
                                 vector_dtype=vector_dtype, image_root=image_root, progress=progress,
                                 **params)
