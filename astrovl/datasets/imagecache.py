"""Decoded training images kept once for all DataLoader workers.

Training reads every image once per epoch; decoding a preview (and scaling a
FITS file for display) costs more than the augmentation that follows, so the
decoded 8-bit pixels are kept. How they are kept decides the memory of a run:

:class:`MemoryImageCache`
    a dict in the process, for training without DataLoader workers. It stops
    adding images once it holds ``max_bytes``; later images are decoded each
    time. (In DataLoader workers such a dict would be filled again in every
    worker, multiplying the memory by the number of workers.)
:class:`DiskImageCache`
    one memory-mapped file of fixed-size rows (all images of the shape of the
    first one; others are decoded each time), opened by every worker, written by
    whichever worker decodes an image first. The pixels live in the page cache,
    shared by all processes and reclaimable by the kernel, so the private
    (anonymous) memory of a process does not grow with the data set.

At the scale of the HubbleCLIP data (about 30,000 previews of 512 x 512 pixels:
7.9 GB as 8-bit grey, 23.6 GB as 8-bit colour) only the file-backed cache, or no
cache, fits; ``benchmarks/bench_image_cache.py`` measures the memory of each
process at that scale.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..utils.files import IMAGE_CACHE_OUTPUT, OUTPUT_MARKER, prepare_output_dir

__all__ = ["MemoryImageCache", "DiskImageCache", "CACHE_KINDS"]

CACHE_KINDS = ("memory", "disk", "none")


class MemoryImageCache:
    """In-process cache of uint8 images, bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._images: dict[int, np.ndarray] = {}

    def get(self, i: int) -> np.ndarray | None:
        return self._images.get(i)

    def put(self, i: int, image: np.ndarray) -> None:
        if i in self._images or self.nbytes + image.nbytes > self.max_bytes:
            return
        self._images[i] = image
        self.nbytes += image.nbytes

    def __len__(self) -> int:
        return len(self._images)


class DiskImageCache:
    """Fixed-shape uint8 images in a memory-mapped file shared by processes.

    Parameters
    ----------
    directory : path
        Where ``images.u8``, ``filled.u8`` and ``cache.json`` live. A cache left
        there by an earlier run over the same files (same paths, sizes and
        modification times, same shape) is reused, an earlier cache of other
        files is replaced; a folder holding anything else is refused
        (:class:`~astrovl.exceptions.OutputDirectoryError`).
    keys : list of str
        One key per image (its path); they identify the cache.
    shape : tuple of int
        Shape of every cached image, ``(H, W)`` or ``(H, W, C)``.

    Notes
    -----
    The object pickles without its mappings (DataLoader workers started with
    ``spawn`` reopen the file); a row is marked filled only after its pixels are
    written, so a reader never sees half an image.
    """

    def __init__(self, directory: str | os.PathLike, keys: list[str], shape: tuple[int, ...]):
        self.directory = Path(directory)
        self.shape = tuple(int(s) for s in shape)
        self.n = len(keys)
        self.identity = _files_identity(keys, self.shape)
        prepare_output_dir(self.directory, IMAGE_CACHE_OUTPUT)
        meta_path = self.directory / "cache.json"
        reuse = False
        if meta_path.is_file():
            try:
                reuse = json.loads(meta_path.read_text("utf-8")).get("identity") == self.identity
            except (OSError, ValueError):
                reuse = False
        if not reuse:
            meta_path.unlink(missing_ok=True)
            np.memmap(self._file("images"), dtype=np.uint8, mode="w+", shape=(self.n, *self.shape)).flush()
            np.memmap(self._file("filled"), dtype=np.uint8, mode="w+", shape=(self.n,)).flush()
            meta = {"identity": self.identity, "n": self.n, "shape": list(self.shape)}
            meta_path.write_text(json.dumps(meta), encoding="utf-8")
        self._images = self._filled = None

    def _file(self, name: str) -> Path:
        return self.directory / f"{name}.u8"

    def _open(self) -> None:
        if self._images is None:
            self._images = np.memmap(self._file("images"), dtype=np.uint8, mode="r+", shape=(self.n, *self.shape))
            self._filled = np.memmap(self._file("filled"), dtype=np.uint8, mode="r+", shape=(self.n,))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = state["_filled"] = None
        return state

    def get(self, i: int) -> np.ndarray | None:
        self._open()
        if not self._filled[i]:
            return None
        return np.array(self._images[i])

    def put(self, i: int, image: np.ndarray) -> None:
        if image.shape != self.shape or image.dtype != np.uint8:
            return
        self._open()
        self._images[i] = image
        self._filled[i] = 1

    def __len__(self) -> int:
        self._open()
        return int(np.count_nonzero(self._filled))

    def remove(self) -> None:
        """Delete the cache files."""
        self._images = self._filled = None
        for name in ("images.u8", "filled.u8", "cache.json", OUTPUT_MARKER):
            (self.directory / name).unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass


def _files_identity(keys: list[str], shape: tuple[int, ...]) -> str:
    h = hashlib.sha256(json.dumps(list(shape)).encode())
    for key in keys:
        h.update(key.encode())
        try:
            st = os.stat(key)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()
