"""Rows kept in a few chunks, so that appending never copies everything.

:class:`ChunkedRows` holds the vectors and the metadata of an
:class:`~astrovl.EmbeddingIndex`. An append adds a chunk; then, while the chunk
before the last is at most twice as long as the last, the two are merged. Chunk
lengths therefore at least double from the newest to the oldest, there are at
most ``log2(n)`` chunks, and each row is copied ``O(log n)`` times over any
sequence of appends (amortised), instead of once per append as with a
concatenation per call. Between appends the chunks hold exactly the rows: no
spare capacity. :meth:`compact` merges everything into one chunk when one array
is needed (saving, building an approximate structure).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["ChunkedRows"]


class ChunkedRows:
    """Row chunks (numpy arrays or astropy tables) with amortised appends.

    Parameters
    ----------
    concat : callable
        ``concat([a, b, ...])`` joins chunks (``numpy.concatenate``, ``astropy.table.vstack``).
    """

    def __init__(self, concat: Callable[[Sequence[Any]], Any]):
        self._concat = concat
        self.chunks: list[Any] = []
        self._starts = np.zeros(1, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _index(self) -> None:
        self._starts = np.concatenate([[0], np.cumsum([len(c) for c in self.chunks], dtype=np.int64)])

    def append(self, chunk) -> None:
        """Add rows; merges the newest chunks while they are of similar length."""
        if len(chunk) == 0:
            return
        self.chunks.append(chunk)
        while len(self.chunks) >= 2 and len(self.chunks[-2]) <= 2 * len(self.chunks[-1]):
            last = self.chunks.pop()
            self.chunks[-1] = self._concat([self.chunks[-1], last])
        self._index()

    def replace(self, chunk) -> None:
        """Hold ``chunk`` alone (for example a memory-mapped array or a loaded table)."""
        self.chunks = [chunk] if len(chunk) else []
        self._index()

    def compact(self):
        """All rows as one chunk (merged once, then kept), or None when empty."""
        if len(self.chunks) > 1:
            self.chunks = [self._concat(self.chunks)]
            self._index()
        return self.chunks[0] if self.chunks else None

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(chunk number, row within the chunk) of global ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self._starts, rows, side="right") - 1
        return which, rows - self._starts[which]

    def take(self, rows: Sequence[int]):
        """The given global rows, in their order, as one chunk (only the chunks involved are touched)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(self.chunks) == 1:
            return self.chunks[0][rows]
        which, local = self.locate(rows)
        parts, order = [], []
        for c in np.unique(which):
            sel = np.flatnonzero(which == c)
            parts.append(self.chunks[c][local[sel]])
            order.append(sel)
        joined = self._concat(parts) if len(parts) > 1 else parts[0]
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[np.concatenate(order)] = np.arange(len(rows))
        return joined[inverse]

    def starts(self) -> np.ndarray:
        """Global index of the first row of each chunk."""
        return self._starts[:-1]
