"""Read FITS files into napari image layers through :func:`astrovl.load_image`.

Display convention
------------------
Each layer holds the **raw pixel values** (float32) of its HDU, so napari's
status bar and any analysis on ``layer.data`` see physical values. The contrast
limits are the limits of the library's display interval
(``astrovl.conf.interval``, by default the 0.25 and 99.75 percentiles of the
finite pixels), computed with the same :func:`astrovl.imaging.interval_limits` that
:func:`astrovl.load_image` uses (percentiles of large images on a fixed
sample); napari maps them linearly. When a region is sent to a model the
library's full scaling (interval and ``asinh`` stretch) is applied to the same
raw pixels, exactly as for a file loaded with :func:`astrovl.load_image`. A
file is opened and read once for all its HDUs and cube planes, except 2-D
images larger than ``astrovl.conf.max_pixels``, which ``load_image`` reads
block-averaged a strip at a time (never the whole array in memory).

FITS images store row 0 at the bottom. The array is not flipped (so
``layer.data[row, col]`` stays at FITS pixel ``(col + 1, row + 1)`` and the WCS
in the metadata applies to it directly); instead the layer gets a vertical scale
of ``-1`` so that napari shows the image the right way up. The vertical world
coordinate in the status bar is therefore ``-row``.

An image block-averaged by a factor ``k`` (larger than ``astrovl.conf.max_pixels``)
gets a scale of ``(-k, k)`` and a translate of ``(-(k-1)/2, (k-1)/2)``: world
coordinates stay those of the full-resolution grid (block centres), so layers
of the same field at different resolutions overlap, while ``metadata["wcs"]``
is the WCS of the block-averaged ``layer.data`` grid.

Layer metadata
--------------
``metadata["header"]`` (:class:`astropy.io.fits.Header`), ``metadata["wcs"]``
(celestial :class:`astropy.wcs.WCS` of the layer's pixel grid, or None) and
``metadata["astrovl"]`` (a dict: ``source``, ``hdu``, ``extname``, ``extver``,
``origin``, ``downsample``, ``interval``, ``stretch``, ``contrast_limits``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astrovl.imaging.inputs import FITS_SUFFIXES, is_fits_name

__all__ = [
    "FITS_PATTERNS",
    "napari_get_reader",
    "read_fits",
    "fits_layer_data",
    "list_image_hdus",
    "is_fits_path",
    "contrast_limits_for",
    "image_layer_data",
]

#: filename patterns of the napari reader contribution (matched case-insensitively by napari),
#: one per FITS file name suffix of the library; napari.yaml lists the same patterns
FITS_PATTERNS = tuple(f"*{suffix}" for suffix in FITS_SUFFIXES)

LayerData = tuple  # (data, kwargs, "image")


def is_fits_path(path: str | os.PathLike) -> bool:
    """True when ``path`` has a FITS file name (``.fits``, ``.fit``, ``.fts``, ``.fz``, gzipped).

    The same test as the library's (:func:`astrovl.imaging.inputs.is_fits_name`).
    """
    return is_fits_name(path)


def napari_get_reader(path: str | os.PathLike | Sequence[str | os.PathLike]
                      ) -> Callable[[Any], list[LayerData]] | None:
    """Return :func:`read_fits` when every path is a FITS file, else None (napari tries others)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(is_fits_path(p) for p in paths):
        return None
    return read_fits


