"""Defaults of the web service (a light module: the command line reads it at start-up)."""

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_K", "MAX_K", "DEFAULT_MAX_UPLOAD_BYTES",
           "DEFAULT_MAX_IMAGE_PIXELS", "TOKEN_ENV", "LOOPBACK_HOSTS"]

#: address ``astrovl serve`` listens on by default: this machine only
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: results per query when the client does not say
DEFAULT_K = 24
#: most results a query may ask for (``max_k`` changes it)
MAX_K = 200
#: default upload limit (bytes)
DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024
#: images with more pixels than this (width x height, from their headers) are not decoded
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
#: environment variable read by ``astrovl serve`` for the token
TOKEN_ENV = "ASTROVL_SERVE_TOKEN"
#: Host header values accepted when the server listens on a loopback address
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
