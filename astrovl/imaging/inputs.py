"""What counts as an image input, defined once for the whole package.

* :data:`FITS_SUFFIXES` and :data:`PICTURE_SUFFIXES`: the file names
  :func:`~astrovl.load_image` reads as FITS or as pictures (Pillow);
  :func:`is_fits_name`, :func:`is_image_name` and :func:`has_fits_signature`
  test a path against them.
* :func:`as_image_list` turns what the models accept (one image input, a list
  of them, or a dataset with ``image_paths``) into a list of single-image
  inputs; :func:`describe_input` names one input in a result table.
* :data:`PATH_COLUMNS`: the metadata columns of an embedding index that may
  name an image file.

:mod:`astrovl.clip`, :mod:`astrovl.llava`, :mod:`astrovl.serve`, the dataset
builders, the command line and the napari plugin use these instead of lists of
their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "FITS_SUFFIXES",
    "PICTURE_SUFFIXES",
    "IMAGE_SUFFIXES",
    "PATH_COLUMNS",
    "is_fits_name",
    "is_image_name",
    "has_fits_signature",
    "as_image_list",
    "describe_input",
]

#: file-name endings read as FITS (lower case; gzip- and tile-compressed included)
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fz", ".fits.fz")
#: file-name endings read as pictures by Pillow (lower case)
PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")
#: every file-name ending :func:`~astrovl.load_image` reads
IMAGE_SUFFIXES = FITS_SUFFIXES + PICTURE_SUFFIXES
#: metadata columns of an embedding index that may name an image file (first found wins)
PATH_COLUMNS = ("path", "image", "source", "filename", "file")


def is_fits_name(path: str | os.PathLike) -> bool:
    """True when the file name of ``path`` ends with one of :data:`FITS_SUFFIXES` (any case).

    Examples
    --------
    >>> is_fits_name("data/j8pu42ecq_drz.FITS"), is_fits_name("m51.fits.fz"), is_fits_name("m51.png")
    (True, True, False)
    """
    return os.path.basename(os.fspath(path)).lower().endswith(FITS_SUFFIXES)


def is_image_name(path: str | os.PathLike) -> bool:
    """True when the file name of ``path`` ends with one of :data:`IMAGE_SUFFIXES` (any case).

    Examples
    --------
    >>> is_image_name("m51.fits.gz"), is_image_name("m51.JPG"), is_image_name("notes.txt")
    (True, True, False)
    """
    return os.path.basename(os.fspath(path)).lower().endswith(IMAGE_SUFFIXES)


def has_fits_signature(path: str | os.PathLike) -> bool:
    """True when the file at ``path`` starts with the FITS signature ``SIMPLE``.

    A file that cannot be opened is not FITS here (``False``); reading it
    later reports the real error.
    """
    try:
        with open(path, "rb") as fh:
            return fh.read(6) == b"SIMPLE"
    except OSError:
        return False


def _is_single_image(obj: Any) -> bool:
    from astropy.io import fits
    from astropy.nddata import NDData

    from .core import AstroImage

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
    """Turn an image input, a collection of them or a dataset into a list of single inputs.

    Parameters
    ----------
    images : object
        One input :func:`~astrovl.load_image` accepts (path, array, HDU,
        NDData, ``(data, header)`` pair, :class:`~astrovl.AstroImage`, PIL
        image), an iterable of them, or a dataset with an ``image_paths``
        attribute (such as :class:`~astrovl.datasets.ManifestDataset`), which
        gives its image paths.

    Returns
    -------
    items : list
        The single-image inputs.
    single : bool
        True when ``images`` was one image (so a caller returns one result
        rather than a list).

    Raises
    ------
    TypeError
        If ``images`` is neither an image input nor an iterable of them.
    """
    paths = getattr(images, "image_paths", None)
    if paths is not None and not _is_single_image(images):
        return [str(p) for p in paths], False
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
    """Short description of an image input for tables (a path, the ``source``, or the type).

    Examples
    --------
    >>> import numpy as np
    >>> describe_input("m51.fits"), describe_input(np.zeros((4, 5)))
    ('m51.fits', '<ndarray (4, 5)>')
    """
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    src = getattr(obj, "source", None)
    if isinstance(src, str):
        return src
    if isinstance(obj, np.ndarray):
        return f"<ndarray {obj.shape}>"
    return f"<{type(obj).__name__}>"
