"""The file of an ``"ivf"`` structure (faiss ``IndexIVFFlat``), written without holding its lists.

faiss keeps the inverted lists of an ``IndexIVFFlat`` (every vector as float32,
with its row number) in memory while vectors are added to it and while it is
written: ``N * (dim * 4 + 8)`` bytes. The file faiss writes ends with those
lists as one block, cell after cell (the cell's vectors, then their row
numbers), after a header that gives each cell's size; that layout is what lets
faiss map the lists from the file (``faiss.IO_FLAG_MMAP``).

This module writes the same file with ordinary file writes, so that an
``"ivf"`` index is built and grown out of core:

* :func:`write_from_rows` places vectors, assigned to their cells beforehand
  (:func:`assign`), at their place in the block, one chunk at a time;
* :class:`GrownStructure` lets a structure mapped from its file take new
  vectors (held in memory, searched together with the mapped lists), and
  :func:`write_from_lists` writes any structure's lists, cell after cell.

Everything before the lists (the centroids and the parameters) is written by
faiss itself, from a copy of the structure without vectors; the file is then
read by faiss like one it wrote (the tests compare the bytes with faiss's own).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["assign", "write_from_rows", "write_from_lists", "GrownStructure", "empty_twin"]

#: bytes the file of an IVF structure without vectors ends with: its empty lists
#: (``"ilar"``, nlist, code size, ``"sprs"``, an empty vector of sizes)
EMPTY_LISTS_BYTES = 32


def assign(structure, block: np.ndarray) -> np.ndarray:
    """The cell of each row of ``block`` (float32, normalised), as faiss assigns it when adding."""
    return structure.quantizer.assign(np.ascontiguousarray(block, dtype=np.float32), 1)[:, 0]


def empty_twin(structure):
    """An ``IndexIVFFlat`` with the centroids and parameters of ``structure`` and no vectors."""
    import faiss

    quantizer = faiss.clone_index(structure.quantizer)
    twin = faiss.IndexIVFFlat(quantizer, int(structure.d), int(structure.nlist), int(structure.metric_type))
    twin.own_fields = True
    quantizer.this.disown()  # owned by the twin from now on
    twin.is_trained = bool(structure.is_trained)
    twin.nprobe = int(structure.nprobe)
    return twin


def _head(structure, sizes: np.ndarray) -> bytes:
    """Everything the file holds before the lists' data, for lists of ``sizes``."""
    import faiss

    twin = empty_twin(structure)
    twin.ntotal = int(sizes.sum())
    head = faiss.serialize_index(twin).tobytes()
    nlist, code_size = int(twin.nlist), int(twin.code_size)
    empty = b"ilar" + struct.pack("=QQ", nlist, code_size) + b"sprs" + struct.pack("=Q", 0)
    if head[-EMPTY_LISTS_BYTES:] != empty:
        raise RuntimeError(f"faiss {faiss.__version__} wrote an IndexIVFFlat without vectors in a layout "
                           "astrovl does not know; build this index with kind='ivfpq' or in memory")
    lists = b"ilar" + struct.pack("=QQ", nlist, code_size) + b"full" + struct.pack("=Q", nlist)
    return head[:-EMPTY_LISTS_BYTES] + lists + np.ascontiguousarray(sizes, dtype="=u8").tobytes()


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def write_from_rows(path: str | os.PathLike, structure, cells: np.ndarray, blocks: Iterable[np.ndarray]) -> None:
    """Write the file of ``structure`` holding every row, without holding them.

    Parameters
    ----------
    path : path-like
        The file to write (a new file, in a folder being written).
    structure : faiss.IndexIVFFlat
        Trained, without vectors.
    cells : numpy.ndarray
        The cell of every row (:func:`assign`), in row order.
    blocks : iterable of numpy.ndarray
        The rows (float32, normalised) in order, in blocks of any size; row ``i``
        gets the id ``i``.

    Notes
    -----
    The file is sized first, then each block's rows are sorted by cell and
    written at their cell's place, after the rows of earlier blocks: within a
    cell the rows stay in row order, as when faiss adds them. Memory: one block,
    its sorted copy and ``nlist`` counters.
    """
    nlist, code_size = int(structure.nlist), int(structure.code_size)
    cells = np.asarray(cells)
    sizes = np.bincount(cells, minlength=nlist).astype(np.int64)
    if len(sizes) != nlist:
        raise ValueError(f"cells name {len(sizes)} cells but the structure has {nlist}")
    head = _head(structure, sizes)
    ends = len(head) + np.cumsum(sizes * (code_size + 8))
    codes_at = ends - sizes * (code_size + 8)
    ids_at = codes_at + sizes * code_size
    filled = np.zeros(nlist, dtype=np.int64)
    start = 0
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(int(ends[-1]) if nlist else len(head))
        fd = fh.fileno()
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.float32)
            if block.ndim != 2 or block.shape[1] * 4 != code_size:
                raise ValueError(f"a block of shape {block.shape} does not fit a structure of dimension "
                                 f"{code_size // 4}")
            mine = cells[start:start + len(block)]
            if len(mine) != len(block):
                raise ValueError(f"more rows than the {len(cells)} cells given")
            order = np.argsort(mine, kind="stable")
            sorted_cells, codes, ids = mine[order], block[order], (order + start).astype(np.int64)
            bounds = np.flatnonzero(np.diff(sorted_cells)) + 1
            for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
                cell = int(sorted_cells[lo])
                at = int(filled[cell])
                _pwrite_all(fd, codes[lo:hi], int(codes_at[cell]) + at * code_size)
                _pwrite_all(fd, ids[lo:hi], int(ids_at[cell]) + at * 8)
                filled[cell] += hi - lo
            start += len(block)
    if start != len(cells) or not np.array_equal(filled, sizes):
        raise ValueError(f"{start} rows were given for {len(cells)} cells; give every row once")


