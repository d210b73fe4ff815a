"""What the image dataset builders share.

The Hubble (:mod:`astrovl.datasets.hubble`) and outreach
(:mod:`astrovl.datasets.outreach`) builders decode pictures strictly
(:func:`open_verified_image`), resize them onto a white square
(:func:`resize_and_pad`), write them atomically as PNG (:func:`save_png`),
recognise finished images on a re-run (:func:`is_complete_png`), split keys
into train and validation by a seeded hash (:func:`assign_splits`), retry
network calls (:func:`retry`) and count what happened in a
:class:`BuildReport`. The public names are re-exported by
:mod:`astrovl.datasets.hubble`, where they were first documented.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from ..exceptions import DatasetError, ImageFileError
from ..utils.files import atomic_write

__all__ = [
    "BuildReport",
    "PAD_VALUE",
    "REPORT_NAME",
    "assign_splits",
    "check_builder_options",
    "is_complete_png",
    "open_verified_image",
    "resize_and_pad",
    "retry",
    "save_png",
    "slug",
    "split_draw",
]

PAD_VALUE = 255
REPORT_NAME = "build_report.json"
_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


# --------------------------------------------------------------------------- report
class BuildReport(dict):
    """Counts of a dataset build, with the reasons of every failure.

    A :class:`dict` of count name -> int (``downloaded``, ``skipped``,
    ``failed``, ``excluded``...). :attr:`failures` lists ``{"item", "reason"}``
    dicts, :attr:`exclusions` the excluded inputs with their reason.
    ``print(report)`` shows a short summary; :meth:`to_table` returns an
    :class:`~astropy.table.Table`.
    """

    def __init__(self, keys: Iterable[str]):
        super().__init__({k: 0 for k in keys})
        self.failures: list[dict[str, str]] = []
        self.exclusions: list[dict[str, str]] = []

    def add_failure(self, item: str, reason: str, key: str = "failed") -> None:
        """Count a failure under ``key`` and remember its reason."""
        self[key] = self.get(key, 0) + 1
        self.failures.append({"item": str(item), "reason": str(reason)})

    def add_exclusion(self, item: str, reason: str) -> None:
        """Count an excluded input and remember why."""
        self["excluded"] = self.get("excluded", 0) + 1
        self.exclusions.append({"item": str(item), "reason": str(reason)})

    def to_table(self) -> Table:
        """The counts as a two-column table (``count``, ``value``)."""
        return Table(rows=[(k, int(v)) for k, v in self.items()], names=("count", "value"),
                     dtype=(str, np.int64))

    def to_dict(self) -> dict[str, Any]:
        """Counts, failures and exclusions as plain JSON-serializable data."""
        return {"counts": dict(self), "failures": self.failures, "exclusions": self.exclusions}

    def __str__(self) -> str:
        width = max((len(k) for k in self), default=0)
        lines = [f"{k:<{width}}  {v}" for k, v in self.items()]
        for f in self.failures[:10]:
            lines.append(f"failed: {f['item']}: {f['reason']}")
        if len(self.failures) > 10:
            lines.append(f"... and {len(self.failures) - 10} more failures")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


# --------------------------------------------------------------------------- images
@contextlib.contextmanager
def _strict_decoding():
    from PIL import ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def open_verified_image(path: str | os.PathLike):
    """Open a picture file and decode it completely.

    Parameters
    ----------
    path : str or path-like
        JPEG, PNG, GIF, TIFF... file (anything Pillow reads; first frame of
        animations).

    Returns
    -------
    PIL.Image.Image
        The decoded image, detached from the file.

    Raises
    ------
    ImageFileError
        If the file is missing, empty, truncated, corrupt or not a picture.
    """
    from PIL import Image

    path = Path(path)
    try:
        with _strict_decoding(), Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError as exc:
        raise ImageFileError(f"image file {str(path)!r} does not exist") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageFileError(
            f"image file {str(path)!r} is truncated, corrupt or not a picture ({exc})"
        ) from exc


def _to_display_mode(im):
    """Convert a Pillow image to 8-bit ``"L"`` or ``"RGB"``; transparency becomes white."""
    from PIL import Image

    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (PAD_VALUE,) * 4)
        im = Image.alpha_composite(canvas, rgba).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        im = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "1":
        im = im.convert("L")
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return im


def resize_and_pad(image, size: int):
    """Resize so that the longer side is ``size`` pixels and pad to a white square.

    Parameters
    ----------
    image : PIL.Image.Image
        Any Pillow image. Palette, alpha (composited on white) and 16-bit or
        float images are converted to 8-bit greyscale or RGB first.
    size : int
        Side of the square output.

    Returns
    -------
    PIL.Image.Image
        ``size x size`` image, mode ``"L"`` or ``"RGB"``. The resized picture
        (Lanczos filter, aspect ratio kept) is centred; the padding is white (255).
    """
    from PIL import Image

    size = int(size)
    if size < 1:
        raise ValueError(f"size={size!r} must be a positive number of pixels")
    im = _to_display_mode(image)
    w, h = im.size
    scale = size / max(w, h)
    new = (max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale))))
    if new != (w, h):
        im = im.resize(new, Image.Resampling.LANCZOS)
    fill = PAD_VALUE if im.mode == "L" else (PAD_VALUE,) * 3
    canvas = Image.new(im.mode, (size, size), fill)
    canvas.paste(im, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def is_complete_png(path: str | os.PathLike, size: int | None = None) -> bool:
    """True if ``path`` is a readable PNG (of ``size x size`` pixels when given)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or (size is not None and im.size != (size, size)):
                return False
            im.verify()
    except Exception:
        return False
    return True


