"""The manifest schema shared by every dataset builder, and datasets that read it.

A dataset is a directory (its *root*) holding image files and ``manifest.ecsv``,
an astropy ECSV table with one row per image-text record:

=================  =====  ==========================================================
column             type   meaning
=================  =====  ==========================================================
``id``             str    unique record id
``split``          str    ``"train"``, ``"val"`` or ``"test"``
``image``          str    image path relative to the root (never absolute, never
                          escaping the root)
``caption``        str    the text paired with the image
=================  =====  ==========================================================

Optional standard columns: ``label`` (class name), ``objects`` and
``use_cases`` (summary fields, ``"; "``-separated), ``abstract``, ``category``,
``title``, ``conversations`` (LLaVA conversation JSON), ``source``
(provenance, e.g. ``"mast"``, ``"apod"``, ``"synthetic"``). Builders add their
own provenance columns (``obs_id``, ``proposal_id``, ``ra``, ``dec``...).

A manifest is meant to be shared with its dataset, so it holds no absolute
local paths: image paths are relative to the root, and provenance columns hold
URLs (``https://...``, ``mast:...``) or paths relative to a source folder.
:func:`write_manifest` refuses a cell that holds an absolute local path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from ..exceptions import ManifestError
from ..utils.files import atomic_write, safe_join

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "REQUIRED_COLUMNS",
    "OPTIONAL_COLUMNS",
    "SPLITS",
    "read_manifest",
    "write_manifest",
    "validate_manifest",
    "check_no_local_paths",
    "empty_manifest",
    "ManifestDataset",
]

MANIFEST_NAME = "manifest.ecsv"
MANIFEST_VERSION = 1
REQUIRED_COLUMNS = ("id", "split", "image", "caption")
OPTIONAL_COLUMNS = ("label", "objects", "use_cases", "abstract", "category", "title",
                    "conversations", "source")
SPLITS = ("train", "val", "test")


def empty_manifest(extra_columns: Sequence[str] = ()) -> Table:
    """Return an empty manifest table with the required (and extra string) columns."""
    names = list(REQUIRED_COLUMNS) + [c for c in extra_columns if c not in REQUIRED_COLUMNS]
    return Table(names=names, dtype=[str] * len(names))


def validate_manifest(table: Table, root: str | os.PathLike | None = None) -> Table:
    """Check a manifest table; return it unchanged.

    Raises
    ------
    ManifestError
        Missing required columns, duplicate ids, unknown splits, or (with ``root``)
        image paths that are absolute or escape the root.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
    if missing:
        raise ManifestError(
            f"manifest is missing required column(s) {missing}; a manifest needs "
            f"{list(REQUIRED_COLUMNS)} (see astrovl.datasets.records)"
        )
    if len(table):
        ids = np.asarray(table["id"]).astype(str)
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1][:5].tolist()
            raise ManifestError(f"manifest has duplicate ids, e.g. {dup}; ids must be unique")
        bad = sorted(set(np.asarray(table["split"]).astype(str)) - set(SPLITS))
        if bad:
            raise ManifestError(f"manifest has unknown split value(s) {bad}; use {list(SPLITS)}")
        if root is not None:
            for rel in np.asarray(table["image"]).astype(str):
                safe_join(root, rel)
    return table


#: free-text columns, not checked for local paths
_TEXT_COLUMNS = frozenset(("caption", "abstract", "title", "objects", "use_cases", "credit", "description",
                           "conversations"))
_ABSOLUTE_PATH = re.compile(r"^(?:/|\\\\|~[/\\]|[A-Za-z]:[/\\]|file:)", re.IGNORECASE)


def check_no_local_paths(table: Table) -> None:
    """Refuse cells that hold absolute local paths (a manifest is meant to be shared).

    Free-text columns (captions, abstracts, titles...) are not checked.

    Raises
    ------
    ManifestError
        Naming the column and row of the first such cell.
    """
    for name in table.colnames:
        if name in _TEXT_COLUMNS or table[name].dtype.kind not in "USO":
            continue
        for i, value in enumerate(table[name]):
            if isinstance(value, str) and _ABSOLUTE_PATH.match(value.strip()):
                raise ManifestError(
                    f"manifest column {name!r} row {i} holds the absolute local path {str(value)!r}; a "
                    "manifest is shared with its dataset, so write paths relative to the dataset "
                    "root (or to the source folder), or provenance URLs"
                )


