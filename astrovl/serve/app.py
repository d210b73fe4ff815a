"""The web application of ``astrovl serve`` (Starlette, served by uvicorn)."""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path

from ..exceptions import QueryError
from ..utils.imports import optional_import
from .assistant_routes import assistant_routes
from .defaults import (
    DEFAULT_HOST,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_PORT,
    MAX_K,
)
from .models import vision_language_models
from .parsing import parse_flag, read_json
from .security import Guard
from .service import SearchService
from .uploads import read_upload

__all__ = ["create_app", "run_app", "STATIC_FILES"]

log = logging.getLogger(__name__)

#: the files of the web page, shipped inside the package
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
                "favicon.svg": "image/svg+xml"}
#: concurrent image decodes (uploads and thumbnails) allowed at once
IMAGE_WORKERS = 2
FORM_OVERHEAD = 64 * 1024


def create_app(index, embedder=None, *, index_dir: str | os.PathLike | None = None,
               token: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_k: int = MAX_K, image_root: str | os.PathLike | None = None,
               thumbnail_cache: str | os.PathLike | None = None, thumbnail_size: int = 256,
               allowed_hosts=None, cors_origins=None, search_threads: int | None = 1,
               device=None, title: str | None = None,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, llava=None, llava_batch: int = 8,
               llava_queue: int = 32, llava_max_tokens: int = 1024, text_batch: int = 32,
               rerank=None, rerank_top: int | None = None):
    """Build the ASGI application that serves an embedding index on the web.

    The index and its model are loaded once, here. The application answers:

    * ``GET /``: the search page (plain HTML, CSS and JavaScript from the package);
    * ``GET /api/search?q=TEXT&k=N&filter=column:value``: a text search
      (with ``rerank``: re-ordered by the model, ``rerank=0`` turns it off for one query);
    * ``POST /api/search?k=N&filter=...``: a search by an uploaded image
      (``multipart/form-data`` with a ``file`` field: FITS or a picture) or by
      an item ("more like this": a form or JSON field ``id``);
    * ``GET /api/item/{id}``: metadata, FITS headers and sky position of an item;
    * ``GET /thumb/{id}.png``: its thumbnail (astrovl's display scaling), cached on
      disk; ``?size=large`` for the larger preview of the detail view;
    * ``GET /api/health`` and ``GET /api/info`` (size, model, dimension, filters);
    * with ``llava``: ``POST /api/caption``, ``/api/ask`` and the OpenAI API under ``/v1``.

    Errors are JSON objects ``{"error": message, "status": code}`` with a 4xx
    status for every malformed request.

    Parameters
    ----------
    index : EmbeddingIndex or path
        The index, or the directory to load it from.
    embedder : CLIPEmbedder, optional
        The model for text and image queries (default: the index's own, which
        an index loaded from a directory loads from where it was recorded).
    index_dir : path, optional
        The directory ``index`` was loaded from, when ``index`` is an object:
        relative image paths and a recorded image root are resolved against it.
    token : str, optional
        When given, every request must carry it (``Authorization: Bearer``, the
        cookie set by opening ``/?token=...``, or a ``token`` query parameter).
        Any printable characters; see :func:`~astrovl.serve.security.check_token`.
    max_upload_bytes : int
        Largest accepted upload (default 50 MB).
    max_k : int
        Largest number of results per query.
    image_root : path, optional
        Serve only image files under this directory (default: the root recorded
        with the index, else the directory common to the files it names).
    thumbnail_cache : path, optional
        Directory for cached thumbnails (default: astrovl's cache directory).
    thumbnail_size : int
        Longest side of thumbnails in pixels.
    allowed_hosts : sequence of str, optional
        Accept only requests whose ``Host`` header names one of these (``astrovl
        serve`` sets the loopback names when it listens on loopback).
    cors_origins : sequence of str, optional
        Origins allowed to call the API from other web pages; CORS is off by default.
    search_threads : int, optional
        faiss threads per search (a process-wide setting). One thread per search
        with several searches at once is fastest for single queries; None keeps
        faiss's setting.
    device : str, optional
        Move the model to this torch device.
    title : str, optional
        The name of the index shown on the page (default: its directory's name).
    max_image_pixels : int
        Largest image (width x height, read from its header) decoded for an
        upload or a thumbnail; larger ones are answered 413 before decoding.
    llava : AstroLLaVA or str or path, optional
        The assistant: a model, or a name ``AstroLLaVA.from_pretrained`` takes (on ``device``);
        the same as ``rerank``: loaded once, used in turns (:class:`~astrovl.serve.models.TakingTurns`).
    llava_batch, llava_queue, llava_max_tokens, text_batch : int
        Most assistant requests per batch, and waiting (more get 503); most new tokens per
        assistant request; most new query texts per pass of the text tower.
    rerank : AstroLLaVA or str or path, optional
        Re-order text searches by this model (a model, or a name
        ``AstroLLaVA.from_pretrained`` takes, loaded here on ``device``): CLIP's best
        ``max(k, rerank_top)`` images are scored again and each result carries both
        scores (``score``, ``rerank_score``); see :class:`~astrovl.serve.SearchService`.
    rerank_top : int, optional
        CLIP candidates the ``rerank`` model scores per text search (default 50).

    Returns
    -------
    starlette.applications.Starlette
    """
    optional_import("starlette", "serve", "the web service")
    optional_import("multipart", "serve", "uploads to the web service")
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException

    from ..clip import EmbeddingIndex
    from .security import BodyTooLarge, check_token

    if token:
        check_token(token)  # now, not at the first request: a token HTTP cannot carry is refused

    if isinstance(index, (str, os.PathLike)):
        index_dir = Path(index)
        index = EmbeddingIndex.load(index_dir, embedder=embedder, device=device)
    _set_search_threads(search_threads)
    assistant, rerank = _assistant_and_reranker(llava, rerank, device, llava_batch, llava_queue, llava_max_tokens)
    service = SearchService(index, embedder, index_dir=index_dir, image_root=image_root,
                            thumbnail_cache=thumbnail_cache, thumbnail_size=thumbnail_size, max_k=max_k,
                            title=title, max_image_pixels=int(max_image_pixels), text_batch=text_batch,
                            reranker=rerank, rerank_top=rerank_top)
    if device is not None:
        service.embedder.to(device)
    handlers = _Handlers(service, int(max_upload_bytes), int(max_image_pixels))
    routes = [*_page_routes(handlers),
              *assistant_routes(assistant, service, int(max_upload_bytes), handlers.image_limiter,
                                max_image_pixels=int(max_image_pixels))]
    middleware = _middleware(token, allowed_hosts, int(max_upload_bytes) + FORM_OVERHEAD, cors_origins)
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={
        QueryError: _query_error, HTTPException: _http_error, BodyTooLarge: handlers.too_large,
        Exception: _internal_error})
    app.state.service = service
    app.state.assistant = assistant
    return app


