"""Model inputs of the CLIP image tower: read, scale, resize and normalise images in batches.

Two ways to turn image inputs into the ``(N, 3, S, S)`` tensor the image tower
takes, chosen with ``preprocess=`` in :meth:`~astrovl.CLIPEmbedder.embed_images`:

``"cpu"``
    Each image is read and scaled on the host with numpy and astropy (the
    display scaling of :func:`~astrovl.load_image`), then resized and
    normalised with torch on the host.
``"gpu"``
    Only reading happens on the host: the raw pixels of FITS files and 2-D
    arrays go to the model's device as float32 batches (pinned memory,
    non-blocking copies), where the interval, the stretch, the resize and the
    normalisation run on the whole batch at once. Inputs that need more than
    that (pictures, colour images, cubes, masks, :class:`~astrovl.AstroImage`)
    and intervals or stretches without a torch version take the ``"cpu"`` way,
    in the same batch.

Both follow the reference path of ``embed_images`` in earlier versions
(``load_image``, ``AstroImage.to_pil`` and the model's open_clip transform):

1. the display scaling of :func:`~astrovl.load_image` (``astrovl.conf.stretch``
   and ``astrovl.conf.interval``; percentiles on a fixed sample of large
   images, see :mod:`astrovl.imaging.scaling`), FITS images flipped so that
   row 0 is at the top;
2. quantisation to 8 bits, as ``AstroImage.to_uint8`` does (and as the
   training data loader sees images);
3. the open_clip evaluation transform of the model's ``preprocess_cfg``
   (shortest side resized with antialiasing, centre crop, or ``squash``),
   with torch's antialiased kernels in float32 instead of PIL's 8-bit ones;
4. the model's mean and standard deviation.

Tolerances: the ``"cpu"`` way gives the reference model inputs to within
3/255 at sharp edges and 0.5/255 on average (PIL resizes 8-bit images in two
passes, rounding and clipping in between; torch resizes in float32); the
``"gpu"`` way computes the scaling in float32 and gives the ``"cpu"`` way's
inputs to within 1/255 (where rounding moves a value across an 8-bit level).
Embeddings of the tiny test model move by less than 2e-3. Both are tested
against the reference on real images (``tests/test_clip_preprocess.py``).
Resize modes other than ``shortest`` and
``squash`` (``longest``, which pads) use the model's own PIL transform.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PREPROCESS_MODES",
    "InputSpec",
    "UnitImage",
    "read_unit_image",
    "read_raw_pixels",
    "host_model_input",
    "device_model_input",
    "FeedDataset",
    "collate_feed",
    "assemble_batch",
    "resolve_preprocess",
    "auto_num_workers",
]

#: values of ``preprocess=`` in :meth:`~astrovl.CLIPEmbedder.embed_images`
PREPROCESS_MODES = ("auto", "cpu", "gpu")

# below this many images per call, worker processes cost more than they save
MIN_IMAGES_FOR_WORKERS = 256


# --------------------------------------------------------------------------- model input spec


@dataclass(frozen=True)
class InputSpec:
    """What the model's image tower expects (from ``CLIPEmbedder.preprocess_cfg``).

    Attributes
    ----------
    size : int
        Side of the square input.
    mean, std : tuple of float
        Per-channel normalisation.
    interpolation : str
        ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
    resize_mode : str
        ``"shortest"`` (resize the shorter side, centre crop), ``"squash"`` or
        ``"longest"`` (pads; done by the model's PIL transform).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_embedder(cls, embedder) -> InputSpec:
        cfg = embedder.preprocess_cfg
        return cls(size=int(embedder.image_size), mean=tuple(float(v) for v in embedder.image_mean),
                   std=tuple(float(v) for v in embedder.image_std),
                   interpolation=str(cfg.get("interpolation") or "bicubic"),
                   resize_mode=str(cfg.get("resize_mode") or "shortest"))

    @property
    def tensor_path(self) -> bool:
        """True when torch kernels reproduce the transform (else the PIL transform is used)."""
        return self.resize_mode in ("shortest", "squash") and self.interpolation in (
            "bicubic", "bilinear", "nearest")


# --------------------------------------------------------------------------- reading


@dataclass
class UnitImage:
    """An image scaled to ``[0, 1]``: float32 ``(H, W)`` or ``(H, W, 3)``, and its row order."""

    data: np.ndarray
    lower: bool  # True: row 0 is the bottom (FITS), flipped before the model sees it
    clipped: bool = True  # False: values may lie outside [0, 1] (a user's AstroImage)


def _read_single_fits_image(path: Path, max_pixels: int | None = None) -> np.ndarray | None:
    """Pixels of a FITS file whose science image is one 2-D HDU, as float32; None otherwise.

    An image of more than ``max_pixels`` pixels also returns None, before any
    pixel is read (``load_image`` reads it block-averaged in strips).

    This is the HDU :func:`~astrovl.load_image` takes when there is no choice to
    make; anything else (several candidate HDUs, cubes) returns None and goes
    through ``load_image``, which chooses or raises the error.
    The file is opened with :func:`astrovl.imaging.fitsfile.open_fits`, so the
    same size checks run before any data is read and a corrupt or forged file
    raises the same :class:`~astrovl.exceptions.ImageFileError` as ``load_image``.
    No header is copied and no WCS is built.
    """
    from ..imaging.fitsfile import open_fits, read_hdu_data, science_candidates

    with open_fits(path) as hdul:  # ImageFileError for corrupt, truncated or forged files
        candidates = science_candidates(hdul)
        if len(candidates) != 1:
            return None
        hdu = hdul[candidates[0]]
        if len(hdu.shape) != 2:
            return None
        if max_pixels is not None and int(np.prod(hdu.shape)) > max_pixels:
            return None  # load_image reads it block-averaged in strips
        data = read_hdu_data(hdu, str(path))
        if data is None or data.dtype.kind not in "biuf":
            return None
        return _native_float32(np.asarray(data))


def _native_float32(data: np.ndarray) -> np.ndarray:
    """``data`` as native float32; big-endian float32 read from a file is swapped in place.

    (The array was just read for us, so swapping its bytes saves a copy: this is
    the common case, FITS stores big-endian values.)
    """
    if data.dtype.kind == "f" and data.dtype.itemsize == 4 and not data.dtype.isnative \
            and data.flags.writeable and data.flags.c_contiguous:
        data.byteswap(inplace=True)
        return data.view(data.dtype.newbyteorder("="))
    return np.asarray(data, dtype=np.float32)


def _fast_raw(item: Any, max_pixels: int | None) -> np.ndarray | None:
    """Raw float32 ``(H, W)`` pixels of the inputs that need no parsing, else None."""
    if max_pixels is None:
        from ..config import conf

        max_pixels = int(conf.max_pixels)
    raw = None
    if isinstance(item, (str, os.PathLike)):
        from ..imaging.inputs import is_fits_name

        path = Path(item)
        if is_fits_name(path) and path.is_file():
            raw = _read_single_fits_image(path, max_pixels)
    elif (isinstance(item, np.ndarray) and type(item) is np.ndarray and item.ndim == 2
          and item.dtype.kind in "biuf" and item.dtype != np.uint8 and item.size <= max_pixels):
        raw = np.asarray(item, dtype=np.float32)
    if raw is None or raw.size == 0 or raw.size > max_pixels:
        return None
    return raw


def _scaling() -> tuple[Any, Any]:
    from ..config import conf
    from ..imaging import get_interval, get_stretch

    return get_stretch(conf.stretch), get_interval(conf.interval)


def read_unit_image(item: Any, stretch=None, interval=None, max_pixels: int | None = None) -> UnitImage:
    """Read and scale one image input as :func:`~astrovl.load_image` would.

    FITS files with one 2-D image HDU and 2-D arrays are read and scaled
    directly (no header copy, no WCS); the result equals
    ``load_image(item).data``. An :class:`~astrovl.AstroImage` keeps its own
    ``data``; every other input goes through ``load_image``. ``stretch``,
    ``interval`` and ``max_pixels`` default to ``astrovl.conf``'s (pass them to
    save looking them up for every image).
    """
    from ..exceptions import ImageInputError
    from ..imaging import AstroImage, load_image, scale_to_unit

    if isinstance(item, AstroImage):
        return UnitImage(item.data, item.meta.get("origin", "lower") == "lower", clipped=False)
    raw = _fast_raw(item, max_pixels)
    if raw is not None:
        if stretch is None or interval is None:
            stretch, interval = _scaling()
        try:
            return UnitImage(scale_to_unit(raw, stretch=stretch, interval=interval), True)
        except ImageInputError:  # no finite pixel: load_image raises it naming the input
            pass
    img = load_image(item)
    return UnitImage(img.data, img.meta.get("origin", "lower") == "lower")


def read_raw_pixels(item: Any, max_pixels: int | None = None) -> np.ndarray | None:
    """Raw float32 ``(H, W)`` pixels for scaling on the device, or None.

    None means the input needs the host path (not a single-image FITS file or
    a 2-D array, or no finite pixel: ``load_image`` then raises).
    """
    raw = _fast_raw(item, max_pixels)
    if raw is None or not np.isfinite(raw).any():
        return None
    return raw


# --------------------------------------------------------------------------- host path


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}[name]


