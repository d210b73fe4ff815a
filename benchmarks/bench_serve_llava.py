"""Tokens/s of ``astrovl serve --llava``: concurrent chats in micro-batches against sequential calls.

Starts the real ``astrovl serve INDEX --llava MODEL`` command in a subprocess on
a free loopback port (a two-image index with a tiny CLIP: the search side is
not measured here) and sends OpenAI chat completions with the official
``openai`` client, each with an image (a ``data:`` URL of a FITS file) and a
question, greedy, ``--new-tokens`` tokens at most. Side by side in one run:

``in process, sequential``
    ``AstroLLaVA.ask`` called directly, one request after another (no server):
    what a script that loops over its questions gets.
``server, concurrency C``
    ``--requests`` chats from C client threads at once (``--concurrency``,
    1 and 8 by default). The server queues them and generates those that
    arrive together in one batched ``generate`` call (at most ``--batch``).

Tokens are the ``completion_tokens`` the server reports (or that ``ask``
generated); tokens/s is their sum over the wall time of the mode. Latency is
per request, as the client saw it.

Models: the tiny LLaVA of ``astrovl.testing.llava`` (default; real
architecture at toy size, so it measures the serving path, not a real model's
speed), or ``--model NAME`` (any hub id or directory
``AstroLLaVA.from_pretrained`` takes) with ``--device cuda`` for a GPU run.
``--threads`` sets the torch threads of this process and of the server.

Usage::

    python benchmarks/bench_serve_llava.py --quick
    python benchmarks/bench_serve_llava.py --requests 24 --new-tokens 32 --threads 1
    python benchmarks/bench_serve_llava.py --model llava-hf/llava-1.5-7b-hf --device cuda --requests 64
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import (
    base_parser,
    environment,
    finish,
    int_list,
    print_environment,
    print_table,
    resolve_bench_device,
)


def sample_images() -> list[Path]:
    """FITS files to ask about: M13 of astropy's test data and a cut-out of it."""
    import astropy
    from astropy.io import fits

    m13 = Path(astropy.__file__).parent / "io/fits/hdu/compressed/tests/data/m13.fits"
    tmp = Path(tempfile.mkdtemp(prefix="astrovl-bench-img-"))
    with fits.open(m13) as hdul:
        data = hdul[0].data
        fits.PrimaryHDU(data[50:250, 40:260]).writeto(tmp / "m13_cut.fits")
    return [m13, tmp / "m13_cut.fits"]


def build_index(directory: Path, images: list[Path]) -> Path:
    """A two-image index with a tiny CLIP saved next to it (the server loads it from there)."""
    from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex

    clip = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
    clip.save_pretrained(directory / "clip")
    clip = CLIPEmbedder.from_pretrained(directory / "clip")
    paths = [str(p) for p in images]
    EmbeddingIndex.build(clip, paths, metadata={"path": paths, "name": [p.name for p in images]},
                         progress=False).save(directory / "index")
    return directory / "index"


def run_load(client, model: str, messages: list, concurrency: int, new_tokens: int) -> dict:
    """Send every chat of ``messages`` from ``concurrency`` threads; tokens, wall time and latencies."""
    def one(msgs):
        t0 = time.perf_counter()
        answer = client.chat.completions.create(model=model, messages=msgs, max_tokens=new_tokens,
                                                temperature=0)
        return answer.usage.completion_tokens, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, messages))
    wall = time.perf_counter() - t0
    return summary([n for n, _ in results], [s for _, s in results], wall)


