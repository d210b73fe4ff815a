"""Turning the many accepted image inputs into a sequence of model-ready items."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["as_image_list", "describe_input"]


def _is_single_image(obj: Any) -> bool:
    from astropy.io import fits
    from astropy.nddata import NDData

    from ..imaging import AstroImage

    if isinstance(obj, (str, os.PathLike, np.ndarray, AstroImage, NDData, fits.HDUList,
                        fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
        return True
    if isinstance(obj, tuple) and len(obj) == 2:
        from astropy.wcs import WCS

        return isinstance(obj[1], (fits.Header, WCS))
    try:
        from PIL import Image

        return isinstance(obj, Image.Image)
    except ImportError:  # pragma: no cover
        return False


def as_image_list(images: Any) -> tuple[list[Any], bool]:
    """Return ``(items, single)`` where ``items`` is a list of single-image inputs.

    A :class:`~astrovl.datasets.ManifestDataset` gives its image paths.
    """
    from ..datasets.records import ManifestDataset

    if isinstance(images, ManifestDataset):
        return [str(p) for p in images.image_paths], False
    if _is_single_image(images):
        return [images], True
    if isinstance(images, (Sequence, Iterable)):
        items = list(images)
        return items, False
    raise TypeError(
        f"cannot embed an object of type {type(images).__name__}; pass an image input accepted "
        "by astrovl.load_image, a list of them, or a dataset"
    )


def describe_input(obj: Any) -> str:
    """Short description of an image input for tables (a path, or the type)."""
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    src = getattr(obj, "source", None)
    if isinstance(src, str):
        return src
    if isinstance(obj, np.ndarray):
        return f"<ndarray {obj.shape}>"
    return f"<{type(obj).__name__}>"
