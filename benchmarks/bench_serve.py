"""Latency and a bounded load test of ``astrovl serve`` on loopback.

Builds an exact index of random unit vectors (``-n``, 100,000 by default) for a
CLIP model with random weights, starts the real ``astrovl serve`` command in a
subprocess on a free loopback port and measures, side by side in one run:

``text pass only``
    the model's text tower on one query: open_clip's ``encode_text`` over all 77
    positions, and ``CLIPEmbedder.embed_text``, which stops at the last
    end-of-text token (same embedding).
``in process``
    ``SearchService.search_text`` called directly (no HTTP): the text pass of the
    model plus the exact search, for new texts and for repeated (cached) texts.
``sequential``
    one client, one request at a time, new texts and repeated texts: the
    server-side time (``took_ms`` of each answer: embedding, search and result
    rows) and the time the client saw (HTTP on loopback included).
``load``
    ``--requests`` queries (2,000 by default) from ``--clients`` concurrent clients
    (16): a mix of new texts, repeated texts, texts with a metadata filter and
    "more like this" requests; errors, p50/p99 latency and requests/s. The run
    stops by itself after the last request or after ``--timeout`` seconds.
    New texts that reach the server together share one pass of the text tower
    (up to ``--text-batch`` texts, 32 by default); ``--text-batch 1,32`` runs the
    load test once with one text per pass and once batched, on the same index.

Models (``--model``):

``vit-b-16-text`` (default)
    the text tower of ViT-B/16 (12 layers, width 512, 77 tokens, 512-d
    embeddings) with a small vision tower: the text pass costs what it costs
    with real ViT-B/16 weights.
``tiny``
    astrovl's ``TINY_CLIP_CONFIG`` (64-d).

The exit status is 1 when any request failed.

Usage::

    python benchmarks/bench_serve.py --quick
    python benchmarks/bench_serve.py -n 100000 --requests 2000 --clients 16 --output serve.json
    python benchmarks/bench_serve.py -n 100000 --requests 2000 --clients 16 --text-batch 1,32
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import base_parser, environment, finish, int_list, print_environment, print_table

ADJECTIVES = ("bright", "faint", "red", "blue", "dusty", "compact", "extended", "barred", "edge-on",
              "interacting", "irregular", "lensed", "distant", "nearby", "young", "old", "massive",
              "diffuse", "clumpy", "smooth")
OBJECTS = ("spiral galaxy", "elliptical galaxy", "globular cluster", "open cluster", "nebula",
           "supernova remnant", "galaxy cluster", "quasar", "star forming region", "planetary nebula",
           "dwarf galaxy", "galaxy merger", "jet", "protoplanetary disk", "dark cloud")
EXTRAS = ("with tidal tails", "in the infrared", "with a dust lane", "seen face-on", "with arcs",
          "near the galactic plane", "with bright knots", "behind foreground stars", "", "at high redshift")
INSTRUMENTS = ("ACS", "WFC3", "WFPC2", "NICMOS", "STIS")


def vit_b_16_text_config() -> dict:
    """ViT-B/16's text tower with a small vision tower (512-d embeddings)."""
    import open_clip

    cfg = open_clip.get_model_config("ViT-B-16")
    return {"model_name": "vit-b-16-text", "embed_dim": cfg["embed_dim"], "text_cfg": dict(cfg["text_cfg"]),
            "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 32, "patch_size": 8,
                           "mlp_ratio": 2.0}}


def query_texts(n: int, seed: int) -> list[str]:
    """``n`` different astronomy-like query texts."""
    combos = [" ".join(w for w in (a, o, e) if w) for a in ADJECTIVES for o in OBJECTS for e in EXTRAS]
    random.Random(seed).shuffle(combos)
    return [combos[i % len(combos)] + (f" {i // len(combos)}" if i >= len(combos) else "") for i in range(n)]