def _resized_shape(h: int, w: int, spec: InputSpec) -> tuple[int, int]:
    """Output size of torchvision's ``Resize`` (``size`` an int: the shorter side) or squash."""
    if spec.resize_mode == "squash":
        return spec.size, spec.size
    if h <= w:
        return spec.size, int(spec.size * w / h)
    return int(spec.size * h / w), spec.size


def _resize_crop(pixels, spec: InputSpec):
    """Resize ``(B, C, H, W)`` float pixels as the open_clip eval transform does.

    torchvision's ``Resize`` then ``CenterCrop`` on tensors (the same output
    sizes and crop offsets), written with ``torch.nn.functional.interpolate``
    directly. The result is not clamped.
    """
    import torch.nn.functional as F

    h, w = pixels.shape[-2:]
    nh, nw = _resized_shape(h, w, spec)
    if (nh, nw) != (h, w):
        if spec.interpolation == "nearest":
            pixels = F.interpolate(pixels, size=(nh, nw), mode="nearest")
        else:
            pixels = F.interpolate(pixels, size=(nh, nw), mode=spec.interpolation,
                                   align_corners=False, antialias=True)
    top, left = int(round((nh - spec.size) / 2.0)), int(round((nw - spec.size) / 2.0))
    return pixels[..., top:top + spec.size, left:left + spec.size]


