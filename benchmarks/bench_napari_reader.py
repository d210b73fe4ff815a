"""Time and file reads of the napari reader on a FITS cube, against one read per plane.

The file holds a float32 cube of ``--planes`` planes of ``--size`` pixels in the
primary HDU and a 2-D ``SCI`` extension. ``fits_layer_data`` (the plugin's
reader) opens it once and builds one 3-D layer with a slider and one 2-D layer;
the reference does what the reader did before: ``list_image_hdus`` to find the
HDUs, then ``astrovl.load_image(path, hdu=..., plane=k)`` for every plane and
HDU, one file read each. Both run side by side; ``opens`` counts
``astropy.io.fits.open`` calls, ``ratio`` is reference time / reader time.
No viewer is started (the layer data is what napari receives).

Usage::

    python benchmarks/bench_napari_reader.py --quick
    python benchmarks/bench_napari_reader.py --planes 64 --size 1024
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _common import base_parser, environment, finish, print_environment, print_table, time_call


def write_cube(path: Path, planes: int, size: int) -> None:
    from astropy.io import fits

    rng = np.random.default_rng(0)
    cube = rng.gamma(2.0, 50.0, (planes, size, size)).astype(np.float32)
    sci = rng.gamma(2.0, 50.0, (size, size)).astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(cube), fits.ImageHDU(sci, name="SCI")]).writeto(path)


def per_plane_reference(path: Path) -> list:
    """The reader's former way: one load_image (one file read) per plane and per HDU."""
    from astrovl import load_image
    from astrovl_napari._reader import _is_cube, list_image_hdus

    out = []
    for index, _, _, shape in list_image_hdus(path):
        if _is_cube(shape):
            planes = [load_image(path, hdu=index, plane=k) for k in range(shape[-3])]
            out.append(np.stack([p.raw for p in planes]))
        else:
            out.append(load_image(path, hdu=index).raw)
    return out


class OpenCounter:
    """Counts ``astropy.io.fits.open`` calls while active."""

    def __enter__(self):
        import astropy.io.fits

        self.module = astropy.io.fits
        self.real = astropy.io.fits.open
        self.count = 0

        def counting(*args, **kwargs):
            self.count += 1
            return self.real(*args, **kwargs)

        astropy.io.fits.open = counting
        return self

    def __exit__(self, *exc):
        self.module.open = self.real


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--planes", type=int, default=None, help="cube planes (default 32; 8 quick)")
    parser.add_argument("--size", type=int, default=None, help="plane side (default 512; 256 quick)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds per method (2; 0.5)")
    args = parser.parse_args(argv)
    planes = args.planes or (8 if args.quick else 32)
    size = args.size or (256 if args.quick else 512)
    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 2.0)

    from astrovl_napari import fits_layer_data

    env = environment()
    print_environment(env)
    with tempfile.TemporaryDirectory(prefix="astrovl-bench-") as tmp:
        path = Path(tmp) / "cube.fits"
        write_cube(path, planes, size)
        layers = fits_layer_data(path)
        reference = per_plane_reference(path)
        for (data, _, _), ref in zip(layers, reference):
            np.testing.assert_array_equal(data, ref)  # the same pixels either way
        rows = []
        for name, fn in [("fits_layer_data", lambda: fits_layer_data(path)),
                         ("one load_image per plane", lambda: per_plane_reference(path))]:
            with OpenCounter() as counter:
                fn()
            t = time_call(fn, repeats=3, warmup=1, min_time=min_time)
            rows.append({"method": name, "planes": planes, "size": size, "opens": counter.count,
                         "seconds": t["median"]})
        for r in rows:
            r["ratio"] = r["seconds"] / rows[0]["seconds"]
        mib = path.stat().st_size / 2**20
    print_table(f"napari reader on a {planes}-plane cube of {size}x{size} plus a 2-D HDU "
                f"({mib:.0f} MiB)", rows)
    finish("napari_reader", args, env, {"napari_reader": rows},
           ["ratio = time / fits_layer_data time (median)"])


if __name__ == "__main__":
    main()
