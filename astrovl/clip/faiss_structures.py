"""The faiss structures behind an :class:`~astrovl.EmbeddingIndex`: building, training, search parameters.

Kinds
-----
``"exact"``
    No structure: exhaustive inner-product search over the stored vectors.
``"hnsw"``
    ``IndexHNSWFlat``: a graph over full vectors (in memory).
``"ivf"``
    ``IndexIVFFlat``: ``nlist`` k-means cells holding full vectors; ``nprobe``
    cells are searched.
``"ivfpq"``
    ``IndexIVFPQ`` (optionally behind an OPQ rotation): the cells hold product
    quantization codes of ``pq_m`` bytes per vector instead of the vectors, so
    the structure is about ``4 * dim / pq_m`` times smaller than the vectors.
    Its approximate scores are only used to choose candidates, which the index
    re-scores exactly from the stored (memory-mapped) vectors.

Building out of core
--------------------
:func:`train_structure` trains on a sample of at most :func:`training_size`
rows, gathered from a (memory-mapped) array, and :func:`add_in_chunks` adds
rows :func:`chunk_rows` (32 MiB of float32) at a time, so building needs memory for the sample,
one chunk and the structure itself, not for all the vectors.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["KINDS", "IVF_KINDS", "IVF_TRAIN_POINTS_PER_CELL", "IVF_TRAIN_SAMPLE", "ADD_CHUNK", "CHUNK_BYTES", "chunk_rows",
           "default_params", "default_nlist", "default_pq_m", "new_structure", "training_size",
           "train_structure", "train_on", "add_block", "add_in_chunks", "build_structure", "apply_search_defaults", "check_search_settings",
           "search_parameters", "ivf_part",
           "read_structure"]

KINDS = ("exact", "hnsw", "ivf", "ivfpq")
IVF_KINDS = ("ivf", "ivfpq")
IVF_TRAIN_POINTS_PER_CELL = 64
IVF_TRAIN_SAMPLE = 100_000
#: rows converted to float32 and added to a structure at once (at most; see :func:`chunk_rows`)
ADD_CHUNK = 65_536
#: bytes of float32 vectors read, converted or added at once
CHUNK_BYTES = 32 * 2**20
#: candidates an ``"ivfpq"`` index re-scores exactly per query by default, at least: at 2 million
#: clustered 512-d vectors 256 gave recall@10 0.80, 512 gave 0.95 (docs/archive.rst)
DEFAULT_RERANK_DEPTH = 512
#: ... and one more per this many vectors in larger indexes: the candidates that a compressed
#: code cannot tell apart grow with the number of vectors (10 million: 1,667, recall@10 0.967
#: against 0.767 with 512 on clustered 512-d vectors; docs/benchmarks.rst)
RERANK_ROWS_PER_CANDIDATE = 6_000


def default_rerank_depth(n: int) -> int:
    """Candidates an ``"ivfpq"`` index of ``n`` vectors re-scores per query unless told otherwise."""
    return max(DEFAULT_RERANK_DEPTH, -(-int(n) // RERANK_ROWS_PER_CANDIDATE))


def chunk_rows(dim: int) -> int:
    """Rows per chunk of ``dim``-d vectors: :data:`CHUNK_BYTES` of float32, at most :data:`ADD_CHUNK`."""
    return max(1, min(ADD_CHUNK, CHUNK_BYTES // (4 * max(int(dim), 1))))


def default_params() -> dict:
    """The structure parameters of a new index, with their defaults."""
    return {"hnsw_m": 32, "ef_search": 128, "ef_construction": 200, "nlist": None, "nprobe": 32,
            "pq_m": None, "pq_bits": 8, "opq": False, "rerank_depth": None}


def default_nlist(kind: str, n: int) -> int:
    """Number of k-means cells for ``n`` vectors.

    ``"ivf"``: about ``4 * sqrt(n)`` (at least 39 vectors per cell);
    ``"ivfpq"``: about ``sqrt(n)`` (at least 64 per cell), fewer and larger
    cells, since candidates are re-scored exactly anyway and training and
    adding cost grows with the number of cells.
    """
    n = max(int(n), 1)
    if kind == "ivfpq":
        return max(1, min(int(math.sqrt(n)), n // 64))
    return max(1, min(int(4 * math.sqrt(n)), n // 39 if n >= 39 else 1))


def default_pq_m(dim: int) -> int:
    """Number of PQ sub-quantizers: the largest divisor of ``dim`` up to ``dim / 8`` (8 dimensions each)."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _pq_bits(params: dict, n: int) -> int:
    """Bits per PQ code: ``pq_bits``, fewer for an index trained on fewer than ``2**pq_bits`` vectors."""
    bits = int(params.get("pq_bits") or 8)
    return max(1, min(bits, int(math.log2(max(n, 2)))))


