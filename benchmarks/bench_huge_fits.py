"""Peak memory and time of ``astrovl.load_image`` on a FITS image larger than ``max_pixels``.

The script writes, in a temporary folder, a ``--side`` x ``--side`` float32 FITS
image (16,384 x 16,384 = 1 GiB by default; written a strip at a time, so the
script itself never holds it) and, with ``--compressed``, the same field as
int16 Rice tile-compressed (tiles of 16 rows). Each measurement runs in a fresh
Python process that imports astrovl, numpy and astropy, notes its resident
memory (the baseline), resets the kernel's peak-RSS counter where the kernel
allows (``/proc/self/clear_refs``), loads the file and reads the peak
(``VmHWM`` in ``/proc/self/status``). ``peak_above_baseline_mib`` is the peak
minus the baseline: the memory the load needed.

Modes:

``astrovl``
    ``load_image(path)`` with ``astrovl.conf.max_pixels`` (16 million by
    default): strips read through ``hdu.section`` and block-averaged.
``old``
    What ``load_image`` did before (``--old``): read the whole HDU
    (``memmap=False``), copy it, convert it to native float32, then
    ``astropy.nddata.block_reduce(..., func=np.nanmean)``. Only the reading and
    reduction are repeated; the scaling of the small result costs the same in
    both.

Usage::

    python benchmarks/bench_huge_fits.py --quick            # 4096 x 4096 (64 MiB)
    python benchmarks/bench_huge_fits.py                     # 16384 x 16384 (1 GiB)
    python benchmarks/bench_huge_fits.py --old --compressed  # also the old path, and Rice
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import base_parser, environment, finish, print_environment, print_table

_CHILD = r"""
import json, sys, time, warnings
import numpy as np
from astropy.io import fits
import astrovl
from astrovl import load_image


def status():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


mode, path, max_pixels = sys.argv[1], sys.argv[2], int(sys.argv[3])
from astropy.nddata import block_reduce  # imported before the baseline in both modes
from astrovl.imaging.pixel_grid import reduction_factor

base = status()["VmRSS"]
reset = reset_peak()
start = time.perf_counter()
if mode == "astrovl":
    img = load_image(path, max_pixels=max_pixels)
    shape, factor = img.raw.shape, img.meta["downsample"]
else:  # the previous reading path of load_image
    with open(path, "rb") as fh, fits.open(fh, memmap=False, lazy_load_hdus=False) as hdul:
        h = [x for x in hdul if x.header.get("NAXIS", 0) >= 2][0]
        arr = np.array(np.asarray(h.data))
    raw = np.asarray(arr, dtype=np.float32)
    factor = reduction_factor(raw.shape[0], raw.shape[1], max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        small = np.asarray(block_reduce(raw, factor, func=np.nanmean), dtype=np.float32)
    shape = small.shape
seconds = time.perf_counter() - start
peak = status()["VmHWM"]
print(json.dumps({"baseline": base, "peak": peak, "seconds": seconds, "shape": list(shape),
                  "factor": factor, "peak_reset": reset}))
"""


def write_float_image(path: Path, side: int, seed: int = 15) -> None:
    """A ``side`` x ``side`` float32 sky (background, noise, a few sources, NaN gaps), by strips."""
    from astropy.io import fits

    header = fits.Header()
    header["SIMPLE"], header["BITPIX"], header["NAXIS"] = True, -32, 2
    header["NAXIS1"], header["NAXIS2"] = side, side
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"], header["CRVAL2"] = 150.0, 2.2
    header["CRPIX1"], header["CRPIX2"] = side / 2 + 0.5, side / 2 + 0.5
    header["CD1_1"], header["CD1_2"], header["CD2_1"], header["CD2_2"] = -1e-5, 0.0, 0.0, 1e-5
    rng = np.random.default_rng(seed)
    stream = fits.StreamingHDU(path, header)
    rows = max(1, (1 << 22) // side)
    x = np.arange(side)
    for y0 in range(0, side, rows):
        y = np.arange(y0, min(side, y0 + rows))[:, None]
        block = 100.0 + 0.001 * x[None, :] + rng.normal(0.0, 5.0, size=(y.size, side))
        block += 500.0 * np.exp(-((x[None, :] - side / 3) ** 2 + (y - side / 2) ** 2) / (0.02 * side) ** 2)
        if y0 == 0:
            block[:3, : side // 2] = np.nan  # a bad edge
        stream.write(block.astype(">f4"))
    stream.close()


def write_compressed_image(source: Path, path: Path) -> None:
    """The same field as int16 Rice tile-compressed (tiles of 16 rows)."""
    from astropy.io import fits

    with fits.open(source, memmap=True) as hdul:
        data = np.nan_to_num(np.asarray(hdul[0].data), nan=0.0)
        ints = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
        header = hdul[0].header.copy()
    del data
    comp = fits.CompImageHDU(ints, header=header, compression_type="RICE_1",
                             tile_shape=(16, ints.shape[1]))
    fits.HDUList([fits.PrimaryHDU(), comp]).writeto(path)


def measure(mode: str, path: Path, max_pixels: int) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, mode, str(path), str(max_pixels)],
                            capture_output=True, text=True, check=False, env=dict(os.environ))
    if result.returncode != 0:
        raise RuntimeError(f"{mode} on {path.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=16_384, help="image side in pixels")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="load_image's max_pixels (default astrovl.conf.max_pixels)")
    parser.add_argument("--old", action="store_true",
                        help="also measure the previous reading path (needs about 4x the file in memory)")
    parser.add_argument("--compressed", action="store_true",
                        help="also an int16 Rice tile-compressed copy of the image")
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode (the lowest peak is kept)")
    args = parser.parse_args()
    side = 4096 if args.quick else args.side
    from astrovl import conf

    max_pixels = int(conf.max_pixels if args.max_pixels is None else args.max_pixels)
    env = environment()
    print_environment(env)
    rows = []
    with tempfile.TemporaryDirectory(prefix="astrovl-huge-") as tmp:
        files = [("float32", Path(tmp) / "huge.fits")]
        start = time.perf_counter()
        write_float_image(files[0][1], side)
        print(f"wrote {side} x {side} float32 in {time.perf_counter() - start:.1f} s")
        if args.compressed:
            files.append(("int16 Rice", Path(tmp) / "huge_rice.fits"))
            write_compressed_image(files[0][1], files[1][1])
        modes = ["astrovl"] + (["old"] if args.old else [])
        for label, path in files:
            for mode in modes:
                runs = [measure(mode, path, max_pixels) for _ in range(max(1, args.repeat))]
                best = min(runs, key=lambda r: r["peak"] - r["baseline"])
                rows.append({
                    "file": label,
                    "file_mib": round(path.stat().st_size / 2**20, 1),
                    "mode": mode,
                    "shape_in": f"{side}x{side}",
                    "shape_out": "x".join(str(s) for s in best["shape"]),
                    "factor": best["factor"],
                    "baseline_mib": round(best["baseline"] / 2**20, 1),
                    "peak_above_baseline_mib": round((best["peak"] - best["baseline"]) / 2**20, 1),
                    "seconds": round(min(r["seconds"] for r in runs), 2),
                    "peak_reset": best["peak_reset"],
                })
    print_table(f"load_image of a {side} x {side} image, max_pixels={max_pixels}", rows)
    finish("bench_huge_fits", args, env, {"huge_fits": rows})


if __name__ == "__main__":
    main()
