"""Caption generation speed: ``AstroLLaVA.caption`` against plain transformers ``generate``.

Methods measured side by side on the same images, model and prompt:

``hf-1``            plain ``processor(...)`` + ``model.generate`` + ``batch_decode``, one image
                    at a time (images already converted to padded PIL images, untimed)
``hf-batched``      the same with ``--batch-size`` images per call (left padding)
``caption-1``       ``AstroLLaVA.caption(..., batch_size=1)``
``caption``         ``AstroLLaVA.caption(..., batch_size=B)``
``caption-static``  ``AstroLLaVA.caption(..., batch_size=B, cache_implementation="static")``

``caption`` starts from the astronomical inputs (the M13 FITS file of astropy's
test data and cut-outs of it, or random arrays without it), so its time includes
``load_image`` and the display scaling. Every caption is forced to exactly
``--new-tokens`` tokens (``min_new_tokens`` equal to ``max_new_tokens``, greedy
decoding), and the generated tokens are counted from the output of
``model.generate``, so tokens/s compares the same work. Each method runs one
untimed warm-up batch first (kernels, allocator, static cache, compilation).

Models (``--shape``):

``tiny`` (default)  ``astrovl.testing.llava.make_tiny_llava``: the real architecture at toy
                    sizes; it measures the code path, not a real model's speed
``7b``              LLaVA-1.5-7B shapes with random weights, built on the GPU in bfloat16
                    (CUDA only; see ``_llava_shapes.py``)

``--model DIR`` measures a local transformers LLaVA checkpoint instead.

Usage::

    python benchmarks/bench_llava_generate.py --quick
    python benchmarks/bench_llava_generate.py --device cuda --shape 7b --batch-size 16 \\
        --new-tokens 64
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _common import (
    MemoryMeter,
    base_parser,
    environment,
    finish,
    print_environment,
    print_table,
    resolve_bench_device,
    str_list,
    synchronize,
)
from _llava_shapes import SHAPES, build_llava

METHODS = ("hf-1", "hf-batched", "caption-1", "caption", "caption-static")


def sample_images(n: int, seed: int = 0) -> tuple[list, str]:
    """``n`` image inputs: cuts of the M13 test image, or random arrays without astropy's data."""
    import astropy
    from astropy.io import fits

    path = Path(astropy.__file__).parent.joinpath(
        "io", "fits", "hdu", "compressed", "tests", "data", "m13.fits"
    )
    rng = np.random.default_rng(seed)
    if not path.is_file():
        return [
            rng.gamma(2.0, 50.0, (128, 128)).astype(np.float32) for _ in range(n)
        ], "random arrays"
    data = fits.getdata(path).astype(np.float32)
    images: list = [path]
    while len(images) < n:
        y, x = rng.integers(0, data.shape[0] - 200, 2)
        images.append(data[y : y + 200, x : x + 200].copy())
    return images[:n], f"M13 FITS and {n - 1} cut-outs"


