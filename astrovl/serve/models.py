"""The vision-language models of ``astrovl serve``: the assistant and the re-ranker, one model when both are."""

from __future__ import annotations

import os
import threading

__all__ = ["TakingTurns", "vision_language_models"]


class TakingTurns:
    """One :class:`~astrovl.AstroLLaVA` serving both the assistant and re-ranking.

    The assistant generates in its batching thread and re-ranking scores in the
    search threads; with one model their calls take turns (one lock), so the
    model is loaded once and never runs two passes at once.

    Parameters
    ----------
    model : AstroLLaVA
    """

    def __init__(self, model):
        self.model = model
        self.source = model.source
        self._lock = threading.Lock()

    def generate_chats(self, *args, **kwargs):
        """:meth:`AstroLLaVA.generate_chats <astrovl.AstroLLaVA.generate_chats>`, in turn."""
        with self._lock:
            return self.model.generate_chats(*args, **kwargs)

    def rerank_scores(self, *args, **kwargs):
        """:meth:`AstroLLaVA.rerank_scores <astrovl.AstroLLaVA.rerank_scores>`, in turn."""
        with self._lock:
            return self.model.rerank_scores(*args, **kwargs)


def _is_name(model) -> bool:
    return isinstance(model, (str, os.PathLike))


def vision_language_models(llava, rerank, device=None) -> tuple:
    """The assistant's model, the name it was given, and the re-ranking model.

    ``llava`` and ``rerank`` are models or names ``AstroLLaVA.from_pretrained``
    takes (loaded here on ``device``), or None. The same model given twice (one
    object, or one name) is loaded once and shared through :class:`TakingTurns`.

    Returns
    -------
    (model or None, str or None, model or None)
    """
    name = str(llava) if _is_name(llava) else None
    same = llava is not None and (llava is rerank or (name is not None and _is_name(rerank)
                                                      and str(rerank) == name))
    loaded = _load(llava, device)
    if same:
        shared = TakingTurns(loaded)
        return shared, name, shared
    return loaded, name, _load(rerank, device)


def _load(model, device):
    if not _is_name(model):
        return model
    from ..llava import AstroLLaVA

    return AstroLLaVA.from_pretrained(model, device=device)