def write_manifest(table: Table, root: str | os.PathLike, *, kind: str = "generic",
                   name: str = MANIFEST_NAME) -> Path:
    """Validate ``table`` and write it atomically as ``root/manifest.ecsv``.

    Raises
    ------
    ManifestError
        An invalid manifest (see :func:`validate_manifest`), or a cell holding
        an absolute local path (see :func:`check_no_local_paths`).
    """
    root = Path(root)
    validate_manifest(table, root)
    check_no_local_paths(table)
    out = table.copy(copy_data=True)
    out.meta = dict(out.meta)
    out.meta.update(astrovl_manifest_version=MANIFEST_VERSION, kind=kind)
    path = root / name
    with atomic_write(path, "w") as fh:
        out.write(fh, format="ascii.ecsv")
    return path


def read_manifest(root: str | os.PathLike, *, name: str = MANIFEST_NAME) -> Table:
    """Read and validate ``root/manifest.ecsv``.

    Raises
    ------
    ManifestError
        If the file is missing or malformed.
    """
    root = Path(root)
    path = root / name
    if not path.is_file():
        raise ManifestError(
            f"no manifest at {str(path)!r}; build the dataset first (e.g. "
            "SyntheticSkyDataset.generate or a dataset builder's build())"
        )
    try:
        table = Table.read(path, format="ascii.ecsv")
    except Exception as exc:
        raise ManifestError(f"manifest {str(path)!r} could not be parsed as ECSV: {exc}") from exc
    for col in table.colnames:
        if table[col].dtype.kind in "SU" or table[col].dtype == object:
            table[col] = np.asarray(table[col]).astype(str) if len(table) else table[col]
    return validate_manifest(table, root)


class ManifestDataset:
    """A dataset described by a manifest: image files under a root directory plus texts.

    Parameters
    ----------
    root : str or path-like
        Dataset directory containing ``manifest.ecsv``.
    manifest : astropy.table.Table, optional
        Use this table instead of reading ``root/manifest.ecsv`` (e.g. a subset).

    Examples
    --------
    ``ds[i]`` returns a dict with every manifest column plus ``image_path``
    (absolute path); ``ds.split("val")`` returns the validation subset;
    ``ds.load_image(i)`` returns an :class:`~astrovl.AstroImage`.
    """

    def __init__(self, root: str | os.PathLike, manifest: Table | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root) if manifest is None else validate_manifest(manifest, self.root)

    # -- sequence protocol -------------------------------------------------
    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record {index} out of range for a dataset of {n} records")
        row = self.manifest[index]
        rec = {c: _plain(row[c]) for c in self.manifest.colnames}
        rec["image_path"] = str(self.image_path(index))
        return rec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        splits = {s: int((np.asarray(self.manifest["split"]).astype(str) == s).sum()) for s in SPLITS}
        splits = {k: v for k, v in splits.items() if v}
        return f"<{type(self).__name__} {len(self)} records {splits} root={str(self.root)!r}>"

    # -- access ------------------------------------------------------------
    def image_path(self, index: int) -> Path:
        """Absolute path of record ``index``'s image (checked to lie inside the root)."""
        return safe_join(self.root, str(self.manifest["image"][index]))

    @property
    def image_paths(self) -> list[Path]:
        """Absolute image paths of all records."""
        return [self.image_path(i) for i in range(len(self))]

    @property
    def captions(self) -> list[str]:
        """Captions of all records."""
        return [str(c) for c in self.manifest["caption"]]

    @property
    def labels(self) -> list[str] | None:
        """Sorted class names (``label`` column), or None when the dataset has no labels."""
        if "label" not in self.manifest.colnames:
            return None
        return sorted({str(x) for x in self.manifest["label"]})

    def load_image(self, index: int, **kwargs):
        """Load record ``index``'s image with :func:`~astrovl.load_image`."""
        from ..imaging import load_image

        return load_image(self.image_path(index), **kwargs)

    def split(self, name: str) -> ManifestDataset:
        """Return the records of split ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"split={name!r} is not known; use one of {list(SPLITS)}")
        keep = np.asarray(self.manifest["split"]).astype(str) == name
        return self._subset(self.manifest[keep])

    def subset(self, indices) -> ManifestDataset:
        """Return the records at ``indices`` (a sequence of ints or a boolean mask)."""
        return self._subset(self.manifest[np.asarray(indices)])

    def _subset(self, table: Table) -> ManifestDataset:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.manifest = table
        return new

    def conversations(self, index: int) -> list[dict[str, str]] | None:
        """Parsed LLaVA conversation of record ``index`` (``conversations`` column), or None."""
        if "conversations" not in self.manifest.colnames:
            return None
        text = str(self.manifest["conversations"][index])
        return json.loads(text) if text else None


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value
