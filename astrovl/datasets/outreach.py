"""Image-caption datasets from outreach archives (APOD, ESO, ESA/Hubble).

:class:`OutreachDatasetBuilder` takes caption records, fetches or reads their
images, resizes them like the Hubble builder (longer side ``image_size``,
Lanczos, centred on a white square, see
:func:`~astrovl.datasets.hubble.resize_and_pad`), writes them as PNG files under
``images/<source>/`` and writes ``manifest.ecsv`` in the shared schema.

Records
-------
Each record is a mapping with these fields:

``image``
    An ``http(s)://`` URL (downloaded with
    :func:`astropy.utils.data.download_file`, cached under the ``astrovl``
    package), or a local file (FITS or any picture format; absolute, or
    relative to the records file it comes from) that lies under the
    ``image_root`` the caller passes. When absent, ``image_url`` or ``hdurl``
    are used, and ``url`` for APOD-style records whose ``media_type`` is
    ``"image"``.
``caption``
    The text (``explanation`` or ``description`` are accepted instead). HTML
    tags are removed and entities decoded.
``title``, ``source``
    Title, and archive name (``"apod"``, ``"eso"``, ``"esahubble"``...).
    Without ``source``, records in the APOD API layout (``date`` and
    ``explanation``) are ``"apod"``, others ``"outreach"``.
``credit``, ``url``, ``id``, ``date`` (optional)
    Credit line, page URL, archive identifier (used in the record id).

Records with a ``media_type`` other than ``"image"`` (APOD videos), without
image or without caption are excluded; repeated images are kept once. Both are
counted in the build report.

Records come from others, so they are not trusted: a record naming another
scheme (``file://``, ``ftp://``, ``data:``...), a local file without an
``image_root``, or a file outside ``image_root`` (``..``, symbolic links) stops
the build with :class:`~astrovl.exceptions.UntrustedSourceError` before
anything is written. The manifest's ``original`` column holds the URL, or the
local file's path relative to ``image_root``: never an absolute local path.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from collections.abc import Mapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Row, Table

from ..exceptions import DatasetError, ImageFileError, ImageInputError
from ..utils.files import (
    OUTREACH_DATASET_OUTPUT,
    atomic_write_text,
    check_output_dir,
    prepare_output_dir,
    resolve_source,
    safe_join,
)
from ..utils.progress import progress_bar
from ._builder import (
    REPORT_NAME,
    BuildReport,
    assign_splits,
    check_builder_options,
    is_complete_png,
    open_verified_image,
    resize_and_pad,
    retry,
    save_png,
    slug,
)
from .records import ManifestDataset, write_manifest

__all__ = ["OutreachDatasetBuilder", "load_outreach_records", "strip_html"]

_RECORD_SUFFIXES = (".json", ".jsonl", ".ndjson", ".ecsv", ".csv")
#: kind of the output folder of a build (see :func:`astrovl.utils.files.check_output_dir`)
OUTPUT_KIND = OUTREACH_DATASET_OUTPUT


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data):
        self.parts.append(data)

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "p", "div", "li"):
            self.parts.append(" ")


def strip_html(text: str) -> str:
    """Remove HTML tags, decode entities and collapse white space.

    Examples
    --------
    >>> strip_html("<p>The <b>Crab</b> Nebula &amp; its pulsar</p>")
    'The Crab Nebula & its pulsar'
    """
    parser = _TextExtractor()
    parser.feed(str(text))
    parser.close()
    return " ".join(html.unescape("".join(parser.parts)).split())


def _first(rec: Mapping, *names: str) -> str:
    for n in names:
        value = rec.get(n)
        if value is None or value is np.ma.masked:
            continue
        value = str(value).strip()
        if value:
            return value
    return ""


def _row_dict(row: Row) -> dict[str, Any]:
    out = {}
    for c in row.colnames:
        v = row[c]
        if v is np.ma.masked:
            continue
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, bytes):
            v = v.decode()
        out[c] = v
    return out


def _read_records_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DatasetError(f"records file {str(path)!r} does not exist")
    if suffix not in _RECORD_SUFFIXES:
        raise DatasetError(
            f"records file {str(path)!r} has an unknown type; use JSON (a list of records), "
            f"JSON Lines, ECSV or CSV ({', '.join(_RECORD_SUFFIXES)})"
        )
    try:
        if suffix in (".jsonl", ".ndjson"):
            recs = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        recs.append(json.loads(line))
                    except ValueError as exc:
                        raise DatasetError(
                            f"line {lineno} of {str(path)!r} is not valid JSON: {exc}") from exc
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, Mapping):
                for key in ("records", "data", "items", "images", "releases"):
                    if isinstance(data.get(key), list):
                        data = data[key]
                        break
                else:
                    data = [data]
            recs = data
        else:
            fmt = "ascii.ecsv" if suffix == ".ecsv" else "ascii.csv"
            recs = [_row_dict(r) for r in Table.read(path, format=fmt)]
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"records file {str(path)!r} could not be read: {exc}") from exc
    if not isinstance(recs, list) or not all(isinstance(r, Mapping) for r in recs):
        raise DatasetError(f"records file {str(path)!r} must hold a list of JSON objects")
    return [dict(r) for r in recs]


def load_outreach_records(records) -> list[dict[str, Any]]:
    """Collect raw records from files, tables and mappings.

    Parameters
    ----------
    records : str, path-like, Mapping, astropy.table.Table or list of them
        JSON (a list of objects, or an object with a ``records``/``data``/``items``
        list), JSON Lines, ECSV or CSV files; tables; single records.

    Returns
    -------
    list of dict
        The records in input order, each with a private ``_base`` key (the
        directory that relative image paths refer to: the folder of the records
        file, or None for dicts and tables, whose relative paths refer to the
        builder's ``image_root``) and ``_origin`` (where it came from).
    """
    if isinstance(records, (str, os.PathLike, Mapping, Table)):
        records = [records]
    out: list[dict] = []
    for item in records:
        if isinstance(item, Mapping):
            out.append({**item, "_base": None, "_origin": "<dict>"})
        elif isinstance(item, Table):
            out.extend({**_row_dict(r), "_base": None, "_origin": "<Table>"}
                       for r in item)
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item).expanduser()
            out.extend({**r, "_base": str(path.resolve().parent), "_origin": str(path)}
                       for r in _read_records_file(path))
        else:
            raise TypeError(
                f"records must be file paths, dicts or astropy Tables; got {type(item).__name__}"
            )
    return out


def _is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


class OutreachDatasetBuilder:
    """Build an image-caption dataset from outreach records (APOD, ESO, ESA/Hubble).

    See the module documentation (:mod:`astrovl.datasets.outreach`) for the
    record fields.

    Parameters
    ----------
    records : str, path-like, Mapping, astropy.table.Table or list of them
        Record files (JSON, JSON Lines, ECSV, CSV), tables or dicts.
    directory : str or path-like
        Dataset root; an existing partial build is resumed. A folder holding
        other files is refused (:class:`~astrovl.exceptions.OutputDirectoryError`).
    image_root : str or path-like, optional
        The only directory local image files may come from. Without it, records
        may name only ``http(s)`` URLs.
    image_size : int
        Side of the square output images (default 512).
    seed : int
        Seed of the train/validation split.
    val_fraction : float
        Fraction of records in the validation split (default 0.1).
    max_retries : int
        Retries after a failed or corrupt download (default 3).
    retry_delay : float
        First back-off delay in seconds; doubled after every retry.
    progress : bool, optional
        Show a progress bar (default: ``astrovl.conf.progress``).
    hdu : int, str or (str, int), optional
        HDU read from every FITS image (see :func:`~astrovl.load_image`);
        default: the science HDU.
    plane : int, optional
        Plane read from every FITS cube.

    Attributes
    ----------
    report : BuildReport
        Counts of the last :meth:`build`: ``records`` (input records),
        ``excluded`` (non-image media, missing image or caption),
        ``duplicates``, ``downloaded`` (images fetched from a URL in this run),
        ``converted`` (local image files converted in this run),
        ``skipped`` (already complete), ``failed`` (missing, unreadable or
        undownloadable images) and ``written`` (manifest rows).

    Examples
    --------
    >>> builder = OutreachDatasetBuilder(["apod.json", "eso.jsonl"], "outreach_ds")  # doctest: +SKIP
    >>> ds = builder.build()  # doctest: +SKIP
    """

    def __init__(self, records, directory: str | os.PathLike, *,
                 image_root: str | os.PathLike | None = None, image_size: int = 512,
                 seed: int = 0, val_fraction: float = 0.1, max_retries: int = 3,
                 retry_delay: float = 1.0, progress: bool | None = None,
                 hdu: int | str | tuple | None = None, plane: int | None = None):
        check_builder_options(image_size, val_fraction, max_retries)
        self.raw_records = load_outreach_records(records)
        self.directory = Path(directory)
        check_output_dir(self.directory, OUTPUT_KIND)
        self.image_root = Path(image_root).expanduser().resolve() if image_root is not None else None
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self.max_retries = int(max_retries)
        self.retry_delay = float(retry_delay)
        self.progress = progress
        self.hdu, self.plane = hdu, plane
        self.report = BuildReport(self._report_keys())

    @staticmethod
    def _report_keys() -> tuple[str, ...]:
        return ("records", "excluded", "duplicates", "downloaded", "converted", "skipped", "failed",
                "written")

    # -- records -------------------------------------------------------------------
    def _normalize(self, rec: dict, index: int) -> dict | None:
        where = f"record {index} ({rec.get('_origin', '?')})"
        media = _first(rec, "media_type").lower()
        if media and media != "image":
            self.report.add_exclusion(where, f"media_type {media!r} is not an image")
            return None
        image = _first(rec, "image", "image_url", "hdurl")
        page_url = _first(rec, "url", "page_url", "link")
        if not image and media == "image" and page_url:
            image, page_url = page_url, ""
        caption = strip_html(_first(rec, "caption", "explanation", "description"))
        if not image:
            self.report.add_exclusion(where, "no image path or URL")
            return None
        if not caption:
            self.report.add_exclusion(where, "no caption")
            return None
        source = _first(rec, "source").lower()
        if not source and _first(rec, "explanation") and _first(rec, "date"):
            source = "apod"  # the APOD API's record layout
        source = slug(source, "outreach", 60)
        checked = resolve_source(image, self.image_root, base=rec.get("_base"), what=where)
        if isinstance(checked, Path):
            image = str(checked)
            key = checked.relative_to(self.image_root).as_posix()  # shareable, the same on every machine
        else:
            image = key = checked
        ident = _first(rec, "id", "date") or Path(image.split("?")[0]).stem
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        stem = f"{slug(ident, 'image', 60)}-{digest}"
        return {
            "key": key, "source_image": image, "original": key, "caption": caption,
            "title": strip_html(_first(rec, "title")), "source": source,
            "credit": strip_html(_first(rec, "credit", "copyright")), "url": page_url,
            "id": f"{source}-{stem}", "image": f"images/{source}/{stem}.png",
        }

    def _plan(self) -> list[dict]:
        plan, seen = [], set()
        for i, rec in enumerate(self.raw_records):
            item = self._normalize(rec, i)
            if item is None:
                continue
            if item["key"] in seen:
                self.report["duplicates"] += 1
                continue
            seen.add(item["key"])
            plan.append(item)
        return plan

    # -- images ----------------------------------------------------------------------
    def _read_local(self, path: Path):
        from ..imaging import load_image
        from ..imaging.inputs import is_fits_name

        with open(path, "rb") as fh:
            head = fh.read(9)
        if head.startswith(b"SIMPLE  =") or is_fits_name(path):
            try:
                img = load_image(path, hdu=self.hdu, plane=self.plane)
            except ImageInputError:  # names the HDU or plane to choose
                raise
            except Exception as exc:
                raise ImageFileError(f"image file {str(path)!r} could not be read: {exc}") from exc
            return img.to_pil("RGB" if img.is_color else "L")
        return open_verified_image(path)

    def _fetch_url(self, url: str):
        from astropy.utils import data as _data

        def fetch():
            path = _data.download_file(url, cache=True, pkgname="astrovl", show_progress=False)
            return self._read_local(Path(path))

        try:  # network errors, corrupt or truncated files are retried
            return retry(fetch, attempts=self.max_retries + 1, delay=self.retry_delay,
                         what=f"the download of {url}",
                         cleanup=lambda: _data.clear_download_cache(url, pkgname="astrovl"))
        except DatasetError as exc:
            last = exc.__cause__
            raise ImageFileError(f"{type(last).__name__}: {last}") from last

    def _process(self, item: dict) -> bool:
        out = safe_join(self.directory, item["image"])
        if is_complete_png(out, self.image_size):
            self.report["skipped"] += 1
            return True
        try:
            if _is_url(item["source_image"]):
                image = self._fetch_url(item["source_image"])
            else:
                path = Path(item["source_image"])
                if not path.is_file():
                    raise ImageFileError(f"local image {str(path)!r} does not exist")
                image = self._read_local(path)
        except (ImageFileError, ImageInputError, OSError) as exc:
            self.report.add_failure(item["original"], str(exc))
            return False
        save_png(resize_and_pad(image, self.image_size), out)
        self.report["downloaded" if _is_url(item["source_image"]) else "converted"] += 1
        return True

    # -- build -----------------------------------------------------------------------
    def build(self) -> ManifestDataset:
        """Run (or resume) the build and return the dataset.

        Returns
        -------
        ManifestDataset
            The dataset in ``directory``.

        Raises
        ------
        astrovl.exceptions.UntrustedSourceError
            A record names a source that is not allowed (see the module
            documentation); nothing is written.
        astrovl.exceptions.OutputDirectoryError
            ``directory`` holds files that are not an outreach build.
        """
        self.report = BuildReport(self._report_keys())
        self.report["records"] = len(self.raw_records)
        plan = self._plan()  # refuses untrusted sources before anything is written
        prepare_output_dir(self.directory, OUTPUT_KIND)
        splits = assign_splits([p["id"] for p in plan], self.seed, self.val_fraction)
        rows = []
        for item in progress_bar(plan, enabled=self.progress, desc="outreach images",
                                 unit="image"):
            if self._process(item):
                rows.append(item)
        rows.sort(key=lambda r: r["id"])
        names = ("id", "split", "image", "caption", "title", "source", "credit", "url",
                 "original")
        data = [[r["id"], splits[r["id"]], r["image"], r["caption"], r["title"], r["source"],
                 r["credit"], r["url"], r["original"]] for r in rows]
        table = (Table(rows=data, names=names, dtype=[str] * len(names)) if data
                 else Table(names=names, dtype=[str] * len(names)))
        table.meta.update(image_size=self.image_size, seed=self.seed,
                          val_fraction=self.val_fraction,
                          padding="white (255), image centred")
        write_manifest(table, self.directory, kind="outreach")
        self.report["written"] = len(rows)
        atomic_write_text(self.directory / REPORT_NAME,
                          json.dumps(self.report.to_dict(), indent=1))
        return ManifestDataset(self.directory)
