"""Reading an image that a web client uploaded: size limits, then :func:`astrovl.load_image`."""

from __future__ import annotations

import gzip
import re
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

from ..exceptions import QueryError
from ..imaging.inputs import IMAGE_SUFFIXES
from .defaults import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_UPLOAD_BYTES

__all__ = ["read_upload", "check_image_size", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MAX_IMAGE_PIXELS",
           "DECODED_FACTOR", "MAX_HDUS"]

#: an upload may decode (gunzip, tile decompression, picture decoding) to at most this many
#: times the upload limit; larger ones are refused before their pixels are read
DECODED_FACTOR = 8
#: FITS uploads with more HDUs than this are refused (each header is parsed)
MAX_HDUS = 256
_CHUNK = 1 << 20


def _suffix(filename: str) -> str:
    """The known image suffix of a client's file name ('' when none): never a path."""
    name = (filename or "").lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ".gz" if name.endswith(".gz") else ""


def _display_name(filename: str) -> str:
    """A short, printable version of a client's file name for messages."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:120]
    return base or "upload"


def read_upload(stream: BinaryIO, filename: str = "", *,
                max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """Read an uploaded image (FITS or picture) into an :class:`~astrovl.AstroImage`.

    The bytes are copied into a private temporary file named only by the
    upload's suffix (the client's file name is never used as a path), checked
    against the size limits, and read by :func:`astrovl.load_image` with its
    usual rules. The temporary file is removed afterwards.

    Parameters
    ----------
    stream : binary file object
        The uploaded bytes.
    filename : str
        The client's file name; only its suffix (``.fits``, ``.fits.gz``,
        ``.png``...) is used, to pick the reader.
    max_bytes : int
        Largest accepted upload. Decoded data (gunzipped files, tile-compressed
        FITS, pictures) may be at most :data:`DECODED_FACTOR` times larger.
    max_pixels : int
        Largest image (width x height) decoded; read from the picture's or the
        FITS header's declared size before any pixel is decoded.

    Returns
    -------
    AstroImage

    Raises
    ------
    QueryError
        413 for an upload or decoded image over the limits, 400 for an empty or
        unreadable upload.
    """
    from ..imaging import load_image

    shown = _display_name(filename)
    suffix = _suffix(filename)
    max_decoded = DECODED_FACTOR * int(max_bytes)
    with tempfile.TemporaryDirectory(prefix="astrovl-upload-") as tmp:
        raw = Path(tmp) / f"upload{suffix}"
        size = _copy_capped(stream, raw, max_bytes, f"the uploaded file {shown!r} is larger than the "
                            f"limit of {max_bytes / 2**20:.0f} MB")
        if size == 0:
            raise QueryError(f"the uploaded file {shown!r} is empty; choose a FITS file or a picture")
        path = _gunzip_if_needed(raw, max_decoded, shown)
        check_image_size(path, shown, max_pixels=max_pixels, max_bytes=max_decoded)
        try:
            image = load_image(path)
        except MemoryError as exc:
            raise QueryError(f"the uploaded image {shown!r} is too large to read", status=413) from exc
        except Exception as exc:  # anything a client sends that does not read is the client's error
            message = str(exc).replace(str(path), shown).replace(str(raw), shown).replace(tmp, "")
            raise QueryError(f"the uploaded file {shown!r} could not be read as an image: {message}") from exc
    image.source = shown
    return image


def _copy_capped(src: BinaryIO, target: Path, limit: int, too_large: str) -> int:
    """Copy ``src`` into ``target``; a 413 QueryError saying ``too_large`` past ``limit`` bytes."""
    size = 0
    with open(target, "wb") as out:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                return size
            size += len(chunk)
            if size > limit:
                raise QueryError(too_large, status=413)
            out.write(chunk)


def _gunzip_if_needed(path: Path, max_decoded: int, shown: str) -> Path:
    """Decompress a gzip upload into a sibling file, at most ``max_decoded`` bytes."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            return path
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    target = path.with_name("decoded-" + name)
    try:
        with gzip.open(path, "rb") as src:
            _copy_capped(src, target, max_decoded, f"the uploaded file {shown!r} decompresses to more "
                         f"than the limit of {max_decoded / 2**20:.0f} MB; it is refused")
    except (OSError, EOFError, zlib.error) as exc:
        raise QueryError(f"the uploaded file {shown!r} is not a valid gzip file ({exc})") from exc
    return target


def check_image_size(path: Path, shown: str, *, max_pixels: int, max_bytes: int | None = None,
                     check_fits: bool = True) -> None:
    """Refuse an image whose headers declare more than ``max_pixels`` pixels or ``max_bytes`` of data.

    Only headers are read: a picture's size from :func:`PIL.Image.open` (which
    reads the PNG ``IHDR``, the JPEG ``SOF``... and decodes nothing), a FITS
    file's ``NAXISn`` and ``BITPIX`` of every image HDU.

    Parameters
    ----------
    path : path
        The file (already decompressed when it was gzipped).
    shown : str
        Its name in messages.
    max_pixels : int
        Most pixels of one image plane (width x height).
    max_bytes : int, optional
        Most bytes of data one HDU or picture may declare.
    check_fits : bool
        Also check FITS files (their pixels are otherwise read in strips, so that
        a large FITS file never sits whole in memory).

    Raises
    ------
    QueryError
        413 naming the declared size and the limit.
    """
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head == b"SIMPLE":
        if not check_fits:
            return
        pixels, declared = _fits_declared_size(path, shown)
    else:
        pixels, declared = _picture_declared_size(path, shown)
    if pixels is not None and pixels > max_pixels:
        raise QueryError(
            f"the image {shown!r} declares {pixels / 1e6:.1f} million pixels, more than the limit of "
            f"{max_pixels / 1e6:g} million; it is not decoded (send a smaller image)", status=413)
    if max_bytes is not None and declared is not None and declared > max_bytes:
        raise QueryError(
            f"the image {shown!r} declares {declared / 2**20:.0f} MB of pixels, more than "
            f"the limit of {max_bytes / 2**20:.0f} MB", status=413)


def _fits_declared_size(path: Path, shown: str) -> tuple[int | None, int | None]:
    """Largest plane (pixels) and data size (bytes) that any image HDU declares (None: unreadable)."""
    from astropy.io import fits

    largest_plane = largest = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                for i, hdu in enumerate(hdul):
                    if i >= MAX_HDUS:
                        raise QueryError(f"the FITS file {shown!r} has more than {MAX_HDUS} HDUs; "
                                         "send the image HDU alone", status=413)
                    if not hdu.is_image:
                        continue
                    header = hdu.header
                    axes = [max(0, int(header.get(f"NAXIS{a}", 0)))
                            for a in range(1, int(header.get("NAXIS", 0)) + 1)]
                    if not axes:
                        continue
                    n = abs(int(header.get("BITPIX", 8))) // 8
                    for size in axes:
                        n *= size
                    largest = max(largest, n)
                    largest_plane = max(largest_plane, axes[0] * (axes[1] if len(axes) > 1 else 1))
    except QueryError:
        raise
    except Exception:  # load_image gives the real error for a broken file
        return None, None
    return largest_plane, largest


def _picture_declared_size(path: Path, shown: str) -> tuple[int | None, int | None]:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                return int(w) * int(h), int(w) * int(h) * max(1, len(im.getbands())) * 4
    except Image.DecompressionBombError as exc:  # Pillow's own limit (2 x MAX_IMAGE_PIXELS)
        raise QueryError(f"the image {shown!r} is too large to decode ({exc})", status=413) from None
    except Exception:
        return None, None
