"""The image files an index names: safe lookup by row, thumbnails, headers and sky positions.

A web client never gives a path: it names a row of the index, and the file that
row's metadata names is opened only when it lies under the index's image root
(the root recorded with the index, else the directory common to every file the
index names).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..clip.index import common_image_root, recorded_image_root  # noqa: F401  (re-exported)
from ..exceptions import QueryError
from ..imaging.inputs import PATH_COLUMNS, is_fits_file, locate_image_file
from ..utils.files import is_within
from ..utils.lru import LRUCache
from .defaults import DEFAULT_MAX_IMAGE_PIXELS

__all__ = ["IndexImages", "PATH_COLUMNS", "RADEC_COLUMNS", "json_value", "recorded_image_root",
           "default_thumbnail_cache", "LRUCache"]

log = logging.getLogger(__name__)

#: metadata column pairs that give a sky position in degrees (matched case-insensitively)
RADEC_COLUMNS = (("ra", "dec"), ("s_ra", "s_dec"), ("ra_targ", "dec_targ"), ("ra_deg", "dec_deg"),
                 ("raj2000", "dej2000"))
#: bump when the thumbnail rendering changes, so that cached thumbnails are redrawn
THUMBNAIL_VERSION = 1
MAX_HEADER_CARDS = 3000


def json_value(value: Any) -> Any:
    """``value`` as a JSON-safe Python object (NaN, inf and masked values become None)."""
    if value is None or value is np.ma.masked:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, np.ndarray):
        return [json_value(v) for v in value.tolist()]
    return str(value)


def default_thumbnail_cache() -> Path:
    """Where thumbnails are cached by default: ``<astrovl cache>/serve-thumbnails``."""
    from ..config import cache_path

    return cache_path("serve-thumbnails")


class IndexImages:
    """Find, check and render the image file of each index row.

    Parameters
    ----------
    metadata : astropy.table.Table
        The index metadata.
    index_dir : path, optional
        The index directory (relative paths are tried against the image root,
        then against it, its parent and the working directory; the file found
        must still lie under the image root).
    image_root : path, optional
        Only files under this directory are opened. Default: the directory common
        to every file the index names.
    cache_dir : path, optional
        Where thumbnails are cached (default :func:`default_thumbnail_cache`): a
        new or empty folder, or an earlier thumbnail cache. A folder holding
        other files is left alone (thumbnails are then not cached, with a
        warning in the log).
    size : int
        Longest side of a thumbnail in pixels.
    preview_size : int
        Longest side of the larger preview of the detail view.
    max_pixels : int
        Pictures with more pixels (from their headers) are not decoded; their
        thumbnails are refused with 413. FITS files are read in strips instead.
    """

    def __init__(self, metadata, *, index_dir=None, image_root=None, cache_dir=None, size: int = 256,
                 preview_size: int = 768, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if int(size) < 16 or int(preview_size) < 16:
            raise ValueError(f"thumbnail sizes ({size}, {preview_size}) must be at least 16 pixels")
        self.metadata = metadata
        self.column = next((c for c in PATH_COLUMNS if c in metadata.colnames), None)
        self.index_dir = Path(index_dir).resolve() if index_dir is not None else None
        self.recorded_root = Path(image_root).resolve() if image_root is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_thumbnail_cache()
        self.size = int(size)
        self.preview_size = int(preview_size)
        self.max_pixels = int(max_pixels)
        self._cache_usable: bool | None = None
        self._root_lock = threading.Lock()
        self._root: Path | None = self.recorded_root
        self._root_known = self.recorded_root is not None
        self._paths = LRUCache(16384)
        self._described = LRUCache(512)
        self._positions = LRUCache(65536)

    # ------------------------------------------------------------------ paths
    @property
    def root(self) -> Path | None:
        """The directory that every served file must lie under (None: no image files)."""
        with self._root_lock:
            if not self._root_known:
                self._root = self._common_root()
                self._root_known = True
            return self._root

    def _common_root(self) -> Path | None:
        """The folder common to the files the index names, as named: a link never widens it."""
        if self.column is None:
            return None
        named = [locate_image_file(value, index_dir=self.index_dir, resolve=False)
                 for value in self.metadata[self.column]]
        named = [p for p in named if p is not None]
        return Path(common_image_root(named)) if named else None

    def _locate(self, value) -> Path | None:
        """The existing file a metadata value names (resolved), or None."""
        return locate_image_file(value, index_dir=self.index_dir, image_root=self.recorded_root)

    def check_row(self, row: int) -> int:
        """``row`` as an int, or a 404 :class:`~astrovl.exceptions.QueryError`."""
        n = len(self.metadata)
        if not isinstance(row, (int, np.integer)) or not 0 <= int(row) < n:
            raise QueryError(f"there is no item {row!r}: ids run from 0 to {n - 1}", status=404)
        return int(row)

    def path(self, row: int) -> Path:
        """The file of ``row``, checked to lie under :attr:`root` now.

        The file a row names is looked up once, but where it leads is checked at
        every call, links followed: a file replaced by a link to somewhere else
        after it was first served is refused from then on.

        Raises
        ------
        QueryError
            404 when the row names no existing file, 403 when the file lies outside
            the image root.
        """
        row = self.check_row(row)
        located = self._paths.get(row)
        if located is None:
            if self.column is None:
                raise QueryError(
                    f"item {row} has no image file: the index metadata has none of the columns "
                    f"{list(PATH_COLUMNS)}", status=404)
            value = self.metadata[self.column][row]
            located = self._locate(value)
            if located is None:
                raise QueryError(f"item {row} names no image file that exists here ({json_value(value)!r})",
                                 status=404)
            self._paths.put(row, located)
        try:
            path = located.resolve(strict=True)  # links followed now, not when first seen
            exists = path.is_file()
        except (OSError, RuntimeError):  # gone, or a loop of links
            exists = False
        if not exists:
            raise QueryError(f"the image file of item {row} no longer exists here", status=404)
        root = self.root
        if root is None or not is_within(path, root):
            raise QueryError(
                f"item {row} names a file outside the index's image root ({root}); it is not served",
                status=403)
        return path

    def has_image(self, row: int) -> bool:
        """True when :meth:`path` would give a file for ``row``."""
        try:
            self.path(row)
        except QueryError:
            return False
        return True

    # ------------------------------------------------------------------ thumbnails
    def _thumbnail_key(self, path: Path, size: int) -> str:
        st = path.stat()
        ident = f"{path}|{st.st_mtime_ns}|{st.st_size}|{size}|v{THUMBNAIL_VERSION}"
        return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:32]

    def thumbnail(self, row: int, large: bool = False) -> tuple[bytes, str]:
        """PNG bytes of the thumbnail of ``row`` and an ETag; rendered once, then cached on disk.

        The image is read with :func:`astrovl.load_image` and its display scaling
        (the configured stretch and interval), the right way up, and shrunk to
        :attr:`size` pixels (:attr:`preview_size` with ``large``) on its longest side.
        """
        path = self.path(row)
        size = self.preview_size if large else self.size
        key = self._thumbnail_key(path, size)
        file = self.cache_dir / key[:2] / f"{key}.png"
        try:
            return file.read_bytes(), key
        except OSError:
            pass
        data = self._render(row, path, size)
        if self._cache_is_usable():
            try:
                from ..utils.files import atomic_write_bytes

                atomic_write_bytes(file, data)
            except OSError as exc:  # a read-only cache still serves, just more slowly
                log.warning("thumbnail cache %s is not writable (%s); thumbnails are not cached", file, exc)
        return data, key

    def _cache_is_usable(self) -> bool:
        """Whether thumbnails may be written to :attr:`cache_dir` (checked once).

        Only a new or empty folder, or an earlier thumbnail cache, is written to:
        a folder holding other files is never filled.
        """
        if self._cache_usable is None:
            from ..utils.files import THUMBNAIL_CACHE_OUTPUT, prepare_output_dir

            try:
                prepare_output_dir(self.cache_dir, THUMBNAIL_CACHE_OUTPUT)
                self._cache_usable = True
            except OSError as exc:  # OutputDirectoryError (a folder of other files) or read-only
                log.warning("thumbnails are not cached: %s", exc)
                self._cache_usable = False
        return self._cache_usable

    def _render(self, row: int, path: Path, size: int) -> bytes:
        from PIL import Image

        from ..imaging import load_image
        from .uploads import check_image_size

        # a picture is decoded whole: its declared size is checked first (FITS is read in strips)
        check_image_size(path, path.name, max_pixels=self.max_pixels, check_fits=False)
        try:
            img = load_image(path)
        except Exception as exc:  # any unreadable file is answered, not raised
            raise QueryError(f"the image of item {row} could not be read: {exc}", status=422) from exc
        pil = img.to_pil()
        pil.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        return buf.getvalue()

    def image(self, row: int):
        """The :class:`~astrovl.AstroImage` of ``row``'s file (checked as :meth:`path` checks it).

        Raises
        ------
        QueryError
            404 or 403 as :meth:`path`; 422 when the file cannot be read as an image.
        """
        from ..imaging import load_image

        path = self.path(row)
        try:
            return load_image(path)
        except Exception as exc:  # any unreadable file is answered, not raised
            raise QueryError(f"the image of item {row} could not be read: {exc}", status=422) from exc

    # ------------------------------------------------------------------ headers and positions
    def describe(self, row: int) -> dict:
        """Format, pixel shape, FITS headers and sky position of ``row``'s file (cached).

        FITS files are read header-only: the primary header and the first image
        HDU's header; the sky position is the world position of the image centre
        (ICRS degrees) when that HDU has a celestial WCS.
        """
        path = self.path(row)
        cached = self._described.get(row)
        if cached is not None:
            return cached
        if is_fits_file(path):
            info = _describe_fits(path)
        else:
            info = _describe_picture(path)
        info["file"] = path.name
        self._described.put(row, info)
        self._positions.put(row, (info.get("ra"), info.get("dec")))
        return info

    def sky_position(self, row: int) -> tuple[float | None, float | None]:
        """``(ra, dec)`` of the centre of ``row``'s image from its WCS, or ``(None, None)``."""
        cached = self._positions.get(row)
        if cached is not None:
            return cached
        try:
            info = self.describe(row)
        except QueryError:
            info = {}
        pos = (info.get("ra"), info.get("dec"))
        self._positions.put(row, pos)
        return pos


