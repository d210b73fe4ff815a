"""Images/s and texts/s of ``CLIPEmbedder``, with peak memory, per batch size and precision.

The model is built untrained with ``CLIPEmbedder.from_config`` (``ViT-B-16`` by
default, the HubbleCLIP architecture; ``--model tiny`` for
``TINY_CLIP_CONFIG``): the cost of the architecture is what is measured, and
random weights cost the same as trained ones.

Per batch size and precision the table gives

* ``pipeline_img_s``: ``embed_images`` on in-memory 512x512 float images
  (display scaling with ``load_image``, the model's preprocessing, the image
  tower, normalisation), the path a user takes;
* ``model_img_s``: ``model.encode_image`` alone on a preprocessed batch;
* ``text_s``: ``embed_text`` on captions (tokenizer and text tower);
* ``peak_mib``: peak memory during the three measurements
  (``torch.cuda.max_memory_allocated`` on CUDA, sampled process RSS on a CPU).

On CUDA, fp32 and bf16 autocast run side by side (``--precisions``).

Usage::

    python benchmarks/bench_clip_embed.py --quick
    python benchmarks/bench_clip_embed.py --device cuda --batch-sizes 1,32,128,256
"""

from __future__ import annotations

import contextlib

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


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="ViT-B-16",
        help="open_clip model name (untrained, from_config) or 'tiny'",
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
        f"pipeline_img_s includes load_image scaling and preprocessing of "
        f"{args.image_size}x{args.image_size} arrays with num_workers={workers}"
    )
    finish("clip_embed", args, env, {"clip_embed": rows}, notes)


if __name__ == "__main__":
    main()
