"""A bounded, thread-safe least-recently-used mapping: the package's one in-memory cache.

:class:`LRUCache` backs the text-embedding cache of the CLIP embedder
(:mod:`astrovl.clip.textcache`) and the caches of ``astrovl serve`` (resolved
image paths, FITS headers, sky positions, query vectors).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["LRUCache"]


class LRUCache:
    """A mapping of at most ``size`` entries; the least recently used goes first.

    :meth:`get` and :meth:`put` are safe to call from several threads.

    Parameters
    ----------
    size : int
        Entries kept. 0 (or less) keeps nothing: :meth:`put` does nothing.

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

    def __init__(self, size: int):
        self.size = max(0, int(size))
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        return default

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` under ``key``, dropping the least recently used beyond ``size``."""
        if not self.size:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
