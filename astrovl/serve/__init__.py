"""Share an embedding index on the web: a search page and a JSON API.

``astrovl serve INDEX_DIR`` (or :func:`create_app` inside another ASGI
application) loads an :class:`~astrovl.EmbeddingIndex` and its model once and
answers text searches, searches by an uploaded FITS file or picture, "more like
this", item details with FITS headers and sky positions, and thumbnails, with
a single web page that needs no build step and no internet access. With an
AstroLLaVA model (``--llava``) it also describes images and answers questions
about them, on the page, in a JSON API and in the OpenAI chat-completions API.
Needs the ``serve`` extra: ``pip install 'astrovl[serve]'``.
"""

from __future__ import annotations

from .._lazy import lazy_exports
from .defaults import (
    DEFAULT_HOST,
    DEFAULT_K,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_PORT,
    LOOPBACK_HOSTS,
    MAX_K,
    TOKEN_ENV,
)

_LAZY = {
    "create_app": "astrovl.serve.app",
    "run_app": "astrovl.serve.app",
    "SearchService": "astrovl.serve.service",
    "AssistantService": "astrovl.serve.assistant",
    "MicroBatcher": "astrovl.serve.batching",
    "ServiceBusy": "astrovl.serve.batching",
    "read_upload": "astrovl.serve.uploads",
    "is_loopback": "astrovl.serve.security",
}

__all__ = [*_LAZY, "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_K", "MAX_K", "DEFAULT_MAX_UPLOAD_BYTES",
           "LOOPBACK_HOSTS", "TOKEN_ENV"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
