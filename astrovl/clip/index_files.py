"""The files of a saved :class:`~astrovl.EmbeddingIndex` folder.

An index folder holds:

``index.json`` (:data:`MANIFEST`)
    Format, dimension, count, kind and parameters, the model record and the
    image root (relative to the folder).
``vectors.safetensors`` (:data:`VECTORS`)
    The unit vectors, one ``vectors`` tensor of shape ``(N, dim)``, float32 or
    float16. Read as a memory map (:func:`map_vectors`) and written in chunks
    (:func:`write_vectors`), so neither needs the vectors in memory.
``metadata.ecsv`` (:data:`METADATA`) or ``metadata.fits``
    One metadata row per vector; FITS for large tables (see
    :mod:`astrovl.clip.index_metadata`).
``index.faiss`` (:data:`FAISS_FILE`)
    The faiss structure of an approximate index.
``staging/`` (:data:`STAGING`)
    Shards of embeddings written by the workers of a cluster build, kept until
    the index is complete (so that a build resumes).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..utils.files import INDEX_OUTPUT
from .identity import digest_from_model_id
from .index_metadata import METADATA

__all__ = ["common_image_root", "MANIFEST", "VECTORS", "METADATA", "FAISS_FILE", "STAGING", "FORMAT", "OUTPUT_KIND",
           "VECTOR_DTYPES", "read_manifest", "relative_root", "recorded_image_root",
           "map_vectors", "read_rows", "write_vectors", "write_manifest", "model_record", "model_manifest",
           "recorded_model"]

MANIFEST = "index.json"
VECTORS = "vectors.safetensors"
FAISS_FILE = "index.faiss"
STAGING = "staging"
FORMAT = "astrovl-embedding-index"
#: kind of the output folder an index is saved in (see :func:`astrovl.utils.files.check_output_dir`)
OUTPUT_KIND = INDEX_OUTPUT
#: how stored vectors may be kept: numpy dtype name -> safetensors dtype name
VECTOR_DTYPES = {"float32": "F32", "float16": "F16"}
_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2"}


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of the index folder ``directory``.

    Raises
    ------
    ValueError
        The manifest is unreadable or not an astrovl index manifest.
    """
    manifest = json.loads((Path(directory) / MANIFEST).read_text("utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"format is {manifest.get('format') if isinstance(manifest, dict) else None!r}")
    return manifest


def relative_root(root: str, directory: Path) -> str:
    """``root`` relative to the index folder (POSIX separators); absolute on another drive."""
    try:
        return Path(os.path.relpath(Path(root).resolve(), Path(directory).resolve())).as_posix()
    except ValueError:
        return str(root)


def recorded_image_root(index, index_dir: str | os.PathLike | None) -> Path | None:
    """The image root recorded with an index (its ``image_root`` or its manifest's), if any.

    A relative root is taken relative to the index directory.
    """
    root = getattr(index, "image_root", None)
    if root is None and index_dir is not None:
        manifest = Path(index_dir) / MANIFEST
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


def common_image_root(files) -> str:
    """The deepest folder holding every file, as named: the image root an index records.

    The folders are compared as written (made absolute, ``..`` removed), and
    only the folder found has its links resolved: a file that is a link to
    somewhere else never widens the root to a common parent of both places
    (such a file then lies outside the root, and ``astrovl serve`` refuses it).

    Parameters
    ----------
    files : sequence of path
        The image files.

    Returns
    -------
    str
        An absolute, resolved folder.
    """
    folders = [os.path.dirname(os.path.abspath(os.path.expanduser(str(f)))) for f in files]
    if not folders:
        raise ValueError("no image files: an image root needs at least one file")
    return str(Path(os.path.commonpath(folders)).resolve())


def map_vectors(path: Path, *, random_access: bool = False) -> np.ndarray:
    """The ``vectors`` tensor of a safetensors file as a read-only memory map.

    The safetensors layout: an 8-byte little-endian header length, the JSON
    header (dtype, shape and byte offsets of each tensor), then the data.
    float32 and float16 tensors are accepted.

    ``random_access`` advises the kernel that rows will be read here and there
    (``MADV_RANDOM``): a page fault then maps only that page, not the
    read-ahead window around it, so re-ranking a few hundred rows per query
    does not map hundreds of MiB of the file into the process.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n < 100_000_000:
            raise ValueError(f"{path.name} has no safetensors header")
        header = json.loads(fh.read(n))
    spec = header.get("vectors") or {}
    if spec.get("dtype") not in _NUMPY_DTYPES or len(spec.get("shape", ())) != 2:
        raise ValueError(f"{path.name} holds no 2-d float32 or float16 'vectors' tensor")
    dtype = np.dtype(_NUMPY_DTYPES[spec["dtype"]])
    shape = tuple(int(x) for x in spec["shape"])
    begin, end = (int(x) for x in spec["data_offsets"])
    if end - begin != shape[0] * shape[1] * dtype.itemsize or 8 + n + end > path.stat().st_size:
        raise ValueError(f"{path.name} is truncated")
    if shape[0] == 0:
        return np.zeros(shape, dtype=dtype)
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)
    handle = getattr(mapped, "_mmap", None)
    if random_access and handle is not None and hasattr(mmap, "MADV_RANDOM"):
        handle.madvise(mmap.MADV_RANDOM)
    return mapped


def read_rows(mapped: np.memmap, rows) -> np.ndarray:
    """Rows of a memory-mapped 2-d array, read from its file straight into the result (``preadv``).

    Reading maps no pages into the process: touching a few hundred scattered
    rows of a map can map hundreds of MiB of page cache (large folios), which
    then count in the process's resident set. Where the system has no
    ``preadv`` (Windows), the rows are taken from the map.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if not hasattr(os, "preadv"):
        return np.asarray(mapped[rows])
    row_bytes = mapped.shape[1] * mapped.dtype.itemsize
    out = np.empty((len(rows), mapped.shape[1]), dtype=mapped.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    offsets = (int(mapped.offset) + rows * row_bytes).tolist()
    fd = os.open(mapped.filename, os.O_RDONLY)
    try:
        for i, offset in enumerate(offsets):
            if os.preadv(fd, [view[i * row_bytes:(i + 1) * row_bytes]], offset) != row_bytes:
                raise OSError(f"{mapped.filename}: row {int(rows[i])} is cut short; the index file is "
                              "truncated, rebuild the index")
    finally:
        os.close(fd)
    return out


def write_vectors(path: str | os.PathLike, chunks: Iterable[np.ndarray], count: int, dim: int,
                  dtype: str = "float32") -> Path:
    """Write ``count`` rows given in ``chunks`` as the ``vectors`` tensor of a safetensors file.

    The file is written chunk by chunk (no copy of all the rows in memory); it is
    the caller's job to write into a temporary folder or file and rename it. The
    result reads back with :func:`map_vectors` or ``safetensors.numpy.load_file``.

    Parameters
    ----------
    path : path-like
    chunks : iterable of numpy.ndarray
        ``(n_i, dim)`` arrays, cast to ``dtype`` here; their rows add up to ``count``.
    count, dim : int
    dtype : {"float32", "float16"}

    Raises
    ------
    ValueError
        Chunks of another width, or another total than ``count``.
    """
    if dtype not in VECTOR_DTYPES:
        raise ValueError(f"vector dtype {dtype!r} is not supported; use one of {list(VECTOR_DTYPES)}")
    np_dtype = np.dtype(_NUMPY_DTYPES[VECTOR_DTYPES[dtype]])
    nbytes = int(count) * int(dim) * np_dtype.itemsize
    header = json.dumps({"vectors": {"dtype": VECTOR_DTYPES[dtype], "shape": [int(count), int(dim)],
                                     "data_offsets": [0, nbytes]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
    path = Path(path)
    written = 0
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header)
        for chunk in chunks:
            chunk = np.asarray(chunk)
            if chunk.ndim != 2 or chunk.shape[1] != dim:
                raise ValueError(f"a chunk of shape {chunk.shape} does not fit {dim}-d vectors")
            fh.write(memoryview(np.ascontiguousarray(chunk, dtype=np_dtype)).cast("B"))  # no copy
            written += len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    if written != count:
        raise ValueError(f"{written} vectors were written where {count} were announced")
    return path


def model_manifest(rec: dict, directory: Path) -> dict:
    """The model record ``rec`` as saved in the manifest of the index folder ``directory``.

    A model directory is also recorded relative to the index, so that an index
    moved with its model still finds it.
    """
    rec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in rec.items()}
    src = rec.get("source")
    if src and src.get("kind") == "directory":
        try:
            src["relative_path"] = os.path.relpath(src["path"], Path(directory).resolve())
        except ValueError:  # another drive
            src.pop("relative_path", None)
    return rec


def recorded_model(manifest: dict, directory: Path) -> dict:
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


def write_manifest(folder: Path, directory: Path, *, dim: int, count: int, kind: str, params: dict,
                   model: dict, image_root: str | None) -> Path:
    """Write the manifest of an index being written in ``folder``, to be renamed to ``directory``.

    ``model`` is the index's model record (:func:`model_record`); paths in the
    manifest (model directory, image root) are recorded relative to ``directory``.
    """
    from .. import __version__

    manifest = {"format": FORMAT, "format_version": 1, "astrovl_version": __version__,
                "model_id": model.get("id"), "model": model_manifest(model, directory),
                "dim": int(dim), "count": int(count), "metric": "inner_product", "kind": kind,
                "params": params}
    if image_root is not None:
        manifest["image_root"] = relative_root(image_root, directory)
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return path


def model_record(embedder) -> dict:
    """What an index records of the embedder that made its vectors."""
    return {"id": embedder.model_id, "name": embedder.model_name, "digest": embedder.weights_digest,
            "source": dict(embedder.source) if embedder.source else None,
            "random": bool(getattr(embedder, "random_weights", False))}
