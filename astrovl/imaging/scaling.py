"""Display scaling to ``[0, 1]`` with :mod:`astropy.visualization`.

The default is an ``asinh`` stretch over the central 99.5 % of the finite
pixels (``PercentileInterval(99.5)``: the 0.25 and 99.75 percentiles), which
keeps faint structure visible without saturating bright cores: the usual
choice for astronomical images.

Rules
-----
* Non-finite (NaN, inf) and masked pixels are excluded from the interval and
  set to 0 (black) in the output.
* A constant image (or one with a single distinct finite value) has no
  contrast: its output is all zeros, without a division warning.
* An image with no finite pixel at all raises :class:`~astrovl.exceptions.ImageInputError`.

Percentiles of large images
---------------------------
Percentile intervals of images with more than ``max_samples`` values
(default :data:`PERCENTILE_SAMPLES`, 100,000) are computed on a fixed
pseudo-random sample of ``max_samples`` of their values (the same positions for
every image of the same size, so results are reproducible) instead of on every
pixel: a full sort of a 4k x 4k image costs about a hundred times more and
gives the same picture. The limits are the exact percentiles of the sample,
computed by the same astropy interval; each lies in the full image within
0.1 percentage points of the requested percentile (the rank error of a
100,000-value sample has a standard deviation of 0.016 points at 0.25 %).
When more than half of the sampled values are invalid (NaN, inf, masked), the
valid pixels of the whole image are used instead. ``max_samples=None`` uses
every pixel. Other intervals (``minmax``, ``zscale``, manual limits) always
see every valid pixel.

The arithmetic is that of :class:`astropy.visualization.ImageNormalize`
without a float64 copy of the image: in float32 in place, or, when the limits
are large compared with their difference (a faint signal on a large offset),
with the offset and scale applied in float64 on small blocks of rows. Results
agree with ImageNormalize to within 2e-6 (float32 rounding, which the ``sqrt``
stretch amplifies near 0).
"""

from __future__ import annotations

import functools

import numpy as np
from astropy import visualization as vis

from ..exceptions import ImageInputError

__all__ = [
    "DEFAULT_PERCENTILE",
    "PERCENTILE_SAMPLES",
    "get_interval",
    "get_stretch",
    "interval_limits",
    "sample_positions",
    "scale_to_unit",
]

DEFAULT_PERCENTILE = 99.5

#: Largest number of values percentile intervals are computed on (see the module docs).
PERCENTILE_SAMPLES = 100_000

_SAMPLE_SEED = 20240501

# values per block of the float64 working buffer of the scaling (512 KiB)
_CHUNK_VALUES = 65_536

# float32 arithmetic when max(|vmin|, |vmax|) <= this x (vmax - vmin): the rounding of vmin
# to float32 then moves values by less than 2**-20 of the interval
_FLOAT32_OFFSET = 16.0

_STRETCHES = {
    "linear": vis.LinearStretch,
    "asinh": vis.AsinhStretch,
    "log": vis.LogStretch,
    "sqrt": vis.SqrtStretch,
    "sinh": vis.SinhStretch,
    "power": vis.PowerStretch,
    "squared": vis.SquaredStretch,
    "histeq": None,
}


def get_stretch(stretch) -> vis.BaseStretch:
    """Return an astropy stretch from a name or a stretch instance."""
    if isinstance(stretch, vis.BaseStretch):
        return stretch
    if not isinstance(stretch, str) or stretch.lower() not in _STRETCHES or stretch == "histeq":
        names = ", ".join(repr(k) for k in _STRETCHES if k != "histeq")
        raise ValueError(f"stretch={stretch!r} is not known; use one of {names} or an astropy stretch")
    cls = _STRETCHES[stretch.lower()]
    if cls is vis.PowerStretch:
        return cls(2.0)
    return cls()


