"""The web layer of the assistant: ``/api/caption``, ``/api/ask`` and the OpenAI ``/v1`` endpoints.

Thin Starlette handlers around :class:`~astrovl.serve.assistant.AssistantService`
(the queue and the model) and :mod:`~astrovl.serve.openai_api` (the OpenAI
schema). Answers stream as server-sent events when the request asks for it
(``"stream": true``): the pieces go from the generating thread to the event
loop through an :class:`asyncio.Queue`, and a client that goes away stops its
answer at the next token.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import uuid

from ..exceptions import QueryError
from .batching import ServiceBusy
from .defaults import DEFAULT_MAX_IMAGE_PIXELS
from .openai_api import (
    SSE_DONE,
    OpenAIError,
    chunk_body,
    completion_body,
    models_body,
    parse_chat_completion,
    sse,
    usage_body,
)
from .parsing import MAX_JSON_BYTES, read_json
from .uploads import read_upload

__all__ = ["assistant_routes", "DISABLED_MESSAGE"]

#: what the assistant endpoints answer (404) when the server runs without a model
DISABLED_MESSAGE = ("the assistant is not enabled on this server: start it with "
                    "'astrovl serve INDEX_DIR --llava MODEL' (a LLaVA checkpoint, e.g. UniverseTBD/AstroLLaVA_v3), "
                    "or pass llava= to astrovl.serve.create_app")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_END = object()


def assistant_routes(assistant, search, max_upload_bytes: int, image_limiter=None, *,
                     max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list:
    """The routes of the assistant for :func:`~astrovl.serve.create_app`.

    Parameters
    ----------
    assistant : AssistantService or None
        None: every route answers 404 with :data:`DISABLED_MESSAGE`.
    search : SearchService
        Gives the images of index items (``{"id": ROW}``).
    max_upload_bytes : int
        Largest uploaded or inline image.
    max_image_pixels : int
        Largest image (width x height, read from its header) decoded.
    image_limiter : anyio.CapacityLimiter, optional
        Bounds the image decodes running at once.
    """
    from starlette.routing import Route

    h = _AssistantHandlers(assistant, search, int(max_upload_bytes), image_limiter, int(max_image_pixels))
    return [Route("/v1/models", h.models, methods=["GET"]),
            Route("/v1/chat/completions", h.chat_completions, methods=["POST"]),
            Route("/api/caption", h.caption, methods=["POST"]),
            Route("/api/ask", h.ask, methods=["POST"])]


def _json(payload, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _openai_error(exc: OpenAIError):
    return _json(exc.body(), exc.status, exc.headers)


def _busy_headers(exc: ServiceBusy) -> dict:
    return {"retry-after": str(exc.retry_after)}


def _event_stream(events):
    from starlette.responses import StreamingResponse

    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


class _Bridge:
    """Pieces of one answer, from the generating thread to the event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()

    def on_text(self, piece: str) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self.cancel.set()

    async def pieces(self, future):
        """The pieces as they come, until ``future`` (the answer) is done."""
        waiting = asyncio.wrap_future(future)
        waiting.add_done_callback(lambda _: self.queue.put_nowait(_END))
        while (piece := await self.queue.get()) is not _END:
            yield piece


async def _read_json(request, max_bytes: int = MAX_JSON_BYTES):
    """The JSON body, its size and nesting bounded before parsing (:func:`~astrovl.serve.parsing.read_json`)."""
    return await read_json(request, max_bytes=max_bytes)


def _flag(value) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    raise QueryError(f"stream={value!r} must be true or false")


