"""Turn any astronomical image input into an :class:`~astrovl.imaging.AstroImage`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.nddata import NDData
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS

from ..config import conf
from ..exceptions import ImageFileError, ImageInputError
from .core import AstroImage
from .fitsfile import choose_science_hdu, describe_hdus, open_fits, read_hdu_data
from .inputs import FITS_SUFFIXES, PICTURE_SUFFIXES, ImageFile, is_fits_file
from .pixel_grid import block_mean, downsample_wcs, read_hdu_reduced, reduction_factor
from .scaling import scale_to_unit

__all__ = ["load_image", "check_image", "FITS_SUFFIXES", "PICTURE_SUFFIXES"]



def load_image(
    obj: Any,
    *,
    hdu: int | str | tuple | None = None,
    plane: int | None = None,
    stretch=None,
    interval=None,
    max_pixels: int | None = None,
) -> AstroImage:
    """Load an astronomical image from any supported input.

    Parameters
    ----------
    obj : str, path-like, ImageFile, HDUList, PrimaryHDU, ImageHDU, CompImageHDU, NDData, CCDData, tuple, numpy.ndarray, PIL.Image.Image or AstroImage
        Accepted inputs:

        * a path to a FITS file (``.fits``, ``.fit``, ``.fts``, gzip-compressed
          ``.fits.gz``, tile-compressed ``.fz``) or to a picture (JPEG, PNG, TIFF...);
        * an :class:`~astrovl.imaging.inputs.ImageFile` (a path with its own
          ``hdu`` and ``plane``, used unless these arguments are given);
        * an :class:`~astropy.io.fits.HDUList` (see ``hdu``);
        * a :class:`~astropy.io.fits.PrimaryHDU`, :class:`~astropy.io.fits.ImageHDU`
          or :class:`~astropy.io.fits.CompImageHDU`;
        * an :class:`~astropy.nddata.NDData` or :class:`~astropy.nddata.CCDData`
          (its mask is honoured, its WCS kept);
        * an ``(array, Header)`` or ``(array, WCS)`` tuple;
        * a 2-D numpy array, or a 3-D one (a cube with ``plane=``, or an
          ``(H, W, 3|4)`` colour array kept as colour);
        * a :class:`PIL.Image.Image`;
        * an :class:`AstroImage`: scaled again from its ``raw`` pixels (8-bit
          pictures are again divided by 255 unless ``stretch``/``interval`` are
          given).
    hdu : int, str or (str, int), optional
        HDU to use from a file or HDUList. When omitted, the first HDU with 2-D or
        higher image data is used; if several science images are present (not just
        ``SCI`` with its ``ERR``/``DQ`` planes) the choice is ambiguous and an error
        asks for ``hdu=``.
    plane : int, optional
        Plane of a 3-D cube (axis 0 in numpy order). A cube of three planes with no
        ``plane`` is shown as colour (planes taken as R, G, B). For an
        ``(H, W, 3|4)`` colour array, ``plane`` picks one colour channel.
    stretch : str or astropy stretch, optional
        ``"asinh"`` (default, ``astrovl.conf.stretch``), ``"linear"``, ``"log"``,
        ``"sqrt"``... or any :class:`astropy.visualization.BaseStretch`.
    interval : str, float, pair or astropy interval, optional
        ``"percentile"`` (default: ``PercentileInterval(99.5)``, the 0.25-99.75
        percentiles), ``"zscale"``, ``"minmax"``, a number ``p`` (the central ``p``
        percent), a ``(vmin, vmax)`` pair or any astropy interval.
    max_pixels : int, optional
        Images with more pixels are block-averaged by an integer factor (NaN-aware)
        before scaling so that huge mosaics fit in memory; the WCS is adjusted.
        FITS images this large are read a strip of rows at a time, never whole
        (see :mod:`astrovl.imaging.pixel_grid`). Defaults to
        ``astrovl.conf.max_pixels``.

    Returns
    -------
    AstroImage

    Raises
    ------
    ImageFileError
        Missing, truncated, corrupt or unrecognised file.
    ImageInputError
        Table HDU, HDU without data, no finite pixel, unsupported dimensionality,
        ambiguous HDU choice.
    TypeError
        Unsupported input type.

    Notes
    -----
    Picture inputs that are already 8-bit (JPEG, PNG, ``uint8`` arrays) are only
    divided by 255 unless ``stretch`` or ``interval`` is given explicitly.

    Examples
    --------
    >>> import numpy as np
    >>> from astrovl import load_image
    >>> img = load_image(np.arange(16.0).reshape(4, 4), stretch="linear", interval="minmax")
    >>> img.data.shape, float(img.data.max())
    ((4, 4), 1.0)
    """
    if isinstance(obj, ImageFile):  # a file with its own HDU and plane (given ones win)
        hdu = obj.hdu if hdu is None else hdu
        plane = obj.plane if plane is None else plane
        obj = obj.path
    explicit_scaling = stretch is not None or interval is not None
    stretch = conf.stretch if stretch is None else stretch
    interval = conf.interval if interval is None else interval
    max_pixels = int(conf.max_pixels if max_pixels is None else max_pixels)
    if max_pixels < 1:
        raise ValueError(f"max_pixels={max_pixels!r} must be a positive integer")

    parsed = _parse(obj, hdu=hdu, limit=max_pixels, plane=plane)
    return _finish(parsed, plane=plane, stretch=stretch, interval=interval,
                   max_pixels=max_pixels, explicit_scaling=explicit_scaling)


def check_image(obj: Any, *, hdu: int | str | tuple | None = None, plane: int | None = None) -> None:
    """Check, from headers only, that :func:`load_image` can read an image file.

    For a path (or :class:`~astrovl.imaging.inputs.ImageFile`): the file exists;
    a FITS file opens, the HDU to read is found (named or chosen as
    :func:`load_image` does), it is an image HDU with data, and ``plane``
    fits its shape; a picture's header is recognised. No pixel is read, so
    this is fast and runs before a model loads. What only the pixels tell
    (no finite pixel) is left to :func:`load_image`. Other inputs (arrays,
    HDUs, ...) are not checked.

    Raises
    ------
    ImageFileError, ImageInputError
        The errors :func:`load_image` would raise, with the same messages.
    """
    if isinstance(obj, ImageFile):
        hdu = obj.hdu if hdu is None else hdu
        plane = obj.plane if plane is None else plane
        obj = obj.path
    if not isinstance(obj, (str, os.PathLike)):
        return
    path = Path(obj)
    if not path.exists():
        raise ImageFileError(f"image file {str(path)!r} does not exist; check the path")
    if path.is_dir():
        raise ImageFileError(f"{str(path)!r} is a directory; pass an image file")
    if is_fits_file(path):
        with open_fits(path) as hdul:
            chosen, label = _choose_hdu(hdul, hdu, str(path))
            if isinstance(chosen, (fits.BinTableHDU, fits.TableHDU)) or not isinstance(
                    chosen, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
                _parse_hdu(chosen, source=f"{path}[{label}]")  # raises the table / not-an-image error
            shape = tuple(int(n) for n in (chosen.shape or ()))
            if not shape or 0 in shape:
                raise _no_data_error(f"{path}[{label}]", chosen)
            header_only = _Parsed(np.broadcast_to(np.float32(0), shape), header=chosen.header,
                                  source=f"{path}[{label}]")
            _reduce_dims(header_only, plane)  # dimensionality and plane, as load_image checks them
        return
    try:
        from PIL import Image, UnidentifiedImageError

        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageFileError(
            f"{str(path)!r} is neither a FITS file nor a readable picture ({exc}); supported: "
            f"FITS ({', '.join(FITS_SUFFIXES)}) and pictures ({', '.join(PICTURE_SUFFIXES)})"
        ) from exc


class _Parsed:
    """Intermediate result: the array and its metadata before scaling."""

    # (factor, (H, W)) when read block-averaged from a FITS HDU (pixel_grid.read_hdu_reduced)
    reduced: tuple[int, tuple[int, int]] | None = None
    plane_applied = False  # the plane was chosen while reading

    def __init__(self, array, header=None, wcs=None, source="<array>", mask=None,
                 origin="lower", picture=False, meta=None, colour_last=None):
        self.array = array
        self.header = header
        self.wcs = wcs
        self.source = source
        self.mask = mask
        self.origin = origin
        self.picture = picture
        self.meta = meta or {}
        # True/False when the layout is known (an AstroImage input), None to guess
        self.colour_last = colour_last


def _parse(obj, *, hdu, limit=None, plane=None) -> _Parsed:
    if isinstance(obj, AstroImage):
        return _Parsed(obj.raw, obj.header, obj.wcs, obj.source, obj.mask,
                       obj.meta.get("origin", "lower"), bool(obj.meta.get("picture", False)),
                       colour_last=obj.is_color)
    if isinstance(obj, (str, os.PathLike)):
        return _parse_path(Path(obj), hdu=hdu, limit=limit, plane=plane)
    if isinstance(obj, fits.HDUList):
        return _parse_hdulist(obj, hdu=hdu, source="<HDUList>", limit=limit, plane=plane)
    if isinstance(obj, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
        return _parse_hdu(obj, source=f"<{type(obj).__name__} {obj.name}>", limit=limit, plane=plane)
    if isinstance(obj, (fits.BinTableHDU, fits.TableHDU)):
        raise ImageInputError(
            f"{type(obj).__name__} {obj.name!r} holds a table, not an image; pass an image "
            "HDU (PrimaryHDU, ImageHDU or CompImageHDU)"
        )
    if isinstance(obj, NDData):
        return _parse_nddata(obj)
    if isinstance(obj, tuple):
        return _parse_tuple(obj)
    if isinstance(obj, np.ndarray):
        return _Parsed(obj, source=f"<ndarray {obj.shape}>",
                       origin="upper" if _looks_like_picture(obj) else "lower",
                       picture=obj.dtype == np.uint8)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(obj, Image.Image):
        return _parse_pil(obj, source=f"<PIL.Image {obj.mode} {obj.size[0]}x{obj.size[1]}>")
    raise TypeError(
        f"cannot load an image from an object of type {type(obj).__name__}; pass a FITS or "
        "picture path, an HDUList or image HDU, NDData/CCDData, an (array, Header|WCS) tuple, "
        "a numpy array or a PIL image"
    )


def _looks_like_picture(arr: np.ndarray) -> bool:
    return arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4


def _parse_path(path: Path, *, hdu, limit=None, plane=None) -> _Parsed:
    if not path.exists():
        raise ImageFileError(f"image file {str(path)!r} does not exist; check the path")
    if path.is_dir():
        raise ImageFileError(f"{str(path)!r} is a directory; pass an image file")
    if is_fits_file(path):
        with open_fits(path) as hdul:  # checked before any data is read; errors name the file
            parsed = _parse_hdulist(hdul, hdu=hdu, source=str(path), limit=limit, plane=plane)
            if parsed.reduced is None:  # a reduced array is already read and small
                parsed.array = np.array(parsed.array)  # force the read inside the context
        return parsed
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover
        raise ImageFileError("reading pictures needs pillow: pip install pillow") from exc
    try:
        with Image.open(path) as im:
            im.load()
            return _parse_pil(im, source=str(path))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageFileError(
            f"{str(path)!r} is neither a FITS file nor a readable picture ({exc}); supported: "
            f"FITS ({', '.join(FITS_SUFFIXES)}) and pictures ({', '.join(PICTURE_SUFFIXES)})"
        ) from exc


def _parse_pil(im, *, source: str) -> _Parsed:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        return _Parsed(arr, source=source, origin="upper", picture=False)
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    arr = np.asarray(im)
    return _Parsed(arr, source=source, origin="upper", picture=True)


def _parse_hdulist(hdul: fits.HDUList, *, hdu, source: str, limit=None, plane=None) -> _Parsed:
    chosen, label = _choose_hdu(hdul, hdu, source)
    parsed = _parse_hdu(chosen, source=f"{source}[{label}]", limit=limit, plane=plane)
    parsed.meta["hdu"] = label
    parsed.meta["extname"] = chosen.name
    return parsed


def _choose_hdu(hdul: fits.HDUList, hdu, source: str):
    """The HDU ``hdu`` names (or the science HDU) and its label in sources."""
    if len(hdul) == 0:
        raise ImageInputError(f"{source}: the HDUList is empty")
    if hdu is None:
        idx = choose_science_hdu(hdul, source)
        return hdul[idx], idx
    try:
        return hdul[hdu], hdu
    except (KeyError, IndexError) as exc:
        raise ImageInputError(
            f"{source}: hdu={hdu!r} does not exist; available HDUs: {describe_hdus(hdul)}",
            options=("hdu",),
        ) from exc


def _no_data_error(source: str, h) -> ImageInputError:
    return ImageInputError(
        f"{source}: HDU {h.name!r} has no data (header only); in multi-extension files the "
        "image usually sits in extension 1: pass hdu=1 or the EXTNAME",
        options=("hdu",),
    )


def _parse_hdu(h, *, source: str, limit=None, plane=None) -> _Parsed:
    if isinstance(h, (fits.BinTableHDU, fits.TableHDU)):
        raise ImageInputError(
            f"{source}: HDU {h.name!r} is a table, not an image; choose an image HDU with hdu=",
            options=("hdu",),
        )
    if not isinstance(h, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
        raise ImageInputError(f"{source}: HDU of type {type(h).__name__} does not hold an image")
    if limit is not None and (reduced := read_hdu_reduced(h, limit, plane)) is not None:
        # larger than max_pixels: read through hdu.section in strips, block-averaged
        parsed = _Parsed(reduced[0], header=h.header.copy(), source=source)
        parsed.reduced = reduced[1:]
        parsed.plane_applied = plane is not None and reduced[0].ndim == 2 and len(h.shape) > 2
        return parsed
    data = read_hdu_data(h, source)
    if data is None or np.size(data) == 0:
        raise _no_data_error(source, h)
    header = h.header.copy()
    return _Parsed(np.asarray(data), header=header, source=source)


def _parse_nddata(nd: NDData) -> _Parsed:
    data = np.asarray(nd.data)
    mask = None if nd.mask is None else np.asarray(nd.mask, dtype=bool)
    if mask is not None and mask.shape != data.shape:
        raise ImageInputError(
            f"NDData mask shape {mask.shape} does not match data shape {data.shape}"
        )
    header = None
    meta = getattr(nd, "meta", None) or {}
    if isinstance(meta, fits.Header):
        header = meta.copy()
    elif isinstance(meta.get("header", None), fits.Header):
        header = meta["header"].copy()
    wcs = nd.wcs if isinstance(nd.wcs, WCS) else None
    return _Parsed(data, header=header, wcs=wcs, source=f"<{type(nd).__name__} {data.shape}>", mask=mask)


def _parse_tuple(obj: tuple) -> _Parsed:
    if len(obj) != 2:
        raise TypeError(
            f"a tuple input must be (array, Header) or (array, WCS); got a tuple of {len(obj)} items"
        )
    arr, second = obj
    arr = np.asarray(arr)
    if isinstance(second, fits.Header):
        return _Parsed(arr, header=second.copy(), source=f"<(ndarray {arr.shape}, Header)>")
    if isinstance(second, WCS):
        return _Parsed(arr, wcs=second, source=f"<(ndarray {arr.shape}, WCS)>")
    raise TypeError(
        f"the second item of an (array, ...) tuple must be an astropy Header or WCS, "
        f"not {type(second).__name__}"
    )


def _celestial_wcs(header, wcs, ndim: int):
    """Return a 2-D celestial WCS, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if wcs is None and header is not None:
                wcs = WCS(header)
            if wcs is None:
                return None
            if not wcs.has_celestial:
                return None
            cel = wcs.celestial
            return cel if cel.naxis == 2 else None
    except Exception:  # malformed WCS keywords: keep the image, drop the WCS
        warnings.warn("the WCS in the header could not be interpreted and was dropped",
                      AstropyUserWarning, stacklevel=4)
        return None