@functools.lru_cache(maxsize=8)
def _mean_std(spec: InputSpec, device: str):
    import torch

    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def _normalize(pixels, spec: InputSpec, levels: float = 1.0):
    """``(B, 1|3, S, S)`` pixels in ``[0, levels]`` -> clamped, normalised ``(B, 3, S, S)`` float32."""
    mean, std = _mean_std(spec, str(pixels.device))
    pixels = pixels.clamp(0.0, levels)
    if levels != 1.0:
        pixels = pixels.div_(levels)
    return (pixels - mean) / std


def _levels(unit: UnitImage) -> np.ndarray:
    """8-bit levels (0-255, as float32) of ``unit.data``, row 0 at the top.

    The values of :meth:`AstroImage.to_uint8`, which the model's PIL transform
    saw; the flip comes free with the first (copying) step. The division by 255
    happens after the resize, on the small image.
    """
    view = unit.data[::-1] if unit.lower else unit.data
    q = np.multiply(view, np.float32(255.0), dtype=np.float32)
    np.rint(q, out=q)
    if not unit.clipped:
        np.clip(q, 0.0, 255.0, out=q)
    return q


def _pil_model_input(unit: UnitImage, transform):
    from ..imaging import AstroImage

    img = AstroImage(data=unit.data, raw=unit.data, meta={"origin": "lower" if unit.lower else "upper"})
    return transform(img.to_pil())