def save_png(image, path: str | os.PathLike) -> None:
    """Write a Pillow image as PNG, atomically (readers never see a partial file)."""
    with atomic_write(path, "wb") as fh:
        image.save(fh, format="PNG")


def split_draw(key, seed: int) -> float:
    """A number in ``[0, 1)`` that is a fixed function of ``str(key)`` and ``seed`` (SHA-256)."""
    digest = hashlib.sha256(f"astrovl-split:{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(keys: Iterable, seed: int, val_fraction: float) -> dict:
    """Assign each key (proposal, record...) to ``"train"`` or ``"val"``.

    A key goes to validation when its :func:`split_draw` (a hash of the key and
    the seed) is below ``val_fraction``. The split of a key therefore depends
    only on the key, the seed and the fraction: adding proposals or cycles to a
    dataset later never moves an existing proposal between train and val.

    A small set where no key (or every key) falls into validation would have no
    validation (or no training) data: then, with two keys or more and
    ``val_fraction > 0``, the key with the smallest draw goes to validation (or
    the one with the largest to training). Only such small sets depend on which
    other keys are present.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1)")
    ordered = sorted(set(keys), key=str)
    draws = {k: split_draw(k, seed) for k in ordered}
    out = {k: ("val" if draws[k] < val_fraction else "train") for k in ordered}
    if val_fraction > 0 and len(ordered) >= 2:
        if "val" not in out.values():
            out[min(ordered, key=draws.get)] = "val"
        if "train" not in out.values():
            out[max(ordered, key=draws.get)] = "train"
    return out


def retry(fn: Callable[[], Any], *, attempts: int, delay: float, what: str,
          cleanup: Callable[[], Any] | None = None) -> Any:
    """Call ``fn`` up to ``attempts`` times with exponential back-off and return its result.

    Parameters
    ----------
    fn : callable
        Called with no argument (a network query, a download and its check).
    attempts : int
        Calls at most.
    delay : float
        Seconds to wait before the second call; doubled before every further one.
    what : str
        What ``fn`` does, for the error message.
    cleanup : callable, optional
        Called after every failed call (e.g. to delete a partial download);
        its own errors are ignored.

    Raises
    ------
    DatasetError
        When every call failed; its ``__cause__`` is the last error of ``fn``.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if cleanup is not None:
                with contextlib.suppress(Exception):
                    cleanup()
            if attempt == attempts - 1:
                raise DatasetError(f"{what} failed after {attempts} attempt(s): {exc}") from exc
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def slug(text: str, default: str = "item", max_len: int = 80) -> str:
    """``text`` as a file-name-safe stem: runs of other characters than letters, digits,
    ``_``, ``.`` and ``-`` become ``_``, cut to ``max_len``; ``default`` when nothing is left."""
    s = _SLUG.sub("_", str(text)).strip("._")
    return s[:max_len] or default


def check_builder_options(image_size, val_fraction, max_retries) -> None:
    """Validate the options every image dataset builder shares (DatasetError if bad)."""
    if int(image_size) < 8:
        raise DatasetError(f"image_size={image_size!r} must be at least 8 pixels")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DatasetError(f"val_fraction={val_fraction!r} must be in [0, 1)")
    if int(max_retries) < 0:
        raise DatasetError(f"max_retries={max_retries!r} must be >= 0")