def _reduce_dims(parsed: _Parsed, plane: int | None) -> tuple[np.ndarray, bool, Any]:
    """Return ``(array, is_colour, select)`` with the array of shape (H, W) or (H, W, 3).

    ``select`` applies the same plane selection to a boolean array of the input's
    shape (a mask) and returns an ``(H, W)`` mask (a pixel is bad when any of its
    colour channels is bad).
    """
    arr = parsed.array
    if arr.dtype.kind not in "biuf":
        raise ImageInputError(f"{parsed.source}: pixel type {arr.dtype} is not numeric")
    if arr.ndim < 2:
        raise ImageInputError(
            f"{parsed.source}: a {arr.ndim}-D array (shape {arr.shape}) is not an image; "
            "images must be 2-D (or a 3-D cube with plane=)",
            options=("plane",),
        )
    if arr.ndim > 4:
        raise ImageInputError(
            f"{parsed.source}: {arr.ndim}-D data (shape {arr.shape}) is not supported; slice it "
            "to a 2-D image or 3-D cube first"
        )
    squeeze = arr.ndim == 4
    if squeeze:
        if arr.shape[0] != 1:
            raise ImageInputError(
                f"{parsed.source}: 4-D data of shape {arr.shape} has a non-trivial 4th axis; "
                "slice it to a 3-D cube or 2-D image first (for example data[0])"
            )
        arr = arr[0]

    def lift(index):
        return lambda m: (m[0] if squeeze else m)[index]

    if arr.ndim == 2:
        if plane not in (None, 0):
            raise ImageInputError(f"{parsed.source}: plane={plane} given for a 2-D image; leave plane= out",
                                  options=("plane",))
        return arr, False, lift(Ellipsis)
    # 3-D
    colour_last = parsed.colour_last
    if colour_last is None:
        colour_last = arr.shape[-1] in (3, 4) and parsed.header is None and (
            parsed.picture or parsed.origin == "upper" or arr.shape[0] > 4)
    if colour_last:
        if plane is None:
            return arr[..., :3], True, lambda m: lift((Ellipsis, slice(0, 3)))(m).any(axis=-1)
        n = arr.shape[-1]
        if not -n <= plane < n:
            raise ImageInputError(
                f"{parsed.source}: plane={plane} is out of range for a colour image of "
                f"{n} channels",
                options=("plane",),
            )
        return arr[..., plane], False, lift((Ellipsis, plane))
    if plane is not None:
        n = arr.shape[0]
        if not -n <= plane < n:
            raise ImageInputError(
                f"{parsed.source}: plane={plane} is out of range for a cube of {n} planes",
                options=("plane",),
            )
        return arr[plane], False, lift(plane)
    if arr.shape[0] == 1:
        return arr[0], False, lift(0)
    if arr.shape[0] == 3:
        return np.moveaxis(arr, 0, -1), True, lambda m: lift(Ellipsis)(m).any(axis=0)
    raise ImageInputError(
        f"{parsed.source}: a cube of shape {arr.shape} has {arr.shape[0]} planes; choose one "
        "with plane=",
        options=("plane",),
    )