def host_model_input(unit: UnitImage, spec: InputSpec, transform=None):
    """Normalised ``(3, S, S)`` model input of one scaled image, on the host.

    ``transform`` (the model's PIL transform) is used when ``spec`` has a resize
    mode the tensor kernels do not reproduce.
    """
    import torch

    if not spec.tensor_path:
        if transform is None:
            raise ValueError(f"resize_mode={spec.resize_mode!r} needs the model's PIL transform")
        return _pil_model_input(unit, transform)
    q = torch.from_numpy(_levels(unit))
    q = q[None, None] if q.ndim == 2 else q[..., :3].permute(2, 0, 1)[None]
    return _normalize(_resize_crop(q, spec), spec, 255.0)[0]


# --------------------------------------------------------------------------- device path


def _torch_linear(x, stretch):
    if stretch.slope != 1:
        x = x.mul_(float(stretch.slope))
    if stretch.intercept != 0:
        x = x.add_(float(stretch.intercept))
    return x


def _torch_asinh(x, stretch):
    a = float(stretch.a)
    return x.div_(a).asinh_().div_(math.asinh(1.0 / a))


def _torch_sinh(x, stretch):
    a = float(stretch.a)
    return x.div_(a).sinh_().div_(math.sinh(1.0 / a))


def _torch_sqrt(x, stretch):
    return x.sqrt_()


def _torch_log(x, stretch):
    a = float(stretch.a)
    return x.mul_(a).add_(1.0).log_().div_(math.log(a + 1.0))


def _torch_power(x, stretch):
    return x.pow_(float(stretch.a))


@functools.cache
def _torch_stretches() -> dict[type, Callable]:
    """The astropy stretches with a torch version, keyed by their type."""
    from astropy import visualization as vis

    return {
        vis.LinearStretch: _torch_linear,
        vis.AsinhStretch: _torch_asinh,
        vis.SinhStretch: _torch_sinh,
        vis.SqrtStretch: _torch_sqrt,
        vis.LogStretch: _torch_log,
        vis.PowerStretch: _torch_power,
        vis.SquaredStretch: _torch_power,
    }


def _device_scaling_supported(stretch, interval) -> bool:
    from astropy import visualization as vis

    return (type(stretch) in _torch_stretches()
            and isinstance(interval, (vis.AsymmetricPercentileInterval, vis.MinMaxInterval,
                                      vis.ManualInterval))
            and getattr(interval, "n_samples", None) is None)


def _torch_stretch(x, stretch):
    """Apply an astropy stretch to a torch tensor of values in ``[0, 1]`` (in place when possible)."""
    apply = _torch_stretches().get(type(stretch))
    if apply is None:  # guarded by _device_scaling_supported
        raise TypeError(f"no torch version of {type(stretch).__name__}")
    return apply(x, stretch)


def _torch_percentiles(values, valid, percents: Sequence[float]):
    """Percentiles per row of ``values`` over its ``valid`` entries, as ``np.percentile`` computes them.

    Returns a float64 ``(B, len(percents))`` tensor (linear interpolation
    between the closest ranks).
    """
    import torch

    keyed = torch.where(valid, values, torch.full_like(values, float("inf")))
    ordered, _ = torch.sort(keyed, dim=1)
    count = valid.sum(dim=1).to(torch.float64)
    cols = []
    for p in percents:
        pos = (float(p) / 100.0) * (count - 1.0)
        below = torch.floor(pos)
        gamma = (pos - below).unsqueeze(1)
        lo = below.long().clamp_(min=0).unsqueeze(1)
        hi = torch.minimum(lo + 1, (count.long() - 1).clamp_(min=0).unsqueeze(1))
        a = ordered.gather(1, lo).to(torch.float64)
        b = ordered.gather(1, hi).to(torch.float64)
        diff = b - a
        # numpy's _lerp: a + diff * t, from the upper end when t >= 0.5
        cols.append(torch.where(gamma >= 0.5, b - diff * (1.0 - gamma), a + diff * gamma))
    return torch.cat(cols, dim=1)