def read_fits(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[LayerData]:
    """Read one or several FITS files into napari layer data tuples.

    Parameters
    ----------
    path : str, path-like or list of them

    Returns
    -------
    list of (numpy.ndarray, dict, "image")
        One image layer per image HDU (see :func:`fits_layer_data`).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        layers.extend(fits_layer_data(p))
    return layers


def _image_hdu_entries(hdul) -> list[tuple[int, str, int, tuple[int, ...]]]:
    from astropy.io import fits

    out = []
    for i, h in enumerate(hdul):
        if not isinstance(h, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            continue
        shape = tuple(int(s) for s in (h.shape or ()))
        if len(shape) >= 2 and all(s > 0 for s in shape):
            out.append((i, str(h.name), int(h.ver), shape))
    return out


def _read_image_hdus(path: Path, *, with_data: bool):
    """Open ``path`` once: ``(entries, hdul)`` with every image HDU's data read when ``with_data``.

    The file is closed on return; with ``with_data`` the HDU objects keep their
    pixels in memory (read with ``memmap=False``), so layers are built from them
    without touching the file again.
    """
    from astrovl.exceptions import ImageFileError
    from astrovl.imaging.fitsfile import open_fits, read_hdu_data

    if not path.is_file():
        raise ImageFileError(f"FITS file {str(path)!r} does not exist; check the path")
    # the same header checks, tolerance and errors as astrovl.load_image
    with open_fits(path) as hdul:
        entries = _image_hdu_entries(hdul)
        if with_data:
            for index, _, _, shape in entries:
                if not _read_in_strips(shape):
                    read_hdu_data(hdul[index], f"{path}[{index}]")  # read now, while the file is open
    return entries, hdul


def list_image_hdus(path: str | os.PathLike) -> list[tuple[int, str, int, tuple[int, ...]]]:
    """List the HDUs of a FITS file that hold an image of two or more dimensions.

    Returns
    -------
    list of (index, extname, extver, shape)

    Raises
    ------
    astrovl.exceptions.ImageFileError
        Missing or unreadable file.
    """
    return _read_image_hdus(Path(path), with_data=False)[0]


def contrast_limits_for(raw: np.ndarray, interval=None, mask: np.ndarray | None = None
                        ) -> tuple[float, float]:
    """Contrast limits of ``raw`` from the library's display interval.

    Parameters
    ----------
    raw : numpy.ndarray
        Pixel values (any shape); non-finite values are ignored.
    interval : optional
        Anything :func:`astrovl.imaging.get_interval` accepts; default
        ``astrovl.conf.interval``.
    mask : numpy.ndarray, optional
        True for pixels to ignore (broadcast over colour channels).

    Returns
    -------
    (float, float)
        ``vmin < vmax`` (a constant image gets ``(v, v + 1)``).
    """
    from astrovl import conf
    from astrovl.exceptions import ImageInputError
    from astrovl.imaging import interval_limits

    values = np.asarray(raw)
    m = None
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        m = np.broadcast_to(m[..., None] if values.ndim == m.ndim + 1 else m, values.shape)
    try:
        vmin, vmax = interval_limits(values, conf.interval if interval is None else interval, mask=m)
    except ImageInputError:  # no finite, unmasked value
        return 0.0, 1.0
    if not (np.isfinite(vmin) and np.isfinite(vmax)) or vmax <= vmin:
        valid = np.isfinite(values) if m is None else np.isfinite(values) & ~m
        base = float(np.min(values[valid]))
        return base, base + 1.0
    return vmin, vmax


def _layer_name(path: Path, extname: str, extver: int, index: int, several: bool,
                names: Sequence[str]) -> str:
    stem = path.name
    for suffix in (".gz", ".fz"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    stem = os.path.splitext(stem)[0]
    if not several:
        return stem
    if extname and extname != "PRIMARY":
        repeated = sum(1 for n in names if n == extname) > 1
        return f"{stem} [{extname},{extver}]" if repeated else f"{stem} [{extname}]"
    return f"{stem} [{index}]"


def _is_cube(shape: tuple[int, ...]) -> bool:
    core = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
    return len(core) == 3 and core[0] not in (1, 3)


def fits_layer_data(path: str | os.PathLike, *, interval=None) -> list[LayerData]:
    """Napari layer data for every image HDU of one FITS file.

    The file is opened and read once for all its HDUs and planes. Two-dimensional
    HDUs (and three-plane colour cubes) go through :func:`astrovl.load_image`
    (from the HDU read into memory); cubes of other depths become one 3-D layer
    with a slider, every plane taken from the same array (block-averaged like
    ``load_image``'s planes when they exceed ``astrovl.conf.max_pixels``). A 2-D
    image larger than ``max_pixels`` is not read with the others:
    ``load_image(path, hdu=index)`` reads it block-averaged in strips. See
    the module docstring for the display convention and the metadata kept.

    Parameters
    ----------
    path : str or path-like
    interval : optional
        Display interval for the contrast limits (default ``astrovl.conf.interval``).

    Returns
    -------
    list of (numpy.ndarray, dict, "image")

    Raises
    ------
    astrovl.exceptions.ImageFileError
        Missing, truncated or corrupt file.
    astrovl.exceptions.ImageInputError
        The file has no image HDU.
    """
    from astrovl import load_image
    from astrovl.exceptions import ImageInputError
    from astrovl.imaging.fitsfile import AUXILIARY_EXTNAMES

    path = Path(path)
    hdus, hdul = _read_image_hdus(path, with_data=True)  # the only read of the file
    if not hdus:
        raise ImageInputError(
            f"{str(path)!r} holds no image HDU (only tables or empty headers); open a FITS file "
            "with image data"
        )
    several = len(hdus) > 1
    names = [h[1] for h in hdus]
    layers = []
    for index, extname, extver, shape in hdus:
        hdu = hdul[index]
        try:
            if _is_cube(shape):
                img = load_image(hdu, plane=0)  # header, WCS and downsampling, from memory
                raw = _cube_raw(hdu.data, int(img.meta.get("downsample", 1)))
            elif _read_in_strips(shape):  # larger than max_pixels: load_image reads it in strips
                img = load_image(path, hdu=index)
                raw = img.raw
            else:
                img = load_image(hdu)
                raw = img.raw
        except ImageInputError as exc:  # name the file, not the in-memory HDU
            raise ImageInputError(f"{path}[{index}]: {exc}") from exc
        mask = None if _is_cube(shape) else img.mask  # a cube's invalid pixels are its NaNs
        vmin, vmax = contrast_limits_for(raw, interval, mask)
        rgb = raw.ndim == 3 and not _is_cube(shape)
        factor = int(img.meta.get("downsample", 1))
        spatial_scale, spatial_translate = _grid_transform(factor)
        scale = spatial_scale if rgb or raw.ndim == 2 else (1.0, *spatial_scale)
        translate = spatial_translate if rgb or raw.ndim == 2 else (0.0, *spatial_translate)
        info = {
            "source": f"{path}[{index}]",
            "hdu": index,
            "extname": extname,
            "extver": extver,
            "origin": "lower",
            "downsample": int(img.meta.get("downsample", 1)),
            "stretch": img.meta.get("stretch"),
            "interval": img.meta.get("interval"),
            "contrast_limits": [vmin, vmax],
        }
        kwargs = {
            "name": _layer_name(path, extname, extver, index, several, names),
            "metadata": {"header": img.header, "wcs": img.wcs, "astrovl": info},
            "contrast_limits": [vmin, vmax],
            "scale": scale,
            "translate": translate,
            "rgb": rgb,
            # auxiliary planes open hidden so that the science image is what shows
            "visible": extname.upper() not in AUXILIARY_EXTNAMES,
        }
        if not rgb:
            kwargs["colormap"] = "gray"
        layers.append((np.ascontiguousarray(raw, dtype=np.float32), kwargs, "image"))
    return layers


def _read_in_strips(shape: tuple[int, ...]) -> bool:
    """True for an image HDU (not a cube) whose planes exceed ``astrovl.conf.max_pixels``.

    Such an HDU is not read with the others: ``load_image`` opens the file again
    and reads it block-averaged, a strip of rows at a time.
    """
    from astrovl import conf

    return not _is_cube(shape) and int(shape[-2]) * int(shape[-1]) > int(conf.max_pixels)


def _grid_transform(factor: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Layer ``(scale, translate)`` of the (row, column) axes of a grid block-averaged by ``factor``.

    World coordinates are those of the full-resolution FITS grid (column, and
    minus the row): block ``(i, j)`` lies at the centre of its ``factor x factor``
    pixels, ``(-(i*k + (k-1)/2), j*k + (k-1)/2)``.
    """
    k = float(factor)
    half = (k - 1.0) / 2.0
    return (-k, k), (-half, half)


def _cube_raw(data: np.ndarray, factor: int) -> np.ndarray:
    """All planes of a cube as float32 ``(N, H, W)``, block-averaged like load_image's planes.

    ``factor`` is the downsampling :func:`astrovl.load_image` chose for one plane
    (the planes share a shape); the NaN-aware block mean is the one it uses.
    """
    cube = np.asarray(data)
    if cube.ndim == 4:
        cube = cube[0]
    if factor <= 1:
        return np.asarray(cube, dtype=np.float32)
    from astrovl.imaging.pixel_grid import block_mean

    return np.stack([block_mean(plane, factor)[0] for plane in cube])


def image_layer_data(path: str | os.PathLike) -> list[LayerData]:
    """Napari layer data for any image file :func:`astrovl.load_image` reads.

    FITS files go through :func:`fits_layer_data`. Pictures (JPEG, PNG, TIFF...)
    open as they are stored: 8-bit ones as ``uint8`` (RGB or grey), others as raw
    values with contrast limits from the library's interval.
    """
    from astrovl import load_image

    path = Path(path)
    if is_fits_path(path):
        return fits_layer_data(path)
    img = load_image(path)
    stem = os.path.splitext(path.name)[0]
    info = {"source": img.source, "origin": "upper", "stretch": img.meta.get("stretch"),
            "interval": img.meta.get("interval")}
    kwargs: dict[str, Any] = {"name": stem, "metadata": {"header": img.header, "wcs": img.wcs,
                                                          "astrovl": info},
                              "rgb": img.is_color}
    if img.meta.get("picture"):
        data = np.clip(np.rint(img.raw), 0, 255).astype(np.uint8)
        kwargs["contrast_limits"] = [0, 255]
    else:
        data = np.ascontiguousarray(img.raw, dtype=np.float32)
        kwargs["contrast_limits"] = list(contrast_limits_for(data, mask=img.mask))
    factor = int(img.meta.get("downsample", 1))
    if factor > 1:  # block-averaged: world coordinates of the full-resolution picture
        (_, k), (_, half) = _grid_transform(factor)
        kwargs.update(scale=(k, k), translate=(half, half))
    if not img.is_color:
        kwargs["colormap"] = "gray"
    return [(data, kwargs, "image")]
