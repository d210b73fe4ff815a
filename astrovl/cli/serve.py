"""The ``serve`` command: share an embedding index on the web (search page and JSON API)."""

from __future__ import annotations

import argparse
import math
import os
import sys

from ._common import add_command, add_model_args, add_search_settings_args, load_clip_if_named

__all__ = ["register", "serve_url"]


def register(sub) -> None:
    """Add the ``serve`` subcommand to ``sub``."""
    from ..serve.defaults import (
        DEFAULT_HOST,
        DEFAULT_MAX_IMAGE_PIXELS,
        DEFAULT_PORT,
        MAX_K,
        TOKEN_ENV,
    )

    p = add_command(sub, "serve", "serve an embedding index on the web: a search page and a JSON API",
                    f"""
                    astrovl serve my_index
                    astrovl serve my_index --port 8080 --device cuda
                    astrovl serve my_index --model ./my-clip --title "HST previews"
                    astrovl serve my_index --llava UniverseTBD/AstroLLaVA_v3 --device cuda
                    astrovl serve my_index --rerank UniverseTBD/AstroLLaVA_v3 --rerank-top 20
                    {TOKEN_ENV}=$(openssl rand -hex 16) astrovl serve my_index --host 0.0.0.0
                    """, _cmd_serve)
    p.add_argument("index", metavar="INDEX_DIR", help="directory written by 'astrovl index build'")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 "
                   "shares the index with every machine that can reach this one)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    add_model_args(p, pretrained=True)
    p.set_defaults(model=None)  # default: the model the index records
    p.add_argument("--token", default=None,
                   help=f"require this token on every request (default: the {TOKEN_ENV} environment "
                   "variable, which other users of this machine cannot read from the process list)")
    p.add_argument("--max-upload-mb", type=_positive_float, default=50.0,
                   help="largest image upload in MB (default 50)")
    p.add_argument("--max-image-mpix", type=_positive_float, default=DEFAULT_MAX_IMAGE_PIXELS / 1e6,
                   help="largest image, in millions of pixels, that is decoded (uploads and thumbnails; "
                   f"default {DEFAULT_MAX_IMAGE_PIXELS / 1e6:g}); larger ones are refused before decoding")
    p.add_argument("--max-k", type=_positive_int, default=MAX_K,
                   help=f"largest number of results per query (default {MAX_K})")
    p.add_argument("--image-root", default=None,
                   help="serve only image files under this directory (default: the root recorded "
                   "with the index, else the directory common to the files it names)")
    p.add_argument("--thumbnail-cache", default=None,
                   help="directory for cached thumbnails (default: astrovl's cache directory)")
    p.add_argument("--title", default=None,
                   help="name of the index shown on the page (default: its directory's name)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN call the API (repeatable; CORS is off by default)")
    p.add_argument("--text-batch", type=_positive_int, default=32,
                   help="most new query texts embedded together in one pass of the text tower "
                   "(default 32; 1 embeds them one at a time)")
    p.add_argument("--llava", default=None, metavar="MODEL",
                   help="also serve an AstroLLaVA assistant: 'Describe' and 'Ask' on the page, /api/caption, "
                   "/api/ask and an OpenAI-compatible /v1/chat/completions (MODEL: a hub id or directory "
                   "of a LLaVA checkpoint in any released layout, e.g. UniverseTBD/AstroLLaVA_v3)")
    p.add_argument("--llava-batch", type=_positive_int, default=8,
                   help="most assistant requests generated together in one batch (default 8)")
    p.add_argument("--llava-queue", type=_positive_int, default=32,
                   help="most assistant requests waiting; more are answered 503 (default 32)")
    p.add_argument("--llava-max-tokens", type=_positive_int, default=1024,
                   help="most new tokens one assistant request may ask for (default 1024)")
    p.add_argument("--rerank", default=None, metavar="MODEL",
                   help="re-order text searches by this AstroLLaVA model (hub id or directory, as for "
                   "'astrovl search --rerank'): CLIP's best --rerank-top images are scored again and the "
                   "results show both scores; a request turns it off with rerank=0")
    p.add_argument("--rerank-top", type=_positive_int, default=None, metavar="N",
                   help="CLIP candidates the --rerank model scores per text search (default 50; at least "
                   "the k of the request)")
    add_search_settings_args(p, "for every query of this server")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level (default info; 'warning' hides the access log)")


