"""Ranking candidate texts with ``AstroLLaVA.score``: batched against one forward pass per text.

Methods measured side by side on the same image, model, prompt and candidates:

``per-text``  ``AstroLLaVA._score_unbatched``: for every candidate, the processor runs on
              the image and the prompt with the candidate, and the whole model (vision
              tower, projector, language model over image and prompt tokens) runs once
``score``     ``AstroLLaVA.score``: the image is processed and encoded once with the
              prompt, whose keys and values are cached; the candidates then run
              ``--batch-size`` at a time through the language model only

Both start from the same input (the M13 FITS file of astropy's test data, or a random
array without it), so both times include ``load_image`` and the display scaling once
per call. The scores of both methods are compared (largest absolute difference) and
the ratio of times is printed. The candidates are the ten Galaxy10 DECaLS classes, as
in zero-shot classification with the generative model.

Models (``--shape``): ``tiny`` (default; ``make_tiny_llava``, the code path at toy sizes)
or ``7b`` (LLaVA-1.5-7B shapes with random weights, CUDA only).

Usage::

    python benchmarks/bench_llava_score.py --quick
    python benchmarks/bench_llava_score.py --device cuda --shape 7b
"""

from __future__ import annotations

import tempfile
import time
import warnings

import numpy as np
from _common import (
    base_parser,
    environment,
    finish,
    print_environment,
    print_table,
    resolve_bench_device,
    time_call,
)
from _llava_shapes import SHAPES, build_llava

CLASSES = ("Disturbed", "Merging", "Round Smooth", "In-between Round Smooth", "Cigar Shaped Smooth",
           "Barred Spiral", "Unbarred Tight Spiral", "Unbarred Loose Spiral", "Edge-on without Bulge",
           "Edge-on with Bulge")


def sample_image():
    """The M13 FITS file of astropy's test data, or a random array without it."""
    try:
        from astropy.utils.data import get_pkg_data_filename

        return get_pkg_data_filename("data/m13.fits", package="astropy.io.fits.hdu.compressed.tests"), "m13.fits"
    except Exception:  # pragma: no cover - astropy without test data
        return np.random.default_rng(0).random((300, 300)), "random 300x300 array"


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=SHAPES)
    parser.add_argument("--candidates", type=int, default=10, help="candidate texts per image (<= 10)")
    parser.add_argument("--batch-size", type=int, default=16, help="candidates per forward pass of score")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = resolve_bench_device(args.device, args.threads)
    if args.shape == "7b" and device.type != "cuda":
        parser.error("--shape 7b needs --device cuda; use the default --shape tiny on a CPU")
    env = environment(device)
    print_environment(env)
    repeats = args.repeats or (3 if args.quick else 7)
    n = max(1, min(args.candidates, len(CLASSES)))
    texts = [f"This is an image of a {c.lower()} galaxy." for c in CLASSES[:n]]
    prompt = "What is the morphological type of this galaxy?"
    image, what = sample_image()
    with tempfile.TemporaryDirectory(prefix="astrovl-bench-") as tmp:
        llava, label = build_llava(args.shape, device, tmp)
        print(f"model: {label}; image: {what}; {n} candidates; prompt {prompt!r}")
        calls = {"per-text": lambda: llava._score_unbatched(image, texts, prompt),
                 "score": lambda: llava.score(image, texts, prompt, batch_size=args.batch_size)}
        rows, results = [], {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, fn in calls.items():
                results[name] = fn()
                timing = time_call(fn, repeats=repeats, warmup=1, device=device)
                rows.append({"method": name, "candidates": n, "seconds": timing["median"],
                             "texts_s": n / timing["median"], "calls": timing["n"]})
                print(f"  done: {name}", flush=True)
    diff = float(np.max(np.abs(results["score"] - results["per-text"])))
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
    print_table(f"AstroLLaVA.score, {n} candidates, on {device} ({label})", rows)
    notes = [f"score / per-text: {ratio:.2f}x faster (median of {repeats} calls each, side by side)",
             f"largest |score - per-text| over the candidates: {diff:.2e}",
             f"run at {time.strftime('%Y-%m-%d %H:%M')}"]
    finish("llava_score", args, env, {"llava_score": rows}, notes)


if __name__ == "__main__":
    main()