def get_interval(interval) -> vis.BaseInterval:
    """Return an astropy interval from a name, a percentile number or an interval instance.

    Names: ``"percentile"`` (``PercentileInterval(99.5)``: the 0.25-99.75
    percentiles), ``"zscale"``, ``"minmax"``. A number ``p`` means
    :class:`~astropy.visualization.PercentileInterval` ``(p)`` (the central ``p`` percent); a
    pair ``(vmin, vmax)`` a :class:`~astropy.visualization.ManualInterval`.
    """
    if isinstance(interval, vis.BaseInterval):
        return interval
    if isinstance(interval, (int, float)) and not isinstance(interval, bool):
        if not 0 < interval <= 100:
            raise ValueError(f"percentile interval {interval!r} must be in (0, 100]")
        return vis.PercentileInterval(float(interval))
    if isinstance(interval, (tuple, list)) and len(interval) == 2:
        return vis.ManualInterval(float(interval[0]), float(interval[1]))
    if isinstance(interval, str):
        key = interval.lower()
        if key == "percentile":
            return vis.PercentileInterval(DEFAULT_PERCENTILE)
        if key == "zscale":
            return vis.ZScaleInterval()
        if key == "minmax":
            return vis.MinMaxInterval()
    raise ValueError(
        f"interval={interval!r} is not known; use 'percentile', 'zscale', 'minmax', a "
        "percentile number, a (vmin, vmax) pair or an astropy interval"
    )


