"""The OpenAI chat-completions schema: request checks, answers, stream chunks and errors.

``POST /v1/chat/completions`` of ``astrovl serve --llava`` takes the request
body the OpenAI API takes (and that the ``openai`` package, editors, notebooks
and agent tools send) and answers in its shapes. Nothing here knows about HTTP
frameworks: :func:`parse_chat_completion` turns a decoded JSON body into
checked values, the ``*_body`` functions build the JSON answers, and
:func:`sse` frames a stream chunk as a server-sent event.

Images come inline, as ``data:`` URLs of PNG, JPEG or FITS (``data:image/fits;base64,...``);
the server never fetches an address (``http(s)://``, ``file://``...): such
parts are refused with a 400 error.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass

__all__ = ["OpenAIError", "ParsedChat", "InlineImage", "parse_chat_completion", "parse_data_url",
           "completion_body", "chunk_body", "models_body", "usage_body", "sse", "SSE_DONE",
           "IMAGE_MEDIA_TYPES", "MAX_STOP_STRINGS"]

#: media types of ``data:`` URLs accepted as images, and the file suffix each is read as
IMAGE_MEDIA_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/fits": ".fits",
                     "application/fits": ".fits", "image/x-fits": ".fits"}
#: most stop strings per request (as the OpenAI API)
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 200
#: parameters the API accepts although they change nothing here, with the only value allowed
NEUTRAL_PARAMETERS = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False}
KNOWN_PARAMETERS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                    "stream", "stream_options", "user", *NEUTRAL_PARAMETERS}
SSE_DONE = b"data: [DONE]\n\n"


class OpenAIError(Exception):
    """An error answered in the OpenAI error shape.

    Parameters
    ----------
    message : str
    status : int
        HTTP status (400 bad request, 404 unknown model, 413 too large, 503 busy).
    type : str
        ``"invalid_request_error"``, ``"not_found_error"``, ``"server_error"``...
    param : str, optional
        The request parameter at fault.
    code : str, optional
        A short machine-readable code.
    headers : dict, optional
        Extra response headers (``Retry-After``).
    """

    def __init__(self, message: str, status: int = 400, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class InlineImage:
    """An image sent inside the request: its bytes and the file suffix it is read as."""

    data: bytes
    suffix: str

    @property
    def filename(self) -> str:
        """A name for messages and for choosing the reader (``image.png``, ``image.fits``)."""
        return f"image{self.suffix}"


@dataclass
class ParsedChat:
    """A checked chat-completions request.

    Attributes
    ----------
    messages : list of dict
        Messages as chat templates take them (``{"role", "content": [parts]}``;
        the image part is ``{"type": "image"}``).
    image : InlineImage or None
    max_tokens : int
    temperature, top_p : float
    stop : tuple of str
    stream : bool
    include_usage : bool
        ``stream_options.include_usage``: a last chunk with the token counts.
    """

    messages: list
    image: InlineImage | None
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple = ()
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise OpenAIError(f"{name}={value!r} must be a number from {low:g} to {high:g}", param=name)
    return float(value)


def _max_tokens(body: dict, default: int, cap: int) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return min(default, cap)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
        raise OpenAIError(f"{name}={value!r} must be a whole number from 1 to {cap} (this server's "
                          "limit)", param=name)
    return value


def _stop(value) -> tuple:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values) \
            or len(values) > MAX_STOP_STRINGS or any(len(v) > MAX_STOP_CHARS for v in values):
        raise OpenAIError(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings of at most "
                          f"{MAX_STOP_CHARS} characters", param="stop")
    return tuple(v for v in values if v)


def parse_data_url(url, *, max_bytes: int) -> InlineImage:
    """The image of a ``data:`` URL (base64 PNG, JPEG or FITS).

    Raises
    ------
    OpenAIError
        400 for an address the server would have to fetch (``http(s)://``,
        ``file://``...) or a malformed ``data:`` URL, 413 for an image over
        ``max_bytes``.
    """
    param = "messages.content.image_url"
    if not isinstance(url, str) or not url:
        raise OpenAIError("image_url.url must be a data: URL string", param=param)
    if not url[:5].lower() == "data:":
        scheme = url.split(":", 1)[0][:20] if ":" in url else "a relative address"
        raise OpenAIError(f"image URLs are not fetched by this server ({scheme!r} given): send the image inline "
                          "as a data: URL, e.g. data:image/png;base64,... (PNG, JPEG or FITS)", param=param,
                          code="image_url_not_allowed")
    head, sep, payload = url[5:].partition(",")
    parts = [p.strip().lower() for p in head.split(";")]
    media = parts[0] or "text/plain"
    if not sep or "base64" not in parts[1:]:
        raise OpenAIError("a data: URL image must be base64-encoded (data:image/png;base64,...)", param=param)
    if media not in IMAGE_MEDIA_TYPES:
        raise OpenAIError(f"data: URL media type {media!r} is not an accepted image type; use one of "
                          f"{sorted(IMAGE_MEDIA_TYPES)}", param=param)
    if len(payload) > 4 * (max_bytes // 3 + 2) + 4096:
        raise OpenAIError(f"the inline image is larger than the limit of {max_bytes / 2**20:.0f} MB", 413,
                          param=param)
    try:
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError("the data: URL image is not valid base64", param=param) from None
    if not data:
        raise OpenAIError("the data: URL image is empty", param=param)
    if len(data) > max_bytes:
        raise OpenAIError(f"the inline image is larger than the limit of {max_bytes / 2**20:.0f} MB", 413,
                          param=param)
    return InlineImage(data, IMAGE_MEDIA_TYPES[media])


def _content_parts(message: dict, index: int, role: str, max_image_bytes: int) -> tuple[list, list]:
    """Template parts of one message's content, and the images it holds."""
    content = message.get("content")
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return [{"type": "text", "text": content}], []
    if content is None and role == "assistant":
        return [{"type": "text", "text": ""}], []
    if not isinstance(content, list) or not content:
        raise OpenAIError(f"{where} must be a string or a non-empty list of content parts", param=where)
    parts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and role == "user":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            images.append(parse_data_url(url, max_bytes=max_image_bytes))
            parts.append({"type": "image"})
        else:
            allowed = "text and image_url" if role == "user" else "text"
            raise OpenAIError(f"{where} has a part of type {kind!r}; {role} messages take {allowed} parts",
                              param=where)
    return parts, images


def _messages(raw, max_image_bytes: int) -> tuple[list, InlineImage | None]:
    if not isinstance(raw, list) or not raw:
        raise OpenAIError("messages must be a non-empty list", param="messages")
    messages, images = [], []
    for i, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise OpenAIError(f"messages[{i}].role is {role!r}; use system, user or assistant",
                              param=f"messages[{i}].role")
        if role == "system" and i != 0:
            raise OpenAIError("a system message may only come first", param=f"messages[{i}].role")
        parts, found = _content_parts(message, i, role, max_image_bytes)
        images.extend(found)
        messages.append({"role": role, "content": parts})
    if messages[-1]["role"] != "user":
        raise OpenAIError("the last message must be a user message (the question to answer)",
                          param="messages")
    if len(images) > 1:
        raise OpenAIError(f"the messages hold {len(images)} images; this model takes one image per "
                          "conversation", param="messages")
    return messages, images[0] if images else None


def parse_chat_completion(body, *, model: str, max_tokens_cap: int, default_max_tokens: int,
                          max_image_bytes: int) -> ParsedChat:
    """Check a chat-completions request body.

    Parameters
    ----------
    body : object
        The decoded JSON body.
    model : str
        The served model's id: ``body["model"]``, when given, must name it.
    max_tokens_cap : int
        Largest ``max_tokens`` accepted.
    default_max_tokens : int
        ``max_tokens`` when the request gives none.
    max_image_bytes : int
        Largest inline image (decoded bytes).

    Returns
    -------
    ParsedChat

    Raises
    ------
    OpenAIError
        For anything the request gets wrong, naming the parameter.
    """
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object with messages")
    unknown = sorted(set(body) - KNOWN_PARAMETERS)
    if unknown:
        raise OpenAIError(f"unsupported parameter(s) {unknown}; this server takes {sorted(KNOWN_PARAMETERS)}",
                          param=unknown[0])
    for name, only in NEUTRAL_PARAMETERS.items():
        if body.get(name) not in (None, only):
            raise OpenAIError(f"{name}={body[name]!r} is not supported; leave it out or use {only!r}", param=name)
    asked = body.get("model")
    if asked is not None and asked != model:
        raise OpenAIError(f"the model {asked!r} is not served here; this server serves {model!r} "
                          "(GET /v1/models)", 404, type="not_found_error", param="model", code="model_not_found")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise OpenAIError("stream must be true or false and stream_options an object", param="stream")
    messages, image = _messages(body.get("messages"), max_image_bytes)
    return ParsedChat(messages=messages, image=image, max_tokens=_max_tokens(body, default_max_tokens, max_tokens_cap),
                      temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                      top_p=_number(body, "top_p", 1.0, 1e-6, 1.0), stop=_stop(body.get("stop")),
                      stream=stream, include_usage=bool(options.get("include_usage", False)))


def usage_body(result) -> dict:
    """The ``usage`` object of a :class:`~astrovl.llava.ChatResult`."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def completion_body(completion_id: str, created: int, model: str, result) -> dict:
    """A ``chat.completion`` object for one :class:`~astrovl.llava.ChatResult`."""
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": _finish(result.finish_reason)}],
            "usage": usage_body(result)}


def chunk_body(completion_id: str, created: int, model: str, *, delta: dict | None = None,
               finish_reason: str | None = None, usage: dict | None = None) -> dict:
    """A ``chat.completion.chunk`` object: a delta, the last chunk (``finish_reason``) or the usage chunk."""
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": []}
    if usage is not None:
        chunk["usage"] = usage
    else:
        chunk["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None,
                             "finish_reason": _finish(finish_reason) if finish_reason else None}]
    return chunk


def models_body(model: str, created: int) -> dict:
    """The ``GET /v1/models`` answer: the one served model."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "astrovl"}]}


def sse(payload) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"
