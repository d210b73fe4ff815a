"""Images/s and texts/s of ``CLIPEmbedder``, with peak memory, per batch size and precision.

The model is built untrained with ``CLIPEmbedder.from_config`` (``ViT-B-16`` by
default, the HubbleCLIP architecture; ``--model tiny`` for
``TINY_CLIP_CONFIG``): the cost of the architecture is what is measured, and
random weights cost the same as trained ones.

Per batch size and precision the table gives

* ``pipeline_img_s``: ``embed_images`` on in-memory 512x512 float images
  (the display scaling of ``load_image``, the model's preprocessing, the image
  tower, normalisation), the path a user takes;
* ``model_img_s``: ``model.encode_image`` alone on a preprocessed batch;
* ``text_s``: ``embed_text`` on captions (tokenizer and text tower);
* ``peak_mib``: peak memory during the three measurements
  (``torch.cuda.max_memory_allocated`` on CUDA, sampled process RSS on a CPU).

On CUDA, fp32 and bf16 autocast run side by side (``--precisions``).

``--feed`` measures instead how fast ``embed_images`` turns FITS files into
embeddings against a minimal loop doing the same work in the same process
(``astropy.io.fits.getdata``, percentile limits on a sample of the pixels, an
asinh stretch, a torch resize to the model input, normalisation, the same
model calls), with the tiny model by default so that the model does not hide
the pipeline. Library and loop alternate for ``--repeats`` rounds on the same
files; the table gives the median images/s of each, their ratio, and the host
time per image of the ``preprocess="gpu"`` path, where the host only reads
the files (on CUDA that path is timed end to end too, with
``--feed-workers`` DataLoader workers).

Usage::

    python benchmarks/bench_clip_embed.py --quick
    python benchmarks/bench_clip_embed.py --device cuda --batch-sizes 1,32,128,256
    OMP_NUM_THREADS=1 python benchmarks/bench_clip_embed.py --feed --threads 1
    python benchmarks/bench_clip_embed.py --feed --device cuda --feed-workers 0,8,16
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    MemoryMeter,
    base_parser,
    environment,
    finish,
    int_list,
    print_environment,
    print_table,
    resolve_bench_device,
    str_list,
    time_call,
)

CAPTIONS = [
    "spiral galaxy; trace star formation along spiral arms",
    "globular cluster; construct a color-magnitude diagram",
    "gravitational lens arc; measure the lens mass, study magnified background galaxies",
    "emission nebula with filaments; map ionized gas structure",
    "merging galaxies; study merger-driven galaxy evolution",
    "Category: Galaxies. We propose deep imaging of nearby barred spirals to measure bar lengths.",
]


def make_embedder(model: str, device, precision: str):
    from astrovl import CLIPEmbedder
    from astrovl.clip import TINY_CLIP_CONFIG

    cfg = TINY_CLIP_CONFIG if model == "tiny" else model
    return CLIPEmbedder.from_config(cfg, device=device, precision=precision, seed=0)


def with_precision(emb, precision: str):
    """The same weights behind another inference precision (no copy of the model)."""
    from astrovl import CLIPEmbedder

    return CLIPEmbedder(
        emb.model,
        emb.tokenizer,
        emb.preprocess,
        model_name=emb.model_name,
        model_cfg=emb.model_cfg,
        preprocess_cfg=emb.preprocess_cfg,
        device=emb.device,
        precision=precision,
        model_id=emb.model_id,
    )


def autocast_for(device, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def int_list_or_zero(text: str) -> list[int]:
    """Parse ``"0,2,8"`` (non-negative integers) for argparse ``type=``."""
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers") from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give integers >= 0, e.g. 0,2,8")
    return values


def write_fits_files(directory: Path, n: int, size: int) -> list[str]:
    """``n`` float32 ``size x size`` FITS images: a sky with noise, stars and a galaxy."""
    from astropy.io import fits

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    paths = []
    for i in range(n):
        sky = rng.gamma(4.0, 25.0, (size, size)).astype(np.float32)
        x0, y0, r = rng.uniform(0.3 * size, 0.7 * size, 2).tolist() + [rng.uniform(5, 30)]
        sky += np.float32(rng.uniform(200, 2000)) * np.exp(
            -((xx - x0) ** 2 + (yy - y0) ** 2) / np.float32(2 * r * r))
        stars = rng.integers(0, size, (40, 2))
        sky[stars[:, 0], stars[:, 1]] += rng.uniform(500, 50_000, 40).astype(np.float32)
        path = directory / f"feed_{i:05d}.fits"
        fits.PrimaryHDU(sky).writeto(path)
        paths.append(str(path))
    return paths


class MinimalLoop:
    """The plain loop ``embed_images`` is compared with: the same work, nothing more.

    Per file ``fits.getdata``; the 0.25 and 99.75 percentiles of as many evenly
    spaced pixels as the library samples (``PERCENTILE_SAMPLES``); ``(x - lo) /
    (hi - lo)`` clipped to ``[0, 1]`` and astropy's ``AsinhStretch`` in float32;
    a bicubic antialiased ``torch.nn.functional.interpolate`` to the model input;
    per batch the normalisation and the same model call and normalisation of the
    embeddings. No NaN handling, no flip, no 8-bit levels, square images only.
    """

    def __init__(self, emb, batch_size: int):
        import torch

        from astrovl.imaging import PERCENTILE_SAMPLES

        self.emb = emb
        self.batch_size = batch_size
        self.samples = PERCENTILE_SAMPLES
        self.mean = torch.tensor(emb.image_mean).view(1, 3, 1, 1).to(emb.device)
        self.std = torch.tensor(emb.image_std).view(1, 3, 1, 1).to(emb.device)
        self.positions: dict[int, np.ndarray] = {}

    def pixels(self, path: str):
        import torch
        import torch.nn.functional as F
        from astropy.io import fits
        from astropy.visualization import AsinhStretch

        data = fits.getdata(path)
        pos = self.positions.get(data.size)
        if pos is None:
            count = min(data.size, self.samples)
            pos = self.positions[data.size] = np.linspace(0, data.size - 1, count).astype(np.intp)
        lo, hi = np.percentile(np.take(data, pos), [0.25, 99.75])
        x = np.subtract(data, lo, dtype=np.float32)
        x *= np.float32(1.0 / (hi - lo))
        np.clip(x, 0.0, 1.0, out=x)
        AsinhStretch()(x, clip=False, out=x)
        size = self.emb.image_size
        return F.interpolate(torch.from_numpy(x)[None, None], size=(size, size), mode="bicubic",
                             antialias=True)[0]

    def __call__(self, paths: list[str]) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(paths), self.batch_size):
            batch = torch.stack([self.pixels(p) for p in paths[start:start + self.batch_size]])
            batch = (batch.to(self.emb.device, non_blocking=True) - self.mean) / self.std
            with torch.inference_mode(), self.emb._autocast():
                feats = self.emb.model.encode_image(batch)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)


def host_read_ms(paths: list[str], repeats: int) -> float:
    """Median host milliseconds per image of the ``preprocess="gpu"`` path (reading only)."""
    from astrovl.clip.preprocess import read_raw_pixels

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            read_raw_pixels(p)
        times.append((time.perf_counter() - t0) / len(paths))
    return 1e3 * statistics.median(times)


def feed_main(args, device) -> None:
    """The ``--feed`` run: library against the minimal loop, side by side, alternating."""
    import os

    import torch

    is_cuda = device.type == "cuda"
    n = args.feed_images or (100 if args.quick else 200)
    repeats = args.repeats or (3 if args.quick else 5)
    bs = args.feed_batch
    precision = (args.precisions or ["bf16" if is_cuda else "fp32"])[0]
    env = environment(device)
    print_environment(env)
    emb = make_embedder(args.model or "tiny", device, precision)
    print(f"model: {emb.model_name} (untrained), input {emb.image_size}px, {precision}, "
          f"batch {bs}, {n} float32 FITS files of {args.image_size}x{args.image_size}")
    workers = args.feed_workers
    if workers is None:
        workers = [0, min(8, os.cpu_count() or 1)] if is_cuda else []
    loop = MinimalLoop(emb, bs)
    with tempfile.TemporaryDirectory(prefix="astrovl-feed-") as tmp:
        paths = write_fits_files(Path(tmp), n, args.image_size)
        variants = {"embed_images": dict(preprocess="cpu", num_workers=0)}
        if is_cuda:
            variants["embed_images gpu"] = dict(preprocess="gpu", num_workers=0)
        for w in workers:
            if w:
                variants[f"embed_images cpu w{w}"] = dict(preprocess="cpu", num_workers=w)
                if is_cuda:
                    variants[f"embed_images gpu w{w}"] = dict(preprocess="gpu", num_workers=w)
        calls = {"minimal loop": lambda: loop(paths)}
        for name, kw in variants.items():
            calls[name] = lambda kw=kw: emb.embed_images(paths, batch_size=bs, progress=False, **kw)
        for fn in calls.values():  # warm-up: kernels, caches, page cache
            fn()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for r in range(repeats):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                if is_cuda:
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1}/{repeats}: " + ", ".join(
                f"{k} {n / v[-1]:.1f}" for k, v in times.items()) + " img/s", flush=True)
        read_ms = host_read_ms(paths, repeats)
    loop_rate = n / statistics.median(times["minimal loop"])
    rows = []
    for name, ts in times.items():
        ratios = [tl / t for tl, t in zip(times["minimal loop"], ts)]
        rows.append({"pipeline": name, "img_s": n / statistics.median(ts),
                     "ratio_to_loop": (n / statistics.median(ts)) / loop_rate,
                     "ratio_min": min(ratios), "ratio_max": max(ratios)})
    print_table(f"embed_images against the minimal loop ({emb.model_name}, median of {repeats} "
                "alternating rounds)", rows)
    host = [{"path": 'preprocess="gpu" host work (read only)', "ms_per_image": read_ms,
             "img_s_per_core": 1e3 / read_ms, "img_s_16_cores": 16e3 / read_ms}]
    print_table("host time per image when scaling, resizing and normalising run on the device",
                host)
    notes = [
        "ratio_to_loop = library img/s / loop img/s (medians); ratio_min/max over the rounds, "
        "each round timing every pipeline back to back on the same files",
        "img_s_16_cores = 16 x img_s_per_core: what 16 such cores could read for one GPU, an "
        "extrapolation of the one-core figure, not a measurement on 16 cores",
    ]
    finish("clip_embed_feed", args, env, {"feed": rows, "host": host}, notes)


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        help="open_clip model name (untrained, from_config) or 'tiny' "
        "(default ViT-B-16; tiny with --feed)",
    )
    parser.add_argument(
        "--feed",
        action="store_true",
        help="measure embed_images on FITS files against a minimal loop (see above)",
    )
    parser.add_argument(
        "--feed-images",
        type=int,
        default=None,
        help="FITS files in the --feed run (default 200; 100 with --quick)",
    )
    parser.add_argument(
        "--feed-batch",
        type=int,
        default=64,
        help="batch size of the --feed run",
    )
    parser.add_argument(
        "--feed-workers",
        type=int_list_or_zero,
        default=None,
        help="DataLoader worker counts the --feed run also times embed_images with "
        "(default: none on a CPU; 0 and up to 8 on CUDA)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int_list,
        default=None,
        help="default 1,8,32 (1,4 with --quick; 1,32,128,256 on CUDA)",
    )
    parser.add_argument(
        "--precisions",
        type=str_list,
        default=None,
        help="fp32, bf16, fp16 (default fp32,bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--n-images",
        type=int,
        default=None,
        help="images per timed call (default: 2 x the batch size; 1 x with --quick)",
    )
    parser.add_argument("--image-size", type=int, default=512, help="side of the input images")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="time each measurement for at least this many seconds (default 2; 0.5 with --quick)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers of embed_images (default: the library's choice, "
        "0 on CPU, up to 8 on CUDA)",
    )
    args = parser.parse_args(argv)

    import torch

    device = resolve_bench_device(args.device, args.threads)
    if args.feed:
        feed_main(args, device)
        return
    args.model = args.model or "ViT-B-16"
    is_cuda = device.type == "cuda"
    batch_sizes = args.batch_sizes or (
        [1, 4] if args.quick else [1, 32, 128, 256] if is_cuda else [1, 8, 32]
    )
    precisions = args.precisions or (["fp32", "bf16"] if is_cuda else ["fp32"])
    bad = [p for p in precisions if p not in ("fp32", "bf16", "fp16")]
    if bad:
        parser.error(f"unknown precision(s) {bad}; use fp32, bf16 or fp16")
    repeats = args.repeats or (1 if args.quick else 3)
    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 2.0)

    env = environment(device)
    print_environment(env)
    base = make_embedder(args.model, device, precisions[0])
    n_params = sum(p.numel() for p in base.model.parameters())
    print(
        f"model: {base.model_name} (untrained), {n_params / 1e6:.1f} M parameters, "
        f"input {base.image_size}px, context {base.context_length} tokens"
    )

    rng = np.random.default_rng(0)
    rows = []
    for precision in precisions:
        emb = base if precision == base.precision else with_precision(base, precision)
        for bs in batch_sizes:
            n = args.n_images or (bs if args.quick else 2 * bs)
            images = [
                rng.gamma(2.0, 50.0, (args.image_size, args.image_size)).astype(np.float32)
                for _ in range(n)
            ]
            texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(max(n, 2 * bs))]
            pixels = torch.stack([emb.image_tensor(images[i % n]) for i in range(bs)]).to(device)

            def encode(pixels=pixels, emb=emb, precision=precision):
                with torch.inference_mode(), autocast_for(device, precision):
                    emb.model.encode_image(pixels)

            meter = MemoryMeter(device)
            warm = 0 if args.quick else 1  # the model call below warms the image tower up
            with meter.measure():
                t_model = time_call(
                    encode, repeats=max(2, repeats), warmup=1, device=device, min_time=min_time
                )
                t_pipe = time_call(
                    lambda emb=emb, images=images, bs=bs: emb.embed_images(
                        images, batch_size=bs, progress=False, num_workers=args.num_workers
                    ),
                    repeats=repeats,
                    warmup=warm,
                    device=device,
                    min_time=min_time,
                )
                t_text = time_call(
                    lambda emb=emb, texts=texts, bs=bs: emb.embed_text(texts, batch_size=bs),
                    repeats=repeats,
                    warmup=1,
                    device=device,
                    min_time=min_time,
                )
            rows.append(
                {
                    "model": base.model_name,
                    "precision": precision,
                    "batch": bs,
                    "pipeline_img_s": n / t_pipe["median"],
                    "model_img_s": bs / t_model["median"],
                    "text_s": len(texts) / t_text["median"],
                    "peak_mib": meter.peak_mib,
                    "memory": meter.kind,
                }
            )
            print(f"  done: {precision} batch {bs}", flush=True)
            del pixels
            if is_cuda:
                torch.cuda.empty_cache()
    print_table(f"CLIPEmbedder throughput on {device}", rows)
    notes = []
    if len(precisions) > 1:
        ref = {r["batch"]: r for r in rows if r["precision"] == precisions[0]}
        for r in rows:
            if r["precision"] != precisions[0] and r["batch"] in ref:
                notes.append(
                    f"{r['precision']}/{precisions[0]} batch {r['batch']}: model "
                    f"{r['model_img_s'] / ref[r['batch']]['model_img_s']:.2f}x, text "
                    f"{r['text_s'] / ref[r['batch']]['text_s']:.2f}x"
                )
    workers = args.num_workers if args.num_workers is not None else ("up to 8" if is_cuda else 0)
    notes.append(
        f"pipeline_img_s includes the display scaling and preprocessing of "
        f"{args.image_size}x{args.image_size} arrays with num_workers={workers}"
    )
    finish("clip_embed", args, env, {"clip_embed": rows}, notes)


if __name__ == "__main__":
    main()