@functools.lru_cache(maxsize=8)
def _device_positions(size: int, max_samples: int, device: str):
    import torch

    from ..imaging.scaling import sample_positions

    positions = sample_positions(size, max_samples)
    return None if positions is None else torch.as_tensor(np.array(positions), device=device)


def _device_limits(flat, finite, interval):
    """``(vmin, vmax)`` float64 ``(B,)`` tensors of rows of raw pixels, as :func:`interval_limits`."""
    import torch
    from astropy import visualization as vis

    from ..imaging.scaling import PERCENTILE_SAMPLES

    if isinstance(interval, vis.ManualInterval):
        lo = torch.where(finite, flat, torch.full_like(flat, float("inf"))).amin(dim=1).double()
        hi = torch.where(finite, flat, torch.full_like(flat, -float("inf"))).amax(dim=1).double()
        vmin = lo if interval.vmin is None else torch.full_like(lo, float(interval.vmin))
        vmax = hi if interval.vmax is None else torch.full_like(hi, float(interval.vmax))
        return vmin, vmax
    if isinstance(interval, vis.MinMaxInterval):
        vmin = torch.where(finite, flat, torch.full_like(flat, float("inf"))).amin(dim=1)
        vmax = torch.where(finite, flat, torch.full_like(flat, -float("inf"))).amax(dim=1)
        return vmin.double(), vmax.double()
    percents = (interval.lower_percentile, interval.upper_percentile)
    positions = _device_positions(flat.shape[1], PERCENTILE_SAMPLES, str(flat.device))
    if positions is None:
        limits = _torch_percentiles(flat, finite, percents)
    else:
        sample, ok = flat[:, positions], finite[:, positions]
        limits = _torch_percentiles(sample, ok, percents)
        # rows with more than half of the sample invalid use all their valid pixels
        sparse = torch.nonzero(2 * ok.sum(dim=1) < positions.numel()).flatten().tolist()
        for r in sparse:
            limits[r] = _torch_percentiles(flat[r:r + 1], finite[r:r + 1], percents)[0]
    return limits[:, 0], limits[:, 1]


def device_model_input(raw, spec: InputSpec, stretch, interval):
    """Normalised ``(B, 3, S, S)`` model inputs from raw ``(B, H, W)`` float32 FITS-order pixels.

    Runs where ``raw`` is (the model's device): the display scaling
    (``interval`` and ``stretch``, invalid pixels 0), 8-bit quantisation, the
    flip to row 0 at the top, resize, crop and normalisation, for the whole
    batch. Every row must have a finite pixel (:func:`read_raw_pixels` checks).
    """
    import torch

    b, h, w = raw.shape
    flat = raw.reshape(b, h * w)
    finite = torch.isfinite(flat)
    vmin, vmax = _device_limits(flat, finite, interval)
    flat_ok = torch.isfinite(vmin) & torch.isfinite(vmax) & (vmax > vmin)
    span = torch.where(flat_ok, vmax - vmin, torch.ones_like(vmax))
    x = (flat - vmin.float().unsqueeze(1)).mul_((1.0 / span).float().unsqueeze(1))
    x = _torch_stretch(x.clamp_(0.0, 1.0), stretch).clamp_(0.0, 1.0)
    x = torch.where(finite & torch.isfinite(x) & flat_ok.unsqueeze(1), x, torch.zeros_like(x))
    # 8-bit levels as AstroImage.to_uint8, then row 0 at the top
    x = x.mul_(255.0).round_().reshape(b, 1, h, w).flip(-2)
    return _normalize(_resize_crop(x, spec), spec, 255.0)


# --------------------------------------------------------------------------- batching


