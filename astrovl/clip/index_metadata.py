"""The metadata table of a saved index folder: ECSV, or a FITS binary table when large.

An index of a few thousand images keeps its metadata in ``metadata.ecsv``, a
text file a person can read. Reading ECSV costs about 20 microseconds and a few
hundred bytes of transient memory per row, which at archive scale (2 million
rows: tens of seconds and most of a GiB while a server starts) is what loading
an index spends. From :data:`FITS_METADATA_ROWS` rows on, the table is written
as a FITS binary table (``metadata.fits``) instead, which is read memory-mapped
in well under a second, provided it reads back exactly: same columns, types,
values, masks, units and descriptions, and no table-level metadata. Anything
FITS cannot carry exactly (text outside ASCII, masked text, object columns,
table ``meta``) keeps the table in ECSV. Reading takes whichever file the folder
holds.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["METADATA", "METADATA_FITS", "FITS_METADATA_ROWS", "metadata_path", "read_metadata",
           "write_metadata"]

#: the metadata table as ECSV
METADATA = "metadata.ecsv"
#: the metadata table as a FITS binary table (large tables)
METADATA_FITS = "metadata.fits"
#: from this many rows on, metadata is written as FITS when it reads back exactly
FITS_METADATA_ROWS = 100_000


def metadata_path(directory: str | os.PathLike) -> Path:
    """The metadata file of the index folder ``directory`` (FITS if present, else ECSV)."""
    directory = Path(directory)
    fits_path = directory / METADATA_FITS
    return fits_path if fits_path.is_file() else directory / METADATA


def write_metadata(table, directory: str | os.PathLike, *, fits_rows: int | None = None) -> Path:
    """Write ``table`` into the (temporary) index folder ``directory``.

    Parameters
    ----------
    table : astropy.table.Table
    directory : path-like
    fits_rows : int, optional
        Tables of at least this many rows are written as FITS when they read
        back exactly (default :data:`FITS_METADATA_ROWS`).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    directory = Path(directory)
    limit = FITS_METADATA_ROWS if fits_rows is None else int(fits_rows)
    if len(table) >= limit and _write_fits_exactly(table, directory / METADATA_FITS):
        return directory / METADATA_FITS
    table.write(directory / METADATA, format="ascii.ecsv", overwrite=True)
    return directory / METADATA


def read_metadata(directory: str | os.PathLike):
    """The metadata table of the index folder ``directory``.

    A FITS table is memory-mapped: its numeric columns stay in the page cache
    until used, and its text columns are decoded once to ``str``.

    Returns
    -------
    astropy.table.Table
    """
    from astropy.table import Table

    path = metadata_path(directory)
    if path.name == METADATA:
        return Table.read(path, format="ascii.ecsv")
    return _decoded(Table.read(path, format="fits", memmap=True))


def _decoded(table):
    """``table`` with its byte-string columns as ``str`` columns (FITS text is ASCII)."""
    for name in table.colnames:
        col = table[name]
        if col.dtype.kind == "S":
            text = np.asarray(col).astype(f"U{max(col.dtype.itemsize, 1)}")
            new = col.__class__(text, name=name, unit=col.unit, description=col.description,
                                format=col.format, meta=col.meta)
            if getattr(col, "mask", None) is not None and hasattr(new, "mask"):
                new.mask = col.mask
            table.replace_column(name, new)
    table.meta.clear()  # FITS header cards are not metadata astrovl wrote
    return table


def _write_fits_exactly(table, path: Path) -> bool:
    """Write ``table`` to ``path`` as FITS if it reads back exactly; else remove it and return False."""
    from astropy.table import Table

    if table.meta or any(table[name].dtype.kind not in "biufUS" for name in table.colnames):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a truncated keyword or a lossy conversion is a refusal
            table.write(path, format="fits", overwrite=True)
            back = _decoded(Table.read(path, format="fits", memmap=True))
        same = _same_table(table, back)
        del back
    except Exception:  # text FITS cannot hold, a masked type it does not round-trip, ...
        same = False
    if not same:
        path.unlink(missing_ok=True)
    return same


def _same_table(a, b) -> bool:
    """True if ``b`` holds exactly the columns of ``a`` (names, kinds, units, values, masks)."""
    if a.colnames != b.colnames or len(a) != len(b):
        return False
    for name in a.colnames:
        x, y = a[name], b[name]
        if x.dtype.kind != y.dtype.kind or x.unit != y.unit or x.description != y.description:
            return False
        mx = np.ma.getmaskarray(np.ma.asarray(x))
        my = np.ma.getmaskarray(np.ma.asarray(y))
        if bool(mx.any()) != bool(getattr(y, "mask", None) is not None and my.any()) or \
                not np.array_equal(mx, my):
            return False
        xv, yv = np.asarray(x), np.asarray(y)
        if xv.dtype.kind == "f":
            if not np.array_equal(xv[~mx], yv[~my], equal_nan=True):
                return False
        elif not np.array_equal(xv[~mx], yv[~my]):
            return False
    return True
