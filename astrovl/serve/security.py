"""ASGI middleware that guards the service: host check, token, body limit, security headers."""

from __future__ import annotations

import hmac
import ipaddress
import json
import unicodedata
from collections.abc import Sequence
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlencode

from .defaults import LOOPBACK_HOSTS, TOKEN_ENV

__all__ = ["Guard", "is_loopback", "LOOPBACK_HOSTS", "TOKEN_COOKIE", "TOKEN_ENV", "BodyTooLarge",
           "check_token", "quote_token", "same_origin_path", "SECURITY_HEADERS", "BIDI_CONTROLS",
           "neutralise_bidi"]

#: cookie that carries the token after the page was opened with ``?token=...``
TOKEN_COOKIE = "astrovl_token"
#: paths answered for programs (JSON errors, no cookie redirect), not pages
API_PREFIXES = ("/api/", "/thumb/", "/v1/")

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data: blob:; connect-src 'self'; form-action 'self'; "
                           "base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


#: characters that reorder the text around them (bidirectional embeddings, overrides, isolates, marks)
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
#: longest token accepted
MAX_TOKEN_CHARS = 1024


def check_token(token: str) -> str:
    """``token`` when it can be sent in a header, a cookie and a URL; else a ValueError saying why.

    Any printable characters work (spaces inside, ``+``, ``&``, non-ASCII
    letters): they are percent-encoded in addresses and cookies. Refused:
    the empty token, leading or trailing white space (clients strip it), control
    characters (not allowed in HTTP headers) and more than 1024 characters.
    """
    if not isinstance(token, str) or not token:
        raise ValueError("the token is empty; choose one, e.g. $(openssl rand -hex 16)")
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"the token has {len(token)} characters; use at most {MAX_TOKEN_CHARS}")
    if token != token.strip():
        raise ValueError("the token starts or ends with white space, which clients strip; remove it")
    bad = sorted({f"U+{ord(c):04X}" for c in token
                  if unicodedata.category(c) in ("Cc", "Cs") or c in BIDI_CONTROLS})
    if bad:
        raise ValueError(f"the token holds control characters ({', '.join(bad)}), which HTTP headers "
                         "cannot carry; use printable characters, e.g. $(openssl rand -hex 16)")
    return token


def quote_token(token: str) -> str:
    """``token`` percent-encoded for a URL query or a cookie value (every reserved character encoded)."""
    return quote(token, safe="")


def same_origin_path(path: str) -> str:
    """``path`` as a relative reference that can only name a page of this server.

    Leading slashes and backslashes collapse to one ``/`` (``//evil.example/``
    and ``/\\evil.example/`` would name another host), and every character
    that is not plain in a path is percent-encoded.
    """
    rest = path.lstrip("/\\")
    return "/" + quote(rest, safe="/:@!$'()*+,;=-._~")


def neutralise_bidi(text: str) -> str:
    """``text`` with each bidirectional control character shown as ``<U+202E>`` instead of applied."""
    if not any(c in BIDI_CONTROLS for c in text):
        return text
    return "".join(f"<U+{ord(c):04X}>" if c in BIDI_CONTROLS else c for c in text)


def is_loopback(host: str) -> bool:
    """True when ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    host = (host or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a request body passes the limit."""