def _assistant_and_reranker(llava, rerank, device, max_batch: int, max_queue: int, max_tokens: int) -> tuple:
    """The :class:`AssistantService` of ``llava`` (or None) and the re-ranking model (or None)."""
    llava, name, rerank = vision_language_models(llava, rerank, device)
    if llava is None:
        return None, rerank
    from .assistant import AssistantService  # the generation machinery: only when asked for

    return AssistantService(llava, model_id=name, max_batch=max_batch, max_queue=max_queue,
                            max_tokens=max_tokens), rerank


def _page_routes(handlers) -> list:
    """The routes of the search page and its API."""
    from starlette.routing import Route

    return [
        Route("/", handlers.page, methods=["GET"]),
        Route("/static/{name}", handlers.static, methods=["GET"]),
        Route("/api/health", handlers.health, methods=["GET"]),
        Route("/api/info", handlers.info, methods=["GET"]),
        Route("/api/search", handlers.search, methods=["GET", "POST"]),
        Route("/api/item/{id}", handlers.item, methods=["GET"]),
        Route("/thumb/{name}", handlers.thumbnail, methods=["GET"]),
    ]


def _set_search_threads(threads: int | None) -> None:
    if threads is not None:
        import faiss

        faiss.omp_set_num_threads(int(threads))


