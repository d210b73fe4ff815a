"""A bounded, thread-safe least-recently-used mapping: the package's one in-memory cache.

:class:`LRUCache` backs the text-embedding cache of the CLIP embedder
(:mod:`astrovl.clip.textcache`) and the caches of ``astrovl serve`` (resolved
image paths, FITS headers, sky positions, query vectors, filter masks).
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["LRUCache", "approximate_nbytes"]


def approximate_nbytes(obj: Any) -> int:
    """The memory ``obj`` holds, roughly: arrays by ``nbytes``, containers by their items.

    Parameters
    ----------
    obj : object
        A numpy array, string, bytes, number or a tuple, list or dict of them.

    Returns
    -------
    int
    """
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes + 112  # the array object itself
    if isinstance(obj, (tuple, list, frozenset, set)):
        return sys.getsizeof(obj) + sum(approximate_nbytes(v) for v in obj)
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(approximate_nbytes(k) + approximate_nbytes(v) for k, v in obj.items())
    return sys.getsizeof(obj)


class LRUCache:
    """A mapping of at most ``size`` entries; the least recently used goes first.

    :meth:`get` and :meth:`put` are safe to call from several threads.

    Parameters
    ----------
    size : int
        Entries kept. 0 (or less) keeps nothing: :meth:`put` does nothing.
    max_bytes : int, optional
        Also keep at most about this many bytes (keys and values as measured by
        ``sizeof``): the least recently used entries go first, and a single entry
        larger than ``max_bytes`` is not kept at all.
    sizeof : callable, optional
        ``sizeof(key, value)`` in bytes; default :func:`approximate_nbytes` of both.

    Examples
    --------
    >>> cache = LRUCache(2)
    >>> cache.put("a", 1); cache.put("b", 2)
    >>> cache.get("a")  # "a" is now the most recently used
    1
    >>> cache.put("c", 3)  # so "b" goes
    >>> cache.get("b", "gone"), len(cache)
    ('gone', 2)
    """

    def __init__(self, size: int, *, max_bytes: int | None = None,
                 sizeof: Callable[[Any, Any], int] | None = None):
        self.size = max(0, int(size))
        self.max_bytes = None if max_bytes is None else max(0, int(max_bytes))
        self._sizeof = sizeof or (lambda k, v: approximate_nbytes(k) + approximate_nbytes(v))
        self._data: OrderedDict = OrderedDict()
        self._weights: dict = {}
        self.nbytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        return default

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` under ``key``, dropping the least recently used beyond the bounds."""
        if not self.size:
            return
        weight = int(self._sizeof(key, value)) if self.max_bytes is not None else 0
        if self.max_bytes is not None and weight > self.max_bytes:
            return
        with self._lock:
            if key in self._data:
                self.nbytes -= self._weights.pop(key, 0)
            self._data[key] = value
            self._data.move_to_end(key)
            self._weights[key] = weight
            self.nbytes += weight
            while len(self._data) > self.size or (self.max_bytes is not None and self.nbytes > self.max_bytes):
                old, _ = self._data.popitem(last=False)
                self.nbytes -= self._weights.pop(old, 0)

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock:
            self._data.clear()
            self._weights.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._data)
