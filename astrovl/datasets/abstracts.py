"""Proposal abstracts: a reader for STScI's proposal abstracts catalog.

The Hubble proposal abstracts catalog is a plain-text file with one record per
proposal, for example::

    Proposal ID: 12345
    Cycle: 20
    Title: The Star Formation History of Nearby Dwarf Galaxies
    PI: A. Astronomer
    Category: Resolved Stellar Populations
    Abstract:
    We propose deep imaging of ...
    ... (more lines)

    ----------------------------------------------------------------------

Records are separated by blank or divider lines (``----``, ``====``, ``****``).
Field names are matched without regard to case or surrounding white space,
fields may come in any order, and common variants are accepted (``ID``,
``Proposal``, ``Principal Investigator``, ``Scientific Category``...). The
abstract runs from the ``Abstract:`` line (text on the same line included) up
to the next record (a divider, a proposal ID line, or a known field after a
blank line) or to the next field of the record that is not set yet;
hard-wrapped lines and paragraphs are joined with single
spaces.

:func:`read_abstracts` returns an :class:`~astropy.table.Table` with the columns
``proposal_id`` (int), ``cycle`` (int, -1 when the catalog does not say),
``title``, ``pi``, ``category`` and ``abstract`` (str). It also reads ECSV or
CSV tables with those columns, so a parsed catalog can be saved with
``table.write("abstracts.ecsv")`` and read back.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from astropy.table import Table
from astropy.utils.exceptions import AstropyUserWarning

from ..exceptions import DatasetError

__all__ = [
    "ABSTRACT_COLUMNS",
    "read_abstracts",
    "parse_abstracts_text",
    "abstracts_by_proposal",
    "raw_abstract_caption",
]

ABSTRACT_COLUMNS = ("proposal_id", "cycle", "title", "pi", "category", "abstract")

# catalog field name (lower case, single spaces) -> column
_FIELD_ALIASES = {
    "proposal id": "proposal_id",
    "proposal_id": "proposal_id",
    "proposal number": "proposal_id",
    "proposal": "proposal_id",
    "prop id": "proposal_id",
    "id": "proposal_id",
    "cycle": "cycle",
    "title": "title",
    "proposal title": "title",
    "pi": "pi",
    "pi name": "pi",
    "principal investigator": "pi",
    "investigator": "pi",
    "category": "category",
    "scientific category": "category",
    "science category": "category",
    "abstract": "abstract",
}

_KEY_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z _]*?)\s*:\s?(.*)$")
_DIVIDER = re.compile(r"^\s*([-=*_#~])\1{2,}\s*$")
_INT = re.compile(r"[-+]?\d+")


def raw_abstract_caption(category: str, abstract: str) -> str:
    """Caption built from a raw abstract, prefixed with its science category.

    Follows the convention of the Hubble abstract-caption experiments:
    ``"Category: <category>. <abstract>"``. Without a category the abstract is
    returned alone.

    Parameters
    ----------
    category : str
        Scientific category of the proposal (e.g. ``"Galaxies"``).
    abstract : str
        Abstract text.

    Returns
    -------
    str

    Examples
    --------
    >>> raw_abstract_caption("Stellar Physics", "We observe   white dwarfs.")
    'Category: Stellar Physics. We observe white dwarfs.'
    """
    text = " ".join(str(abstract).split())
    cat = " ".join(str(category or "").split()).rstrip(".")
    return f"Category: {cat}. {text}" if cat else text


def _field_name(key: str) -> str | None:
    return _FIELD_ALIASES.get(" ".join(key.lower().replace("_", " ").split()))


def _to_int(value, default: int | None = None) -> int | None:
    match = _INT.search(str(value))
    return int(match.group()) if match else default


def _join_text(lines: list[str]) -> str:
    return " ".join(" ".join(lines).split())


def parse_abstracts_text(text: str, *, source: str = "<text>") -> Table:
    """Parse the text of a proposal abstracts catalog (see the module documentation).

    Parameters
    ----------
    text : str
        Catalog contents.
    source : str
        Name used in messages (file name or URL).

    Returns
    -------
    astropy.table.Table
        One row per proposal, columns :data:`ABSTRACT_COLUMNS`.

    Raises
    ------
    DatasetError
        If no record with a proposal ID is found.

    Warns
    -----
    astropy.utils.exceptions.AstropyUserWarning
        For records without a usable proposal ID (skipped) and for duplicated IDs
        (the first record with a non-empty abstract is kept).
    """
    rows = _records_to_rows(_read_records(text), source)
    return _rows_to_table(rows, source)


def _read_records(text: str) -> list[dict]:
    """Split catalog text into raw records: one dict of field values per proposal."""
    records: list[dict] = []
    current: dict = {}
    abstract_lines: list[str] | None = None
    prev_blank = True

    def finish():
        nonlocal current, abstract_lines
        if abstract_lines is not None:
            current["abstract"] = _join_text(abstract_lines)
        if current:
            records.append(current)
        current = {}
        abstract_lines = None

    for lineno, line in enumerate(text.splitlines(), start=1):
        if _DIVIDER.match(line):
            finish()
            prev_blank = True
            continue
        if not line.strip():
            prev_blank = True
            continue
        match = _KEY_LINE.match(line)
        field = _field_name(match.group(1)) if match else None
        # inside an abstract, a known "Field: value" line continues the abstract text when
        # that field is already set in this record (and no blank line precedes it); a
        # field not yet set is a trailing field of the record, a proposal ID line always
        # starts a new record
        if field is not None and abstract_lines is not None and not prev_blank \
                and field != "proposal_id" and (field in current or field == "abstract"):
            field = None
        if field is None:
            if abstract_lines is not None:
                abstract_lines.append(line.strip())
            elif match is None and current.get("_last") in ("title", "pi", "category"):
                # a wrapped title/PI/category line
                last = current["_last"]
                current[last] = _join_text([current[last], line.strip()])
            elif current:
                current["_last"] = None  # a field this reader does not use
            prev_blank = False
            continue
        value = match.group(2).strip()
        if (field in current or (abstract_lines is not None and (prev_blank or field == "abstract"))):
            # a field seen twice, or a field after the blank line that ends an abstract:
            # the next record has begun
            finish()
        if abstract_lines is not None:
            current["abstract"] = _join_text(abstract_lines)
            abstract_lines = None
        current.setdefault("_line", lineno)
        if field == "abstract":
            abstract_lines = [value] if value else []
        else:
            current[field] = value
        current["_last"] = field
        prev_blank = False
    finish()

    return records


def _records_to_rows(records: list[dict], source: str) -> list[dict]:
    """Turn raw records into table rows: IDs parsed, unusable records and duplicates reported."""
    rows = []
    bad: list[int] = []
    seen: dict[int, int] = {}
    duplicates: list[int] = []
    for rec in records:
        if set(rec) <= {"_line", "_last"}:
            continue
        pid = _to_int(rec.get("proposal_id", ""))
        if pid is None:
            bad.append(rec["_line"])
            continue
        row = {
            "proposal_id": pid,
            "cycle": _to_int(rec.get("cycle", ""), -1),
            "title": rec.get("title", ""),
            "pi": rec.get("pi", ""),
            "category": rec.get("category", ""),
            "abstract": rec.get("abstract", ""),
        }
        if pid in seen:
            duplicates.append(pid)
            if not rows[seen[pid]]["abstract"] and row["abstract"]:
                rows[seen[pid]] = row
            continue
        seen[pid] = len(rows)
        rows.append(row)
    if bad:
        warnings.warn(
            f"{len(bad)} record(s) in the abstracts catalog {source} have no usable proposal ID "
            f"and were skipped (records starting at line(s) {bad[:10]})",
            AstropyUserWarning, stacklevel=3,
        )
    if duplicates:
        warnings.warn(
            f"proposal ID(s) {sorted(set(duplicates))[:10]} appear more than once in the abstracts "
            f"catalog {source}; the first record with an abstract is kept",
            AstropyUserWarning, stacklevel=3,
        )
    if not rows:
        raise DatasetError(
            f"no proposal records found in the abstracts catalog {source}; expected records like "
            "'Proposal ID: 12345', 'Cycle: 20', 'Title: ...', 'PI: ...', 'Category: ...', "
            "'Abstract:' followed by the text, separated by blank or divider lines"
        )
    return rows


def _rows_to_table(rows: list[dict], source: str) -> Table:
    table = Table(
        rows=[[r[c] for c in ABSTRACT_COLUMNS] for r in rows],
        names=ABSTRACT_COLUMNS,
        dtype=[np.int64, np.int64, str, str, str, str],
    )
    table.meta["source"] = source
    return table


def _normalize_table(table: Table, source: str) -> Table:
    missing = [c for c in ("proposal_id", "abstract") if c not in table.colnames]
    if missing:
        raise DatasetError(
            f"the abstracts table {source} lacks column(s) {missing}; it needs at least "
            f"'proposal_id' and 'abstract' (all columns: {list(ABSTRACT_COLUMNS)})"
        )
    rows = []
    for row in table:
        pid = _to_int(_cell(row, "proposal_id"))
        if pid is None:
            raise DatasetError(
                f"the abstracts table {source} has a proposal_id that is not an integer: "
                f"{_cell(row, 'proposal_id')!r}"
            )
        rows.append({
            "proposal_id": pid,
            "cycle": _to_int(_cell(row, "cycle"), -1),
            "title": _cell(row, "title"),
            "pi": _cell(row, "pi"),
            "category": _cell(row, "category"),
            "abstract": " ".join(_cell(row, "abstract").split()),
        })
    if not rows:
        raise DatasetError(f"the abstracts table {source} has no rows")
    return _rows_to_table(rows, source)


def _cell(row, name: str) -> str:
    if name not in row.colnames:
        return ""
    value = row[name]
    if value is np.ma.masked or (np.ma.isMaskedArray(value) and value.mask.all()):
        return ""
    if isinstance(value, bytes):
        value = value.decode()
    return str(value).strip()


def _looks_like_table_file(path: Path, head: str) -> bool:
    if path.suffix.lower() in (".ecsv", ".csv"):
        return True
    return head.lstrip().startswith("# %ECSV")


def read_abstracts(path_or_text: str | os.PathLike | Table) -> Table:
    """Read a proposal abstracts catalog.

    Parameters
    ----------
    path_or_text : str, path-like or astropy.table.Table
        Accepted inputs:

        * a path to the STScI text catalog (any suffix);
        * a path to an ECSV or CSV table with the columns ``proposal_id`` and
          ``abstract`` (and optionally ``cycle``, ``title``, ``pi``, ``category``);
        * an ``http(s)://`` URL of either, fetched with
          :func:`astropy.utils.data.download_file` (``cache=True``,
          ``pkgname="astrovl"``);
        * the catalog text itself (a string with line breaks);
        * an :class:`~astropy.table.Table` with the columns above.

    Returns
    -------
    astropy.table.Table
        Columns ``proposal_id`` (int), ``cycle`` (int, -1 when unknown), ``title``,
        ``pi``, ``category``, ``abstract`` (str; white space collapsed).

    Raises
    ------
    DatasetError
        Missing file, a table without the needed columns, or no records.

    Examples
    --------
    >>> text = '''Proposal ID: 5371
    ... Cycle: 4
    ... Title: Medium deep survey
    ... PI: R. Griffiths
    ... Category: Galaxies
    ... Abstract:
    ... We image random fields
    ... in parallel.
    ... '''
    >>> t = read_abstracts(text)
    >>> int(t["proposal_id"][0]), int(t["cycle"][0]), str(t["abstract"][0])
    (5371, 4, 'We image random fields in parallel.')
    """
    if isinstance(path_or_text, Table):
        return _normalize_table(path_or_text, "<Table>")
    if isinstance(path_or_text, Mapping):
        raise TypeError("read_abstracts takes a path, a URL, catalog text or a Table, not a dict")
    if isinstance(path_or_text, str) and ("\n" in path_or_text or "\r" in path_or_text):
        return parse_abstracts_text(path_or_text)
    if not isinstance(path_or_text, (str, os.PathLike)):
        raise TypeError(
            f"read_abstracts takes a path, a URL, catalog text or a Table; got "
            f"{type(path_or_text).__name__}"
        )
    source = str(path_or_text)
    if source.startswith(("http://", "https://")):
        from astropy.utils import data as _data

        try:
            path = Path(_data.download_file(source, cache=True, pkgname="astrovl"))
        except Exception as exc:
            raise DatasetError(
                f"could not download the abstracts catalog {source!r}: {exc}; download it by "
                "hand and pass the local file path"
            ) from exc
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"abstracts catalog {source!r} does not exist; pass the path of the STScI proposal "
            "abstracts text file, an ECSV/CSV table, or the catalog text itself"
        )
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DatasetError(f"could not read the abstracts catalog {source!r}: {exc}") from exc
    if _looks_like_table_file(path, text[:200]):
        fmt = "ascii.ecsv" if text.lstrip().startswith("# %ECSV") else "ascii.csv"
        try:
            table = Table.read(path, format=fmt)
        except Exception as exc:
            raise DatasetError(
                f"abstracts table {source!r} could not be read as {fmt}: {exc}"
            ) from exc
        return _normalize_table(table, repr(source))
    return parse_abstracts_text(text, source=repr(source))


def abstracts_by_proposal(table: Table) -> dict[int, dict]:
    """Map proposal ID -> record dict (the columns of :func:`read_abstracts`)."""
    out: dict[int, dict] = {}
    for row in table:
        rec = {c: (int(row[c]) if c in ("proposal_id", "cycle") else str(row[c]))
               for c in ABSTRACT_COLUMNS}
        out[rec["proposal_id"]] = rec
    return out
