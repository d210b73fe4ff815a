"""Caption generation speed of ``AstroLLaVA``: tokens/s batched against one image at a time.

Every caption is forced to exactly ``--new-tokens`` tokens (``min_new_tokens``
equal to ``max_new_tokens``, greedy decoding), so that tokens/s compares the same
amount of work for every batch size. Images are the real M13 FITS file from
astropy's test data (with in-memory copies cut from it) when it is installed, or
random arrays otherwise.

By default a tiny random LLaVA is written with ``astrovl.llava.testing.make_tiny_llava``
(the real architecture at toy sizes: the code path, not a real model's speed).
Give ``--model`` a local transformers LLaVA directory (for example a downloaded
``llava-hf/llava-1.5-7b-hf`` or a converted AstroLLaVA) to measure a real model,
normally with ``--device cuda``.

Usage::

    python benchmarks/bench_llava_generate.py --quick
    python benchmarks/bench_llava_generate.py --device cuda --model /models/llava-1.5-7b-hf \\
        --batch-sizes 1,8,16 --new-tokens 128
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
    int_list,
    print_environment,
    print_table,
    resolve_bench_device,
    synchronize,
)


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


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a local transformers LLaVA directory (default: a tiny random LLaVA)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int_list,
        default=[1, 8],
        help="AstroLLaVA.caption batch sizes; the first is the reference",
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
        help="timed runs per batch size (default 2; 1 with --quick)",
    )
    args = parser.parse_args(argv)
    n_images = args.n_images or (8 if args.quick else 16)
    new_tokens = args.new_tokens or (32 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 2)

    from transformers.utils import logging as hf_logging

    from astrovl import AstroLLaVA

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = resolve_bench_device(args.device, args.threads)
    env = environment(device)
    print_environment(env)
    images, what = sample_images(n_images)
    rows = []
    with tempfile.TemporaryDirectory(prefix="astrovl-bench-") as tmp:
        if args.model is None:
            from astrovl.llava.testing import make_tiny_llava

            model_dir = make_tiny_llava(Path(tmp) / "tiny-llava", seed=0)
            label = "tiny random LLaVA"
        else:
            model_dir, label = args.model, str(args.model)
        llava = AstroLLaVA.from_pretrained(model_dir, device=device, dtype=args.dtype)
        n_params = sum(p.numel() for p in llava.model.parameters())
        print(
            f"model: {label}, {n_params / 1e6:.1f} M parameters, dtype {llava.model.dtype}; "
            f"{n_images} images ({what}), {new_tokens} new tokens each"
        )

        def run(bs: int) -> list[str]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # generation-config chatter from transformers
                return llava.caption(
                    images,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    batch_size=bs,
                    progress=False,
                )

        run(max(args.batch_sizes))  # warm-up: kernels, allocator, tokenizer caches
        for bs in args.batch_sizes:
            meter = MemoryMeter(device)
            times = []
            with meter.measure():
                for _ in range(repeats):
                    synchronize(device)
                    t0 = time.perf_counter()
                    captions = run(bs)
                    synchronize(device)
                    times.append(time.perf_counter() - t0)
            best = float(np.median(times))
            tokens = n_images * new_tokens
            rows.append(
                {
                    "batch": bs,
                    "images": n_images,
                    "new_tokens": new_tokens,
                    "seconds": best,
                    "tokens_s": tokens / best,
                    "images_s": n_images / best,
                    "peak_mib": meter.peak_mib,
                    "memory": meter.kind,
                    "mean_chars": float(np.mean([len(c) for c in captions])),
                }
            )
            print(f"  done: batch {bs}", flush=True)
    print_table(f"AstroLLaVA.caption on {device}", rows)
    ref = rows[0]
    notes = [
        f"batch {r['batch']} / batch {ref['batch']}: "
        f"{r['tokens_s'] / ref['tokens_s']:.2f}x tokens/s"
        for r in rows[1:]
    ]
    notes.append(
        "tokens_s counts generated tokens only (every caption has exactly new_tokens tokens)"
    )
    finish("llava_generate", args, env, {"llava_generate": rows}, notes)


if __name__ == "__main__":
    main()