class FeedDataset:
    """Map-style dataset of image inputs for :class:`torch.utils.data.DataLoader`.

    Item ``i`` is ``("raw", float32 (H, W) array)`` when the input is scaled on
    the device (``device_scaling``, where the resize mode and the configured
    stretch and interval have torch versions), else ``("ready", (3, S, S) tensor)``, the
    normalised model input made on the host (in the worker process).
    """

    def __init__(self, items: list, spec: InputSpec, *, device_scaling: bool, transform=None):
        from ..config import conf

        self.items = items
        self.spec = spec
        self.transform = transform
        self.stretch, self.interval = _scaling()
        self.max_pixels = int(conf.max_pixels)
        # the device path needs the tensor resize and a torch version of the scaling
        self.device_scaling = bool(device_scaling and spec.tensor_path
                                   and _device_scaling_supported(self.stretch, self.interval))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        if self.device_scaling:
            raw = read_raw_pixels(item, self.max_pixels)
            if raw is not None:
                return "raw", raw
        unit = read_unit_image(item, self.stretch, self.interval, self.max_pixels)
        return "ready", host_model_input(unit, self.spec, self.transform)


def collate_feed(records: list) -> dict:
    """Group the records of one batch: host-made inputs stacked, raw pixels stacked by shape.

    Returns a dict of tensors (what :class:`~torch.utils.data.DataLoader` pins):
    ``n``, ``ready`` ``(k, 3, S, S)`` with ``ready_index``, and lists ``raw``
    (``(b, H, W)`` per shape) with ``raw_index``.
    """
    import torch
    from torch.utils.data import default_collate

    ready = [(i, t) for i, (kind, t) in enumerate(records) if kind == "ready"]
    groups: dict[tuple[int, int], list] = {}
    for i, (kind, arr) in enumerate(records):
        if kind == "raw":
            groups.setdefault(arr.shape, []).append((i, arr))
    out = {"n": len(records), "raw": [], "raw_index": []}
    if ready:
        out["ready"] = default_collate([t for _, t in ready])
        out["ready_index"] = torch.tensor([i for i, _ in ready], dtype=torch.long)
    for members in groups.values():
        out["raw"].append(default_collate([torch.from_numpy(a) for _, a in members]))
        out["raw_index"].append(torch.tensor([i for i, _ in members], dtype=torch.long))
    return out


def assemble_batch(batch: dict, spec: InputSpec, device, stretch=None, interval=None):
    """The ``(n, 3, S, S)`` model input on ``device`` from a :func:`collate_feed` batch.

    Tensors are copied with ``non_blocking=True`` (asynchronous from pinned
    memory); raw groups are scaled, resized and normalised on the device.
    """
    import torch

    n = int(batch["n"])
    if "ready" in batch and not batch["raw"]:
        return batch["ready"].to(device, non_blocking=True)
    if stretch is None or interval is None:
        stretch, interval = _scaling()
    out = torch.empty((n, 3, spec.size, spec.size), dtype=torch.float32, device=device)
    if "ready" in batch:
        out[batch["ready_index"].to(device, non_blocking=True)] = batch["ready"].to(
            device, non_blocking=True)
    for raw, index in zip(batch["raw"], batch["raw_index"]):
        pixels = device_model_input(raw.to(device, non_blocking=True), spec, stretch, interval)
        out[index.to(device, non_blocking=True)] = pixels
    return out


def resolve_preprocess(preprocess: str, device) -> str:
    """``"cpu"`` or ``"gpu"`` for ``preprocess=`` (``"auto"``: ``"gpu"`` on CUDA, else ``"cpu"``)."""
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess={preprocess!r} is not known; use one of {PREPROCESS_MODES}")
    if preprocess == "auto":
        return "gpu" if getattr(device, "type", str(device)) == "cuda" else "cpu"
    return preprocess


def auto_num_workers(n_items: int, batch_size: int, device) -> int:
    """DataLoader workers for ``embed_images`` when the caller gives none.

    None for small calls (fewer than :data:`MIN_IMAGES_FOR_WORKERS` images:
    starting worker processes costs more than they save) and on a CPU device
    (the model needs the cores; measured in ``benchmarks/bench_clip_embed.py
    --feed``); on CUDA up to 8, one per CPU core, at most one per batch.
    """
    if n_items < MIN_IMAGES_FOR_WORKERS or getattr(device, "type", str(device)) != "cuda":
        return 0
    n_batches = -(-n_items // max(1, batch_size))
    return max(0, min(8, os.cpu_count() or 1, n_batches))