def build(directory: Path, model: str, n: int, seed: int, device: str):
    from astropy.table import Table

    from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex

    cfg = TINY_CLIP_CONFIG if model == "tiny" else vit_b_16_text_config()
    CLIPEmbedder.from_config(cfg, seed=seed).save_pretrained(directory / "model")
    embedder = CLIPEmbedder.from_pretrained(directory / "model", device=device)
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, embedder.embed_dim), dtype=np.float32)
    meta = Table({"name": [f"image {i}" for i in range(n)],
                  "instrument": [INSTRUMENTS[i % len(INSTRUMENTS)] for i in range(n)]})
    index = EmbeddingIndex(embedder.embed_dim, embedder=embedder)
    index.add(vectors, meta)
    index.save(directory / "index")
    return index, embedder


def percentiles(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": float(arr.mean())}


def in_process(index, embedder, texts: list[str], repeats: int) -> list[dict]:
    """``SearchService.search_text`` without HTTP: new texts, then the same texts again."""
    import faiss
    import torch

    from astrovl.serve import SearchService

    faiss.omp_set_num_threads(1)  # as create_app sets it
    service = SearchService(index, embedder, thumbnail_cache=tempfile.mkdtemp())
    rows = []
    passes = {"model.encode_text, all positions":
              lambda t: embedder.model.encode_text(embedder.tokenizer([t])),
              "embed_text (up to end-of-text)": lambda t: embedder.embed_text(t)}
    for label, run in passes.items():
        times = []
        with torch.inference_mode():
            for text in texts[: max(20, len(texts) // 4)]:
                t0 = time.perf_counter()
                run(text)
                times.append(1000 * (time.perf_counter() - t0))
        rows.append({"mode": "text pass only", "queries": label, "n": len(times), **percentiles(times)})
    for label, batch in (("new texts", texts), ("repeated texts", texts[:repeats])):
        times = []
        for text in batch:
            t0 = time.perf_counter()
            service.search_text(text, 24)
            times.append(1000 * (time.perf_counter() - t0))
        rows.append({"mode": "in process", "queries": label, "n": len(batch), **percentiles(times)})
    return rows


async def sequential(base: str, texts: list[str], label: str) -> dict:
    import httpx

    client_ms, server_ms, errors = [], [], 0
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        for text in texts:
            t0 = time.perf_counter()
            r = await client.get("/api/search", params={"q": text, "k": 24})
            client_ms.append(1000 * (time.perf_counter() - t0))
            if r.status_code == 200:
                server_ms.append(r.json()["took_ms"])
            else:
                errors += 1
    server = percentiles(server_ms) if server_ms else {}
    return {"mode": "sequential", "queries": label, "n": len(texts), "errors": errors,
            "server_p50_ms": server.get("p50_ms"), "server_p99_ms": server.get("p99_ms"),
            **percentiles(client_ms)}


def load_plan(n_requests: int, texts: list[str], n_rows: int, seed: int) -> list[tuple[str, dict]]:
    """The mixed requests of the load test: 40 % new texts, 30 % repeated, 20 % filtered, 10 % like."""
    rng = random.Random(seed)
    new = iter(texts)
    popular = texts[-50:]
    plan = []
    for _ in range(n_requests):
        u = rng.random()
        if u < 0.4:
            plan.append(("GET", {"q": next(new), "k": 24}))
        elif u < 0.7:
            plan.append(("GET", {"q": rng.choice(popular), "k": 24}))
        elif u < 0.9:
            plan.append(("GET", {"q": rng.choice(popular), "k": 24,
                                 "filter": f"instrument:{rng.choice(INSTRUMENTS)}"}))
        else:
            plan.append(("POST", {"id": rng.randrange(n_rows), "k": 24}))
    return plan


async def load(base: str, plan: list[tuple[str, dict]], clients: int, timeout: float) -> dict:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    latencies, server_ms, errors, statuses = [], [], 0, {}

    async def worker(client):
        nonlocal errors
        while True:
            try:
                method, params = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                if method == "GET":
                    r = await client.get("/api/search", params=params)
                else:
                    r = await client.post("/api/search", params={"k": params["k"]}, json={"id": params["id"]})
                status = r.status_code
                if status == 200:
                    server_ms.append(r.json()["took_ms"])
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            latencies.append(1000 * (time.perf_counter() - t0))
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker(client)) for _ in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:  # the test is bounded: stop whatever is left
            task.cancel()
        wall = time.perf_counter() - t0
    unanswered = len(plan) - len(latencies)
    server = percentiles(server_ms) if server_ms else {}
    return {"mode": f"load, {clients} clients", "queries": "mixed", "n": len(plan),
            "errors": errors + unanswered, "server_p50_ms": server.get("p50_ms"),
            "server_p99_ms": server.get("p99_ms"), **percentiles(latencies),
            "requests_per_s": len(latencies) / wall, "statuses": statuses}


def main(argv=None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--n-vectors", type=int, default=None,
                        help="vectors in the exact index (default 100,000; 20,000 with --quick)")
    parser.add_argument("--model", choices=("vit-b-16-text", "tiny"), default="vit-b-16-text")
    parser.add_argument("--requests", type=int, default=None, help="load-test requests (default 2,000)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the load test")
    parser.add_argument("--sequential", type=int, default=None,
                        help="requests of each sequential phase (default 200; 60 with --quick)")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest load test in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-batch", type=int_list, default=[32],
                        help="--text-batch of the server (texts per pass of the text tower); several "
                        "values, e.g. 1,32, run the load test once per value")
    args = parser.parse_args(argv)
    n = args.n_vectors or (20_000 if args.quick else 100_000)
    n_requests = args.requests or (500 if args.quick else 2000)
    n_seq = args.sequential or (60 if args.quick else 200)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)
    texts = query_texts(3 * n_seq + n_requests, args.seed)
    with tempfile.TemporaryDirectory(prefix="astrovl-bench-serve-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        index, embedder = build(tmp, args.model, n, args.seed, args.device)
        print(f"exact index of {n:,} x {index.dim} vectors, model {args.model} "
              f"({sum(p.numel() for p in embedder.model.parameters()) / 1e6:.1f} M parameters), "
              f"built in {time.perf_counter() - t0:.0f} s")
        rows = in_process(index, embedder, texts[:n_seq], n_seq)
        del index, embedder
        from astrovl.testing.serve import ServerProcess

        statuses = {}
        for i, text_batch in enumerate(args.text_batch):
            server = ServerProcess([tmp / "index", "--device", args.device, "--text-batch", str(text_batch),
                                    "--thumbnail-cache", tmp / "thumbs", "--log-level", "warning"],
                                   tmp / "server.log", timeout=300)
            with server:
                base = server.url.rstrip("/")
                if i == 0:
                    rows.append(asyncio.run(sequential(base, texts[n_seq:2 * n_seq], "new texts")))
                    rows.append(asyncio.run(sequential(base, texts[n_seq:2 * n_seq], "repeated texts")))
                plan = load_plan(n_requests, texts[2 * n_seq:], n, args.seed)
                result = asyncio.run(load(base, plan, args.clients, args.timeout))
                statuses[text_batch] = result.pop("statuses")
                if len(args.text_batch) > 1:
                    result["queries"] = f"mixed, text batch {text_batch}"
                rows.append(result)
    columns = ["mode", "queries", "n", "errors", "server_p50_ms", "server_p99_ms", "p50_ms", "p99_ms",
               "mean_ms", "requests_per_s"]
    print_table(f"astrovl serve: text queries on an exact index of {n:,} vectors ({args.model})", rows,
                columns)
    print(f"load-test answers by status (per --text-batch): {statuses}")
    errors = sum(int(r.get("errors") or 0) for r in rows)
    notes = ["server_*: time inside the server (embedding, search, result rows); p50/p99/mean: as the "
             "client saw it, HTTP on loopback included; the client runs on the same machine",
             f"load mix: 40 % new texts, 30 % repeated, 20 % repeated with a filter, 10 % more-like-this; "
             f"{errors} failed requests"]
    finish("serve", args, env, {"serve": rows}, notes)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
