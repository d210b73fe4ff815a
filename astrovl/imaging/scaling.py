"""Display scaling to ``[0, 1]`` with :mod:`astropy.visualization`.

The default is an ``asinh`` stretch over the 0.5-99.5 percentile interval of
the finite pixels, which keeps faint structure visible without saturating
bright cores: the usual choice for astronomical images.

Rules
-----
* Non-finite (NaN, inf) and masked pixels are excluded from the interval and
  set to 0 (black) in the output.
* A constant image (or one with a single distinct finite value) has no
  contrast: its output is all zeros, without a division warning.
* An image with no finite pixel at all raises :class:`~astrovl.exceptions.ImageInputError`.
"""

from __future__ import annotations

import numpy as np
from astropy import visualization as vis

from ..exceptions import ImageInputError

__all__ = ["DEFAULT_PERCENTILE", "get_interval", "get_stretch", "scale_to_unit"]

DEFAULT_PERCENTILE = 99.5

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

    Names: ``"percentile"`` (0.5-99.5 %), ``"zscale"``, ``"minmax"``. A number
    ``p`` means :class:`~astropy.visualization.PercentileInterval` ``(p)``; a
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


def scale_to_unit(array: np.ndarray, *, stretch="asinh", interval="percentile",
                  mask: np.ndarray | None = None) -> np.ndarray:
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

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape; invalid pixels are 0.
    """
    arr = np.asarray(array, dtype=np.float64)
    invalid = ~np.isfinite(arr)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if arr.ndim == 3 and m.ndim == 2:
            m = np.repeat(m[:, :, None], arr.shape[2], axis=2)
        invalid |= m
    valid_values = arr[~invalid]
    if valid_values.size == 0:
        raise ImageInputError(
            "the image has no finite, unmasked pixel (all NaN/inf or masked); "
            "check the HDU or plane you selected"
        )
    interval_obj = get_interval(interval)
    stretch_obj = get_stretch(stretch)
    vmin, vmax = interval_obj.get_limits(valid_values)
    out = np.zeros(arr.shape, dtype=np.float32)
    if not np.isfinite(vmin) or not np.isfinite(vmax) or vmax <= vmin:
        # no contrast (constant image): documented result is all zeros
        return out
    filled = np.where(invalid, vmin, arr)
    norm = vis.ImageNormalize(vmin=vmin, vmax=vmax, stretch=stretch_obj, clip=True)
    scaled = np.asarray(norm(filled).filled(0.0), dtype=np.float32)
    scaled[invalid] = 0.0
    np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled[~np.isfinite(scaled)] = 0.0
    return scaled
