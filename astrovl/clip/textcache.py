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
from collections import OrderedDict

import numpy as np

__all__ = ["TextEmbeddingCache", "TEXT_CACHE"]


class TextEmbeddingCache:
    """A bounded, thread-safe LRU map ``(model key, text) -> float32 vector``.

    Parameters
    ----------
    max_entries : int
        Vectors kept (10,000 by default: 20 MB for 512-d embeddings). 0 disables it.
    """

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = int(max_entries)
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, model_key, texts: list[str]) -> list[np.ndarray | None]:
        """Cached vectors (or None) for ``texts``."""
        out = []
        with self._lock:
            for t in texts:
                v = self._data.get((model_key, t))
                if v is not None:
                    self._data.move_to_end((model_key, t))
                    self.hits += 1
                else:
                    self.misses += 1
                out.append(v)
        return out

    def put_many(self, model_key, texts: list[str], vectors: np.ndarray) -> None:
        """Store one row of ``vectors`` per text."""
        if self.max_entries <= 0:
            return
        with self._lock:
            for t, v in zip(texts, vectors):
                v = np.array(v, dtype=np.float32)
                v.flags.writeable = False
                self._data[(model_key, t)] = v
                self._data.move_to_end((model_key, t))
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0


#: the cache every CLIPEmbedder uses
TEXT_CACHE = TextEmbeddingCache()
