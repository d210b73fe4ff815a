"""The identity of a set of model weights: one digest, computed the same way everywhere.

An :class:`~astrovl.EmbeddingIndex` remembers the digest of the weights that made
its vectors, and compares it with the digest of any model that queries it. The
digest therefore has to be a function of the weights only: the same for a model
loaded by name, from a hub cache or from a saved directory, on any device and in
any storage precision of the same values.

The digest is BLAKE2b (8 bytes) over the state dict in key order: each key,
then the raw bytes of its tensor, where floating-point tensors are hashed as
float32 (so a bf16 or fp16 tensor hashes like its exact float32 widening; a
float32 tensor hashes its own bytes). Tensors are hashed one at a time, straight
from their memory when they already are contiguous float32 on the CPU, so no
copy of the whole model is ever made.
"""

from __future__ import annotations

import hashlib
import re
import threading

__all__ = ["weights_digest", "weights_stamp", "DigestCache", "digest_from_model_id", "DIGEST_HEX_CHARS"]

DIGEST_BYTES = 8
DIGEST_HEX_CHARS = 2 * DIGEST_BYTES
_MODEL_ID = re.compile(rf"@([0-9a-f]{{{DIGEST_HEX_CHARS}}})$")


def weights_digest(model) -> str:
    """Hex digest of the weights of ``model`` (a ``torch.nn.Module``), see the module notes."""
    import torch

    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach()
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.to(torch.float32)
        t = t.to("cpu").contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy() if t.dtype != torch.uint8 else t.numpy())
    return h.hexdigest()


def weights_stamp(model) -> tuple:
    """A cheap fingerprint that changes whenever a weight tensor is replaced or written in place.

    Built from each state-dict tensor's storage address and its version counter
    (which torch increments on every in-place write, such as an optimizer step or
    ``load_state_dict``); used to know when a cached digest is stale.
    """
    return tuple((name, t.data_ptr(), t._version, t.dtype, str(t.device))
                 for name, t in model.state_dict().items())


def digest_from_model_id(model_id: str | None) -> str | None:
    """The digest inside a ``"name@digest"`` model id, or None."""
    if not model_id:
        return None
    m = _MODEL_ID.search(str(model_id))
    return m.group(1) if m else None


class DigestCache:
    """The digest of one model's weights, recomputed only after the weights changed.

    Thread-safe: concurrent readers compute it once.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._digest: str | None = None

    def prime(self, model, digest: str) -> None:
        """Record a digest known to describe the current weights (e.g. read from a saved config)."""
        with self._lock:
            self._stamp, self._digest = weights_stamp(model), digest

    def get(self, model) -> str:
        """The digest of the current weights of ``model``."""
        stamp = weights_stamp(model)
        with self._lock:
            if stamp != self._stamp or self._digest is None:
                self._digest = weights_digest(model)
                self._stamp = stamp
            return self._digest
