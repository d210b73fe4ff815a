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


def _open_stream(path: Path, kind: str | None):
    """A binary stream of the FITS bytes (decompressed when the file is compressed)."""
    if kind is None:
        return open(path, "rb")
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bzip2":
        return bz2.open(path, "rb")
    zf = zipfile.ZipFile(path)
    names = zf.namelist()
    if len(names) != 1:
        zf.close()
        raise ImageFileError(
            f"FITS file {str(path)!r} is a zip archive of {len(names)} files; astrovl reads zip "
            "archives holding exactly one FITS file: unzip it first"
        )
    return zf.open(names[0])


_BLOCK = 2880
_END = b"END"


def _read_header(stream) -> tuple[dict[str, str], int] | None:
    """Cards of the next header as ``{keyword: raw value}`` (first occurrence) and its length.

    None at the end of the stream; raises ``EOFError`` when it ends inside the header.
    """
    cards: dict[str, str] = {}
    length = 0
    while True:
        block = stream.read(_BLOCK)
        if not block:
            if length == 0:
                return None
            raise EOFError("the stream ends inside a header (no END card)")
        if len(block) < _BLOCK:
            raise EOFError("the stream ends inside a header block")
        length += _BLOCK
        for pos in range(0, _BLOCK, 80):
            card = block[pos:pos + 80]
            key = card[:8].rstrip().decode("ascii", "replace")
            if card[:3] == _END and not card[3:8].strip():
                return cards, length
            if key and card[8:10] == b"= " and key not in cards:
                cards[key] = card[10:].decode("ascii", "replace")


def _raw_int(cards: dict[str, str], key: str):
    """The integer value of ``key``, None when missing, or the raw text when not an integer."""
    text = cards.get(key)
    if text is None:
        return None
    value = text.split("/", 1)[0].strip()
    try:
        return int(value) if value.lstrip("+-").isdigit() else value
    except ValueError:
        return value


def _raw_true(cards: dict[str, str], key: str) -> bool:
    text = cards.get(key)
    return text is not None and text.split("/", 1)[0].strip() == "T"


def _int_value(cards, key: str, source: str, index: int, *, default=None, low=None, high=None,
               allowed=None) -> int:
    value = _raw_int(cards, key)
    if value is None:
        value = default
    ok = isinstance(value, int)
    if ok:
        ok = (low is None or value >= low) and (high is None or value <= high) and (
            allowed is None or value in allowed)
    if not ok:
        what = "nothing (missing)" if value is None else repr(value)
        if allowed is not None:
            rule = f"one of {', '.join(str(a) for a in allowed)}"
        elif high is not None:
            rule = f"an integer from {low} to {high}"
        else:
            rule = f"an integer of at least {low}"
        raise _refuse(source, f"HDU {index} declares {key} = {what}, which must be {rule}")
    return value


def _declared_data_bytes(cards, source: str, index: int) -> int:
    bitpix = _int_value(cards, "BITPIX", source, index, allowed=_BITPIX)
    naxis = _int_value(cards, "NAXIS", source, index, low=0, high=999)
    if naxis == 0:
        return 0
    axes = [_int_value(cards, f"NAXIS{n}", source, index, low=0) for n in range(1, naxis + 1)]
    pcount = _int_value(cards, "PCOUNT", source, index, default=0, low=0)
    gcount = _int_value(cards, "GCOUNT", source, index, default=1, low=0)
    if "TFIELDS" in cards:
        _int_value(cards, "TFIELDS", source, index, low=0, high=999)
    if _raw_true(cards, "GROUPS") and axes[0] == 0:
        axes = axes[1:]
    return abs(bitpix) // 8 * gcount * (pcount + math.prod(axes))


def _compressed_image_bytes(cards, source: str, index: int, data_bytes: int) -> int:
    zbitpix = _int_value(cards, "ZBITPIX", source, index, allowed=_BITPIX)
    znaxis = _int_value(cards, "ZNAXIS", source, index, low=1, high=999)
    shape = [_int_value(cards, f"ZNAXIS{n}", source, index, low=0) for n in range(1, znaxis + 1)]
    tiles = []
    for n, size in enumerate(shape, start=1):
        default = size if n == 1 else 1
        tiles.append(_int_value(cards, f"ZTILE{n}", source, index, default=max(default, 1),
                                low=1))
    rows = _int_value(cards, "NAXIS2", source, index, low=0)
    ntiles = math.prod(math.ceil(s / t) for s, t in zip(shape, tiles)) if all(shape) else 0
    if ntiles != rows:
        raise _refuse(source, f"tile-compressed HDU {index} declares an image of "
                      f"{' x '.join(map(str, shape))} pixels in tiles of "
                      f"{' x '.join(map(str, tiles))} ({ntiles} tiles) but its table has "
                      f"{rows} rows")
    image_bytes = math.prod(shape) * abs(zbitpix) // 8
    tile_bytes = math.prod(tiles) * 8
    limit = max(_SMALL_IMAGE_BYTES, MAX_COMPRESSION_RATIO * data_bytes)
    if max(image_bytes, tile_bytes) > limit:
        raise _refuse(source, f"tile-compressed HDU {index} declares an image of "
                      f"{' x '.join(map(str, shape))} pixels in tiles of "
                      f"{' x '.join(map(str, tiles))} from {data_bytes:,} bytes of compressed "
                      f"data, more than {MAX_COMPRESSION_RATIO} times as much (a forged or "
                      "damaged header)")
    return image_bytes