def _host_of(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


async def _send_json(send, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message, "status": status}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers, *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Checks every HTTP request before the application sees it.

    * ``allowed_hosts``: the ``Host`` header must name one of them (defends a
      loopback server against DNS rebinding); None accepts any.
    * ``token``: when set, every request must carry it as ``Authorization:
      Bearer TOKEN``, the ``astrovl_token`` cookie or a ``token=`` query
      parameter, compared in constant time. Opening a page with ``?token=``
      sets the cookie and redirects to the address without it.
    * ``max_body``: request bodies larger than this are refused with 413.
    * security headers (content security policy, no sniffing, no framing) are
      added to every response.
    """

    def __init__(self, app, *, token: str | None = None, allowed_hosts: Sequence[str] | None = None,
                 max_body: int | None = None):
        self.app = app
        self.token = check_token(token).encode("utf-8") if token else None
        self.allowed_hosts = {h.lower().strip("[]") for h in allowed_hosts} if allowed_hosts else None
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None and _host_of(headers.get("host", "")) not in self.allowed_hosts:
            await _send_json(send, 400, "invalid Host header: this server answers only to "
                             + ", ".join(sorted(self.allowed_hosts)))
            return
        if self.token is not None:
            # latin-1 both ways: each value is the exact bytes the client sent, percent-decoded
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True,
                              encoding="latin-1")
            from_query = next((v for k, v in query if k == "token"), None)
            if not self._authorised(headers, from_query):
                await self._refuse(scope, send)
                return
            if from_query is not None and scope["method"] == "GET" and not scope["path"].startswith(
                    API_PREFIXES):
                await self._set_cookie_and_redirect(scope, send, query)
                return
        if self.max_body is not None:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await _send_json(send, 413, f"the request body ({int(length) / 2**20:.1f} MB) is larger "
                                 f"than the limit of {self.max_body / 2**20:.0f} MB")
                return
            receive = self._limited(receive)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message)
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except BodyTooLarge:
            if started:
                raise
            await _send_json(send, 413, f"the request body is larger than the limit of "
                             f"{self.max_body / 2**20:.0f} MB")

    def _limited(self, receive):
        seen = 0
        limit = self.max_body

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        return limited_receive

    def _authorised(self, headers: dict, from_query: str | None) -> bool:
        offered = []  # raw bytes: headers were decoded as latin-1, query values too
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            offered.append(auth[7:].strip().encode("latin-1"))
        if "cookie" in headers:
            cookie = SimpleCookie()
            try:
                cookie.load(headers["cookie"])
            except Exception:  # a malformed cookie header carries no token
                cookie = SimpleCookie()
            if TOKEN_COOKIE in cookie:  # the cookie holds the token percent-encoded
                offered.append(unquote_to_bytes(cookie[TOKEN_COOKIE].value))
        if from_query is not None:
            offered.append(from_query.encode("latin-1"))
        ok = False
        for value in offered:  # every offered value is compared, each in constant time
            ok |= hmac.compare_digest(value, self.token)
        return ok

    async def _refuse(self, scope, send) -> None:
        path = scope["path"]
        if path.startswith(API_PREFIXES) or scope["method"] != "GET":
            await _send_json(send, 401, "this server needs a token: send 'Authorization: Bearer TOKEN' "
                             "or open the page address printed by 'astrovl serve' (it ends in ?token=...)",
                             headers=[(b"www-authenticate", b"Bearer")])
            return
        body = (b"<!doctype html><meta charset=utf-8><title>astrovl: token needed</title>"
                b"<h1>This astrovl server needs a token</h1><p>Open the address printed by "
                b"<code>astrovl serve</code>; it ends in <code>?token=...</code>.</p>")
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"text/html; charset=utf-8"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer"), *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body})

    async def _set_cookie_and_redirect(self, scope, send, query) -> None:
        root = scope.get("root_path", "").rstrip("/")
        rest = urlencode([(k, v) for k, v in query if k != "token"], encoding="latin-1")
        path = scope["path"]
        if root and path.startswith(root):
            path = path[len(root):]
        # only ever a path of this server: never //host/ or /\\host/ (another origin)
        location = (same_origin_path(root + "/" + path.lstrip("/\\")) if root else same_origin_path(path)) \
            + (f"?{rest}" if rest else "")
        cookie = SimpleCookie()
        cookie[TOKEN_COOKIE] = quote_token(self.token.decode("utf-8"))
        cookie[TOKEN_COOKIE]["httponly"] = True
        cookie[TOKEN_COOKIE]["samesite"] = "Strict"
        cookie[TOKEN_COOKIE]["path"] = same_origin_path(root) if root else "/"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode("ascii")),
                                (b"set-cookie", cookie.output(header="").strip().encode("latin-1")),
                                (b"content-length", b"0"), *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": b""})
