"""Progress bars (tqdm) that respect ``astrovl.conf.progress``."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable | None = None, *, enabled: bool | None = None, **kwargs):
    """Wrap ``iterable`` in a tqdm progress bar.

    ``enabled=None`` follows ``astrovl.conf.progress``. Extra keyword arguments
    go to :class:`tqdm.auto.tqdm` (``desc``, ``total``, ``unit``...).
    """
    from tqdm.auto import tqdm

    from ..config import conf

    if enabled is None:
        enabled = bool(conf.progress)
    return tqdm(iterable, disable=not enabled, **kwargs)
