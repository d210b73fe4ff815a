"""Image-text datasets from Hubble preview images in MAST and proposal abstracts.

:class:`HubblePreviewDatasetBuilder` turns a table of HST observations (as
returned by :meth:`astroquery.mast.ObservationsClass.query_criteria`) into a
dataset directory in the shared manifest schema (:mod:`astrovl.datasets.records`):

1. the observations table is checked for the columns ``obsid``, ``obs_id`` and
   ``proposal_id``; observations whose proposal has no abstract (or title, for
   ``caption_source="title"``) are excluded and counted;
2. the product lists of the remaining observations are fetched with
   :meth:`~astroquery.mast.ObservationsClass.get_product_list` (cached in the
   dataset directory, so a re-run does not query again);
3. only ``productType == "PREVIEW"`` products that are pictures (``.jpg``,
   ``.jpeg``, ``.png``, ``.gif``, lower or upper case) are kept
   (:meth:`~astroquery.mast.ObservationsClass.filter_products`); colour
   composites (file name containing ``"color"``) are dropped unless
   ``keep_color=True``;
4. at most ``max_images_per_proposal`` previews per proposal are drawn at
   random; the draw of each proposal depends only on ``seed`` and the proposal
   ID, so adding proposals does not change the images chosen for the others;
5. previews are downloaded with
   :meth:`~astroquery.mast.ObservationsClass.download_file` (``cache=True``),
   with retries and exponential back-off. Every download is decoded completely
   with Pillow; truncated or corrupt files are deleted and fetched again;
6. each image is resized so that its longer side is ``image_size`` pixels
   (Lanczos filter, up or down), centred on a square canvas padded with white
   (255), and written as an 8-bit PNG (greyscale previews stay greyscale) to
   ``images/<proposal_id>/<name>.png``, atomically;
7. proposals are assigned to the ``train`` or ``val`` split (no proposal in
   both), and ``manifest.ecsv`` is written.

Re-running :meth:`~HubblePreviewDatasetBuilder.build` on the same directory
skips every image whose PNG is already complete and reuses cached product
lists and summaries, so an interrupted build (Ctrl-C, a killed job) finishes
on the next run with no duplicate and no lost record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from astropy.table import Row, Table, vstack
from astropy.utils.exceptions import AstropyUserWarning

from ..exceptions import DatasetError
from ..utils.files import (
    HUBBLE_DATASET_OUTPUT,
    atomic_write,
    atomic_write_text,
    check_output_dir,
    prepare_output_dir,
    safe_join,
)
from ..utils.imports import optional_import
from ..utils.progress import progress_bar
from ._builder import (
    PAD_VALUE,  # noqa: F401  (public constant of this module before the split)
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
    split_draw,
)
from .abstracts import abstracts_by_proposal, raw_abstract_caption, read_abstracts
from .records import ManifestDataset, write_manifest

__all__ = [
    "HubblePreviewDatasetBuilder",
    "BuildReport",
    "REQUIRED_OBSERVATION_COLUMNS",
    "CAPTION_SOURCES",
    "PREVIEW_SUFFIXES",
    "resize_and_pad",
    "open_verified_image",
    "is_complete_png",
    "save_png",
    "assign_splits",
    "split_draw",
]

REQUIRED_OBSERVATION_COLUMNS = ("obsid", "obs_id", "proposal_id")
REQUIRED_PRODUCT_COLUMNS = ("productType", "productFilename", "dataURI")
PREVIEW_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif")
CAPTION_SOURCES = ("summary", "abstract", "title")
_PRODUCT_CACHE = "products.ecsv"
_SUMMARY_CACHE = "summaries.jsonl"
_SUMMARY_FIELDS = ("objects_and_phenomena", "science_use_cases", "caption")
#: kind of the output folder of a build (see :func:`astrovl.utils.files.check_output_dir`)
OUTPUT_KIND = HUBBLE_DATASET_OUTPUT


def _cell(row, name: str, default=""):
    if name not in row.colnames:
        return default
    value = row[name]
    if value is np.ma.masked or (np.ma.isMaskedArray(value) and np.all(value.mask)):
        return default
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _str_cell(row, name: str) -> str:
    value = _cell(row, name, "")
    return "" if value is None else str(value).strip()


def _float_cell(row, name: str) -> float:
    try:
        value = float(_cell(row, name, np.nan))
    except (TypeError, ValueError):
        return float("nan")
    return value


def _int_or_none(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        try:
            f = float(str(value).strip())
        except (TypeError, ValueError):
            return None
        return int(f) if f.is_integer() else None


def _as_table(observations, what: str = "observations") -> Table:
    if isinstance(observations, Table):
        return observations
    if isinstance(observations, Row):
        return observations.table[[observations.index]]
    if isinstance(observations, Sequence) and observations and all(
            isinstance(r, Row) for r in observations):
        return vstack([r.table[[r.index]] for r in observations], metadata_conflicts="silent")
    raise TypeError(
        f"{what} must be an astropy Table (e.g. from astroquery.mast.Observations."
        f"query_criteria), a Row of one, or a list of Rows; got {type(observations).__name__}"
    )


def _summary_fields(summary) -> tuple[list[str], list[str], str]:
    objects = [str(x).strip() for x in getattr(summary, "objects_and_phenomena", []) or []]
    uses = [str(x).strip() for x in getattr(summary, "science_use_cases", []) or []]
    caption = str(getattr(summary, "caption", "") or "").strip()
    if not caption:
        caption = "; ".join(p for p in (", ".join(objects), ", ".join(uses)) if p)
    return objects, uses, caption


def _caption_source(caption_source: str | None, caption_mode: str | None) -> str:
    """The builder's ``caption_source``, accepting its former name ``caption_mode`` with a warning."""
    if caption_mode is None:
        return "summary" if caption_source is None else caption_source
    warnings.warn(
        "HubblePreviewDatasetBuilder(caption_mode=...) is deprecated; use caption_source=... (the "
        "same values: 'summary', 'abstract', 'title')", DeprecationWarning, stacklevel=3)
    if caption_source is not None and caption_source != caption_mode:
        raise DatasetError(f"caption_source={caption_source!r} and its former name "
                           f"caption_mode={caption_mode!r} disagree; pass caption_source only")
    return caption_mode