def new_structure(kind: str, dim: int, params: dict, n: int, *, train_sample: int = IVF_TRAIN_SAMPLE):
    """An empty (untrained) faiss structure of ``kind`` for about ``n`` vectors.

    Fills ``params["nlist"]`` (and ``pq_m``, ``pq_bits`` for ``"ivfpq"``) when unset.
    An IVF structure trains on at most ``max(train_sample, 64 * nlist)`` vectors.
    """
    import faiss

    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["ef_construction"])
        index.hnsw.efSearch = int(params["ef_search"])
        return index
    if kind not in IVF_KINDS:
        raise ValueError(f"kind={kind!r} has no faiss structure")
    nlist = int(params.get("nlist") or default_nlist(kind, n))
    params["nlist"] = nlist
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        m = int(params.get("pq_m") or default_pq_m(dim))
        if dim % m:
            raise ValueError(f"pq_m={m} must divide the dimension {dim}")
        params["pq_m"], params["pq_bits"] = m, _pq_bits(params, min(n, train_sample))
        ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, m, params["pq_bits"], faiss.METRIC_INNER_PRODUCT)
    # k-means on all vectors up to IVF_TRAIN_SAMPLE, beyond that on a fixed-seed sample
    # of IVF_TRAIN_POINTS_PER_CELL per cell (faiss's default is 256): a million vectors
    # then train in about a minute on two cores instead of a quarter of an hour
    ivf.cp.max_points_per_centroid = max(IVF_TRAIN_POINTS_PER_CELL, -(-int(train_sample) // nlist))
    ivf.nprobe = min(int(params["nprobe"]), nlist)
    ivf.own_fields = True
    quantizer.this.disown()  # owned by the IVF structure from now on
    if kind == "ivfpq" and params.get("opq"):
        opq = faiss.OPQMatrix(dim, params["pq_m"])
        index = faiss.IndexPreTransform(opq, ivf)
        index.own_fields = True
        opq.this.disown()
        ivf.this.disown()
        return index
    return ivf


def ivf_part(index):
    """The IVF structure of ``index`` (itself, or the one behind an OPQ rotation), or None."""
    import faiss

    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


def training_size(index, n: int) -> int:
    """How many of ``n`` vectors train ``index`` (all up to the sample bound)."""
    ivf = ivf_part(index)
    if ivf is None or index.is_trained:
        return 0
    return min(int(n), int(ivf.cp.max_points_per_centroid) * int(ivf.nlist))


def train_structure(index, vectors, seed: int = 1234) -> None:
    """Train ``index`` on a fixed-seed sample of the rows of ``vectors`` (an array or a memory map).

    Only the sample (at most :func:`training_size` rows) is read into memory, as float32.
    """
    n = len(vectors)
    size = training_size(index, n)
    if size == 0:
        return
    if size < n:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        sample = np.empty((size, vectors.shape[1]), dtype=np.float32)
        step = chunk_rows(vectors.shape[1])
        for start in range(0, size, step):  # fancy indexing of a memory map, chunk by chunk
            sample[start:start + step] = vectors[rows[start:start + step]]
    else:
        sample = np.ascontiguousarray(vectors, dtype=np.float32)
    train_on(index, sample)


def train_on(index, sample: np.ndarray) -> None:
    """Train ``index`` on ``sample``, repeated when it has fewer rows than the structure has centroids
    (a tiny index: k-means needs at least one point per centroid)."""
    ivf = ivf_part(index)
    need = int(ivf.nlist) if ivf is not None else 1
    pq = getattr(ivf, "pq", None)
    if pq is not None:
        need = max(need, 2 ** int(pq.nbits))
    if type(index).__name__ == "IndexPreTransform":  # an OPQ rotation: 256 centroids per sub-space
        need = max(need, 256)
    if 0 < len(sample) < need:
        sample = np.concatenate([sample] * -(-need // len(sample)))
    index.train(sample)


def add_in_chunks(index, vectors, chunk: int | None = None) -> None:
    """Add the rows of ``vectors`` (an array or a memory map) to ``index``, ``chunk`` rows at a time."""
    chunk = chunk or chunk_rows(vectors.shape[1])
    for start in range(0, len(vectors), chunk):
        add_block(index, vectors[start:start + chunk])


def add_block(index, block: np.ndarray) -> None:
    """Add ``block`` to ``index`` in batches whose encoding needs at most :data:`CHUNK_BYTES`.

    faiss encodes product-quantized vectors of 16 or more dimensions per
    sub-quantizer through distance tables of ``pq_m * 2**pq_bits`` floats per
    vector, all at once for the rows given: for 32768 rows of 16 sub-quantizers
    that is 512 MiB. Batches keep that bounded.
    """
    block = np.ascontiguousarray(block, dtype=np.float32)
    ivf = ivf_part(index)
    pq = getattr(ivf, "pq", None)
    step = len(block)
    if pq is not None and int(pq.dsub) >= 16:
        step = max(1, CHUNK_BYTES // (4 * int(pq.M) * int(pq.ksub)))
    for start in range(0, len(block), max(step, 1)):
        index.add(block[start:start + step])


def build_structure(kind: str, dim: int, params: dict, vectors):
    """A trained faiss structure of ``kind`` holding all rows of ``vectors``."""
    index = new_structure(kind, dim, params, len(vectors))
    if len(vectors):
        train_structure(index, vectors)
        add_in_chunks(index, vectors)
    return index


def apply_search_defaults(structure, kind: str, params: dict) -> None:
    """Give ``structure`` the index's ``nprobe`` (at most ``nlist``) or ``ef_search`` from ``params``."""
    if kind in IVF_KINDS and params.get("nprobe"):
        ivf = ivf_part(structure)
        ivf.nprobe = min(int(params["nprobe"]), int(ivf.nlist))
    elif kind == "hnsw" and params.get("ef_search"):
        structure.hnsw.efSearch = int(params["ef_search"])


def check_search_settings(kind: str, ef_search: int | None, nprobe: int | None) -> None:
    """Refuse a search setting below 1 or one that does not apply to ``kind`` (:class:`ValueError`)."""
    for name, value in (("ef_search", ef_search), ("nprobe", nprobe)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{name}={value!r} must be >= 1")
    if (ef_search is not None and kind != "hnsw") or (nprobe is not None and kind not in IVF_KINDS):
        given = "ef_search" if ef_search is not None else "nprobe"
        raise ValueError(
            f"{given} does not apply to an index of kind {kind!r}: ef_search is for "
            "kind='hnsw' and nprobe for kind='ivf' or 'ivfpq'"
        )


def search_parameters(kind: str, params: dict, structure, ef_search: int | None, nprobe: int | None,
                      bitmap: np.ndarray | None = None):
    """faiss search parameters for one call, or None to use the structure's own.

    Parameters
    ----------
    kind : str
    params : dict
        The index's parameters (``ef_search``...).
    structure : callable
        Returns the faiss structure (called only when needed).
    ef_search, nprobe : int or None
        Per-call overrides.
    bitmap : numpy.ndarray, optional
        Packed little-endian bits, one per row, restricting the search; the
        caller keeps it alive until the search returns.
    """
    if ef_search is None and nprobe is None and bitmap is None:
        return None
    import faiss

    check_search_settings(kind, ef_search, nprobe)
    kw = {} if bitmap is None else {"sel": faiss.IDSelectorBitmap(bitmap)}
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=int(ef_search or params["ef_search"]), **kw)
    if kind in IVF_KINDS:
        index = structure()
        ivf_params = faiss.SearchParametersIVF(nprobe=int(nprobe or ivf_part(index).nprobe), **kw)
        if isinstance(index, faiss.IndexPreTransform):
            # the selector applies to the IVF structure behind the rotation
            return faiss.SearchParametersPreTransform(index_params=ivf_params)
        return ivf_params
    return faiss.SearchParameters(**kw)


def read_structure(path, kind: str, *, mmap: bool = False) -> tuple:
    """Read a faiss structure; ``mmap`` maps the inverted lists of an IVF structure from the file.

    A mapped structure is searched from the page cache (shared between processes
    serving the same index) and cannot grow: the index reads it again into
    memory before adding vectors.

    Returns
    -------
    (faiss.Index, bool)
        The structure, and whether it is mapped from the file.
    """
    import faiss

    if mmap and kind in IVF_KINDS:  # faiss maps inverted lists; other structures are read
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY), True
    return faiss.read_index(str(path)), False
