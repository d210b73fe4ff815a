"""Strict parsing of what web clients send: item ids, numbers and JSON bodies, with bounds.

Every function here answers malformed or oversized input with a
:class:`~astrovl.exceptions.QueryError` (a 4xx answer), never with an
exception that would become a 500: ids are ASCII digits only (``str.isdigit``
accepts ``²`` and ``①``, which ``int`` refuses), and a JSON body is measured
and its nesting counted before :func:`json.loads` sees it (a deeply nested
body would otherwise raise ``RecursionError``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from ..exceptions import QueryError

__all__ = ["parse_id", "parse_count", "parse_flag", "check_json_depth", "parse_json", "read_json",
           "is_sky_position", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_ID_DIGITS"]

#: largest JSON request body (bytes) of the search API
MAX_JSON_BYTES = 64 * 1024
#: deepest nesting of arrays and objects accepted in a JSON body
MAX_JSON_DEPTH = 32
#: longest id accepted (longer ones cannot name a row, and ``int`` refuses > 4300 digits)
MAX_ID_DIGITS = 18

_ASCII_INT = re.compile(rf"[+-]?[0-9]{{1,{MAX_ID_DIGITS}}}")
# a JSON string (escapes included) or one bracket; everything else is skipped
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


def parse_id(value: Any, what: str = "item id", status: int = 404) -> int:
    """``value`` as an int when it is an int or a string of ASCII digits.

    Parameters
    ----------
    value : int or str
        From a URL path, a form field or a JSON body.
    what : str
        What the value is, for the message.
    status : int
        Status of the error for anything else (404 for ids in paths).

    Raises
    ------
    QueryError
        Booleans, floats, other types, non-ASCII digits (``²``, ``①``, ``٣``),
        more than :data:`MAX_ID_DIGITS` digits.
    """
    if isinstance(value, bool):
        raise QueryError(f"{what} {value!r} is not a whole number", status=status)
    if isinstance(value, (int, np.integer)):
        return int(value)
    text = value.strip() if isinstance(value, str) else None
    if text is None or not _ASCII_INT.fullmatch(text):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise QueryError(f"{what} {shown} is not a whole number written with the digits 0-9",
                         status=status)
    return int(text)


def parse_count(value: Any, name: str, low: int, high: int) -> int:
    """A whole number ``low <= n <= high`` from a query parameter, form field or JSON value.

    Raises
    ------
    QueryError
        400 for anything that is not such a number (see :func:`parse_id`).
    """
    n = parse_id(value, what=name, status=400)
    if not low <= n <= high:
        raise QueryError(f"{name}={n} is out of range; use {low} to {high}")
    return n


_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_flag(value: Any, name: str) -> bool | None:
    """A yes/no switch from a query parameter, form field or JSON value; None when not given.

    JSON ``true``/``false`` and the texts ``1``/``0``, ``true``/``false``,
    ``yes``/``no``, ``on``/``off`` (any case) are accepted.

    Raises
    ------
    QueryError
        400 for anything else.
    """
    if value is None or isinstance(value, bool):
        return value
    flag = _FLAGS.get(value.strip().lower()) if isinstance(value, str) else None
    if flag is None:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise QueryError(f"{name}={shown} is not a yes/no switch; use {name}=1 or {name}=0")
    return flag


def check_json_depth(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse a JSON text nested deeper than ``max_depth`` arrays and objects (400).

    Brackets inside strings are skipped; the text is otherwise not validated
    (:func:`json.loads` does that afterwards).
    """
    depth = 0
    for match in _JSON_TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise QueryError(f"the JSON body is nested more than {max_depth} levels deep; "
                                 "send a flat object")
        elif token in (b"]", b"}"):
            depth -= 1


def parse_json(raw: bytes, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a JSON request body after checking its size (413) and nesting (400).

    Raises
    ------
    QueryError
        413 above ``max_bytes``; 400 for deep nesting, invalid JSON or UTF-8,
        NaN/Infinity and integers of more than 4300 digits.
    """
    if len(raw) > max_bytes:
        raise QueryError(f"the JSON body ({len(raw):,} bytes) is larger than the limit of "
                         f"{max_bytes:,} bytes", status=413)
    check_json_depth(raw, max_depth)
    try:
        return json.loads(raw or b"null", parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise QueryError(f"the request body is not valid JSON ({str(exc)[:200]})") from None


async def read_json(request, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read and parse the JSON body of a Starlette request, never holding more than ``max_bytes``.

    Raises
    ------
    QueryError
        See :func:`parse_json`.
    """
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > max_bytes:
        raise QueryError(f"the JSON body ({int(length):,} bytes) is larger than the limit of "
                         f"{max_bytes:,} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise QueryError(f"the JSON body is larger than the limit of {max_bytes:,} bytes", status=413)
        chunks.append(chunk)
    return parse_json(b"".join(chunks), max_bytes=max_bytes, max_depth=max_depth)


def is_sky_position(ra: Any, dec: Any) -> bool:
    """True when ``(ra, dec)`` are finite degrees with ``|dec| <= 90`` (a position astropy accepts)."""
    if isinstance(ra, bool) or isinstance(dec, bool):
        return False
    if not isinstance(ra, (int, float)) or not isinstance(dec, (int, float)):
        return False
    return math.isfinite(ra) and math.isfinite(dec) and abs(dec) <= 90 and abs(ra) < 1e9


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")