def __getattr__(name: str):
    if name == "CAPTION_MODES":
        warnings.warn("astrovl.datasets.hubble.CAPTION_MODES is deprecated; use CAPTION_SOURCES",
                      DeprecationWarning, stacklevel=2)
        return CAPTION_SOURCES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- builder
class HubblePreviewDatasetBuilder:
    """Build an image-text dataset from HST preview images and proposal abstracts.

    See the module documentation (:mod:`astrovl.datasets.hubble`) for the steps.

    Parameters
    ----------
    observations : astropy.table.Table, Row or list of Row
        HST observations as returned by ``astroquery.mast.Observations.query_criteria
        (obs_collection="HST", ...)``. Needs the columns ``obsid``, ``obs_id`` and
        ``proposal_id``; ``instrument_name``, ``filters``, ``target_name``,
        ``s_ra``, ``s_dec`` and ``obs_title`` are copied when present.
    directory : str or path-like
        Dataset root. Created if needed; an existing partial build is resumed. A
        folder holding other files is refused
        (:class:`~astrovl.exceptions.OutputDirectoryError`).
    abstracts : str, path-like or astropy.table.Table, optional
        Proposal abstracts catalog (anything :func:`~astrovl.datasets.read_abstracts`
        accepts). Needed for ``caption_source="summary"`` and ``"abstract"``.
    summarizer : object, optional
        Object with ``summarize(text)`` returning an object with
        ``objects_and_phenomena`` and ``science_use_cases`` (lists of str) and
        ``caption`` (str), such as :class:`astrovl.AbstractSummarizer`. Needed for
        ``caption_source="summary"``; when given in the other modes the summary
        columns are filled too. Summaries are cached in ``directory/summaries.jsonl``
        (:class:`~astrovl.generation.JSONLCache`), keyed by the summarizer's model
        (``model_id``), its ``prompt_version``, the proposal and the abstract, so a
        summary is reused only for the same model, prompt and text.
    caption_source : {"summary", "abstract", "title"}
        Where each caption comes from (default ``"summary"``).
        ``"summary"``: the summary caption ("objects; use cases");
        ``"abstract"``: ``"Category: <category>. <abstract>"``;
        ``"title"``: the proposal title (catalog title, else ``obs_title``).
        Recorded as ``caption_mode`` in the manifest metadata.
    max_images_per_proposal : int
        At most this many previews per proposal, drawn at random (default 20).
    image_size : int
        Side of the square output images in pixels (default 512).
    seed : int
        Seed of the per-proposal draws and of the train/validation split.
    val_fraction : float
        Fraction of proposals in the validation split (default 0.1).
    keep_color : bool
        Keep colour-composite previews (file names containing ``"color"``).
    max_retries : int
        Retries after a failed or corrupt download (default 3).
    retry_delay : float
        First back-off delay in seconds; doubled after every retry.
    progress : bool, optional
        Show progress bars (default: ``astrovl.conf.progress``).
    caption_mode : {"summary", "abstract", "title"}, optional
        Former name of ``caption_source`` (deprecated: a
        :class:`DeprecationWarning`; it is not the ``caption_mode`` of
        :class:`astrovl.training.CLIPTrainingConfig`, which picks the manifest
        column to train on).

    Attributes
    ----------
    report : BuildReport
        Counts of the last :meth:`build`: ``observations``, ``excluded``
        (observations without abstract/title or with a bad proposal ID),
        ``previews`` (after filtering), ``selected`` (after the per-proposal
        cap), ``downloaded``, ``skipped`` (already complete), ``failed``
        (downloads that failed after all retries), ``summary_failed``
        (proposals whose summary failed; their images are left out) and
        ``records`` (manifest rows). Also saved as ``build_report.json``.

    Examples
    --------
    >>> from astroquery.mast import Observations  # doctest: +SKIP
    >>> obs = Observations.query_criteria(obs_collection="HST", proposal_id="5371",
    ...                                   dataRights="PUBLIC")  # doctest: +SKIP
    >>> builder = HubblePreviewDatasetBuilder(obs, "hubble_ds", abstracts="abstracts.txt",
    ...                                       caption_source="abstract")  # doctest: +SKIP
    >>> ds = builder.build()  # doctest: +SKIP
    >>> print(builder.report)  # doctest: +SKIP
    """

    def __init__(self, observations, directory: str | os.PathLike, *, abstracts=None,
                 summarizer=None, caption_source: str | None = None,
                 max_images_per_proposal: int = 20, image_size: int = 512, seed: int = 0,
                 val_fraction: float = 0.1, keep_color: bool = False, max_retries: int = 3,
                 retry_delay: float = 1.0, progress: bool | None = None,
                 caption_mode: str | None = None):
        caption_source = _caption_source(caption_source, caption_mode)
        self.observations = _as_table(observations)
        missing = [c for c in REQUIRED_OBSERVATION_COLUMNS if c not in self.observations.colnames]
        if missing:
            raise DatasetError(
                f"the observations table lacks required column(s) {missing} (it has "
                f"{self.observations.colnames[:20]}); pass the table returned by "
                "astroquery.mast.Observations.query_criteria(obs_collection='HST', ...)"
            )
        if caption_source not in CAPTION_SOURCES:
            raise DatasetError(f"caption_source={caption_source!r} is not known; use one of "
                               f"{list(CAPTION_SOURCES)}")
        if caption_source == "summary" and summarizer is None:
            raise DatasetError(
                "caption_source='summary' needs a summarizer (e.g. astrovl.AbstractSummarizer); "
                "pass summarizer=..., or use caption_source='abstract' for raw-abstract captions"
            )
        if summarizer is not None and not callable(getattr(summarizer, "summarize", None)):
            raise DatasetError("summarizer must have a summarize(text) method")
        if caption_source in ("summary", "abstract") and abstracts is None:
            raise DatasetError(
                f"caption_source={caption_source!r} needs the proposal abstracts: pass abstracts= "
                "(path of the STScI abstracts catalog, its text, or a table from read_abstracts)"
            )
        if int(max_images_per_proposal) < 1:
            raise DatasetError(f"max_images_per_proposal={max_images_per_proposal!r} must be >= 1")
        check_builder_options(image_size, val_fraction, max_retries)
        self.directory = Path(directory)
        check_output_dir(self.directory, OUTPUT_KIND)
        self.abstracts = None if abstracts is None else read_abstracts(abstracts)
        self.summarizer = summarizer
        self.caption_source = caption_source
        self.max_images_per_proposal = int(max_images_per_proposal)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self.keep_color = bool(keep_color)
        self.max_retries = int(max_retries)
        self.retry_delay = float(retry_delay)
        self.progress = progress
        self.report = BuildReport(self._report_keys())

    @property
    def caption_mode(self) -> str:
        """Former name of :attr:`caption_source` (deprecated)."""
        warnings.warn("HubblePreviewDatasetBuilder.caption_mode is deprecated; use caption_source",
                      DeprecationWarning, stacklevel=2)
        return self.caption_source

    # -- constructors ----------------------------------------------------------
    @classmethod
    def from_proposals(cls, proposal_ids: Iterable[int | str], directory: str | os.PathLike,
                       *, batch_size: int = 50, **kwargs) -> HubblePreviewDatasetBuilder:
        """Query MAST for the public HST observations of some proposals.

        Calls ``astroquery.mast.Observations.query_criteria(obs_collection="HST",
        proposal_id=[...], dataRights="PUBLIC")`` in batches of ``batch_size``
        proposals (with retries) and passes the stacked table to the constructor.

        Parameters
        ----------
        proposal_ids : iterable of int or str
            HST proposal IDs.
        directory : str or path-like
            Dataset root.
        batch_size : int
            Proposals per MAST query.
        **kwargs
            Constructor arguments (``abstracts``, ``caption_source``...).

        Raises
        ------
        DatasetError
            If an ID is not an integer, or MAST returns no public observation.
        OutputDirectoryError
            ``directory`` holds other files (checked before MAST is queried).
        """
        optional_import("astroquery", purpose="querying the Hubble archive (MAST)")
        from astroquery.mast import Observations

        check_output_dir(directory, OUTPUT_KIND)
        ids: list[str] = []
        for p in proposal_ids:
            pid = _int_or_none(p)
            if pid is None:
                raise DatasetError(f"proposal ID {p!r} is not an integer")
            ids.append(str(pid))
        ids = sorted(set(ids), key=int)
        if not ids:
            raise DatasetError("no proposal IDs given")
        delay = float(kwargs.get("retry_delay", 1.0))
        attempts = int(kwargs.get("max_retries", 3)) + 1
        tables = []
        for start in range(0, len(ids), int(batch_size)):
            chunk = ids[start:start + int(batch_size)]
            table = retry(
                lambda chunk=chunk: Observations.query_criteria(
                    obs_collection="HST", proposal_id=chunk, dataRights="PUBLIC"),
                attempts=attempts, delay=delay,
                what=f"the MAST query for proposals {chunk[:5]}",
            )
            if table is not None and len(table):
                tables.append(table)
        if not tables:
            raise DatasetError(
                f"MAST returned no public HST observations for proposal(s) {ids[:10]}; "
                "check the IDs and whether their data are public yet"
            )
        observations = tables[0] if len(tables) == 1 else vstack(
            tables, metadata_conflicts="silent")
        return cls(observations, directory, **kwargs)

    @classmethod
    def from_cycles(cls, cycles: int | Iterable[int], directory: str | os.PathLike, *,
                    abstracts, **kwargs) -> HubblePreviewDatasetBuilder:
        """Build from every proposal of some HST cycles.

        MAST observations carry no cycle number, so the proposals of the cycles are
        taken from the abstracts catalog (its ``cycle`` column) and queried with
        :meth:`from_proposals`. The paper used cycles up to 30.

        Parameters
        ----------
        cycles : int or iterable of int
            HST observing cycles.
        directory : str or path-like
            Dataset root.
        abstracts : str, path-like or astropy.table.Table
            Proposal abstracts catalog (required: it maps proposals to cycles).
        **kwargs
            Passed to :meth:`from_proposals` and the constructor.
        """
        if abstracts is None:
            raise DatasetError("from_cycles needs abstracts= (the catalog maps proposals to cycles)")
        table = read_abstracts(abstracts)
        wanted = {int(cycles)} if np.isscalar(cycles) else {int(c) for c in cycles}
        keep = np.isin(np.asarray(table["cycle"]), sorted(wanted))
        ids = [int(p) for p in table["proposal_id"][keep]]
        if not ids:
            known = sorted({int(c) for c in table["cycle"]})
            raise DatasetError(
                f"the abstracts catalog has no proposal in cycle(s) {sorted(wanted)}; it covers "
                f"cycles {known}"
            )
        return cls.from_proposals(ids, directory, abstracts=table, **kwargs)

    # -- helpers -----------------------------------------------------------------
    @staticmethod
    def _report_keys() -> tuple[str, ...]:
        return ("observations", "excluded", "previews", "selected", "downloaded", "skipped",
                "failed", "summary_failed", "records")

    def _bar(self, iterable, **kwargs):
        return progress_bar(iterable, enabled=self.progress, **kwargs)

    def _observation_records(self) -> list[dict[str, Any]]:
        """One dict per usable observation; excluded ones are counted in the report."""
        catalog = {} if self.abstracts is None else abstracts_by_proposal(self.abstracts)
        records = []
        for row in self.observations:
            obs_id = _str_cell(row, "obs_id")
            pid = _int_or_none(_cell(row, "proposal_id", None))
            if pid is None:
                self.report.add_exclusion(obs_id, "no integer proposal_id")
                continue
            entry = catalog.get(pid, {})
            abstract = entry.get("abstract", "")
            title = entry.get("title", "") or _str_cell(row, "obs_title")
            if self.caption_source in ("summary", "abstract") and not abstract:
                self.report.add_exclusion(obs_id, f"proposal {pid} has no abstract")
                continue
            if self.caption_source == "title" and not title:
                self.report.add_exclusion(obs_id, f"proposal {pid} has no title")
                continue
            cycle = entry.get("cycle", None)
            if cycle is None:
                cycle = _int_or_none(_cell(row, "cycle", None))
            records.append({
                "obsid": _str_cell(row, "obsid"),
                "obs_id": obs_id,
                "proposal_id": pid,
                "cycle": -1 if cycle is None else int(cycle),
                "instrument": _str_cell(row, "instrument_name"),
                "filters": _str_cell(row, "filters"),
                "target": _str_cell(row, "target_name"),
                "ra": _float_cell(row, "s_ra"),
                "dec": _float_cell(row, "s_dec"),
                "abstract": abstract,
                "category": entry.get("category", ""),
                "title": title,
            })
        return records

    def _product_list(self, obsids: list[str]) -> Table:
        """Product lists of ``obsids`` (cached in the dataset directory)."""
        cache = self.directory / _PRODUCT_CACHE
        key = hashlib.sha256("\n".join(sorted(obsids)).encode()).hexdigest()
        if cache.is_file():
            try:
                cached = Table.read(cache, format="ascii.ecsv")
                if cached.meta.get("obsids_sha256") == key:
                    return Table({c: np.asarray(cached[c].filled("") if hasattr(
                        cached[c], "filled") else cached[c]).astype(str)
                        for c in cached.colnames})
            except Exception:  # an unreadable cache is rebuilt
                pass
        optional_import("astroquery", purpose="querying the Hubble archive (MAST)")
        from astroquery.mast import Observations

        batch = 500
        parts = []
        starts = range(0, len(obsids), batch)
        for start in self._bar(starts, desc="MAST product lists", unit="batch"):
            chunk = obsids[start:start + batch]
            products = retry(lambda chunk=chunk: Observations.get_product_list(chunk),
                              attempts=self.max_retries + 1, delay=self.retry_delay,
                              what=f"the MAST product list query for obsids {chunk[:3]}")
            if products is not None and len(products):
                parts.append(self._compact_products(products))
        names = ("obsID", "parent_obsid", "obs_id", "productType", "productFilename", "dataURI")
        table = Table(names=names, dtype=[str] * len(names))
        for part in parts:
            table = vstack([table, part], metadata_conflicts="silent") if len(table) else part
        table.meta = {"obsids_sha256": key}
        with atomic_write(cache, "w") as fh:
            table.write(fh, format="ascii.ecsv")
        return table

    @staticmethod
    def _compact_products(products: Table) -> Table:
        missing = [c for c in REQUIRED_PRODUCT_COLUMNS if c not in products.colnames]
        if missing:
            raise DatasetError(
                f"the MAST product list lacks column(s) {missing}; got {products.colnames}"
            )
        names = ("obsID", "parent_obsid", "obs_id", "productType", "productFilename", "dataURI")
        cols = {n: [_str_cell(r, n) for r in products] for n in names}
        return Table(cols, names=names, dtype=[str] * len(names))

    @staticmethod
    def _preview_products(products: Table) -> Table:
        """The ``PREVIEW`` products whose file is a picture (:data:`PREVIEW_SUFFIXES`)."""
        from astroquery.mast import Observations

        if not len(products):
            return products
        suffixes = [*PREVIEW_SUFFIXES, *(s.upper() for s in PREVIEW_SUFFIXES)]
        return Observations.filter_products(products, productType="PREVIEW", extension=suffixes)

    def _select_previews(self, products: Table, observations: list[dict]) -> list[dict]:
        by_obsid = {o["obsid"]: o for o in observations if o["obsid"]}
        by_obs_id = {o["obs_id"].upper(): o for o in observations if o["obs_id"]}
        seen: set[str] = set()
        previews = []
        for row in self._preview_products(products):
            fname = str(row["productFilename"]).strip()
            uri = str(row["dataURI"]).strip()
            if not uri:
                continue
            if not self.keep_color and "color" in fname.lower():
                continue
            obs = next((by_obsid[k] for k in (str(row["parent_obsid"]), str(row["obsID"]))
                        if k and k in by_obsid), None)
            if obs is None:
                obs = by_obs_id.get(str(row["obs_id"]).upper())
            if obs is None or uri in seen:
                continue
            seen.add(uri)
            previews.append({**obs, "data_uri": uri, "filename": fname})
        previews.sort(key=lambda p: (p["proposal_id"], p["data_uri"]))
        return previews

    def _cap(self, previews: list[dict]) -> list[dict]:
        groups: dict[int, list[dict]] = {}
        for p in previews:
            groups.setdefault(p["proposal_id"], []).append(p)
        chosen = []
        for pid, items in sorted(groups.items()):
            if len(items) > self.max_images_per_proposal:
                rng = np.random.default_rng([self.seed & 0xFFFFFFFF, abs(pid)])
                idx = np.sort(rng.choice(len(items), self.max_images_per_proposal, replace=False))
                items = [items[i] for i in idx]
            names: set[str] = set()
            for item in items:
                stem = slug(Path(item["filename"]).stem, "preview")
                if stem in names:
                    stem = f"{stem}-{hashlib.sha1(item['data_uri'].encode()).hexdigest()[:8]}"
                names.add(stem)
                item["name"] = stem
                item["image"] = f"images/{pid}/{stem}.png"
                item["id"] = f"hst-{pid}-{stem}"
                chosen.append(item)
        return chosen

    def _summary_identity(self) -> tuple[str, str]:
        """(model, prompt version) of the summarizer: what a cached summary must match."""
        s = self.summarizer
        model = getattr(s, "model_id", None) or f"{type(s).__module__}.{type(s).__qualname__}"
        return str(model), str(getattr(s, "prompt_version", ""))

    def _summaries(self, plan: list[dict]) -> dict[int, tuple[list[str], list[str], str]]:
        from ..generation.cache import JSONLCache, cache_key

        if self.summarizer is None:
            return {}
        cache = JSONLCache(self.directory / _SUMMARY_CACHE)
        model, prompt_version = self._summary_identity()
        abstracts = {}
        for item in plan:
            abstracts.setdefault(item["proposal_id"], item["abstract"])
        out = {}
        for pid in self._bar(sorted(abstracts), desc="summaries", unit="proposal"):
            text = abstracts[pid]
            key = cache_key("hubble-summary", model, prompt_version, str(pid), text)
            c = cache.get(key)
            if isinstance(c, dict) and set(_SUMMARY_FIELDS) <= c.keys():
                out[pid] = _summary_fields(SimpleNamespace(**{n: c[n] for n in _SUMMARY_FIELDS}))
                continue
            try:
                fields = _summary_fields(self.summarizer.summarize(text))
            except Exception as exc:
                self.report.add_failure(f"proposal {pid}", f"summary failed: {exc}",
                                        key="summary_failed")
                continue
            if not fields[2]:
                self.report.add_failure(f"proposal {pid}", "summary is empty", key="summary_failed")
                continue
            out[pid] = fields
            cache.put(key, {"objects_and_phenomena": fields[0], "science_use_cases": fields[1],
                            "caption": fields[2], "model": model, "prompt_version": prompt_version})
        return out

    def _download(self, item: dict) -> bool:
        """Fetch, check, resize and save one preview; True when its PNG is complete."""
        optional_import("astroquery", purpose="querying the Hubble archive (MAST)")
        from astroquery.mast import Observations

        out = safe_join(self.directory, item["image"])
        if is_complete_png(out, self.image_size):
            self.report["skipped"] += 1
            return True
        raw = safe_join(self.directory,
                        f"downloads/{item['proposal_id']}/{slug(item['filename'])}")
        raw.parent.mkdir(parents=True, exist_ok=True)

        def fetch():
            result = Observations.download_file(item["data_uri"], local_path=str(raw), cache=True)
            status, msg = (result[0], result[1]) if isinstance(result, tuple) else ("COMPLETE", None)
            if str(status).upper() == "ERROR":
                raise OSError(msg or "download error")
            return open_verified_image(raw)

        try:  # network errors, corrupt or truncated files are retried
            image = retry(fetch, attempts=self.max_retries + 1, delay=self.retry_delay,
                          what=f"the download of {item['data_uri']}", cleanup=raw.unlink)
        except DatasetError as exc:
            last_error = exc.__cause__
            self.report.add_failure(item["data_uri"], f"{type(last_error).__name__}: {last_error}")
            return False
        save_png(resize_and_pad(image, self.image_size), out)
        with contextlib.suppress(OSError):
            raw.unlink()
        self.report["downloaded"] += 1
        return True

    # -- build -------------------------------------------------------------------
    def build(self) -> ManifestDataset:
        """Run (or resume) the build and return the dataset.

        Returns
        -------
        ManifestDataset
            The dataset in ``directory`` (``manifest.ecsv`` plus images).

        Warns
        -----
        astropy.utils.exceptions.AstropyUserWarning
            When no preview image is left after filtering (the dataset is empty).
        """
        self.report = BuildReport(self._report_keys())
        prepare_output_dir(self.directory, OUTPUT_KIND)
        self.report["observations"] = len(self.observations)
        observations = self._observation_records()
        obsids = sorted({o["obsid"] for o in observations if o["obsid"]})
        products = self._product_list(obsids) if obsids else Table(
            names=("obsID", "parent_obsid", "obs_id", "productType", "productFilename",
                   "dataURI"), dtype=[str] * 6)
        previews = self._select_previews(products, observations)
        self.report["previews"] = len(previews)
        plan = self._cap(previews)
        self.report["selected"] = len(plan)
        if not plan:
            warnings.warn(
                f"no PREVIEW images (jpg/png/gif{'' if self.keep_color else ', non-colour'}) "
                f"were found for the {len(observations)} usable observation(s); the dataset in "
                f"{str(self.directory)!r} is empty",
                AstropyUserWarning, stacklevel=2,
            )
        summaries = self._summaries(plan)
        if self.caption_source == "summary":
            plan = [p for p in plan if p["proposal_id"] in summaries]
        splits = assign_splits({p["proposal_id"] for p in plan}, self.seed, self.val_fraction)
        rows = []
        for item in self._bar(plan, desc="Hubble previews", unit="image"):
            if not self._download(item):
                continue
            objects, uses, summary_caption = summaries.get(item["proposal_id"], ([], [], ""))
            if self.caption_source == "summary":
                caption = summary_caption
            elif self.caption_source == "abstract":
                caption = raw_abstract_caption(item["category"], item["abstract"])
            else:
                caption = item["title"]
            rows.append({
                "id": item["id"], "split": splits[item["proposal_id"]], "image": item["image"],
                "caption": caption, "obs_id": item["obs_id"], "proposal_id": item["proposal_id"],
                "cycle": item["cycle"], "instrument": item["instrument"],
                "filters": item["filters"], "target": item["target"], "ra": item["ra"],
                "dec": item["dec"], "abstract": item["abstract"], "objects": "; ".join(objects),
                "use_cases": "; ".join(uses), "category": item["category"],
                "title": item["title"], "data_uri": item["data_uri"], "source": "mast",
            })
        rows.sort(key=lambda r: r["id"])
        manifest = self._manifest_table(rows)
        write_manifest(manifest, self.directory, kind="hubble")
        self.report["records"] = len(rows)
        atomic_write_text(self.directory / REPORT_NAME,
                          json.dumps(self.report.to_dict(), indent=1))
        return ManifestDataset(self.directory)

    _COLUMNS = (("id", str), ("split", str), ("image", str), ("caption", str), ("obs_id", str),
                ("proposal_id", np.int64), ("cycle", np.int64), ("instrument", str),
                ("filters", str), ("target", str), ("ra", np.float64), ("dec", np.float64),
                ("abstract", str), ("objects", str), ("use_cases", str), ("category", str),
                ("title", str), ("data_uri", str), ("source", str))

    def _manifest_table(self, rows: list[dict]) -> Table:
        names = [c for c, _ in self._COLUMNS]
        dtypes = [t for _, t in self._COLUMNS]
        if rows:
            table = Table(rows=[[r[c] for c in names] for r in rows], names=names, dtype=dtypes)
        else:
            table = Table(names=names, dtype=dtypes)
        table.meta.update(
            caption_mode=self.caption_source, image_size=self.image_size, seed=self.seed,
            val_fraction=self.val_fraction, max_images_per_proposal=self.max_images_per_proposal,
            keep_color=self.keep_color, padding="white (255), image centred",
        )
        return table