def _middleware(token, allowed_hosts, max_body: int, cors_origins) -> list:
    """The guard (token, Host check, body size, security headers), after CORS when enabled."""
    from starlette.middleware import Middleware

    middleware = [Middleware(Guard, token=token, allowed_hosts=allowed_hosts, max_body=max_body)]
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=list(cors_origins),
                                        allow_methods=["GET", "POST"],
                                        allow_headers=["Authorization", "Content-Type"]))
    return middleware


def run_app(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted.

    Parameters
    ----------
    app : ASGI application
        From :func:`create_app`.
    host : str
        Address to listen on; the default listens on this machine only.
    port : int
    log_level : str
        uvicorn's log level (``"warning"`` hides the access log).
    """
    uvicorn = optional_import("uvicorn", "serve", "the web service")
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, server_header=False,
                proxy_headers=False, timeout_graceful_shutdown=5)


def _json(payload, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict | None = None):
    return _json({"error": message, "status": status}, status, headers)


async def _query_error(request, exc: QueryError):
    retry = getattr(exc, "retry_after", None)  # ServiceBusy: a queue is full
    return _error(exc.status, str(exc), headers={"retry-after": str(retry)} if retry else None)


async def _http_error(request, exc):
    messages = {404: f"nothing is served at {request.url.path}; the API is under /api/",
                405: f"{request.method} is not allowed for {request.url.path}"}
    return _error(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                  headers=getattr(exc, "headers", None))


async def _internal_error(request, exc):
    from .security import SECURITY_HEADERS

    log.exception("error while answering %s %s", request.method, request.url.path, exc_info=exc)
    # sent by Starlette's outermost middleware, past the Guard: the security headers are added here
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in SECURITY_HEADERS}
    return _error(500, f"internal error ({type(exc).__name__}); the server log has the details", headers)


class _Handlers:
    """The endpoints; blocking work runs in worker threads, never on the event loop."""

    def __init__(self, service: SearchService, max_upload_bytes: int,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        import anyio

        self.service = service
        self.max_upload_bytes = max_upload_bytes
        self.max_image_pixels = max_image_pixels
        self.image_limiter = anyio.CapacityLimiter(IMAGE_WORKERS)
        static = resources.files("astrovl.serve") / "static"
        self.files = {name: (static / name).read_bytes() for name in [*STATIC_FILES, "index.html"]}

    async def _thread(self, func, *args, limiter=None):
        import anyio

        return await anyio.to_thread.run_sync(func, *args, limiter=limiter)

    def _with_urls(self, request, answer: dict) -> dict:
        root = request.scope.get("root_path", "")
        for r in answer["results"]:
            r["thumbnail"] = f"{root}/thumb/{r['id']}.png" if r["has_image"] else None
        return answer

    async def page(self, request):
        from starlette.responses import Response

        return Response(self.files["index.html"], media_type="text/html; charset=utf-8",
                        headers={"cache-control": "no-cache"})

    async def static(self, request):
        from starlette.responses import Response

        name = request.path_params["name"]
        if name not in STATIC_FILES:
            raise QueryError(f"no static file {name!r}", status=404)
        return Response(self.files[name], media_type=STATIC_FILES[name],
                        headers={"cache-control": "no-cache"})

    async def health(self, request):
        return _json({"status": "ok", "count": len(self.service.index)})

    async def info(self, request):
        from .. import __version__

        assistant = request.app.state.assistant
        return _json({**self.service.info(), "max_upload_bytes": self.max_upload_bytes,
                      "max_image_pixels": self.max_image_pixels,
                      "assistant": assistant.info() if assistant is not None else None,
                      "astrovl_version": __version__})

    async def search(self, request):
        params = request.query_params
        unknown = sorted(set(params) - {"q", "k", "filter", "rerank", "token"})
        if unknown:
            raise QueryError(f"unknown query parameter(s) {unknown}; use q, k, filter and rerank")
        k, filters, rerank = params.get("k"), params.getlist("filter"), params.get("rerank")
        if request.method == "GET":
            if "q" not in params:
                raise QueryError("GET /api/search needs q=TEXT; to search by an image or an item, "
                                 "POST a file or an id")
            answer = await self._thread(self.service.search_text, params["q"], k, filters, rerank)
            return _json(self._with_urls(request, answer))
        return await self._search_post(request, k, filters, rerank)

    async def _search_post(self, request, k, filters, rerank):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            body = await read_json(request)  # size and nesting bounded before parsing
            if not isinstance(body, dict) or set(body) - {"id", "k", "filter", "q", "rerank"}:
                raise QueryError('POST a JSON object such as {"id": 12} (more like item 12) or '
                                 '{"q": "text"}')
            k, rerank = body.get("k", k), body.get("rerank", rerank)
            filters = list(filters) + _as_list(body.get("filter"))
            if "id" in body:
                _text_only_rerank(rerank)
                answer = await self._thread(self.service.search_like, body["id"], k, filters)
            elif "q" in body:
                answer = await self._thread(self.service.search_text, body["q"], k, filters, rerank)
            else:
                raise QueryError('the JSON body names no query: give "id" or "q"')
            return _json(self._with_urls(request, answer))
        if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raise QueryError(f"POST /api/search takes multipart/form-data (a 'file' field) or JSON "
                             f"({{\"id\": N}}), not {ctype or 'a body without a content type'!r}",
                             status=415)
        async with request.form(max_files=1, max_fields=20) as form:
            upload = form.get("file")
            k = form.get("k", k)
            _text_only_rerank(form.get("rerank", rerank))
            filters = list(filters) + [v for v in form.getlist("filter") if isinstance(v, str)]
            if upload is not None and not isinstance(upload, str):
                image = await self._thread(self._read_upload, upload, limiter=self.image_limiter)
                answer = await self._thread(self.service.search_image, image, k, filters)
            elif form.get("id") is not None:
                answer = await self._thread(self.service.search_like, form.get("id"), k, filters)
            else:
                raise QueryError("the form has neither a 'file' (an image to search with) nor an "
                                 "'id' (an item to find more like)")
        return _json(self._with_urls(request, answer))

    def _read_upload(self, upload):
        upload.file.seek(0)
        return read_upload(upload.file, upload.filename or "", max_bytes=self.max_upload_bytes,
                           max_pixels=self.max_image_pixels)

    async def too_large(self, request, exc):
        return _error(413, f"the request body is larger than the limit of "
                      f"{self.max_upload_bytes / 2**20:.0f} MB")

    async def item(self, request):
        answer = await self._thread(self.service.item, request.path_params["id"])
        root = request.scope.get("root_path", "")
        answer["thumbnail"] = f"{root}/thumb/{answer['id']}.png" if answer["has_image"] else None
        return _json(answer)

    async def thumbnail(self, request):
        from starlette.responses import Response

        name = request.path_params["name"]
        if not name.endswith(".png"):
            raise QueryError(f"thumbnails are served as /thumb/ID.png, not {name!r}", status=404)
        size = request.query_params.get("size")
        if size not in (None, "large") or set(request.query_params) - {"size", "token"}:
            raise QueryError("thumbnails take only size=large (the preview of the detail view)")
        data, etag = await self._thread(self.service.thumbnail, name[:-4], size == "large",
                                        limiter=self.image_limiter)
        headers = {"etag": f'"{etag}"', "cache-control": "private, max-age=86400"}
        if request.headers.get("if-none-match") == f'"{etag}"':
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/png", headers=headers)


def _text_only_rerank(rerank) -> None:
    """Refuse ``rerank`` on for a search by an image or an item (400): the model scores a text query."""
    if parse_flag(rerank, "rerank"):
        raise QueryError("re-ranking scores a text query against the images; searches by an image or an "
                         "item are not re-ranked (give q=TEXT, or leave rerank out)")


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise QueryError(f"filter must be a 'column:value' string or a list of them, not {repr(value)[:80]}")
