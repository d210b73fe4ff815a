"""What counts as an image input, defined once for the whole package.

* :data:`FITS_SUFFIXES` and :data:`PICTURE_SUFFIXES`: the file names
  :func:`~astrovl.load_image` reads as FITS or as pictures (Pillow);
  :func:`is_fits_name`, :func:`is_image_name` and :func:`has_fits_signature`
  test a path against them, and :func:`is_fits_file` (name or signature) is the
  one test of whether a file is read as FITS.
* :func:`as_image_list` turns what the models accept (one image input, a list
  of them, or a dataset with ``image_paths``) into a list of single-image
  inputs; :func:`describe_input` names one input in a result table.
* :class:`ImageFile`: a file name with the HDU and plane to read from it,
  accepted wherever an image input is; :func:`parse_hdu` and
  :func:`format_hdu` read and write an HDU choice as text (``1``, ``SCI``,
  ``SCI,2``), the syntax of the command line's ``--hdu``.
* :data:`PATH_COLUMNS`: the metadata columns of an embedding index that may
  name an image file; :func:`locate_image_file` finds the file such a value
  names.

:mod:`astrovl.clip`, :mod:`astrovl.llava`, :mod:`astrovl.serve`, the dataset
builders, the command line and the napari plugin use these instead of lists of
their own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FITS_SUFFIXES",
    "PICTURE_SUFFIXES",
    "IMAGE_SUFFIXES",
    "PATH_COLUMNS",
    "ImageFile",
    "parse_hdu",
    "format_hdu",
    "is_fits_name",
    "is_image_name",
    "has_fits_signature",
    "is_fits_file",
    "as_image_list",
    "describe_input",
    "locate_image_file",
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


def is_fits_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is read as FITS: a FITS file name, or a file that starts like one.

    The one test of the library for "is this file FITS?" (:func:`is_fits_name`, then
    :func:`has_fits_signature` for FITS files under other names).
    """
    return is_fits_name(path) or has_fits_signature(path)


@dataclass(frozen=True)
class ImageFile:
    """An image file and the HDU and plane to read from it.

    :func:`~astrovl.load_image` and everything that takes image inputs (the
    CLIP embedder, the index, AstroLLaVA) read it as ``load_image(path,
    hdu=hdu, plane=plane)``; it is small and picklable, so it also travels to
    data-loader workers and cluster workers.

    Parameters
    ----------
    path : str or path-like
        The file.
    hdu : int, str or (str, int), optional
        HDU index, EXTNAME or (EXTNAME, EXTVER); default: the science HDU
        :func:`~astrovl.load_image` chooses.
    plane : int, optional
        Plane of a cube (axis 0 in numpy order).

    Examples
    --------
    >>> ImageFile("j8pu42ecq_flt.fits", hdu=("SCI", 2))
    ImageFile(path='j8pu42ecq_flt.fits', hdu=('SCI', 2), plane=None)
    """

    path: str
    hdu: int | str | tuple[str, int] | None = None
    plane: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))

    def __str__(self) -> str:
        return self.path


def parse_hdu(text: str | int | tuple | None) -> int | str | tuple[str, int] | None:
    """An HDU choice written as text: an index, an EXTNAME, or ``EXTNAME,EXTVER``.

    Values that are already parsed (an int, a tuple, None) are returned as they are.

    Raises
    ------
    ValueError
        Empty text, or an EXTVER that is not an integer.

    Examples
    --------
    >>> parse_hdu("1"), parse_hdu("SCI"), parse_hdu("sci, 2"), parse_hdu(None)
    (1, 'SCI', ('SCI', 2), None)
    """
    if text is None or isinstance(text, (int, tuple)):
        return text
    value = str(text).strip()
    if not value:
        raise ValueError("an HDU choice is empty; give an index (1), an EXTNAME (SCI) or EXTNAME,EXTVER (SCI,2)")
    if re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    name, sep, ver = value.partition(",")
    name, ver = name.strip(), ver.strip()
    if not sep:
        return value.upper()
    if not name or not re.fullmatch(r"[+-]?\d+", ver):
        raise ValueError(f"HDU choice {value!r}: write EXTNAME,EXTVER with an integer EXTVER "
                         "(for example SCI,2), an index (1) or an EXTNAME (SCI)")
    return (name.upper(), int(ver))


def format_hdu(hdu: int | str | tuple | None) -> str:
    """The text :func:`parse_hdu` reads back as ``hdu`` (``""`` for None).

    Examples
    --------
    >>> format_hdu(1), format_hdu("SCI"), format_hdu(("SCI", 2))
    ('1', 'SCI', 'SCI,2')
    """
    if hdu is None:
        return ""
    if isinstance(hdu, tuple):
        return ",".join(str(v) for v in hdu)
    return str(hdu)


def _is_single_image(obj: Any) -> bool:
    from astropy.io import fits
    from astropy.nddata import NDData

    from .core import AstroImage

    if isinstance(obj, (str, os.PathLike, np.ndarray, AstroImage, NDData, fits.HDUList, ImageFile,
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
    if isinstance(obj, (str, os.PathLike, ImageFile)):
        return str(obj)
    src = getattr(obj, "source", None)
    if isinstance(src, str):
        return src
    if isinstance(obj, np.ndarray):
        return f"<ndarray {obj.shape}>"
    return f"<{type(obj).__name__}>"


def locate_image_file(value: Any, *, index_dir: str | os.PathLike | None = None,
                      image_root: str | os.PathLike | None = None, resolve: bool = True) -> Path | None:
    """Find the existing image file an index metadata value names (resolved), or None.

    Absolute paths are used as they are. Relative ones are tried against
    ``image_root`` (when given), then against ``index_dir`` and its parent
    (when given), then against the current directory. HDU suffixes of
    :func:`~astrovl.load_image` sources (``file.fits[1]``) are removed; values
    that are not file names (masked, empty, ``"<ndarray (64, 64)>"``, holding a
    NUL character) or that name no existing file give None. Whether the file
    found may be opened (under an image root or not) is for the caller to decide.
    With ``resolve=False`` the file is returned as named (absolute, ``..``
    removed), links not followed.
    """
    if value is None or value is np.ma.masked:
        return None
    text = str(value).strip()
    if not text or text.startswith("<") or "\x00" in text:
        return None
    text = re.sub(r"\[[^\]]*\]$", "", text)  # HDU suffix of load_image sources: file.fits[1]
    candidate = Path(os.path.expanduser(text))
    if candidate.is_absolute():
        tries = [candidate]
    else:
        bases = [Path(image_root)] if image_root is not None else []
        bases += [Path(index_dir), Path(index_dir).parent] if index_dir is not None else []
        tries = [b / candidate for b in bases] + [Path.cwd() / candidate]
    for p in tries:
        try:
            if p.is_file():
                return p.resolve() if resolve else Path(os.path.abspath(p))
        except OSError:
            continue
    return None
