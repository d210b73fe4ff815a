"""Cutouts that keep the WCS, via :class:`astropy.nddata.Cutout2D`."""

from __future__ import annotations

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.nddata import Cutout2D
from astropy.nddata.utils import NoOverlapError

from ..exceptions import ImageInputError
from .core import AstroImage
from .pixel_grid import header_with_wcs
from .scaling import get_stretch

__all__ = ["cutout"]


def cutout(image, position, size, *, stretch=None, interval=None, mode: str = "trim",
           **load_kwargs) -> AstroImage:
    """Cut a region out of an image, keeping its WCS.

    Parameters
    ----------
    image : any input of :func:`~astrovl.load_image`, or an AstroImage
    position : astropy.coordinates.SkyCoord or (x, y)
        Centre of the cutout: sky position (needs a WCS) or pixel coordinates
        (0-based, x along columns).
    size : int, (ny, nx), astropy.units.Quantity or pair of Quantity
        Size in pixels, or an angle (needs a WCS).
    stretch, interval
        Scaling of the cutout (as in :func:`~astrovl.load_image`); the interval is
        recomputed on the cutout.
    mode : {"trim", "partial", "strict"}
        As in :class:`~astropy.nddata.Cutout2D`: how to treat cutouts that run off
        the image edge ("partial" fills with NaN, shown as 0).

    Returns
    -------
    AstroImage
        Its ``wcs`` is that of the cutout grid; its ``header`` is the input's
        header with every WCS keyword replaced by the cutout's (``CD``, ``PC``,
        SIP and distortion-table keywords of the input are removed first).
    """
    from .readers import load_image

    base = image if isinstance(image, AstroImage) else load_image(image, **load_kwargs)
    needs_wcs = isinstance(position, SkyCoord) or isinstance(size, u.Quantity) or (
        isinstance(size, (tuple, list)) and any(isinstance(s, u.Quantity) for s in size))
    if needs_wcs and base.wcs is None:
        raise ImageInputError(
            f"{base.source}: a sky position or angular size needs a celestial WCS, and this "
            "image has none; give the position and size in pixels"
        )
    raw = base.raw
    planes = [raw[..., i] for i in range(raw.shape[2])] if raw.ndim == 3 else [raw]
    try:
        cuts = [Cutout2D(p, position, size, wcs=base.wcs, mode=mode, fill_value=np.nan, copy=True)
                for p in planes]
    except NoOverlapError as exc:
        raise ImageInputError(f"{base.source}: the cutout at {position} does not overlap the image") from exc
    except ValueError as exc:
        raise ImageInputError(f"{base.source}: cannot cut out {size} at {position}: {exc}") from exc
    data = cuts[0].data if len(cuts) == 1 else np.stack([c.data for c in cuts], axis=-1)
    header = base.header.copy() if base.header is not None else None
    if header is not None and cuts[0].wcs is not None:
        # every WCS keyword of the input goes (no stale CD/PC/SIP keys), then the cutout's
        header = header_with_wcs(header, cuts[0].wcs)
    mask = None
    if base.mask is not None:
        mcut = Cutout2D(base.mask.astype(float), position, size, wcs=base.wcs, mode=mode,
                        fill_value=1.0, copy=True)
        mask = mcut.data > 0
    if stretch is None:
        stretch = _known_stretch(base.meta.get("stretch"))
    # an AstroImage keeps the layout (colour or grey), the mask and the 8-bit picture flag
    piece = AstroImage(data=data, raw=data, wcs=cuts[0].wcs, header=None, source=base.source,
                       mask=mask, meta={"origin": base.meta.get("origin", "lower"),
                                        "picture": base.meta.get("picture", False)})
    out = load_image(piece, stretch=stretch, interval=interval)
    out.header = header
    out.source = f"cutout({base.source}, {position}, {size})"
    out.meta.update(origin=base.meta.get("origin", "lower"), bbox=cuts[0].bbox_original)
    return out


def _known_stretch(name):
    """The stretch name an image was scaled with, if it can be used again (else None)."""
    if not isinstance(name, str) or name == "none":
        return None
    try:
        get_stretch(name)
    except ValueError:  # a class name recorded for a stretch instance
        return None
    return name