class TokenCounter:
    """Wrap ``model.generate`` to count the tokens it generates (one shape read per call)."""

    def __init__(self, model):
        self.model = model
        self.original = model.generate
        self.tokens = 0
        model.generate = self

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += int(out.shape[0]) * (int(out.shape[1]) - int(ids.shape[1]))
        return out

    def restore(self) -> None:
        self.model.generate = self.original


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="tiny",
        help="'tiny' (any device) or '7b' (LLaVA-1.5-7B shapes, random bf16 weights, CUDA only)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a local transformers LLaVA directory instead of --shape",
    )
    parser.add_argument(
        "--methods",
        type=str_list,
        default=None,
        help=f"any of {', '.join(METHODS)} (default: all; without caption-1 for --shape 7b)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batched call (default 8; 16 for --shape 7b)",
    )
    parser.add_argument(
        "--n-images",
        type=int,
        default=None,
        help="images captioned per run (default 16; 8 with --quick)",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="tokens generated per caption (default 64; 32 with --quick)",
    )
    parser.add_argument(
        "--dtype", default=None, help="model dtype (default bfloat16 on CUDA, float32 on CPU)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per method, median reported (default 3; 1 for --shape 7b)",
    )
    args = parser.parse_args(argv)
    big = args.shape == "7b" and args.model is None
    batch = args.batch_size or (16 if big else 8)
    n_images = args.n_images or (8 if args.quick else 16)
    new_tokens = args.new_tokens or (32 if args.quick else 64)
    repeats = args.repeats or (1 if big else 3)
    methods = args.methods or [m for m in METHODS if not (big and m == "caption-1")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; use {', '.join(METHODS)}")
    if args.model is not None and args.shape != "tiny":
        parser.error("give either --model or --shape 7b, not both")

    import torch
    from transformers.utils import logging as hf_logging

    from astrovl import AstroLLaVA

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = resolve_bench_device(args.device, args.threads)
    if big and device.type != "cuda":
        parser.error(
            f"--shape 7b needs --device cuda (a 7B model in bf16 is about 14 GB); the device "
            f"here is {device}. Use the default --shape tiny on a CPU"
        )
    dtype = getattr(torch, args.dtype) if args.dtype else None
    env = environment(device)
    print_environment(env)
    images, what = sample_images(n_images)
    rows = []
    with tempfile.TemporaryDirectory(prefix="astrovl-bench-") as tmp:
        t0 = time.perf_counter()
        if args.model is None:
            llava, label = build_llava(args.shape, device, tmp, dtype=dtype)
        else:
            llava = AstroLLaVA.from_pretrained(args.model, device=device, dtype=dtype)
            label = str(args.model)
        synchronize(device)
        build_s = time.perf_counter() - t0
        model, processor = llava.model, llava.processor
        tok = processor.tokenizer
        n_params = sum(p.numel() for p in model.parameters())
        prompt = llava._prompt([llava._user("Describe this astronomical image in detail.")])
        pils = [llava._pil(x) for x in images]  # the plain runs start from ready PIL images
        t0 = time.perf_counter()
        pils = [llava._pil(x) for x in images]  # again, timed without first-call costs
        prepare_s = time.perf_counter() - t0
        n_prompt = int(
            processor(images=pils[:1], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        )
        print(
            f"model: {label}, {n_params / 1e6:,.1f} M parameters, dtype {model.dtype}, "
            f"built in {build_s:.1f} s; {n_images} images ({what}); prompt {n_prompt} tokens "
            f"(image tokens included), {new_tokens} new tokens per image"
        )
        gen_kwargs = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )

        def hf_generate(chunk: list) -> list[str]:
            inputs = processor(
                images=chunk, text=[prompt] * len(chunk), padding=True, return_tensors="pt"
            ).to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                out = model.generate(**inputs, **gen_kwargs)
            return tok.batch_decode(
                out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )

        def run(method: str, items: list, pil_items: list) -> list[str]:
            if method.startswith("hf-"):
                bs = 1 if method == "hf-1" else batch
                out: list[str] = []
                for s in range(0, len(pil_items), bs):
                    out.extend(hf_generate(pil_items[s : s + bs]))
                return out
            extra = {"cache_implementation": "static"} if method == "caption-static" else {}
            return llava.caption(
                items,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                batch_size=1 if method == "caption-1" else batch,
                progress=False,
                **extra,
            )

        counter = TokenCounter(model)
        try:
            for method in methods:
                bs = 1 if method in ("hf-1", "caption-1") else batch
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # generation-config chatter from transformers
                    run(method, images[:bs], pils[:bs])  # warm-up
                    meter = MemoryMeter(device)
                    times, tokens = [], []
                    with meter.measure():
                        for _ in range(repeats):
                            counter.tokens = 0
                            synchronize(device)
                            t0 = time.perf_counter()
                            captions = run(method, images, pils)
                            synchronize(device)
                            times.append(time.perf_counter() - t0)
                            tokens.append(counter.tokens)
                seconds = float(np.median(times))
                rows.append(
                    {
                        "method": method,
                        "batch": bs,
                        "images": n_images,
                        "new_tokens": int(np.median(tokens)),
                        "seconds": seconds,
                        "images_s": n_images / seconds,
                        "tokens_s": float(np.median(tokens)) / seconds,
                        "peak_mib": meter.peak_mib,
                        "memory": meter.kind,
                        "mean_chars": float(np.mean([len(c) for c in captions])),
                    }
                )
                print(f"  done: {method}", flush=True)
        finally:
            counter.restore()
    print_table(f"LLaVA caption generation on {device} ({label})", rows)
    notes = []
    by = {r["method"]: r for r in rows}
    for ref in ("hf-1", "hf-batched"):
        if ref not in by:
            continue
        for r in rows:
            if r["method"] != ref and not (ref == "hf-batched" and r["batch"] == 1):
                notes.append(
                    f"{r['method']} / {ref}: {r['tokens_s'] / by[ref]['tokens_s']:.2f}x tokens/s"
                )
    notes.append(
        f"turning the {n_images} inputs into padded PIL images (load_image, display scaling, "
        f"padding; part of caption's time, not of hf's) took {prepare_s:.3f} s"
    )
    notes.append(
        "new_tokens counts the tokens model.generate returned beyond the prompt, for all "
        f"images (expected {n_images} x {new_tokens} = {n_images * new_tokens})"
    )
    if device.type != "cuda":
        notes.append("peak_mib on a CPU is the resident set size of the whole process")
    finish("llava_generate", args, env, {"llava_generate": rows}, notes)


if __name__ == "__main__":
    main()
