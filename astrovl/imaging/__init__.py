"""Astronomical image input: FITS, HDUs, NDData, arrays and pictures -> :class:`AstroImage`.

Every image enters the library through :func:`load_image`. Display scaling uses
:mod:`astropy.visualization`; colour composites use :func:`make_rgb`; cutouts
with WCS use :func:`cutout`.
"""

from .core import AstroImage
from .cutouts import cutout
from .readers import FITS_SUFFIXES, check_image, load_image
from .rgb import make_rgb
from .scaling import (
    DEFAULT_PERCENTILE,
    PERCENTILE_SAMPLES,
    get_interval,
    get_stretch,
    interval_limits,
    scale_to_unit,
)

__all__ = [
    "AstroImage",
    "load_image",
    "check_image",
    "make_rgb",
    "cutout",
    "scale_to_unit",
    "get_interval",
    "get_stretch",
    "FITS_SUFFIXES",
    "DEFAULT_PERCENTILE",
    "PERCENTILE_SAMPLES",
    "interval_limits",
]