def _reduce_mask(mask, parsed: _Parsed, arr: np.ndarray, select) -> np.ndarray | None:
    """Bring a mask to the ``(H, W)`` grid of ``arr`` (None if it cannot match)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == parsed.array.shape:
        mask = select(mask)
    return mask if mask.shape == arr.shape[:2] else None


def _finish(parsed: _Parsed, *, plane, stretch, interval, max_pixels, explicit_scaling) -> AstroImage:
    arr, _colour, select = _reduce_dims(parsed, None if parsed.plane_applied else plane)
    mask = parsed.mask
    if mask is not None:
        mask = _reduce_mask(mask, parsed, arr, select)
    wcs = _celestial_wcs(parsed.header, parsed.wcs, arr.ndim)
    full_shape = parsed.reduced[1] if parsed.reduced is not None else arr.shape[:2]
    if wcs is not None and wcs.pixel_shape is None:
        wcs.pixel_shape = (full_shape[1], full_shape[0])

    if parsed.reduced is not None:  # block-averaged while reading (huge FITS HDU)
        factor = parsed.reduced[0]
        raw = np.asarray(arr, dtype=np.float32)
    else:
        factor = reduction_factor(arr.shape[0], arr.shape[1], max_pixels)
        if factor > 1:  # strips of the input, no full-size float copy
            raw, mask = block_mean(arr, factor, mask=mask)
        else:
            raw = np.asarray(arr, dtype=np.float32)
    if factor > 1 and wcs is not None:
        wcs = downsample_wcs(wcs, factor, raw.shape[:2])

    if not np.isfinite(raw).any() or (mask is not None and not (np.isfinite(raw) & ~_expand(mask, raw)).any()):
        raise ImageInputError(
            f"{parsed.source}: the image has no finite, unmasked pixel (all NaN/inf or masked); "
            "choose another HDU or plane with hdu= or plane=",
            options=("hdu", "plane"),
        )

    if parsed.picture and not explicit_scaling:
        data = raw / np.float32(255.0)
        used = {"stretch": "none", "interval": "uint8/255"}
    else:
        data = scale_to_unit(raw, stretch=stretch, interval=interval, mask=mask)
        used = {"stretch": _name(stretch), "interval": _name(interval)}
    invalid = ~np.isfinite(raw)
    if raw.ndim == 3:
        invalid = invalid.any(axis=2)
    if mask is not None:
        invalid |= mask
    data = np.asarray(data, dtype=np.float32)
    if invalid.any():
        data[invalid] = 0.0
    meta = dict(parsed.meta)
    meta.update(origin=parsed.origin, picture=parsed.picture, downsample=factor, **used)
    return AstroImage(
        data=data,
        raw=raw,
        wcs=wcs,
        header=parsed.header,
        source=parsed.source,
        mask=invalid if invalid.any() else None,
        meta=meta,
    )


def _expand(mask, raw):
    return np.repeat(mask[:, :, None], raw.shape[2], axis=2) if raw.ndim == 3 else mask


def _name(x) -> str:
    return x if isinstance(x, str) else type(x).__name__
