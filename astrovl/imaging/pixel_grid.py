"""Coarser pixel grids: block means read in strips, and the WCS of a resampled grid.

Images with more than ``max_pixels`` pixels are block-averaged by an integer
factor before scaling (see :func:`~astrovl.load_image`). This module does that
without full-size copies:

* :func:`block_mean` reduces any array, or any reader of row strips, a strip of
  rows at a time: only one strip is ever converted to float64 (the working
  buffer is at most about :data:`STRIP_VALUES` values), the output is float32.
* :func:`read_hdu_reduced` reads a FITS image HDU through astropy's
  ``hdu.section`` (so the full data array is never loaded) and reduces it. For
  uncompressed files only the strip being reduced is read; for tile-compressed
  files (``CompImageHDU``) astropy decompresses only the tiles the strip
  touches; strips are aligned with the rows of tiles, and tiles taller than a
  strip are decompressed once per row of tiles (:class:`TileRowCache`), which
  then needs memory for a row of tiles. A file compressed as a single tile is
  thus decompressed once, as a whole, and needs memory for the whole image (in
  its own integer or float type, no float64 copy). Whole-file compressed
  files (``.fits.gz``, also bzip2 and xz) cannot be read in strips at a
  reasonable cost (every section read decompresses the stream from its
  start), so their data are read at once, as astropy returns them (with
  ``BSCALE``/``BZERO`` applied), and then reduced in strips: they need memory
  for the decompressed data but for no float copy of it.
* :func:`downsample_wcs` gives the WCS of the block-averaged grid, for
  ``PC``/``CDELT`` and ``CD``-matrix headers, with SIP coefficients and
  distortion lookup tables rescaled to the coarser pixels.
* :func:`header_with_wcs` writes a WCS into a copy of a header after removing
  every WCS keyword of the old grid (no stale ``CD``/``PC``/SIP keys).

Block means follow the astropy convention of
:func:`astropy.nddata.block_reduce`: rows and columns left over at the far
edges are dropped, and output pixel ``(i, j)`` is the mean of input pixels
``[i*k:(i+1)*k, j*k:(j+1)*k]``; its centre is at input pixel
``(i*k + (k-1)/2, j*k + (k-1)/2)``. Non-finite (NaN, inf) and masked values are
left out of the mean; a block with no valid value is NaN (and masked when all
its values are masked). Sums are accumulated in float64, so the result equals
a float64 reference block mean rounded to float32.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "STRIP_VALUES",
    "reduction_factor",
    "block_mean",
    "read_hdu_reduced",
    "TileRowCache",
    "downsample_wcs",
    "header_with_wcs",
    "strip_wcs_keywords",
]

#: Values per strip read and reduced at once (a float64 strip is then 8 MiB at most,
#: unless one row of blocks is larger than that).
STRIP_VALUES = 1 << 20


def reduction_factor(height: int, width: int, max_pixels: int) -> int:
    """The integer block size that brings an ``height x width`` image to at most ``max_pixels``.

    1 when the image is small enough; never more than the shorter side (at least
    one output pixel is kept).
    """
    npix = int(height) * int(width)
    if npix <= max_pixels:
        return 1
    factor = int(math.ceil(math.sqrt(npix / max_pixels)))
    while (height // factor) * (width // factor) > max_pixels:  # float rounding of the root
        factor += 1
    return max(1, min(factor, int(height), int(width)))


def _strip_blocks(factor: int, width: int, trailing: int, align: int = 1) -> int:
    """Rows of blocks per strip: about STRIP_VALUES values, a multiple of ``align`` rows if cheap."""
    per_block_row = max(1, factor * width * trailing)
    blocks = max(1, STRIP_VALUES // per_block_row)
    if align > 1:
        step = align // math.gcd(align, factor)  # block rows per aligned unit
        if step <= blocks:
            blocks = (blocks // step) * step
    return blocks


def block_mean(source: Any, factor: int, *, mask: np.ndarray | None = None,
               shape: tuple[int, ...] | None = None,
               align_rows: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """NaN-aware block mean of a 2-D ``(H, W)`` or ``(H, W, C)`` image, a strip at a time.

    Parameters
    ----------
    source : numpy.ndarray or callable
        The image (any numeric dtype or byte order; a ``numpy.memmap`` is read
        strip by strip), or a callable ``read(y0, y1)`` returning rows
        ``y0:y1`` as an array (then ``shape`` is required).
    factor : int
        Block size along both image axes (1 returns a float32 copy).
    mask : numpy.ndarray, optional
        Boolean ``(H, W)`` array, True for pixels to leave out.
    shape : tuple of int, optional
        Shape of the image when ``source`` is a callable.
    align_rows : int
        Make strips a multiple of this many rows where that keeps them small
        (the tile height of a tile-compressed image).

    Returns
    -------
    reduced : numpy.ndarray
        float32 array of shape ``(H // factor, W // factor[, C])``; NaN for
        blocks without any finite, unmasked value.
    reduced_mask : numpy.ndarray or None
        Boolean ``(H // factor, W // factor)``, True where every pixel of the
        block was masked; None when ``mask`` is None.
    """
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor={factor!r} must be a positive integer")
    if callable(source):
        if shape is None:
            raise ValueError("shape= is required when source is a reader callable")
        read: Callable[[int, int], Any] = source
    else:
        arr = source
        shape = tuple(arr.shape)

        def read(y0: int, y1: int):
            return arr[y0:y1]
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"block_mean needs a (H, W) or (H, W, C) image, not shape {shape}")
    height, width = shape[:2]
    rest = shape[2:]
    trailing = int(np.prod(rest)) if rest else 1
    out_h, out_w = height // factor, width // factor
    out = np.empty((out_h, out_w) + rest, dtype=np.float32)
    out_mask = None if mask is None else np.empty((out_h, out_w), dtype=bool)
    if mask is not None and tuple(np.shape(mask)) != (height, width):
        raise ValueError(f"mask shape {np.shape(mask)} does not match image shape {(height, width)}")
    blocks = _strip_blocks(factor, width, trailing, align_rows)
    used_w = out_w * factor
    for b0 in range(0, out_h, blocks):
        b1 = min(out_h, b0 + blocks)
        y0, y1 = b0 * factor, b1 * factor
        strip = np.asarray(read(y0, y1))[:, :used_w]
        if strip.shape[:2] != (y1 - y0, used_w):
            raise ValueError(f"rows {y0}:{y1} read with shape {strip.shape}, expected "
                             f"{(y1 - y0, used_w)} rows and columns")
        values = np.asarray(strip, dtype=np.float64)  # one strip only
        valid = np.isfinite(values)
        strip_mask = None
        if mask is not None:
            strip_mask = np.asarray(mask[y0:y1, :used_w], dtype=bool)
            valid &= ~(strip_mask[..., None] if rest else strip_mask)
        if not valid.all():
            if values is strip:  # float64 input: never write into the caller's array
                values = values.copy()
            values[~valid] = 0.0
        nb = b1 - b0
        sums = values.reshape((nb, factor, used_w) + rest).sum(axis=1)
        sums = sums.reshape((nb, out_w, factor) + rest).sum(axis=2)
        counts = valid.reshape((nb, factor, used_w) + rest).sum(axis=1, dtype=np.int64)
        counts = counts.reshape((nb, out_w, factor) + rest).sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[b0:b1] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        if out_mask is not None:
            masked = strip_mask.reshape(nb, factor, used_w).sum(axis=1, dtype=np.int64)
            masked = masked.reshape(nb, out_w, factor).sum(axis=2)
            out_mask[b0:b1] = masked == factor * factor
    return out, out_mask


def _tile_rows(hdu) -> int:
    """Tile height of a tile-compressed HDU (rows per tile), 1 otherwise."""
    from astropy.io import fits

    if not isinstance(hdu, fits.CompImageHDU):
        return 1
    tile_shape = getattr(hdu, "tile_shape", None)  # numpy order: (..., rows, columns)
    try:
        return max(1, int(tile_shape[-2]))
    except (TypeError, ValueError, IndexError):
        return 1


def read_hdu_reduced(hdu, max_pixels: int, plane: int | None = None
                     ) -> tuple[np.ndarray, int, tuple[int, int]] | None:
    """Read a FITS image HDU block-averaged to at most ``max_pixels`` pixels per plane.

    The data are read through ``hdu.section`` a strip of rows at a time (see the
    module documentation), so the full array is never held in memory. Only the
    planes :func:`~astrovl.load_image` will use are read: the chosen ``plane`` of
    a cube, or every plane of a one- or three-plane cube (shown as colour).

    Parameters
    ----------
    hdu : astropy.io.fits.PrimaryHDU, ImageHDU or CompImageHDU
    max_pixels : int
        Largest number of pixels per plane.
    plane : int, optional
        Plane of a cube (axis 0 in numpy order), as in ``load_image``.

    Returns
    -------
    tuple of (numpy.ndarray, int, (int, int)) or None
        None when a plane has at most ``max_pixels`` pixels (read the HDU as
        usual), else ``(array, factor, (H, W))``: the float32 reduced array with
        the leading axes of the HDU (a chosen plane gives a 2-D array), the block
        size, and the full plane shape. When the choice of planes is invalid (a
        cube of several planes without ``plane``, ``plane`` out of range, more
        than 4 axes) the array is a placeholder of the HDU's shape that takes no
        memory, so that ``load_image`` raises its usual error without reading any
        pixel.
    """
    shape = tuple(int(s) for s in (hdu.shape or ()))
    if len(shape) < 2:
        return None
    height, width = shape[-2:]
    factor = reduction_factor(height, width, max_pixels)
    if factor <= 1:
        return None
    lead = shape[:-2]
    prefix: tuple[int, ...] = ()
    if len(lead) == 2 and lead[0] == 1:
        prefix, lead = (0,), lead[1:]
    if len(lead) > 1:
        return _placeholder(hdu, shape), factor, (height, width)
    if not lead:
        picks, out_lead = [()], ()
    else:
        n = lead[0]
        if plane is not None:
            if not -n <= plane < n:
                return _placeholder(hdu, shape), factor, (height, width)
            picks, out_lead = [prefix + (plane % n,)], None
        elif n in (1, 3):
            picks, out_lead = [prefix + (i,) for i in range(n)], shape[:-2]
        else:
            return _placeholder(hdu, shape), factor, (height, width)
    # pixels already in memory (an HDU whose .data was read) are used as they are: the
    # section of an HDU read with memmap=False from a file that is now closed cannot read.
    # A whole-file compressed stream (.fits.gz, .bz2, .xz) is read at once: astropy's
    # section seeks back after every read, which restarts the decompression each strip.
    stream = getattr(getattr(hdu, "_file", None), "compression", None) is not None
    section = hdu.data if stream or getattr(hdu, "_data_loaded", False) else hdu.section
    align = _tile_rows(hdu)
    planes = []
    for pick in picks:
        def read(y0: int, y1: int, pick=pick):
            return section[pick + (slice(y0, y1), slice(0, width))]

        if align > 1:  # tiles taller than a strip are decompressed once, not once per strip
            read = TileRowCache(read, align, height)
        reduced, _ = block_mean(read, factor, shape=(height, width), align_rows=align)
        planes.append(reduced)
    if out_lead is None or not out_lead:
        array = planes[0]
    else:
        array = np.stack(planes).reshape(out_lead + planes[0].shape)
    return array, factor, (height, width)


class TileRowCache:
    """Serve row strips of a tile-compressed image from whole rows of tiles.

    ``read(y0, y1)`` of astropy's ``CompImageHDU.section`` decompresses every
    tile the rows touch, so strips thinner than the tiles would decompress each
    tile several times. This reader fetches the rows of tiles that cover a
    request (native dtype, as astropy returns them) and keeps the last ones, so
    each row of tiles is decompressed at most twice (once more when a strip
    straddles two rows of tiles). It holds at most two rows of tiles: a file
    compressed as one tile is decompressed once, as a whole.

    Parameters
    ----------
    read : callable
        ``read(y0, y1)`` returning rows ``y0:y1``.
    tile_rows : int
        Rows per tile.
    height : int
        Rows of the image.
    """

    def __init__(self, read: Callable[[int, int], Any], tile_rows: int, height: int):
        self._read = read
        self._tile_rows = max(1, int(tile_rows))
        self._height = int(height)
        self._chunk: np.ndarray | None = None
        self._start = self._stop = 0
        self.reads = 0  #: calls to ``read`` so far

    def __call__(self, y0: int, y1: int) -> np.ndarray:
        if self._chunk is None or y0 < self._start or y1 > self._stop:
            t = self._tile_rows
            start, stop = (y0 // t) * t, min(self._height, -(-y1 // t) * t)
            self._chunk = None  # let the previous rows go before reading the next ones
            self._chunk = np.asarray(self._read(start, stop))
            self._start, self._stop = start, stop
            self.reads += 1
        return self._chunk[y0 - self._start:y1 - self._start]


def _placeholder(hdu, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array of ``shape`` that takes no memory (its pixels are never looked at)."""
    dtype = np.dtype(np.float32)
    try:
        bitpix = int(hdu.header.get("BITPIX", -32))
        dtype = np.dtype({8: np.uint8, 16: np.int16, 32: np.int32, 64: np.int64,
                          -32: np.float32, -64: np.float64}.get(bitpix, np.float32))
    except (TypeError, ValueError):
        pass
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def _scaled_sip(sip, factor: int, crpix):
    """SIP polynomials in units of the coarser pixels: coefficient ``(p, q)`` times ``k**(p+q-1)``."""
    from astropy.wcs import Sip

    def scale(coeffs):
        if coeffs is None or np.size(coeffs) == 0:
            return coeffs
        c = np.array(coeffs, dtype=np.float64)
        p, q = np.indices(c.shape)
        return c * float(factor) ** (p + q - 1)

    return Sip(scale(sip.a), scale(sip.b), scale(sip.ap), scale(sip.bp), crpix)


def downsample_wcs(wcs, factor: int, shape: tuple[int, int] | None = None):
    """The WCS of a grid block-averaged by ``factor`` (see :func:`block_mean`).

    Uses astropy's ``wcs.slice`` with a step (which moves ``CRPIX`` to the block
    centres, scales ``CDELT`` and rescales distortion lookup tables) and
    completes it where it falls short: a ``CD`` matrix is multiplied by
    ``factor`` (``slice`` only scales ``CDELT``, which a ``CD`` matrix
    overrides), and SIP coefficients are rescaled to the coarser pixels, so
    sky positions agree with the original WCS at every block centre (exactly
    for the linear part and SIP; distortion lookup tables are interpolated on
    the coarser grid).

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        WCS of the full-resolution 2-D grid.
    factor : int
        Block size.
    shape : (H, W), optional
        Shape of the reduced array, recorded as ``pixel_shape``.

    Returns
    -------
    astropy.wcs.WCS
    """
    factor = int(factor)
    if factor == 1:
        out = wcs.deepcopy()
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*cdelt will be ignored.*")
            out = wcs.slice((slice(None, None, factor),) * wcs.pixel_n_dim)
            if wcs.wcs.has_cd():
                out.wcs.cd = np.asarray(wcs.wcs.cd, dtype=np.float64) * factor
                out.wcs.cdelt = wcs.wcs.cdelt
        if wcs.sip is not None:
            out.sip = _scaled_sip(wcs.sip, factor, out.sip.crpix)
        out.wcs.set()
    if shape is not None:
        out.pixel_shape = (int(shape[1]), int(shape[0]))
    return out


_WCS_KEY = re.compile(
    r"^(?:"
    r"(?:CD|PC|PV|PS)\d+_\d+[A-Z]?"
    r"|(?:CRPIX|CRVAL|CDELT|CTYPE|CUNIT|CROTA|CRDER|CSYER|CNAME)\d+[A-Z]?"
    r"|(?:A|B|AP|BP)_(?:\d+_\d+|ORDER|DMAX)"
    r"|(?:LONPOLE|LATPOLE|WCSAXES|WCSNAME|RESTFRQ|RESTWAV)[A-Z]?"
    r"|(?:CPDIS|CQDIS|DP|DQ|D2IMDIS|D2IM|D2IMERR|CPERR)\d+(?:\..*)?"
    r"|D2IMEXT|NPOLEXT|D2IMARR"
    r")$"
)


def strip_wcs_keywords(header):
    """A copy of ``header`` without the keywords that describe a WCS.

    Removes ``CD``/``PC``/``PV`` matrices, ``CRPIX``/``CRVAL``/``CDELT``/``CTYPE``/
    ``CUNIT``/``CROTA``, SIP (``A_``/``B_``/``AP_``/``BP_``) and distortion-table
    keywords, for the primary and the alternate (``A``-``Z``) WCS. ``DQ``-prefixed
    keywords are distortion records only when followed by a digit.
    """
    out = header.copy()
    for key in list(dict.fromkeys(out.keys())):
        if _WCS_KEY.match(key):
            while key in out:
                del out[key]
    return out


def header_with_wcs(header, wcs):
    """A copy of ``header`` whose WCS keywords are those of ``wcs`` (SIP included).

    Every WCS keyword of ``header`` is removed first (:func:`strip_wcs_keywords`),
    so a header that used a ``CD`` matrix does not keep ``CD`` keys next to the
    ``PC``/``CDELT`` ones astropy writes.
    """
    out = strip_wcs_keywords(header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy notes SIP needs relax=True: it is given
        out.update(wcs.to_header(relax=True))
    return out
