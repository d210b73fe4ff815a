"""Galaxy10 DECaLS: its classes, and its images and labels read offline.

:func:`load_galaxy10` reads the hub dataset ``matthieulel/galaxy10_decals``
(the one the AstroLLaVA evaluation streams; its parquet shards, through the
Hugging Face cache), a local copy of it, astroNN's ``Galaxy10_DECals.h5``, or
a folder per class, and draws stratified subsets (:func:`stratified_subset`).
The evaluation of descriptions against these classes is
:mod:`astrovl.evaluation.descriptions`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import DatasetError
from ..utils.imports import optional_import

__all__ = ["GALAXY10_CLASSES", "GALAXY10_CLASS_NAMES", "GALAXY10_DATASET", "load_galaxy10", "stratified_subset"]

#: The ten Galaxy10 DECaLS classes (short names), in label order.
GALAXY10_CLASSES = (
    "Disturbed",
    "Merging",
    "Round Smooth",
    "In-between Round Smooth",
    "Cigar Shaped Smooth",
    "Barred Spiral",
    "Unbarred Tight Spiral",
    "Unbarred Loose Spiral",
    "Edge-on without Bulge",
    "Edge-on with Bulge",
)

#: The class names of the dataset card and of the AstroLLaVA evaluation, in label order.
GALAXY10_CLASS_NAMES = (
    "Disturbed Galaxies",
    "Merging Galaxies",
    "Round Smooth Galaxies",
    "In-between Round Smooth Galaxies",
    "Cigar Shaped Smooth Galaxies",
    "Barred Spiral Galaxies",
    "Unbarred Tight Spiral Galaxies",
    "Unbarred Loose Spiral Galaxies",
    "Edge-on Galaxies without Bulge",
    "Edge-on Galaxies with Bulge",
)

#: The hub dataset the AstroLLaVA evaluation streams (parquet shards: image bytes and label).
GALAXY10_DATASET = "matthieulel/galaxy10_decals"


def stratified_subset(labels, n: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a stratified random subset of ``n`` items (all items, shuffled, when ``n`` is None).

    Each class gets a share proportional to its frequency (largest remainders
    first, every class present at least once when ``n`` allows), drawn at random
    without replacement; the result is in random order.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if n is None or n >= len(labels):
        return rng.permutation(len(labels))
    if n < 1:
        raise ValueError(f"limit={n} must be >= 1")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts / counts.sum() * n
    take = np.floor(quota).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    while take.sum() > n:
        take[np.argmax(take - quota)] -= 1
    order = np.argsort(-(quota - take), kind="stable")
    for j in order:
        if take.sum() >= n:
            break
        if take[j] < counts[j]:
            take[j] += 1
    chosen = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        chosen.extend(rng.choice(idx, size=min(k, len(idx)), replace=False).tolist())
    return rng.permutation(np.asarray(chosen, dtype=int))


def _split_indices(labels: np.ndarray, split: str, test_fraction: float, seed: int) -> np.ndarray:
    """Deterministic stratified split of a file without one; indices of ``split`` in file order."""
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = max(1, int(round(test_fraction * len(idx)))) if len(idx) > 1 else 0
        test[idx[:n]] = True
    return np.flatnonzero(test if split == "test" else ~test)


def _parquet_files(directory: Path, split: str) -> list[Path]:
    files = sorted(directory.glob(f"data/{split}-*.parquet")) or sorted(directory.glob(f"{split}-*.parquet")) \
        or sorted(directory.glob(f"*/{split}/*.parquet")) or sorted(directory.glob(f"{split}/*.parquet"))
    if split == "all":
        files = sorted(directory.rglob("*.parquet"))
    return files


def _load_parquet(files: list[Path], limit, seed) -> tuple[list, list[int]]:
    import io

    optional_import("pyarrow", purpose="reading the Galaxy10 DECaLS parquet files")
    import pyarrow.parquet as pq
    from PIL import Image

    labels, where = [], []
    for fi, f in enumerate(files):
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:
            raise DatasetError(f"{str(f)!r} is not a readable parquet file: {exc}") from exc
        names = set(pf.schema_arrow.names)
        if not {"image", "label"} <= names:
            raise DatasetError(f"{str(f)!r} has columns {sorted(names)}; the Galaxy10 DECaLS hub layout has "
                               "'image' (bytes) and 'label'")
        for g in range(pf.num_row_groups):
            lab = pf.read_row_group(g, columns=["label"]).column("label").to_numpy()
            labels.extend(int(x) for x in lab)
            where.extend((fi, g, r) for r in range(len(lab)))
    chosen = stratified_subset(labels, limit, seed)
    wanted: dict[tuple[int, int], list[int]] = {}
    for k in chosen:
        fi, g, r = where[k]
        wanted.setdefault((fi, g), []).append(r)
    decoded = {}
    for (fi, g), rows in wanted.items():
        column = pq.ParquetFile(files[fi]).read_row_group(g, columns=["image"]).column("image")
        for r in rows:
            cell = column[r].as_py()
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            if data is None:
                raise DatasetError(f"{str(files[fi])!r}: row {r} holds no image bytes")
            with Image.open(io.BytesIO(data)) as im:
                decoded[(fi, g, r)] = im.convert("RGB")
    return [decoded[where[k]] for k in chosen], [labels[k] for k in chosen]


def _load_h5(path: Path, split: str, limit, seed: int, test_fraction: float) -> tuple[list, list[int]]:
    optional_import("h5py", purpose="reading the Galaxy10 DECaLS HDF5 file")
    import h5py
    from PIL import Image

    try:
        with h5py.File(path, "r") as f:
            if "images" not in f or "ans" not in f:
                raise DatasetError(f"{str(path)!r} lacks the 'images' and 'ans' datasets of Galaxy10_DECals.h5")
            labels_all = np.asarray(f["ans"][:], dtype=int)
            pool = _split_indices(labels_all, split, test_fraction, seed)
            chosen = pool[stratified_subset(labels_all[pool], limit, seed)]
            ordered = np.sort(chosen)
            data = f["images"][ordered] if len(ordered) else np.zeros((0, 1, 1, 3), np.uint8)
    except OSError as exc:
        raise DatasetError(f"{str(path)!r} is not a readable HDF5 file: {exc}") from exc
    pos = {int(i): k for k, i in enumerate(ordered)}
    images = [Image.fromarray(np.asarray(data[pos[int(i)]], dtype=np.uint8)) for i in chosen]
    return images, [int(labels_all[i]) for i in chosen]


def _load_folders(base: Path, limit, seed: int) -> tuple[list, list[int]]:
    from PIL import Image

    lookup = {}
    for i, (short, name) in enumerate(zip(GALAXY10_CLASSES, GALAXY10_CLASS_NAMES)):
        lookup[short.lower().replace(" ", "_")] = i
        lookup[name.lower().replace(" ", "_")] = i
    files, labels = [], []
    for sub in sorted(p for p in base.iterdir() if p.is_dir()):
        key = sub.name.lower().replace(" ", "_")
        if key not in lookup:
            continue
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff"):
                files.append(f)
                labels.append(lookup[key])
    if not files:
        raise DatasetError(f"no class subdirectories with images in {str(base)!r}; expected folders named "
                           f"like {list(GALAXY10_CLASSES)[:3]}...")
    chosen = stratified_subset(labels, limit, seed)
    images = []
    for i in chosen:
        with Image.open(files[i]) as im:
            images.append(im.convert("RGB"))
    return images, [labels[i] for i in chosen]


def load_galaxy10(source: str | os.PathLike = GALAXY10_DATASET, *, split: str = "test", limit: int | None = None,
                  seed: int = 0, revision: str | None = None, test_fraction: float = 0.1
                  ) -> tuple[list[Any], list[int]]:
    """Load Galaxy10 DECaLS images and labels, offline when the data is local or cached.

    Parameters
    ----------
    source : str or path-like
        One of

        - a hub dataset id (default ``"matthieulel/galaxy10_decals"``, the one the
          AstroLLaVA evaluation streams), resolved through the Hugging Face cache
          (offline with ``HF_HUB_OFFLINE=1`` once downloaded; only the shards of
          ``split`` are fetched);
        - a directory in that layout (``data/test-*.parquet``,
          ``data/train-*.parquet``; columns ``image`` with the image bytes and
          ``label``);
        - astroNN's ``Galaxy10_DECals.h5`` (datasets ``images``, ``(N, 256, 256,
          3)`` uint8, and ``ans``); it has no split, so a deterministic,
          stratified ``test_fraction`` of it (from ``seed``) is the test split;
        - a directory with one subdirectory per class (named like
          :data:`GALAXY10_CLASSES` or :data:`GALAXY10_CLASS_NAMES`, spaces or
          underscores) of image files; ``train``/``test`` subdirectories are used
          when present.
    split : {"test", "train", "all"}
    limit : int, optional
        A stratified random subset of this many images (each class in proportion
        to its frequency, drawn with ``seed``); never the first N.
    seed : int
    revision : str, optional
        Revision of a hub dataset.
    test_fraction : float
        The test share of the h5 file.

    Returns
    -------
    images : list of PIL.Image.Image
    labels : list of int
        Label ``i`` is ``GALAXY10_CLASS_NAMES[i]``.
    """
    if split not in ("test", "train", "all"):
        raise ValueError(f"split={split!r}; use 'test', 'train' or 'all'")
    path = Path(os.path.expanduser(str(source)))
    if not path.exists():
        from ..utils.hub import fetch_files, looks_like_repo_id

        if not looks_like_repo_id(str(source)):
            raise DatasetError(f"Galaxy10 data {str(source)!r} does not exist; pass the hub dataset "
                               f"{GALAXY10_DATASET!r}, its local copy, or astroNN's Galaxy10_DECals.h5")
        patterns = ["*.parquet"] if split == "all" else [f"data/{split}-*.parquet", f"*/{split}/*.parquet"]
        path = fetch_files(str(source), patterns, revision=revision, repo_type="dataset")
    if path.is_file():
        return _load_h5(path, split, limit, seed, test_fraction)
    files = _parquet_files(path, split)
    if files:
        return _load_parquet(files, limit, seed)
    if list(path.rglob("*.parquet")):
        raise DatasetError(f"{str(path)!r} has no parquet shards of the {split!r} split (data/{split}-*.parquet)")
    base = path / split if split != "all" and (path / split).is_dir() else path
    return _load_folders(base, limit, seed)
