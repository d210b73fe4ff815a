"""Throughput of ``astrovl.load_image`` on real FITS files, against plain astropy.

The files are the telescope images shipped with astropy's own test data (M13
plain and tile-compressed, NGC 1316 tile-compressed, a gzip DSS plate), plus
larger images tiled from M13 (plain and Rice tile-compressed) at ``--sizes``.

For every file the table gives images/s and megapixels/s of
``load_image(path)`` (HDU choice, WCS, display scaling with an asinh stretch
over the 0.5-99.5 percentile interval) and of a baseline doing the same scaling
by hand, ``astropy.io.fits.getdata(path)`` then
``astropy.visualization.simple_norm(data, "asinh", percent=99.5)(data)``.
``ratio`` is load_image time / baseline time (1.0 = no overhead).

Usage::

    python benchmarks/bench_load_image.py --quick
    python benchmarks/bench_load_image.py --sizes 1024,2048,4096 --output load_image.json
"""

from __future__ import annotations

import tempfile
import warnings
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

# (label, path parts under the astropy package): the same files as tests/conftest.py
ASTROPY_FILES = [
    ("M13 300x300 int16", ("io", "fits", "hdu", "compressed", "tests", "data", "m13.fits")),
    (
        "M13 Rice tile-compressed",
        ("io", "fits", "hdu", "compressed", "tests", "data", "m13_rice.fits"),
    ),
    (
        "M13 gzip tile-compressed",
        ("io", "fits", "hdu", "compressed", "tests", "data", "m13_gzip.fits"),
    ),
    ("NGC 1316 tile-compressed", ("io", "fits", "tests", "data", "comp.fits")),
    ("DSS plate .fits.gz", ("wcs", "tests", "data", "dss.14.29.56-62.41.05.fits.gz")),
]


def astropy_test_files() -> list[tuple[str, Path]]:
    """The astropy test images that are installed (missing ones are skipped with a note)."""
    import astropy

    root = Path(astropy.__file__).parent
    found = []
    for label, parts in ASTROPY_FILES:
        path = root.joinpath(*parts)
        if path.is_file():
            found.append((label, path))
        else:
            print(f"note: {path} is not installed; skipping {label}")
    return found


def write_tiled(directory: Path, m13: Path, sizes: list[int]) -> list[tuple[str, Path]]:
    """Write ``size x size`` images tiled from M13, plain and Rice tile-compressed."""
    from astropy.io import fits

    base = fits.getdata(m13)
    out = []
    for size in sizes:
        reps = -(-size // base.shape[0])
        data = np.tile(base, (reps, reps))[:size, :size].copy()
        plain = directory / f"m13_tiled_{size}.fits"
        fits.PrimaryHDU(data).writeto(plain, overwrite=True)
        rice = directory / f"m13_tiled_{size}_rice.fits"
        fits.HDUList(
            [fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="RICE_1")]
        ).writeto(rice, overwrite=True)
        out += [(f"tiled {size}x{size} int16", plain), (f"tiled {size}x{size} Rice", rice)]
    return out


def baseline(path: Path) -> np.ndarray:
    """Plain astropy: read the first HDU with data and scale it like load_image does."""
    from astropy.io import fits
    from astropy.visualization import simple_norm

    data = fits.getdata(path).astype(np.float32)
    norm = simple_norm(data, "asinh", percent=99.5)
    return np.asarray(norm(data), dtype=np.float32)


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=int_list,
        default=None,
        help="sides of the tiled M13 images (default 1024,2048,3072; 1024 with --quick)",
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds spent timing each reader and file (default 2; 0.5 with --quick)",
    )
    args = parser.parse_args(argv)
    sizes = args.sizes or ([1024] if args.quick else [1024, 2048, 3072])
    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 2.0)

    from astrovl import conf, load_image

    env = environment()
    print_environment(env)
    files = astropy_test_files()
    rows = []
    with tempfile.TemporaryDirectory(prefix="astrovl-bench-") as tmp:
        m13 = next((p for label, p in files if label.startswith("M13 300")), None)
        if m13 is not None and sizes:
            files += write_tiled(Path(tmp), m13, sizes)
        for label, path in files:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FITS header fix-up warnings of old test files
                img = load_image(path)
                t_astrovl = time_call(lambda p=path: load_image(p), repeats=3, min_time=min_time)
                t_base = time_call(lambda p=path: baseline(p), repeats=3, min_time=min_time)
            mpix = img.raw.shape[0] * img.raw.shape[1] / 1e6
            rows.append(
                {
                    "file": label,
                    "shape": f"{img.raw.shape[1]}x{img.raw.shape[0]}",
                    "size_kib": path.stat().st_size / 1024,
                    "load_image_ms": 1e3 * t_astrovl["median"],
                    "load_image_img_s": 1.0 / t_astrovl["median"],
                    "load_image_mpix_s": mpix / t_astrovl["median"],
                    "astropy_ms": 1e3 * t_base["median"],
                    "astropy_img_s": 1.0 / t_base["median"],
                    "ratio": t_astrovl["median"] / t_base["median"],
                }
            )
    print_table("load_image vs fits.getdata + simple_norm (median per image)", rows)
    notes = [
        "ratio = load_image time / baseline time; load_image also finds the science HDU, "
        "builds the celestial WCS, masks non-finite pixels and keeps the raw float32 pixels",
        f"images with more than astrovl.conf.max_pixels={int(conf.max_pixels):,} pixels are "
        "block-averaged first by load_image (the baseline does not)",
        "load_image takes the percentiles of images over 100,000 pixels from a fixed sample of "
        "100,000 (astrovl.imaging.PERCENTILE_SAMPLES); simple_norm sorts every pixel",
    ]
    finish("load_image", args, env, {"load_image": rows}, notes)


if __name__ == "__main__":
    main()
