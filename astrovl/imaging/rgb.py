"""Colour composites from three bands."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from astropy import visualization as vis

from ..exceptions import ImageInputError
from .core import AstroImage
from .scaling import get_interval, get_stretch

__all__ = ["make_rgb"]


def make_rgb(
    images: Sequence,
    *,
    stretch="asinh",
    interval="percentile",
    reproject: bool = True,
    reference: int = 0,
    hdu=None,
    method: str = "make_rgb",
) -> AstroImage:
    """Make a colour composite from three bands (red, green, blue order).

    Parameters
    ----------
    images : sequence of three inputs
        Anything :func:`~astrovl.load_image` accepts (paths, HDUs, NDData,
        ``(array, WCS)`` tuples, arrays), reddest band first.
    stretch, interval
        As in :func:`~astrovl.load_image`. One interval is computed over the three
        bands so that their relative brightness is kept.
    reproject : bool
        When the bands carry different celestial WCS, resample them onto the grid
        of band ``reference`` with :func:`reproject.reproject_interp`. With
        ``False`` (or without WCS) the bands must already share one grid.
    reference : int
        Index of the band whose pixel grid and WCS the composite uses.
    hdu : optional
        Passed to :func:`~astrovl.load_image` for each band.
    method : {"make_rgb", "lupton"}
        :func:`astropy.visualization.make_rgb` with the given interval and stretch,
        or :func:`astropy.visualization.make_lupton_rgb` (asinh, Lupton et al. 2004).

    Returns
    -------
    AstroImage
        Colour image with the WCS of the reference band.
    """
    from .readers import load_image

    if len(images) != 3:
        raise ImageInputError(f"make_rgb needs exactly three bands (R, G, B); got {len(images)}")
    if reference not in (0, 1, 2):
        raise ValueError(f"reference={reference!r} must be 0, 1 or 2")
    bands = [load_image(im, hdu=hdu, stretch="linear", interval="minmax") for im in images]
    for b in bands:
        if b.is_color:
            raise ImageInputError(f"band {b.source!r} is already a colour image; pass single bands")
    ref = bands[reference]
    arrays = []
    for b in bands:
        arr = b.raw
        if b is not ref:
            arr = _align(b, ref, reproject)
        arrays.append(np.where(np.isfinite(arr), arr, np.nan))
    stack = np.stack(arrays, axis=-1)
    finite = stack[np.isfinite(stack)]
    if finite.size == 0:
        raise ImageInputError("the three bands have no finite overlapping pixel")
    vmin, vmax = get_interval(interval).get_limits(finite)
    filled = [np.nan_to_num(a, nan=vmin, posinf=vmax, neginf=vmin) for a in arrays]
    if method == "lupton":
        # pixels at the minimum have zero intensity: astropy divides 0 by 0 there before
        # replacing the result with 0, which numpy reports as a RuntimeWarning
        with np.errstate(invalid="ignore", divide="ignore"):
            rgb = vis.make_lupton_rgb(*filled, minimum=vmin,
                                      stretch=max(vmax - vmin, 1e-12) / 5, Q=8)
        data = rgb.astype(np.float32) / 255.0
    elif method == "make_rgb":
        if vmax <= vmin:
            data = np.zeros(stack.shape, dtype=np.float32)
        else:
            data = vis.make_rgb(
                *filled,
                interval=vis.ManualInterval(vmin, vmax),
                stretch=get_stretch(stretch),
                output_dtype=np.float64,
            ).astype(np.float32)
    else:
        raise ValueError(f"method={method!r} is not known; use 'make_rgb' or 'lupton'")
    data = np.clip(np.nan_to_num(data, nan=0.0), 0.0, 1.0).astype(np.float32)
    invalid = ~np.isfinite(stack).all(axis=2)
    data[invalid] = 0.0
    return AstroImage(
        data=data,
        raw=stack.astype(np.float32),
        wcs=ref.wcs,
        header=ref.header,
        source="rgb(" + ", ".join(b.source for b in bands) + ")",
        mask=invalid if invalid.any() else None,
        meta={"origin": ref.meta.get("origin", "lower"), "picture": False,
              "stretch": str(stretch), "interval": str(interval), "method": method},
    )


def _align(band: AstroImage, ref: AstroImage, reproject: bool) -> np.ndarray:
    same_shape = band.raw.shape == ref.raw.shape
    if band.wcs is not None and ref.wcs is not None and reproject:
        if same_shape and band.wcs.wcs.compare(ref.wcs.wcs, tolerance=1e-10):
            return band.raw
        from reproject import reproject_interp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out, _ = reproject_interp((band.raw, band.wcs), ref.wcs, shape_out=ref.raw.shape)
        return out.astype(np.float32)
    if not same_shape:
        raise ImageInputError(
            f"band {band.source!r} has shape {band.raw.shape} but the reference band has "
            f"{ref.raw.shape}; give each band a celestial WCS so it can be reprojected, or "
            "resample them to one grid first"
        )
    return band.raw