def write_from_lists(path: str | os.PathLike, structure) -> None:
    """Write the file of an ``IndexIVFFlat`` whose lists are mapped, grown or in memory, cell after cell.

    Only one cell's vectors are held at a time (pages of a mapped file that are
    read stay in the page cache).
    """
    import faiss

    lists = structure.invlists
    nlist, code_size = int(structure.nlist), int(structure.code_size)
    sizes = np.array([lists.list_size(i) for i in range(nlist)], dtype=np.int64)
    with open(Path(path), "wb") as fh:
        fh.write(_head(structure, sizes))
        for cell in np.flatnonzero(sizes):
            cell, n = int(cell), int(sizes[cell])
            codes = lists.get_codes(cell)
            try:
                fh.write(faiss.rev_swig_ptr(codes, n * code_size))
            finally:
                lists.release_codes(cell, codes)
            ids = lists.get_ids(cell)
            try:
                fh.write(faiss.rev_swig_ptr(ids, n).astype(np.int64, copy=False))
            finally:
                lists.release_ids(cell, ids)


class GrownStructure:
    """An ``"ivf"`` structure mapped from its file, grown by vectors held in memory.

    The mapped lists are not read into memory: new vectors go into lists of the
    same cells in memory, and the structure searches both as one (faiss
    ``HStackInvertedLists``), so search parameters and row filters apply
    unchanged. :func:`write_from_lists` writes the two as one file.

    Parameters
    ----------
    structure : faiss.IndexIVFFlat
        Mapped from its file (read with ``IO_FLAG_MMAP``); changed in place.
    """

    def __init__(self, structure):
        import faiss

        self.structure = structure
        self._mapped = structure.invlists
        if structure.own_invlists:  # the mapped lists are kept alive (and freed) from here
            structure.own_invlists = False
            self._mapped.this.acquire()
        self._new = empty_twin(structure)
        parts = faiss.InvertedListsPtrVector()
        parts.push_back(self._mapped)
        parts.push_back(self._new.invlists)
        self._parts = parts
        self._stack = faiss.HStackInvertedLists(2, parts.data())
        structure.replace_invlists(self._stack, False)

    def add(self, vectors: np.ndarray) -> None:
        """Add normalised float32 ``vectors`` as the next rows."""
        first = int(self.structure.ntotal)
        ids = np.arange(first, first + len(vectors), dtype=np.int64)
        self._new.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self.structure.ntotal = first + len(vectors)