class _AssistantHandlers:
    def __init__(self, assistant, search, max_upload_bytes: int, image_limiter, max_image_pixels: int):
        self.assistant = assistant
        self.search = search
        self.max_upload_bytes = max_upload_bytes
        self.max_image_pixels = max_image_pixels
        # a chat may carry one image inline as a base64 data: URL (4 characters per 3 bytes)
        self.max_chat_bytes = MAX_JSON_BYTES + (max_upload_bytes * 4) // 3 + 4
        self.image_limiter = image_limiter

    async def _thread(self, func, *args, limiter=None):
        import anyio

        return await anyio.to_thread.run_sync(func, *args, limiter=limiter)

    # ------------------------------------------------------------------ OpenAI endpoints
    async def models(self, request):
        if self.assistant is None:
            return _openai_error(OpenAIError(DISABLED_MESSAGE, 404, type="not_found_error"))
        return _json(models_body(self.assistant.model_id, self.assistant.created))

    async def chat_completions(self, request):
        if self.assistant is None:
            return _openai_error(OpenAIError(DISABLED_MESSAGE, 404, type="not_found_error"))
        try:
            return await self._chat(request)
        except OpenAIError as exc:
            return _openai_error(exc)
        except ServiceBusy as exc:
            return _openai_error(OpenAIError(str(exc), 503, type="server_error", code="server_busy",
                                             headers=_busy_headers(exc)))
        except QueryError as exc:
            return _openai_error(OpenAIError(str(exc), exc.status))

    async def _chat(self, request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise OpenAIError(f"POST /v1/chat/completions takes a JSON body (Content-Type: application/json), "
                              f"not {ctype or 'a body without a content type'!r}", 415)
        a = self.assistant
        parsed = parse_chat_completion(await _read_json(request, self.max_chat_bytes), model=a.model_id, max_tokens_cap=a.max_tokens,
                                       default_max_tokens=a.default_max_tokens,
                                       max_image_bytes=self.max_upload_bytes)
        image = None
        if parsed.image is not None:
            image = await self._thread(self._read_inline, parsed.image, limiter=self.image_limiter)
        bridge = _Bridge()
        future = a.submit(a.chat_request(parsed, image, on_text=bridge.on_text if parsed.stream else None,
                                         cancel=bridge.cancel))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not parsed.stream:
            try:
                result = await asyncio.wrap_future(future)
            finally:
                bridge.cancel.set()
            return _json(completion_body(cid, created, a.model_id, result))
        return _event_stream(self._chat_events(bridge, future, cid, created, a.model_id, parsed.include_usage))

    async def _chat_events(self, bridge, future, cid, created, model, include_usage):
        try:
            yield sse(chunk_body(cid, created, model, delta={"role": "assistant", "content": ""}))
            async for piece in bridge.pieces(future):
                yield sse(chunk_body(cid, created, model, delta={"content": piece}))
            result = future.result()
            yield sse(chunk_body(cid, created, model, finish_reason=result.finish_reason))
            if include_usage:
                yield sse(chunk_body(cid, created, model, usage=usage_body(result)))
        except Exception as exc:  # the status line is sent: the error goes into the stream
            yield sse(OpenAIError(f"generation failed ({type(exc).__name__}: {exc})", 500,
                                  type="server_error").body())
        finally:
            bridge.cancel.set()
        yield SSE_DONE

    def _read_inline(self, inline):
        try:
            return read_upload(io.BytesIO(inline.data), inline.filename, max_bytes=self.max_upload_bytes,
                               max_pixels=self.max_image_pixels)
        except QueryError as exc:
            raise OpenAIError(str(exc), exc.status, param="messages.content.image_url") from exc

    # ------------------------------------------------------------------ the page's endpoints
    async def caption(self, request):
        return await self._describe(request, "prompt")

    async def ask(self, request):
        return await self._describe(request, "question")

    async def _describe(self, request, text_field: str):
        from starlette.responses import Response

        if self.assistant is None:
            raise QueryError(DISABLED_MESSAGE, status=404)
        try:
            image, item, fields = await self._describe_inputs(request, text_field)
            prompt = fields.get(text_field)
            if text_field == "question" and prompt is None:
                raise QueryError("POST /api/ask needs a question")
            bridge = _Bridge()
            stream = _flag(fields.get("stream"))
            req = self.assistant.describe_request(image, prompt, fields.get("max_tokens"),
                                                  on_text=bridge.on_text if stream else None, cancel=bridge.cancel)
            future = self.assistant.submit(req)
        except ServiceBusy as exc:
            body = json.dumps({"error": str(exc), "status": 503})
            return Response(body, status_code=503, media_type="application/json", headers=_busy_headers(exc))
        prompt_used = req.messages[0]["content"][1]["text"]
        head = {"id": item, "prompt": prompt_used, "model": self.assistant.model_id}
        if not stream:
            try:
                result = await asyncio.wrap_future(future)
            finally:
                bridge.cancel.set()
            return _json({**head, **self._result_json(result)})
        return _event_stream(self._describe_events(bridge, future, head))

    @staticmethod
    def _result_json(result) -> dict:
        return {"text": result.text, "finish_reason": result.finish_reason, "usage": usage_body(result)}

    async def _describe_events(self, bridge, future, head):
        try:
            yield sse({**head, "text": ""})
            async for piece in bridge.pieces(future):
                yield sse({"text": piece})
            yield sse({"done": True, **head, **self._result_json(future.result())})
        except Exception as exc:  # the status line is sent: the error goes into the stream
            yield sse({"error": f"generation failed ({type(exc).__name__}: {exc})", "status": 500})
        finally:
            bridge.cancel.set()

    async def _describe_inputs(self, request, text_field: str):
        """The image (an item's or an upload's), the item id and the other fields of the request."""
        allowed = {"id", text_field, "max_tokens", "stream"}
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            body = await _read_json(request)
            if not isinstance(body, dict) or set(body) - allowed or "id" not in body:
                raise QueryError(f"POST a JSON object with \"id\" (an item) and optionally "
                                 f"{sorted(allowed - {'id'})}, e.g. {{\"id\": 12, \"{text_field}\": \"...\"}}; "
                                 "to send an image, POST multipart/form-data with a 'file' field")
            row, image = await self._thread(self.search.item_image, body["id"], limiter=self.image_limiter)
            return image, row, body
        if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raise QueryError(f"{request.url.path} takes JSON ({{\"id\": N}}) or multipart/form-data (a 'file' "
                             f"field), not {ctype or 'a body without a content type'!r}", status=415)
        async with request.form(max_files=1, max_fields=10) as form:
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            unknown = set(fields) - allowed
            if unknown:
                raise QueryError(f"unknown form field(s) {sorted(unknown)}; use file or id, and "
                                 f"{sorted(allowed - {'id'})}")
            upload = form.get("file")
            if upload is not None and not isinstance(upload, str):
                image = await self._thread(self._read_upload, upload, limiter=self.image_limiter)
                return image, None, fields
        if fields.get("id") is None:
            raise QueryError("the form has neither a 'file' (an image) nor an 'id' (an item of the index)")
        row, image = await self._thread(self.search.item_image, fields["id"], limiter=self.image_limiter)
        return image, row, fields

    def _read_upload(self, upload):
        upload.file.seek(0)
        return read_upload(upload.file, upload.filename or "", max_bytes=self.max_upload_bytes,
                           max_pixels=self.max_image_pixels)