def _header_cards(header) -> list[list]:
    cards = []
    for card in header.cards[:MAX_HEADER_CARDS]:
        try:
            value = card.value
        except Exception:  # an unparsable card is shown as its image
            value = card.image
        if not isinstance(value, (bool, int, float, str)):
            value = str(value)
        cards.append([card.keyword, json_value(value), str(card.comment or "")])
    return cards


def _describe_fits(path: Path) -> dict:
    from astropy.io import fits
    from astropy.utils.exceptions import AstropyWarning

    info: dict = {"format": "FITS", "hdus": [], "shape": None, "ra": None, "dec": None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                primary = hdul[0]
                info["hdus"].append({"index": 0, "name": primary.name, "cards": _header_cards(primary.header)})
                image = None
                for i, hdu in enumerate(hdul):
                    if hdu.is_image and int(hdu.header.get("NAXIS", 0)) >= 2:
                        image = (i, hdu)
                        break
                if image is not None:
                    i, hdu = image
                    header = hdu.header
                    if i != 0:
                        info["hdus"].append({"index": i, "name": hdu.name, "cards": _header_cards(header)})
                    shape = [int(header.get(f"NAXIS{a}", 0)) for a in (2, 1)]
                    info["shape"] = shape
                    info["ra"], info["dec"] = _centre(header, shape)
    except Exception as exc:  # a broken header is reported, not raised
        info["error"] = f"the FITS header could not be read: {exc}"
    return info


def _centre(header, shape) -> tuple[float | None, float | None]:
    """ICRS position of the image centre from a header's celestial WCS, or (None, None)."""
    from astropy.utils.exceptions import AstropyWarning
    from astropy.wcs import WCS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            wcs = WCS(header).celestial
            if not wcs.has_celestial:
                return None, None
            ny, nx = shape
            coord = wcs.pixel_to_world((nx - 1) / 2.0, (ny - 1) / 2.0)
            icrs = coord.icrs
            ra, dec = float(icrs.ra.deg), float(icrs.dec.deg)
    except Exception:  # no usable WCS means no position
        return None, None
    if not (math.isfinite(ra) and math.isfinite(dec)):
        return None, None
    return ra, dec


def _describe_picture(path: Path) -> dict:
    from PIL import Image

    info: dict = {"format": None, "hdus": [], "shape": None, "ra": None, "dec": None}
    try:
        with Image.open(path) as im:
            info["format"] = im.format
            info["shape"] = [int(im.size[1]), int(im.size[0])]
    except Exception as exc:
        info["error"] = f"the picture could not be read: {exc}"
    return info
