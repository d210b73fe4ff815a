"""Open FITS files safely: header pre-scan, size checks, tolerance and the science HDU.

Every FITS file read by astrovl (:func:`~astrovl.load_image`, the CLIP input
pipeline and the napari reader) goes through :func:`open_fits`:

1. **Pre-scan.** The headers are parsed (no data is read) and every size they
   declare is checked against what the file holds: the data of each HDU
   (``BITPIX``, ``NAXISn``, ``PCOUNT``, ``GCOUNT``) must lie inside the file,
   and a tile-compressed image (``ZIMAGE``) must declare valid ``ZBITPIX``,
   ``ZNAXISn`` and ``ZTILEn``, as many tiles as its table has rows, and an image
   no more than :data:`MAX_COMPRESSION_RATIO` times larger than its compressed
   bytes. A file that fails is refused before any pixel buffer is allocated,
   so a forged header cannot make the process allocate memory out of
   proportion to the file.
2. **Tolerance.** Non-standard but fixable content (cards astropy fixes with a
   ``VerifyWarning``, a ``BLANK`` keyword on floating-point data, bytes after
   the last HDU...) does not stop the file from loading: astropy's warnings are
   gathered into one :class:`~astrovl.exceptions.ImageFileWarning` that names
   the file and says what was fixed or ignored.
3. **Clean failure.** Any error raised while the file is open and its data read
   becomes an :class:`~astrovl.exceptions.ImageFileError` naming the file.

:func:`science_candidates` and :func:`choose_science_hdu` give the HDU
:func:`~astrovl.load_image` uses when none is named: auxiliary planes
(:data:`AUXILIARY_EXTNAMES`) never compete, and two science images (for
example two ``SCI`` chips) are an ambiguity that asks for ``hdu=``.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import FITSFixedWarning

from ..exceptions import AstroVLError, ImageFileError, ImageFileWarning, ImageInputError

__all__ = [
    "AUXILIARY_EXTNAMES",
    "MAX_COMPRESSION_RATIO",
    "HDUExtent",
    "scan_fits",
    "open_fits",
    "science_candidates",
    "choose_science_hdu",
    "describe_hdus",
    "read_hdu_data",
]

#: Extension names of auxiliary planes and lookup tables: never chosen as the science image.
AUXILIARY_EXTNAMES = frozenset({
    # uncertainties, data quality, weights, exposure and context maps
    "ERR", "ERROR", "DQ", "WHT", "WEIGHT", "WGT", "VAR", "VARIANCE", "IVM", "RMS", "SIGMA",
    "MASK", "BPM", "FLAGS", "CTX", "CON", "EXP", "EXPMAP", "SAMP", "TIME", "AREA",
    "VAR_POISSON", "VAR_RNOISE", "VAR_FLAT",
    # distortion and lookup tables (HST)
    "WCSDVARR", "D2IMARR", "DNIMARR", "SIPTAB",
    # header and provenance tables
    "HDRTAB", "HDRLET", "ASDF",
})

#: A tile-compressed image may declare at most this many times its compressed bytes.
#: (Deflate cannot expand more than 1032-fold; Rice and PLIO stay well below this
#: on real data.) Images under :data:`_SMALL_IMAGE_BYTES` are not checked.
MAX_COMPRESSION_RATIO = 4096

_SMALL_IMAGE_BYTES = 64 * 2**20
_BITPIX = (8, 16, 32, 64, -32, -64)
_IMAGE_KINDS = (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)
_MAX_MESSAGES = 6


@dataclass(frozen=True)
class HDUExtent:
    """Where one HDU lies in a FITS file and how large its data is declared to be.

    Attributes
    ----------
    index : int
        Position of the HDU in the file.
    extname : str
        ``EXTNAME`` (``"PRIMARY"`` for the first HDU without one).
    data_offset : int
        Byte offset of the data (in the uncompressed stream for ``.gz`` files).
    data_bytes : int
        Bytes of data the header declares (without the final padding).
    image_bytes : int
        Bytes of the image once read (decompressed for tile-compressed HDUs).
    compressed : bool
        True for a tile-compressed image (``ZIMAGE = T``).
    """

    index: int
    extname: str
    data_offset: int
    data_bytes: int
    image_bytes: int
    compressed: bool


# --------------------------------------------------------------------------- pre-scan


def _stream_kind(path: Path) -> str | None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic[:3] == b"BZh":
        return "bzip2"
    if magic == b"PK\x03\x04":
        return "zip"
    return None


def _stream_size(path: Path, kind: str | None) -> int:
    """Bytes of the FITS stream: the file size, or the decompressed size (read through once)."""
    if kind is None:
        return path.stat().st_size
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if len(names) != 1:
                raise ImageFileError(
                    f"FITS file {str(path)!r} is a zip archive of {len(names)} files; astrovl "
                    "reads zip archives holding exactly one FITS file: unzip it first"
                )
            opener = zf.open(names[0])
            return _count_bytes(opener)
    opener = gzip.open(path, "rb") if kind == "gzip" else bz2.open(path, "rb")
    return _count_bytes(opener)


def _count_bytes(stream) -> int:
    total = 0
    with stream:
        while True:
            chunk = stream.read(2**22)
            if not chunk:
                return total
            total += len(chunk)


def _int_value(header, key: str, source: str, index: int, *, default=None, low=None, high=None,
               allowed=None) -> int:
    try:
        value = header.get(key, default)
    except Exception as exc:  # an unparsable card
        raise ImageFileError(
            f"FITS file {source!r}: HDU {index} has an unreadable {key} card ({exc}); the file "
            "is corrupt: download it again"
        ) from exc
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok:
        value = int(value)
        ok = (low is None or value >= low) and (high is None or value <= high) and (
            allowed is None or value in allowed)
    if not ok:
        what = "missing" if value is None else f"{value!r}"
        if allowed is not None:
            rule = f"one of {', '.join(str(a) for a in allowed)}"
        elif high is not None:
            rule = f"an integer from {low} to {high}"
        else:
            rule = f"an integer of at least {low}"
        raise ImageFileError(
            f"FITS file {source!r}: HDU {index} declares {key} = {what}, which must be {rule}; "
            "the header is corrupt: download the file again"
        )
    return value


def _declared_data_bytes(header, source: str, index: int) -> int:
    bitpix = _int_value(header, "BITPIX", source, index, allowed=_BITPIX)
    naxis = _int_value(header, "NAXIS", source, index, low=0, high=999)
    if naxis == 0:
        return 0
    axes = [_int_value(header, f"NAXIS{n}", source, index, low=0) for n in range(1, naxis + 1)]
    pcount = _int_value(header, "PCOUNT", source, index, default=0, low=0)
    gcount = _int_value(header, "GCOUNT", source, index, default=1, low=0)
    try:
        groups = bool(header.get("GROUPS", False)) and axes[0] == 0
    except Exception:
        groups = False
    if groups:
        axes = axes[1:]
    return abs(bitpix) // 8 * gcount * (pcount + math.prod(axes))


def _compressed_image_bytes(header, source: str, index: int, data_bytes: int) -> int:
    zbitpix = _int_value(header, "ZBITPIX", source, index, allowed=_BITPIX)
    znaxis = _int_value(header, "ZNAXIS", source, index, low=1, high=999)
    shape = [_int_value(header, f"ZNAXIS{n}", source, index, low=0) for n in range(1, znaxis + 1)]
    tiles = []
    for n, size in enumerate(shape, start=1):
        default = size if n == 1 else 1
        tiles.append(_int_value(header, f"ZTILE{n}", source, index, default=max(default, 1),
                                low=1))
    rows = _int_value(header, "NAXIS2", source, index, low=0)
    ntiles = math.prod(math.ceil(s / t) for s, t in zip(shape, tiles)) if all(shape) else 0
    if ntiles != rows:
        raise ImageFileError(
            f"FITS file {source!r}: tile-compressed HDU {index} declares an image of "
            f"{' x '.join(map(str, shape))} pixels in tiles of {' x '.join(map(str, tiles))} "
            f"({ntiles} tiles) but its table has {rows} rows; the header is corrupt: download "
            "the file again"
        )
    image_bytes = math.prod(shape) * abs(zbitpix) // 8
    tile_bytes = math.prod(min(s, t) for s, t in zip(shape, tiles)) * 8
    limit = max(_SMALL_IMAGE_BYTES, MAX_COMPRESSION_RATIO * data_bytes)
    if max(image_bytes, tile_bytes) > limit:
        raise ImageFileError(
            f"FITS file {source!r}: tile-compressed HDU {index} declares an image of "
            f"{' x '.join(map(str, shape))} pixels ({image_bytes:,} bytes) from {data_bytes:,} "
            f"bytes of compressed data, more than {MAX_COMPRESSION_RATIO} times as much; the "
            "header is corrupt or forged: download the file again"
        )
    return image_bytes


def scan_fits(path: str | os.PathLike) -> list[HDUExtent]:
    """Check the sizes every header of a FITS file declares against what the file holds.

    Only headers are parsed (with the tile compression left undone, so that the
    raw ``Z*`` keywords are seen); no data is read.

    Parameters
    ----------
    path : str or path-like
        A FITS file, optionally gzip-, bzip2- or zip-compressed.

    Returns
    -------
    list of HDUExtent
        One entry per HDU that astropy finds.

    Raises
    ------
    astrovl.exceptions.ImageFileError
        The file is not FITS, a size keyword is missing or invalid, an HDU's data
        runs past the end of the file, or a tile-compressed HDU's declared image
        does not match its table or is out of proportion to its compressed bytes.
    """
    path = Path(path)
    source = str(path)
    try:
        kind = _stream_kind(path)
        size = _stream_size(path, kind)
    except AstroVLError:
        raise
    except Exception as exc:
        raise ImageFileError(
            f"FITS file {source!r} could not be read ({type(exc).__name__}: {exc}); its "
            "compressed stream is damaged: download it again"
        ) from exc
    extents = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported when the file is opened for reading
        try:
            with open(path, "rb") as fh, fits.open(fh, memmap=False, lazy_load_hdus=False,
                                                   disable_image_compression=True) as hdul:
                for index, hdu in enumerate(hdul):
                    info = hdul.fileinfo(index)
                    header = hdu.header
                    data_bytes = _declared_data_bytes(header, source, index)
                    end = info["datLoc"] + data_bytes
                    if end > size:
                        raise ImageFileError(
                            f"FITS file {source!r} is truncated: HDU {index} declares "
                            f"{data_bytes:,} bytes of data ending at byte {end:,} but the file "
                            f"holds {size:,} bytes; download it again"
                        )
                    compressed = False
                    image_bytes = data_bytes
                    if isinstance(hdu, fits.BinTableHDU) and _is_true(header, "ZIMAGE"):
                        compressed = True
                        image_bytes = _compressed_image_bytes(header, source, index, data_bytes)
                    extents.append(HDUExtent(index, _extname(hdu), int(info["datLoc"]),
                                             data_bytes, image_bytes, compressed))
        except AstroVLError:
            raise
        except Exception as exc:
            raise _file_error(source, exc) from exc
    if not extents:
        raise ImageFileError(f"FITS file {source!r} holds no HDU; it is empty or not FITS")
    return extents


def _is_true(header, key: str) -> bool:
    try:
        return header.get(key, False) is True
    except Exception:
        return False


def _extname(hdu) -> str:
    try:
        return str(hdu.name)
    except Exception:
        return "?"


def _file_error(source: str, exc: BaseException) -> ImageFileError:
    if isinstance(exc, MemoryError):
        return ImageFileError(
            f"FITS file {source!r} could not be read: not enough memory for its data "
            "(MemoryError); choose a smaller HDU or free memory"
        )
    return ImageFileError(
        f"FITS file {source!r} could not be read ({type(exc).__name__}: {exc}); it may be "
        "truncated or corrupt: download it again"
    )


# --------------------------------------------------------------------------- opening


@contextmanager
def open_fits(path: str | os.PathLike, *, memmap: bool = False) -> Iterator[fits.HDUList]:
    """Open a FITS file for reading after :func:`scan_fits` has checked it.

    Use as a context manager; read the data inside the ``with`` block. Any
    error raised inside the block that is not already an astrovl error becomes
    an :class:`~astrovl.exceptions.ImageFileError` naming the file. Astropy's
    warnings about fixed or ignored content are gathered into one
    :class:`~astrovl.exceptions.ImageFileWarning` when the block ends (a
    warning that the file is truncated is an error instead).

    Parameters
    ----------
    path : str or path-like
        The FITS file.
    memmap : bool, optional
        Passed to :func:`astropy.io.fits.open`.

    Yields
    ------
    astropy.io.fits.HDUList
        Headers parsed and verified with ``"fix+warn"``; data not yet read.

    Raises
    ------
    astrovl.exceptions.ImageFileError
        See :func:`scan_fits`; also any failure to parse the file or read its data.
    """
    path = Path(path)
    source = str(path)
    scan_fits(path)
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with open(path, "rb") as fh, fits.open(fh, memmap=memmap,
                                                   lazy_load_hdus=False) as hdul:
                for hdu in hdul:
                    _fix_if_unparsable(hdu)
                yield hdul
    except AstroVLError:
        raise
    except Exception as exc:
        raise _file_error(source, exc) from exc
    _report_fixes(source, caught)


_KEYS_READ = ("BITPIX", "NAXIS", "EXTNAME", "EXTVER", "BSCALE", "BZERO", "BLANK", "BUNIT")


def _fix_if_unparsable(hdu) -> None:
    """Let astropy fix (with a warning) the header of ``hdu`` if a card astrovl reads is unparsable."""
    header = hdu.header
    try:
        keys = list(_KEYS_READ) + [f"NAXIS{n}" for n in range(1, int(header.get("NAXIS", 0)) + 1)]
        for key in keys:
            header.get(key)
    except fits.VerifyError:
        hdu.verify("fix+warn")
    except Exception:
        pass  # reported when the HDU is used


def _is_noise(text: str) -> bool:
    return text.endswith(":") or text.startswith("Note: astropy.io.fits uses zero-based")


def _report_fixes(source: str, caught: list[warnings.WarningMessage]) -> None:
    fixes: list[str] = []
    for w in caught:
        category = w.category
        if issubclass(category, FITSFixedWarning):
            continue  # WCS keyword fixes: astropy.wcs reports them when the WCS is built
        if issubclass(category, AstropyWarning):
            text = " ".join(str(w.message).split())
            if "truncated" in text.lower():
                raise ImageFileError(
                    f"FITS file {source!r} is truncated ({text}); download it again")
            if text and not _is_noise(text) and text not in fixes:
                fixes.append(text)
        else:
            warnings.warn_explicit(w.message, category, w.filename, w.lineno)
    if fixes:
        shown = fixes[:_MAX_MESSAGES]
        more = f" (and {len(fixes) - len(shown)} more)" if len(fixes) > len(shown) else ""
        warnings.warn(
            f"FITS file {source!r} is not standard; it was read after astropy fixed or ignored: "
            + "; ".join(shown) + more,
            ImageFileWarning, stacklevel=4,
        )


def read_hdu_data(hdu, source: str) -> np.ndarray | None:
    """The data of an image HDU, with any failure raised as an astrovl error naming ``source``.

    Parameters
    ----------
    hdu : PrimaryHDU, ImageHDU or CompImageHDU
    source : str
        What the HDU came from, for messages.

    Returns
    -------
    numpy.ndarray or None

    Raises
    ------
    astrovl.exceptions.ImageFileError
        The data cannot be read or decompressed.
    """
    try:
        return hdu.data
    except AstroVLError:
        raise
    except Exception as exc:
        raise ImageFileError(
            f"{source}: the data of HDU {_extname(hdu)!r} could not be read "
            f"({type(exc).__name__}: {exc}); the file is corrupt: download it again"
        ) from exc


# --------------------------------------------------------------------------- the science HDU


def _shape(hdu) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in (hdu.shape or ()))
    except Exception:
        return ()


def science_candidates(hdul: fits.HDUList) -> list[int]:
    """Indices of the HDUs that may hold the science image.

    An HDU is a candidate when it is an image HDU with data of two or more
    non-empty dimensions and its ``EXTNAME`` is not one of
    :data:`AUXILIARY_EXTNAMES`.
    """
    out = []
    for i, h in enumerate(hdul):
        if not isinstance(h, _IMAGE_KINDS):
            continue
        shape = _shape(h)
        if len(shape) >= 2 and all(s > 0 for s in shape) and \
                _extname(h).upper() not in AUXILIARY_EXTNAMES:
            out.append(i)
    return out


def describe_hdus(hdul: fits.HDUList) -> str:
    """A one-line list of the HDUs of ``hdul`` (index, name, version, type, shape)."""
    parts = []
    for i, h in enumerate(hdul):
        if isinstance(h, (fits.BinTableHDU, fits.TableHDU)):
            try:
                rows = h.header.get("NAXIS2", 0)
            except Exception:
                rows = "?"
            what = f"table of {rows} rows"
        else:
            shape = _shape(h)
            what = str(shape) if shape else "no data"
        try:
            ver = int(h.ver)
        except Exception:
            ver = 1
        label = f"{_extname(h)!r}" if ver == 1 else f"({_extname(h)!r}, {ver})"
        parts.append(f"[{i}] {label} {type(h).__name__} {what}")
    return "; ".join(parts)


def choose_science_hdu(hdul: fits.HDUList, source: str) -> int:
    """The index of the science image of ``hdul``, or an error asking for ``hdu=``.

    Rules: auxiliary HDUs (:data:`AUXILIARY_EXTNAMES`) never compete; of the
    remaining image HDUs, a single one named ``SCI`` wins; otherwise there must
    be exactly one candidate. Several ``SCI`` HDUs (HST chips) are ambiguous.

    Raises
    ------
    astrovl.exceptions.ImageInputError
        No candidate, or several.
    """
    candidates = science_candidates(hdul)
    if not candidates:
        aux = [i for i, h in enumerate(hdul)
               if isinstance(h, _IMAGE_KINDS) and len(_shape(h)) >= 2
               and all(s > 0 for s in _shape(h))]
        if aux:
            raise ImageInputError(
                f"{source}: no HDU holds 2-D science image data, only auxiliary planes (HDUs: "
                f"{describe_hdus(hdul)}); to load one, name it with hdu= (an index or an EXTNAME)"
            )
        raise ImageInputError(
            f"{source}: no HDU holds 2-D image data (HDUs: {describe_hdus(hdul)}); pass a file "
            "with an image or choose one with hdu="
        )
    sci = [i for i in candidates if _extname(hdul[i]).upper() == "SCI"]
    if len(sci) == 1:
        return sci[0]
    if len(sci) > 1:
        versions = ", ".join(f"hdu=('SCI', {int(hdul[i].ver)})" for i in sci)
        raise ImageInputError(
            f"{source}: {len(sci)} SCI images (one per detector chip) could be the science "
            f"image; choose one with {versions} (or an index); HDUs: {describe_hdus(hdul)}"
        )
    if len(candidates) == 1:
        return candidates[0]
    raise ImageInputError(
        f"{source}: {len(candidates)} image HDUs could hold the science image "
        f"({describe_hdus(hdul)}); choose one with hdu= (an index or an EXTNAME)"
    )
