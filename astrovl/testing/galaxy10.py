"""A tiny Galaxy10 DECaLS in the hub dataset's own layout, to run the Galaxy10 evaluation offline."""

from __future__ import annotations

import os
from pathlib import Path

from ..utils.files import atomic_directory

__all__ = ["make_tiny_galaxy10"]


def make_tiny_galaxy10(directory: str | os.PathLike, *, per_class: int = 2, image_size: int = 16,
                       train_shards: int = 2) -> Path:
    """Write a tiny Galaxy10 DECaLS in the layout of the hub dataset ``matthieulel/galaxy10_decals``.

    ``data/train-0000K-of-0000N-<hash>.parquet`` and ``data/test-00000-of-00001-<hash>.parquet``
    with the columns ``image`` (struct of PNG ``bytes`` and ``path``) and ``label``
    (uint8), ``per_class`` images of each of the ten classes in each split. The red
    channel of an image is ``20 * label`` (so images and labels can be checked
    against each other), the green one its row number.
    """
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    directory = Path(directory)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    with atomic_directory(directory, kind="galaxy10") as tmp:
        (tmp / "data").mkdir()
        for split, shards in (("train", train_shards), ("test", 1)):
            labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
            rows = []
            for k, lab in enumerate(labels):
                buf = io.BytesIO()
                Image.new("RGB", (image_size, image_size), (int(lab) * 20, k % 256, 7)).save(buf, format="PNG")
                rows.append({"bytes": buf.getvalue(), "path": None})
            for s in range(shards):
                table = pa.table({"image": pa.array(rows[s::shards], type=image_type),
                                  "label": pa.array(labels[s::shards], type=pa.uint8())})
                pq.write_table(table, tmp / "data" / f"{split}-{s:05d}-of-{shards:05d}-0a1b2c3d.parquet",
                               row_group_size=4)
        (tmp / "README.md").write_text(
            "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
            "  - split: test\n    path: data/test-*\ndataset_info:\n  features:\n  - name: image\n"
            "    dtype: image\n  - name: label\n    dtype: uint8\n---\n")
    return directory