@functools.lru_cache(maxsize=16)
def _cached_positions(size: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(_SAMPLE_SEED)
    idx = np.sort(rng.choice(size, n, replace=False)).astype(np.intp)
    idx.flags.writeable = False
    return idx


def sample_positions(size: int, max_samples: int | None = PERCENTILE_SAMPLES) -> np.ndarray | None:
    """Flat positions of the percentile sample of an array of ``size`` values.

    Returns None when every value is used (``size <= max_samples`` or
    ``max_samples`` is None), else a sorted, read-only ``intp`` array of
    ``max_samples`` distinct positions, the same for every call with the same
    arguments (a fixed seed).
    """
    if max_samples is None or size <= int(max_samples):
        return None
    if int(max_samples) < 1:
        raise ValueError(f"max_samples={max_samples!r} must be a positive integer or None")
    return _cached_positions(int(size), int(max_samples))


def _uses_samples(interval_obj) -> bool:
    return isinstance(interval_obj, vis.AsymmetricPercentileInterval)


def _invalid_values(arr: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """Boolean array of ``arr``'s shape, True for non-finite or masked values; None if none is."""
    finite = np.isfinite(arr)
    if mask is None and finite.all():
        return None
    invalid = np.logical_not(finite, out=finite)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if arr.ndim == 3 and m.ndim == 2:
            m = m[:, :, None]
        invalid |= m
    return invalid


def _limits(arr: np.ndarray, invalid: np.ndarray | None, interval_obj,
            max_samples) -> tuple[float, float]:
    positions = sample_positions(arr.size, max_samples) if _uses_samples(interval_obj) else None
    values = None
    if positions is not None:
        values = np.take(arr, positions)
        if invalid is not None:
            ok = ~np.take(invalid, positions)
            values = values[ok] if 2 * int(ok.sum()) >= positions.size else None
    if values is None:
        values = arr.ravel() if invalid is None else arr[~invalid]
    if values.size == 0:
        raise ImageInputError(
            "the image has no finite, unmasked pixel (all NaN/inf or masked); "
            "check the HDU or plane you selected (hdu=, plane=)",
            options=("hdu", "plane"),
        )
    vmin, vmax = interval_obj.get_limits(values)
    return float(vmin), float(vmax)


def interval_limits(array: np.ndarray, interval="percentile", *, mask: np.ndarray | None = None,
                    max_samples: int | None = PERCENTILE_SAMPLES) -> tuple[float, float]:
    """The ``(vmin, vmax)`` limits :func:`scale_to_unit` uses for ``array``.

    Non-finite and masked values are left out; percentile intervals of arrays
    with more than ``max_samples`` values use a fixed sample of them (see the
    module documentation for the tolerance).

    Raises
    ------
    ImageInputError
        When no value is finite and unmasked.
    """
    arr = np.asarray(array)
    return _limits(arr, _invalid_values(arr, mask), get_interval(interval), max_samples)


def scale_to_unit(array: np.ndarray, *, stretch="asinh", interval="percentile",
                  mask: np.ndarray | None = None,
                  max_samples: int | None = PERCENTILE_SAMPLES) -> np.ndarray:
    """Scale ``array`` to float32 in ``[0, 1]`` with an astropy interval and stretch.

    Parameters
    ----------
    array : numpy.ndarray
        2-D (grey) or 3-D ``(H, W, C)`` array. For colour arrays one interval is
        computed over all channels so that colours keep their balance.
    stretch : str or astropy.visualization.BaseStretch
    interval : str, float, (vmin, vmax) or astropy.visualization.BaseInterval
    mask : numpy.ndarray, optional
        Boolean ``(H, W)`` array, True for pixels to ignore.
    max_samples : int or None
        Percentile intervals of larger arrays are computed on a fixed sample of
        this many values (see the module documentation); None uses every pixel.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape; invalid pixels are 0.
    """
    arr = np.asarray(array)
    if arr.dtype.kind not in "biuf":
        raise ImageInputError(f"pixel type {arr.dtype} is not numeric")
    invalid = _invalid_values(arr, mask)
    interval_obj = get_interval(interval)
    stretch_obj = get_stretch(stretch)
    vmin, vmax = _limits(arr, invalid, interval_obj, max_samples)
    if not np.isfinite(vmin) or not np.isfinite(vmax) or vmax <= vmin:
        # no contrast (constant image): documented result is all zeros
        return np.zeros(arr.shape, dtype=np.float32)
    out = np.empty(arr.shape, dtype=np.float32)
    _normalize_into(out, arr, vmin, vmax, stretch_obj)
    if invalid is not None:
        out[invalid] = 0.0
    if not np.isfinite(out).all():
        out[~np.isfinite(out)] = 0.0
    return out


def _normalize_into(out: np.ndarray, arr: np.ndarray, vmin: float, vmax: float, stretch_obj) -> None:
    """Write ``clip(stretch(clip((arr - vmin) / (vmax - vmin))))`` to float32 ``out``.

    The arithmetic of :class:`~astropy.visualization.ImageNormalize` without a
    float64 copy of the image. When the limits are within a factor of
    :data:`_FLOAT32_OFFSET` of their difference, float32 loses nothing that
    matters (errors of about 1e-7 of the interval) and everything runs in float32
    in place; otherwise ``(arr - vmin) / (vmax - vmin)`` is computed in float64
    on blocks of rows through one small buffer. Either way the ends of the
    interval map exactly to 0 and 1.
    """
    if arr.size == 0:
        return
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if max(abs(vmin), abs(vmax)) <= _FLOAT32_OFFSET * (vmax - vmin):
            lo = np.float32(vmin)
            span = np.float32(vmax) - lo  # as the pixels equal to vmax get it: exactly 1 after division
            if not np.isfinite(span) or span <= 0:
                span = np.float32(vmax - vmin)
            np.subtract(arr, lo, out=out, dtype=np.float32, casting="unsafe")
            np.true_divide(out, span, out=out)
        else:
            rows = max(1, _CHUNK_VALUES // max(1, arr[0].size))
            buffer = np.empty((min(rows, arr.shape[0]),) + arr.shape[1:], dtype=np.float64)
            for start in range(0, arr.shape[0], rows):
                block = arr[start:start + rows]
                work = buffer[:block.shape[0]]
                np.subtract(block, vmin, out=work, dtype=np.float64)
                np.true_divide(work, vmax - vmin, out=work)
                out[start:start + rows] = work
        np.clip(out, 0.0, 1.0, out=out)
        stretch_obj(out, out=out, clip=False)
        np.clip(out, 0.0, 1.0, out=out)
