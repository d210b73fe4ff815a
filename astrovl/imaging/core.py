"""The :class:`AstroImage` container."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["AstroImage"]


@dataclass
class AstroImage:
    """An astronomical image ready for display and for models.

    Attributes
    ----------
    data : numpy.ndarray
        float32 array of shape ``(H, W)`` (grey) or ``(H, W, 3)`` (colour), scaled
        to ``[0, 1]``. Non-finite and masked pixels are 0.
    raw : numpy.ndarray
        The unscaled pixel values on the same grid as ``data`` (after plane
        selection and any ``max_pixels`` downsampling).
    wcs : astropy.wcs.WCS or None
        Celestial WCS of the pixel grid, if the input had one. For an image
        block-averaged by ``meta["downsample"]`` it is the WCS of the coarser
        grid (pixel centres at the block centres; ``CD`` matrices and SIP
        rescaled).
    header : astropy.io.fits.Header or None
        FITS header of the input, if any. Its WCS keywords describe the input's
        grid; :func:`astrovl.imaging.pixel_grid.header_with_wcs` writes
        :attr:`wcs` into a copy of it.
    source : str
        What the image came from (a path with HDU, or a description of the object).
    mask : numpy.ndarray or None
        Boolean mask of pixels that were invalid (non-finite or masked), shape ``(H, W)``.
    meta : dict
        Extra information (scaling used, downsampling factor, HDU name...).
    """

    data: np.ndarray
    raw: np.ndarray
    wcs: Any = None
    header: Any = None
    source: str = "<array>"
    mask: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :attr:`data`."""
        return tuple(self.data.shape)

    @property
    def is_color(self) -> bool:
        """True for ``(H, W, 3)`` colour images."""
        return self.data.ndim == 3

    def to_uint8(self) -> np.ndarray:
        """Return :attr:`data` as a ``uint8`` array (0-255), row 0 at the top.

        FITS images store row 0 at the bottom (the astronomical convention); the
        returned array is flipped vertically for them so that it displays the
        right way up as a picture.
        """
        out = np.clip(np.rint(self.data * 255.0), 0, 255).astype(np.uint8)
        if self.meta.get("origin", "lower") == "lower":
            out = out[::-1]
        return np.ascontiguousarray(out)

    def to_pil(self, mode: str = "RGB"):
        """Return a :class:`PIL.Image.Image` (``mode="RGB"`` by default, or ``"L"``).

        Grey images are repeated into three channels for ``"RGB"``; colour images
        are converted to luminance for ``"L"``.
        """
        from PIL import Image

        arr = self.to_uint8()
        if mode == "RGB":
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
            return Image.fromarray(arr, mode="RGB")
        if mode == "L":
            img = Image.fromarray(arr, mode="RGB" if arr.ndim == 3 else "L")
            return img.convert("L")
        raise ValueError(f"mode={mode!r} is not supported; use 'RGB' or 'L'")

    def __repr__(self) -> str:
        kind = "colour" if self.is_color else "grey"
        return (
            f"<AstroImage {self.data.shape[1]}x{self.data.shape[0]} {kind} "
            f"source={self.source!r} wcs={'yes' if self.wcs is not None else 'no'}>"
        )
