"""Rendering speed of ``SyntheticSkyDataset.generate`` (images/s) per image size, and per class.

The first table times ``SyntheticSkyDataset.generate`` end to end (rendering,
PSF convolution, noise, FITS files with WCS written atomically, the manifest)
into a fresh temporary folder for every image size; a second call on the same
folder shows the cost of a resumed run, where every image already exists.

The second table times ``render_object`` (the noiseless model of one object)
for each class at the largest size, which shows where the time goes.

``--default-set`` first times the default data set of ``generate`` (5,000
images of 128 pixels; 1,000 with ``--quick``, the time for 5,000 then being
projected from it and marked so), with ``--workers`` processes.

Usage::

    python benchmarks/bench_synthetic.py --quick
    python benchmarks/bench_synthetic.py --default-set --threads 1
    python benchmarks/bench_synthetic.py --sizes 64,128,256,512 --n-images 500
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    base_parser,
    environment,
    finish,
    int_list,
    print_environment,
    print_table,
    time_call,
)


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=int_list,
        default=None,
        help="image sides in pixels (default 64,128,256; 64,128 with --quick)",
    )
    parser.add_argument(
        "--n-images", type=int, default=None, help="images per size (default 220; 55 with --quick)"
    )
    parser.add_argument(
        "--per-class-repeats",
        type=int,
        default=None,
        help="render_object calls per class (default 5; 2 with --quick)",
    )
    parser.add_argument(
        "--default-set",
        action="store_true",
        help="time the default data set (5,000 images of 128 px) first",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="worker processes of generate (default 0)"
    )
    args = parser.parse_args(argv)
    sizes = args.sizes or ([64, 128] if args.quick else [64, 128, 256])
    n_images = args.n_images or (55 if args.quick else 220)
    repeats = args.per_class_repeats or (2 if args.quick else 5)

    from astrovl import SyntheticSkyDataset
    from astrovl.datasets.synthetic import SYNTHETIC_CLASSES, render_object

    env = environment()
    print_environment(env)
    default_rows = []
    if args.default_set:
        n_default = 1000 if args.quick else 5000
        with tempfile.TemporaryDirectory(prefix="astrovl-bench-") as tmp:
            t0 = time.perf_counter()
            SyntheticSkyDataset.generate(
                Path(tmp) / "sky", n_images=n_default, image_size=128, seed=0, progress=False,
                workers=args.workers,
            )
            seconds = time.perf_counter() - t0
        default_rows.append(
            {
                "images": n_default,
                "size": 128,
                "workers": args.workers,
                "seconds": seconds,
                "images_s": n_default / seconds,
                "seconds_for_5000": seconds * 5000 / n_default,
                "measured": "yes" if n_default == 5000 else "projected",
            }
        )
        print_table("the default data set: SyntheticSkyDataset.generate() at 128 px", default_rows)
    rows = []
    with tempfile.TemporaryDirectory(prefix="astrovl-bench-") as tmp:
        for size in sizes:
            directory = Path(tmp) / f"sky-{size}"
            t0 = time.perf_counter()
            ds = SyntheticSkyDataset.generate(
                directory, n_images=n_images, image_size=size, seed=0, progress=False,
                workers=args.workers,
            )
            fresh = time.perf_counter() - t0
            t0 = time.perf_counter()
            SyntheticSkyDataset.generate(
                directory, n_images=n_images, image_size=size, seed=0, progress=False,
                workers=args.workers,
            )
            resumed = time.perf_counter() - t0
            mib = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**20
            rows.append(
                {
                    "size": size,
                    "images": len(ds),
                    "seconds": fresh,
                    "images_s": len(ds) / fresh,
                    "ms_per_image": 1e3 * fresh / len(ds),
                    "resume_s": resumed,
                    "disk_mib": mib,
                }
            )
            print(f"  done: {size}px", flush=True)
    print_table("SyntheticSkyDataset.generate (all classes, balanced)", rows)

    size = max(sizes)
    per_class = []
    for label in SYNTHETIC_CLASSES:
        rng = np.random.default_rng(0)
        t = time_call(
            lambda label=label, rng=rng: render_object(label, size, rng), repeats=repeats, warmup=1
        )
        per_class.append({"class": label, "size": size, "render_ms": 1e3 * t["median"]})
    per_class.sort(key=lambda r: -r["render_ms"])
    print_table(
        f"render_object per class at {size}px (median, before PSF, noise and FITS writing)",
        per_class,
    )
    finish(
        "synthetic",
        args,
        env,
        {"default_set": default_rows, "generate": rows, "render_object": per_class},
        ["images_s includes writing one FITS file per image and the manifest"],
    )


if __name__ == "__main__":
    main()
