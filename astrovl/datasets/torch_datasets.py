"""PyTorch views of manifest datasets, with the HubbleCLIP augmentations.

Training reads images through :class:`ImageTextTorchDataset`: FITS or picture
files are decoded with :func:`~astrovl.load_image` (display scaling to
``[0, 1]``), turned into 3-channel tensors, augmented with random 90-degree
rotations, flips and a random crop of the model's input size
(:mod:`torchvision.transforms.v2`), and normalized with the model's mean and
standard deviation. Every sample's randomness comes from a seed given with its
index, so a run resumed at step ``s`` sees exactly the batches it would have
seen without the interruption.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torchvision.transforms import v2

from ..exceptions import DatasetError
from .records import ManifestDataset

__all__ = ["ImageTextTorchDataset", "image_to_tensor", "image_to_uint8", "uint8_to_tensor", "sentence_chunk",
           "item_seed"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def item_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed that is a pure function of ``seed`` and ``parts`` (any Python, any process)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(p) & 0xFFFFFFFF for p in parts]])
               .generate_state(1)[0] & 0x7FFFFFFF)


def image_to_uint8(path) -> np.ndarray:
    """Load an image file as display-scaled 8-bit pixels, ``(H, W)`` or ``(H, W, 3)``, row 0 at the top."""
    from ..imaging import load_image

    return np.ascontiguousarray(load_image(path).to_uint8())


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """8-bit pixels ``(H, W)`` or ``(H, W, 3)`` as a float ``(3, H, W)`` tensor in ``[0, 1]``."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.unsqueeze(0).expand(3, -1, -1) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.float() / 255.0


def image_to_tensor(path, size: int | None = None) -> torch.Tensor:
    """Load an image file as a float ``(3, H, W)`` tensor in ``[0, 1]`` (row 0 at the top).

    With ``size``, the shorter side is resized to ``size`` (antialiased).
    """
    t = uint8_to_tensor(image_to_uint8(path))
    if size is not None and min(t.shape[-2:]) != size:
        t = v2.functional.resize(t, size, antialias=True)
    return t


def sentence_chunk(text: str, rng: np.random.Generator, fits) -> str:
    """Pick a random run of consecutive sentences of ``text`` for which ``fits(chunk)`` holds.

    Used for raw-abstract captions, which are longer than the text encoder's context:
    a random starting sentence is chosen and sentences are appended while the run
    still fits. A first sentence that alone is too long is returned as is (the
    tokenizer truncates it).
    """
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
    if len(sentences) <= 1 or fits(text):
        return text
    start = int(rng.integers(len(sentences)))
    chunk = sentences[start]
    for s in sentences[start + 1:]:
        candidate = chunk + " " + s
        if not fits(candidate):
            break
        chunk = candidate
    return chunk


class ImageTextTorchDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``(image_tensor, caption)`` pairs for contrastive training.

    Items are requested as ``(index, seed)`` pairs; the seed drives the
    augmentation and caption sampling of that item.

    Parameters
    ----------
    dataset : ManifestDataset
    image_size : int
        Model input size (the crop size).
    mean, std : sequence of float
        Normalization of the model.
    augment : bool
        Random 90-degree rotations, flips and random crops (training); without it
        images are resized and centre-cropped (validation).
    captions : list of str, optional
        Override the manifest captions (e.g. a shuffled control).
    caption_mode : {"caption", "abstract"}
        ``"abstract"`` picks random runs of sentences that fit ``fits_context``.
    fits_context : callable, optional
        ``fits_context(text) -> bool``, needed for ``caption_mode="abstract"``.
    cache : {"memory", "disk", "none"}, bool or cache object
        How decoded 8-bit images are kept after their first read
        (:mod:`astrovl.datasets.imagecache`): ``"memory"`` (or True) in this
        process, up to ``cache_max_bytes``, for loading without DataLoader
        workers; ``"disk"``, a memory-mapped file in ``cache_dir`` shared by all
        workers; ``"none"`` (or False) decodes every time.
    cache_dir : path, optional
        Directory of the ``"disk"`` cache (required for it).
    cache_max_bytes : int
        Bound of the ``"memory"`` cache (default 4 GiB).
    """

    def __init__(self, dataset: ManifestDataset, image_size: int, mean, std, *, augment: bool = True,
                 captions: list[str] | None = None, caption_mode: str = "caption",
                 fits_context=None, cache="memory", cache_dir=None, cache_max_bytes: int = 4 << 30):
        if len(dataset) == 0:
            raise DatasetError("the dataset is empty")
        if caption_mode not in ("caption", "abstract"):
            raise ValueError(f"caption_mode={caption_mode!r} must be 'caption' or 'abstract'")
        if caption_mode == "abstract" and fits_context is None:
            raise ValueError("caption_mode='abstract' needs fits_context")
        self.paths = [str(p) for p in dataset.image_paths]
        self.ids = [str(i) for i in dataset.manifest["id"]]
        if captions is None:
            col = "abstract" if caption_mode == "abstract" and "abstract" in dataset.manifest.colnames else "caption"
            captions = [str(c) for c in dataset.manifest[col]]
        if len(captions) != len(self.paths):
            raise ValueError("captions must have one entry per image")
        self.captions = list(captions)
        self.image_size = int(image_size)
        self.augment = augment
        self.caption_mode = caption_mode
        self.fits_context = fits_context
        self.normalize = v2.Normalize(mean=list(mean), std=list(std))
        self.cache = self._make_cache(cache, cache_dir, cache_max_bytes)

    def _make_cache(self, cache, cache_dir, max_bytes):
        from .imagecache import CACHE_KINDS, DiskImageCache, MemoryImageCache

        if cache is True:
            cache = "memory"
        if cache is False or cache is None:
            cache = "none"
        if not isinstance(cache, str):
            return cache  # a cache object shared with another dataset
        if cache not in CACHE_KINDS:
            raise ValueError(f"cache={cache!r} must be one of {CACHE_KINDS}")
        if cache == "memory":
            return MemoryImageCache(max_bytes)
        if cache == "disk":
            if cache_dir is None:
                raise ValueError("cache='disk' needs cache_dir")
            first = self._decode(0)
            disk = DiskImageCache(cache_dir, self.paths, first.shape)
            disk.put(0, first)
            return disk
        return None

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, i: int) -> np.ndarray:
        arr = image_to_uint8(self.paths[i])
        if min(arr.shape[:2]) < self.image_size:
            raise DatasetError(
                f"image {self.paths[i]!r} is {arr.shape[1]}x{arr.shape[0]} pixels, smaller than the "
                f"model input ({self.image_size}); use larger images or a model with a smaller input"
            )
        return arr

    def _pixels(self, i: int) -> np.ndarray:
        arr = self.cache.get(i) if self.cache is not None else None
        if arr is None:
            arr = self._decode(i)
            if self.cache is not None:
                self.cache.put(i, arr)
        return arr

    def _image(self, i: int) -> torch.Tensor:
        return uint8_to_tensor(self._pixels(i))

    def check_first_image(self) -> None:
        """Read the first record's image now, so that an unusable image fails before training.

        Raises
        ------
        DatasetError
            Naming the record and its image (for instance an image smaller than the model input).
        """
        self._record_pixels(0)

    def _record_pixels(self, i: int) -> np.ndarray:
        """:meth:`_pixels`, with errors that name the record and its image (also from DataLoader workers)."""
        try:
            return self._pixels(i)
        except DatasetError as exc:
            raise DatasetError(f"record {self.ids[i]!r}: {exc}") from exc
        except Exception as exc:
            raise DatasetError(f"record {self.ids[i]!r}: image {self.paths[i]!r} could not be read: {exc}") \
                from exc

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, 0)
        gen = torch.Generator().manual_seed(int(seed))
        if self.augment:
            # rotations, flips and the crop move pixels only: done on the 8-bit image,
            # and only the crop is turned into floats (the same numbers, less work)
            img = torch.from_numpy(self._record_pixels(int(i)))
            img = img.unsqueeze(0) if img.ndim == 2 else img.permute(2, 0, 1)
            k = int(torch.randint(0, 4, (1,), generator=gen))
            img = torch.rot90(img, k, dims=(-2, -1))
            if torch.rand(1, generator=gen) < 0.5:
                img = img.flip(-1)
            h, w = img.shape[-2:]
            s = self.image_size
            top = int(torch.randint(0, h - s + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - s + 1, (1,), generator=gen))
            img = img[..., top:top + s, left:left + s].expand(3, -1, -1).float() / 255.0
        else:
            img = uint8_to_tensor(self._record_pixels(int(i)))
            img = v2.functional.resize(img, self.image_size, antialias=True)
            img = v2.functional.center_crop(img, [self.image_size, self.image_size])
        caption = self.captions[int(i)]
        if self.caption_mode == "abstract":
            caption = sentence_chunk(caption, np.random.default_rng(int(seed)), self.fits_context)
        return self.normalize(img.contiguous()), caption
