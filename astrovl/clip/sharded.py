"""Embedding archive-scale image sets on a dask.distributed cluster."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..utils.imports import optional_import

__all__ = ["embed_on_cluster", "local_cluster"]


def local_cluster(n_workers: int, **kwargs):
    """A :class:`dask.distributed.LocalCluster` of ``n_workers`` single-threaded processes on this machine.

    Its status page listens on a free port of the loopback address (dask's
    default, port 8787 on every address, fails when two clusters run at once,
    and shows the cluster to the network). ``kwargs`` go to ``LocalCluster``.

    Examples
    --------
    >>> from distributed import Client                     # doctest: +SKIP
    >>> with local_cluster(4) as cluster, Client(cluster) as client:  # doctest: +SKIP
    ...     index = EmbeddingIndex.build(clip, paths, client=client, directory="index")
    """
    distributed = optional_import("distributed", purpose="a local dask cluster")
    options = {"threads_per_worker": 1, "processes": True, "dashboard_address": None,
               "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"}, **kwargs}
    return distributed.LocalCluster(n_workers=int(n_workers), **options)


def _embed_shard(model_dir: str, items: list, batch_size: int, device: str | None) -> np.ndarray:
    """Worker task: load the saved embedder once per process and embed one shard."""
    from .embedder import CLIPEmbedder

    cache = _embed_shard.__dict__.setdefault("_cache", {})
    key = (model_dir, device)
    if key not in cache:
        cache[key] = CLIPEmbedder.from_pretrained(model_dir, device=device)
    return cache[key].embed_images(items, batch_size=batch_size, progress=False)


def embed_on_cluster(client, embedder, items: list, *, batch_size: int = 64, shard_size: int = 1024,
                     device: str | None = None, model_dir: str | None = None) -> np.ndarray:
    """Embed ``items`` in shards on the workers of a :class:`dask.distributed.Client`.

    The embedder is written (safetensors) to ``model_dir`` (a temporary directory by
    default, which must be visible to the workers) and loaded once per worker; the
    embedder itself is left as it was (its identity and source do not change).
    Results come back in the input order.
    """
    from ..utils.progress import progress_bar

    optional_import("distributed", purpose="embedding on a dask cluster")
    owned = model_dir is None
    tmp = tempfile.TemporaryDirectory(prefix="astrovl-shard-model-") if owned else None
    model_dir = str(Path(tmp.name) / "model") if owned else model_dir
    try:
        embedder.save_pretrained(model_dir, update_source=False)
        shards = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
        futures = [client.submit(_embed_shard, model_dir, shard, batch_size, device, pure=False)
                   for shard in shards]
        parts = []
        for fut in progress_bar(futures, desc="embedding shards", unit="shard"):
            parts.append(fut.result())
        return np.concatenate(parts).astype(np.float32)
    finally:
        if tmp is not None:
            tmp.cleanup()
