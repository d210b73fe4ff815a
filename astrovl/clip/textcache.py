"""Text embeddings kept per model, so repeated queries and category lists are embedded once.

:meth:`CLIPEmbedder.embed_text <astrovl.CLIPEmbedder.embed_text>` looks every
text up in one process-wide cache before running the text tower. The key is the
model's identity (``model_id``, which contains the digest of its weights), its
inference precision and device type, and the text: two embedders holding the
same weights share entries, and a model whose weights change (a training step,
``load_state_dict``) gets a new identity, so its old entries are never used
again (they age out). The cache holds at most ``max_entries`` vectors, least
recently used first out, and is safe to use from several threads.
"""

from __future__ import annotations

import threading

import numpy as np

from ..utils.lru import LRUCache

__all__ = ["TextEmbeddingCache", "TEXT_CACHE"]


class TextEmbeddingCache:
    """A bounded, thread-safe LRU map ``(model key, text) -> float32 vector``.

    Built on :class:`~astrovl.utils.lru.LRUCache`, with counts of hits and misses.

    Parameters
    ----------
    max_entries : int
        Vectors kept (10,000 by default: 20 MB for 512-d embeddings). 0 disables it.
    """

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = int(max_entries)
        self._lru = LRUCache(self.max_entries)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._lru)

    def get_many(self, model_key, texts: list[str]) -> list[np.ndarray | None]:
        """Cached vectors (or None) for ``texts``."""
        out = [self._lru.get((model_key, t)) for t in texts]
        found = sum(v is not None for v in out)
        with self._lock:
            self.hits += found
            self.misses += len(out) - found
        return out

    def put_many(self, model_key, texts: list[str], vectors: np.ndarray) -> None:
        """Store one row of ``vectors`` per text."""
        for t, v in zip(texts, vectors):
            v = np.array(v, dtype=np.float32)
            v.flags.writeable = False
            self._lru.put((model_key, t), v)

    def clear(self) -> None:
        """Remove every vector and reset the counts."""
        self._lru.clear()
        with self._lock:
            self.hits = self.misses = 0


#: the cache every CLIPEmbedder uses
TEXT_CACHE = TextEmbeddingCache()