def _skip(stream, nbytes: int, plain_size: int | None) -> int:
    """Move ``nbytes`` forward; return how many bytes were actually there."""
    if nbytes <= 0:
        return 0
    if plain_size is not None:
        here = stream.tell()
        available = max(0, min(nbytes, plain_size - here))
        stream.seek(here + available)
        return available
    done = 0
    while done < nbytes:
        chunk = stream.read(min(2**22, nbytes - done))
        if not chunk:
            break
        done += len(chunk)
    return done


def scan_fits(path: str | os.PathLike) -> list[HDUExtent]:
    """Check the sizes every header of a FITS file declares against what the file holds.

    The headers are walked block by block without astropy and without reading
    any data (compressed files are decompressed as a stream, in constant
    memory). HDU 0 must start with ``SIMPLE``; the walk stops, as astropy's does,
    at bytes after the last HDU that do not start an extension.

    Parameters
    ----------
    path : str or path-like
        A FITS file, optionally gzip-, bzip2- or zip-compressed.

    Returns
    -------
    list of HDUExtent
        One entry per HDU.

    Raises
    ------
    astrovl.exceptions.ImageFileError
        The file is not FITS, a size keyword (``BITPIX``, ``NAXIS``, ``NAXISn``,
        ``PCOUNT``, ``GCOUNT``, ``ZBITPIX``, ``ZNAXIS``, ``ZNAXISn``, ``ZTILEn``)
        is missing or invalid, an HDU's data runs past the end of the file, or a
        tile-compressed HDU's declared image does not match its table or is out
        of proportion to its compressed bytes.
    """
    path = Path(path)
    source = str(path)
    extents: list[HDUExtent] = []
    try:
        kind = _stream_kind(path)
        plain_size = path.stat().st_size if kind is None else None
        with _open_stream(path, kind) as stream:
            offset = 0
            while True:
                index = len(extents)
                try:
                    got = _read_header(stream)
                except EOFError:
                    if index == 0:
                        raise _refuse(source, "its first header has no END card (not FITS, "
                                      "or cut short)") from None
                    break  # bytes after the last HDU: astropy ignores them with a warning
                if got is None:
                    break
                cards, header_len = got
                first = "SIMPLE" if index == 0 else "XTENSION"
                if first not in cards:
                    if index == 0:
                        raise _refuse(source, "it does not start with a SIMPLE card (not FITS)")
                    break
                data_offset = offset + header_len
                data_bytes = _declared_data_bytes(cards, source, index)
                compressed = _raw_true(cards, "ZIMAGE") and "BINTABLE" in cards.get("XTENSION", "")
                image_bytes = data_bytes
                if compressed:
                    image_bytes = _compressed_image_bytes(cards, source, index, data_bytes)
                padded = -(-data_bytes // _BLOCK) * _BLOCK
                there = _skip(stream, padded, plain_size)
                if there < data_bytes:
                    raise _refuse(source, f"HDU {index} declares {data_bytes:,} bytes of data "
                                  f"from byte {data_offset:,} but the file holds only "
                                  f"{there:,} of them")
                name = cards.get("EXTNAME", "'PRIMARY'" if index == 0 else "''")
                extname = name.split("/", 1)[0].strip().strip("'").strip()
                extents.append(HDUExtent(index, extname, data_offset, data_bytes, image_bytes,
                                         compressed))
                offset = data_offset + there
                if there < padded:
                    break  # the last HDU, without its final padding
    except AstroVLError:
        raise
    except Exception as exc:
        raise _refuse(source, f"{type(exc).__name__}: {exc}") from exc
    return extents


def _extname(hdu) -> str:
    try:
        return str(hdu.name)
    except Exception:
        return "?"


def _refuse(source: str, reason: str) -> ImageFileError:
    return ImageFileError(
        f"FITS file {source!r} could not be read: {reason}; the file is truncated or corrupt: "
        "download it again"
    )


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
    """Let astropy fix (with a warning) the cards astrovl reads that it cannot parse."""
    header = hdu.header
    try:
        naxis = header.get("NAXIS", 0)
        keys = list(_KEYS_READ) + [f"NAXIS{n}" for n in range(1, int(naxis) + 1)]
    except Exception:
        return  # reported when the HDU is used
    for key in keys:
        try:
            header.get(key)
        except fits.VerifyError:
            try:
                header.cards[key].verify("fix+warn")
            except Exception:
                pass  # unfixable: reported when the HDU is used
        except Exception:
            pass


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
                raise _refuse(source, text)
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
                f"{describe_hdus(hdul)}); to load one, name it with hdu= (an index or an EXTNAME)",
                options=("hdu",),
            )
        raise ImageInputError(
            f"{source}: no HDU holds 2-D image data (HDUs: {describe_hdus(hdul)}); pass a file "
            "with an image or choose one with hdu=",
            options=("hdu",),
        )
    sci = [i for i in candidates if _extname(hdul[i]).upper() == "SCI"]
    if len(sci) == 1:
        return sci[0]
    if len(sci) > 1:
        versions = ", ".join(f"hdu=('SCI', {int(hdul[i].ver)})" for i in sci)
        raise ImageInputError(
            f"{source}: {len(sci)} SCI images (one per detector chip) could be the science "
            f"image; choose one with {versions} (or an index); HDUs: {describe_hdus(hdul)}",
            options=("hdu",),
        )
    if len(candidates) == 1:
        return candidates[0]
    raise ImageInputError(
        f"{source}: {len(candidates)} image HDUs could hold the science image "
        f"({describe_hdus(hdul)}); choose one with hdu= (an index or an EXTNAME)",
        options=("hdu",),
    )