def _positive_float(text: str) -> float:
    """A finite number > 0 (argparse type: ``nan``, ``inf`` and negatives are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
    return value


def _positive_int(text: str) -> int:
    """A whole number >= 1 written with the digits 0-9 (argparse type)."""
    if not (text.strip().isascii() and text.strip().isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return int(text)


def _port(text: str) -> int:
    """A TCP port number 1-65535 (argparse type)."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def serve_url(host: str, port: int, token: str | None = None) -> str:
    """The address to open in a browser for a server on ``host:port`` (the token percent-encoded)."""
    from ..serve.security import quote_token

    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"?token={quote_token(token)}" if token else "")


def _cmd_serve(args):
    from ..clip import EmbeddingIndex
    from ..serve import LOOPBACK_HOSTS, TOKEN_ENV, create_app, is_loopback
    from ..serve.app import run_app  # the module's own name (a test may replace it there)
    from ..serve.security import check_token

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is not None:
        try:
            check_token(token)
        except ValueError as exc:
            raise ValueError(f"--token / {TOKEN_ENV}: {exc}") from None
    if args.rerank_top is not None and args.rerank is None:
        raise ValueError("--rerank-top goes with --rerank MODEL (the AstroLLaVA model that re-scores CLIP's "
                         "candidates)")
    loopback = is_loopback(args.host)
    if not loopback:
        print(f"astrovl serve: warning: listening on {args.host}: every machine that can reach this "
              "one can search the index and see its images and headers"
              + ("" if token else f"; set a token with {TOKEN_ENV} or --token"), file=sys.stderr)
    embedder = load_clip_if_named(args)
    index = EmbeddingIndex.load(args.index, embedder=embedder, device=args.device)
    try:
        index.set_search_defaults(nprobe=args.nprobe, ef_search=args.ef_search, rerank_depth=args.rerank_depth)
    except ValueError as exc:
        raise ValueError(f"{args.index}: {exc}") from None
    app = create_app(index, embedder, index_dir=args.index, token=token, device=args.device,
                     max_upload_bytes=int(args.max_upload_mb * 2**20), max_k=args.max_k,
                     max_image_pixels=int(args.max_image_mpix * 1e6),
                     image_root=args.image_root, thumbnail_cache=args.thumbnail_cache,
                     # the address it listens on is accepted too (127.0.0.2, a host name)
                     allowed_hosts=(*LOOPBACK_HOSTS, args.host) if loopback else None,
                     cors_origins=args.cors_origin,
                     # one name for both is loaded once (create_app)
                     title=args.title, llava=args.llava, llava_batch=args.llava_batch,
                     llava_queue=args.llava_queue, llava_max_tokens=args.llava_max_tokens,
                     text_batch=args.text_batch, rerank=args.rerank, rerank_top=args.rerank_top)
    print(f"astrovl serve: {len(index)} images from {args.index}; open {serve_url(args.host, args.port, token)}",
          flush=True)
    assistant, reranker = app.state.assistant, app.state.service.reranker
    if assistant is not None:
        print(f"astrovl serve: assistant {assistant.model_id}; OpenAI-compatible API at "
              f"{serve_url(args.host, args.port)}v1", flush=True)
    if reranker is not None:
        print(f"astrovl serve: text searches re-ranked by {reranker.source} (CLIP's best "
              f"{app.state.service.rerank_top} scored again)", flush=True)
    run_app(app, args.host, args.port, log_level=args.log_level)
    return 0