def summary(tokens: list[int], latencies: list[float], wall: float) -> dict:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"requests": len(tokens), "tokens": sum(tokens), "wall_s": wall, "tokens_per_s": sum(tokens) / wall,
            "p50_s": statistics.median(latencies), "p99_s": p99}


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="hub id or directory of a LLaVA checkpoint (default: a tiny random LLaVA)")
    parser.add_argument("--concurrency", type=int_list, default=[1, 8], help="client threads, e.g. 1,8")
    parser.add_argument("--requests", type=int, default=None, help="chats per mode (default 24; 8 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="max_tokens of each chat (default 32; 16 with --quick)")
    parser.add_argument("--batch", type=int, default=8, help="--llava-batch of the server")
    args = parser.parse_args(argv)
    n_requests = args.requests or (8 if args.quick else 24)
    new_tokens = args.new_tokens or (16 if args.quick else 32)

    import openai
    from transformers.utils import logging as hf_logging

    from astrovl import AstroLLaVA
    from astrovl.testing.serve import ServerProcess

    hf_logging.set_verbosity_error()
    device = resolve_bench_device(args.device, args.threads)
    env = environment(device)
    print_environment(env)
    images = sample_images()
    questions = [f"Question {i}: what kind of object is this, and what stands out?" for i in range(n_requests)]
    payloads = {p: "data:image/fits;base64," + base64.b64encode(p.read_bytes()).decode() for p in images}
    messages = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": payloads[images[i % 2]]}},
                                              {"type": "text", "text": q}]}] for i, q in enumerate(questions)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="astrovl-bench-serve-llava-") as tmp:
        tmp = Path(tmp)
        if args.model is None:
            from astrovl.testing.llava import make_tiny_llava

            model_name = str(make_tiny_llava(tmp / "tiny-llava"))
        else:
            model_name = args.model
        llava = AstroLLaVA.from_pretrained(model_name, device=device)
        print(f"model: {llava.source}; {n_requests} chats per mode, at most {new_tokens} new tokens each")
        llava.ask(images[0], questions[0], max_new_tokens=2)  # warm-up
        tokens, latencies = [], []
        t0 = time.perf_counter()
        for i, q in enumerate(questions):
            t1 = time.perf_counter()
            result = llava.generate_chats([_request(llava, images[i % 2], q, new_tokens)])[0]
            tokens.append(result.completion_tokens)
            latencies.append(time.perf_counter() - t1)
        rows.append({"mode": "in process, sequential", "concurrency": 1,
                     **summary(tokens, latencies, time.perf_counter() - t0)})
        del llava
        index_dir = build_index(tmp, images)
        server_args = [index_dir, "--llava", model_name, "--llava-batch", str(args.batch),
                       "--llava-max-tokens", str(new_tokens), "--log-level", "warning"]
        if args.device != "auto":
            server_args += ["--device", args.device]
        if args.threads:  # the server's torch threads too
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
        with ServerProcess(server_args, tmp / "server.log", timeout=600) as server:
            with openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0, timeout=600) as client:
                served = client.models.list().data[0].id
                run_load(client, served, messages[:2], 2, 2)  # warm-up
                for c in args.concurrency:
                    before = _batches(server.url)
                    row = {"mode": f"server, concurrency {c}", "concurrency": c,
                           **run_load(client, served, messages, c, new_tokens)}
                    after = _batches(server.url)
                    row["batches"] = after["batches"] - before["batches"]
                    row["largest_batch"] = after["largest_batch"]
                    rows.append(row)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_sequential"] = row["tokens_per_s"] / base
    columns = ["mode", "requests", "tokens", "wall_s", "tokens_per_s", "vs_sequential", "p50_s", "p99_s", "batches",
               "largest_batch"]
    print_table("chat completions (greedy)", rows, columns)
    finish("serve_llava", args, env, {"chat": rows},
           notes=["tokens/s = completion tokens of all chats of a mode / its wall time"])


def _request(llava, image, question: str, new_tokens: int):
    from astrovl.llava import ChatRequest

    return ChatRequest([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                       image=image, max_new_tokens=new_tokens)


def _batches(url: str) -> dict:
    with urllib.request.urlopen(url + "api/info", timeout=30) as r:
        return json.loads(r.read())["assistant"]


if __name__ == "__main__":
    main()
