"""Image-text datasets from Hubble preview images in MAST and proposal abstracts.

:class:`HubblePreviewDatasetBuilder` turns a table of HST observations (as
returned by :meth:`astroquery.mast.ObservationsClass.query_criteria`) into a
dataset directory in the shared manifest schema (:mod:`astrovl.datasets.records`):

1. the observations table is checked for the columns ``obsid``, ``obs_id`` and
   ``proposal_id``; observations whose proposal has no abstract (or title, for
   ``caption_mode="title"``) are excluded and counted;
2. the product lists of the remaining observations are fetched with
   :meth:`~astroquery.mast.ObservationsClass.get_product_list` (cached in the
   dataset directory, so a re-run does not query again);
3. only ``productType == "PREVIEW"`` products that are pictures (``.jpg``,
   ``.jpeg``, ``.png``, ``.gif``) are kept; colour composites (file name
   containing ``"color"``) are dropped unless ``keep_color=True``;
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
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Row, Table, vstack
from astropy.utils.exceptions import AstropyUserWarning

from ..exceptions import DatasetError, ImageFileError
from ..utils.files import atomic_write, atomic_write_text, safe_join
from ..utils.imports import optional_import
from ..utils.progress import progress_bar
from .abstracts import abstracts_by_proposal, raw_abstract_caption, read_abstracts
from .records import ManifestDataset, write_manifest

__all__ = [
    "HubblePreviewDatasetBuilder",
    "BuildReport",
    "REQUIRED_OBSERVATION_COLUMNS",
    "CAPTION_MODES",
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
CAPTION_MODES = ("summary", "abstract", "title")
PAD_VALUE = 255
_PRODUCT_CACHE = "products.ecsv"
_SUMMARY_CACHE = "summaries.jsonl"
_REPORT_NAME = "build_report.json"
_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


# --------------------------------------------------------------------------- report
class BuildReport(dict):
    """Counts of a dataset build, with the reasons of every failure.

    A :class:`dict` of count name -> int (``downloaded``, ``skipped``,
    ``failed``, ``excluded``...). :attr:`failures` lists ``{"item", "reason"}``
    dicts, :attr:`exclusions` the excluded inputs with their reason.
    ``print(report)`` shows a short summary; :meth:`to_table` returns an
    :class:`~astropy.table.Table`.
    """

    def __init__(self, keys: Iterable[str]):
        super().__init__({k: 0 for k in keys})
        self.failures: list[dict[str, str]] = []
        self.exclusions: list[dict[str, str]] = []

    def add_failure(self, item: str, reason: str, key: str = "failed") -> None:
        """Count a failure under ``key`` and remember its reason."""
        self[key] = self.get(key, 0) + 1
        self.failures.append({"item": str(item), "reason": str(reason)})

    def add_exclusion(self, item: str, reason: str) -> None:
        """Count an excluded input and remember why."""
        self["excluded"] = self.get("excluded", 0) + 1
        self.exclusions.append({"item": str(item), "reason": str(reason)})

    def to_table(self) -> Table:
        """The counts as a two-column table (``count``, ``value``)."""
        return Table(rows=[(k, int(v)) for k, v in self.items()], names=("count", "value"),
                     dtype=(str, np.int64))

    def to_dict(self) -> dict[str, Any]:
        """Counts, failures and exclusions as plain JSON-serializable data."""
        return {"counts": dict(self), "failures": self.failures, "exclusions": self.exclusions}

    def __str__(self) -> str:
        width = max((len(k) for k in self), default=0)
        lines = [f"{k:<{width}}  {v}" for k, v in self.items()]
        for f in self.failures[:10]:
            lines.append(f"failed: {f['item']}: {f['reason']}")
        if len(self.failures) > 10:
            lines.append(f"... and {len(self.failures) - 10} more failures")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


# --------------------------------------------------------------------------- images
@contextlib.contextmanager
def _strict_decoding():
    from PIL import ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def open_verified_image(path: str | os.PathLike):
    """Open a picture file and decode it completely.

    Parameters
    ----------
    path : str or path-like
        JPEG, PNG, GIF, TIFF... file (anything Pillow reads; first frame of
        animations).

    Returns
    -------
    PIL.Image.Image
        The decoded image, detached from the file.

    Raises
    ------
    ImageFileError
        If the file is missing, empty, truncated, corrupt or not a picture.
    """
    from PIL import Image

    path = Path(path)
    try:
        with _strict_decoding(), Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError as exc:
        raise ImageFileError(f"image file {str(path)!r} does not exist") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageFileError(
            f"image file {str(path)!r} is truncated, corrupt or not a picture ({exc})"
        ) from exc


def _to_display_mode(im):
    """Convert a Pillow image to 8-bit ``"L"`` or ``"RGB"``; transparency becomes white."""
    from PIL import Image

    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (PAD_VALUE,) * 4)
        im = Image.alpha_composite(canvas, rgba).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        im = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "1":
        im = im.convert("L")
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return im


def resize_and_pad(image, size: int):
    """Resize so that the longer side is ``size`` pixels and pad to a white square.

    Parameters
    ----------
    image : PIL.Image.Image
        Any Pillow image. Palette, alpha (composited on white) and 16-bit or
        float images are converted to 8-bit greyscale or RGB first.
    size : int
        Side of the square output.

    Returns
    -------
    PIL.Image.Image
        ``size x size`` image, mode ``"L"`` or ``"RGB"``. The resized picture
        (Lanczos filter, aspect ratio kept) is centred; the padding is white (255).
    """
    from PIL import Image

    size = int(size)
    if size < 1:
        raise ValueError(f"size={size!r} must be a positive number of pixels")
    im = _to_display_mode(image)
    w, h = im.size
    scale = size / max(w, h)
    new = (max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale))))
    if new != (w, h):
        im = im.resize(new, Image.Resampling.LANCZOS)
    fill = PAD_VALUE if im.mode == "L" else (PAD_VALUE,) * 3
    canvas = Image.new(im.mode, (size, size), fill)
    canvas.paste(im, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def is_complete_png(path: str | os.PathLike, size: int | None = None) -> bool:
    """True if ``path`` is a readable PNG (of ``size x size`` pixels when given)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or (size is not None and im.size != (size, size)):
                return False
            im.verify()
    except Exception:
        return False
    return True


def save_png(image, path: str | os.PathLike) -> None:
    """Write a Pillow image as PNG, atomically (readers never see a partial file)."""
    with atomic_write(path, "wb") as fh:
        image.save(fh, format="PNG")


def split_draw(key, seed: int) -> float:
    """A number in ``[0, 1)`` that is a fixed function of ``str(key)`` and ``seed`` (SHA-256)."""
    digest = hashlib.sha256(f"astrovl-split:{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(keys: Iterable, seed: int, val_fraction: float) -> dict:
    """Assign each key (proposal, record...) to ``"train"`` or ``"val"``.

    A key goes to validation when its :func:`split_draw` (a hash of the key and
    the seed) is below ``val_fraction``. The split of a key therefore depends
    only on the key, the seed and the fraction: adding proposals or cycles to a
    dataset later never moves an existing proposal between train and val.

    A small set where no key (or every key) falls into validation would have no
    validation (or no training) data: then, with two keys or more and
    ``val_fraction > 0``, the key with the smallest draw goes to validation (or
    the one with the largest to training). Only such small sets depend on which
    other keys are present.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1)")
    ordered = sorted(set(keys), key=str)
    draws = {k: split_draw(k, seed) for k in ordered}
    out = {k: ("val" if draws[k] < val_fraction else "train") for k in ordered}
    if val_fraction > 0 and len(ordered) >= 2:
        if "val" not in out.values():
            out[min(ordered, key=draws.get)] = "val"
        if "train" not in out.values():
            out[max(ordered, key=draws.get)] = "train"
    return out


def _retry(fn: Callable[[], Any], *, attempts: int, delay: float, what: str):
    """Call ``fn`` up to ``attempts`` times with exponential back-off; re-raise the last error."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1:
                raise DatasetError(f"{what} failed after {attempts} attempt(s): {exc}") from exc
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _slug(text: str, default: str = "item", max_len: int = 80) -> str:
    s = _SLUG.sub("_", str(text)).strip("._")
    return s[:max_len] or default


def check_builder_options(image_size, val_fraction, max_retries) -> None:
    """Validate the options every image dataset builder shares (DatasetError if bad)."""
    if int(image_size) < 8:
        raise DatasetError(f"image_size={image_size!r} must be at least 8 pixels")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DatasetError(f"val_fraction={val_fraction!r} must be in [0, 1)")
    if int(max_retries) < 0:
        raise DatasetError(f"max_retries={max_retries!r} must be >= 0")


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


class _CachedSummary:
    def __init__(self, objects_and_phenomena, science_use_cases, caption):
        self.objects_and_phenomena = list(objects_and_phenomena)
        self.science_use_cases = list(science_use_cases)
        self.caption = caption


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
        Dataset root. Created if needed; an existing partial build is resumed.
    abstracts : str, path-like or astropy.table.Table, optional
        Proposal abstracts catalog (anything :func:`~astrovl.datasets.read_abstracts`
        accepts). Needed for ``caption_mode="summary"`` and ``"abstract"``.
    summarizer : object, optional
        Object with ``summarize(text)`` returning an object with
        ``objects_and_phenomena`` and ``science_use_cases`` (lists of str) and
        ``caption`` (str), such as :class:`astrovl.AbstractSummarizer`. Needed for
        ``caption_mode="summary"``; when given in the other modes the summary
        columns are filled too. Summaries are cached in ``directory/summaries.jsonl``
        (:class:`~astrovl.generation.JSONLCache`), keyed by the summarizer's model
        (``model_id``), its ``prompt_version``, the proposal and the abstract, so a
        summary is reused only for the same model, prompt and text.
    caption_mode : {"summary", "abstract", "title"}
        ``"summary"``: the summary caption ("objects; use cases");
        ``"abstract"``: ``"Category: <category>. <abstract>"``;
        ``"title"``: the proposal title (catalog title, else ``obs_title``).
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
    ...                                       caption_mode="abstract")  # doctest: +SKIP
    >>> ds = builder.build()  # doctest: +SKIP
    >>> print(builder.report)  # doctest: +SKIP
    """

    def __init__(self, observations, directory: str | os.PathLike, *, abstracts=None,
                 summarizer=None, caption_mode: str = "summary",
                 max_images_per_proposal: int = 20, image_size: int = 512, seed: int = 0,
                 val_fraction: float = 0.1, keep_color: bool = False, max_retries: int = 3,
                 retry_delay: float = 1.0, progress: bool | None = None):
        self.observations = _as_table(observations)
        missing = [c for c in REQUIRED_OBSERVATION_COLUMNS if c not in self.observations.colnames]
        if missing:
            raise DatasetError(
                f"the observations table lacks required column(s) {missing} (it has "
                f"{self.observations.colnames[:20]}); pass the table returned by "
                "astroquery.mast.Observations.query_criteria(obs_collection='HST', ...)"
            )
        if caption_mode not in CAPTION_MODES:
            raise DatasetError(f"caption_mode={caption_mode!r} is not known; use one of "
                               f"{list(CAPTION_MODES)}")
        if caption_mode == "summary" and summarizer is None:
            raise DatasetError(
                "caption_mode='summary' needs a summarizer (e.g. astrovl.AbstractSummarizer); "
                "pass summarizer=..., or use caption_mode='abstract' for raw-abstract captions"
            )
        if summarizer is not None and not callable(getattr(summarizer, "summarize", None)):
            raise DatasetError("summarizer must have a summarize(text) method")
        if caption_mode in ("summary", "abstract") and abstracts is None:
            raise DatasetError(
                f"caption_mode={caption_mode!r} needs the proposal abstracts: pass abstracts= "
                "(path of the STScI abstracts catalog, its text, or a table from read_abstracts)"
            )
        if int(max_images_per_proposal) < 1:
            raise DatasetError(f"max_images_per_proposal={max_images_per_proposal!r} must be >= 1")
        check_builder_options(image_size, val_fraction, max_retries)
        self.directory = Path(directory)
        self.abstracts = None if abstracts is None else read_abstracts(abstracts)
        self.summarizer = summarizer
        self.caption_mode = caption_mode
        self.max_images_per_proposal = int(max_images_per_proposal)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self.keep_color = bool(keep_color)
        self.max_retries = int(max_retries)
        self.retry_delay = float(retry_delay)
        self.progress = progress
        self.report = BuildReport(self._report_keys())

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
            Constructor arguments (``abstracts``, ``caption_mode``...).

        Raises
        ------
        DatasetError
            If an ID is not an integer, or MAST returns no public observation.
        """
        optional_import("astroquery", purpose="querying the Hubble archive (MAST)")
        from astroquery.mast import Observations

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
            table = _retry(
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
            if self.caption_mode in ("summary", "abstract") and not abstract:
                self.report.add_exclusion(obs_id, f"proposal {pid} has no abstract")
                continue
            if self.caption_mode == "title" and not title:
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
            products = _retry(lambda chunk=chunk: Observations.get_product_list(chunk),
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

    def _select_previews(self, products: Table, observations: list[dict]) -> list[dict]:
        by_obsid = {o["obsid"]: o for o in observations if o["obsid"]}
        by_obs_id = {o["obs_id"].upper(): o for o in observations if o["obs_id"]}
        seen: set[str] = set()
        previews = []
        for row in products:
            if str(row["productType"]).strip().upper() != "PREVIEW":
                continue
            fname = str(row["productFilename"]).strip()
            uri = str(row["dataURI"]).strip()
            if not uri or not fname.lower().endswith(PREVIEW_SUFFIXES):
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
                stem = _slug(Path(item["filename"]).stem, "preview")
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
            if isinstance(c, dict) and {"objects_and_phenomena", "science_use_cases", "caption"} <= c.keys():
                out[pid] = _summary_fields(_CachedSummary(c["objects_and_phenomena"],
                                                          c["science_use_cases"], c["caption"]))
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
                        f"downloads/{item['proposal_id']}/{_slug(item['filename'])}")
        raw.parent.mkdir(parents=True, exist_ok=True)
        last_error: Exception | None = None
        image = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_delay * 2 ** (attempt - 1))
            try:
                result = Observations.download_file(item["data_uri"], local_path=str(raw),
                                                    cache=True)
                status, msg = (result[0], result[1]) if isinstance(result, tuple) else (
                    "COMPLETE", None)
                if str(status).upper() == "ERROR":
                    raise OSError(msg or "download error")
                image = open_verified_image(raw)
                break
            except Exception as exc:  # network errors, corrupt or truncated files
                last_error = exc
                with contextlib.suppress(OSError):
                    raw.unlink()
        if image is None:
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
        self.directory.mkdir(parents=True, exist_ok=True)
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
        if self.caption_mode == "summary":
            plan = [p for p in plan if p["proposal_id"] in summaries]
        splits = assign_splits({p["proposal_id"] for p in plan}, self.seed, self.val_fraction)
        rows = []
        for item in self._bar(plan, desc="Hubble previews", unit="image"):
            if not self._download(item):
                continue
            objects, uses, summary_caption = summaries.get(item["proposal_id"], ([], [], ""))
            if self.caption_mode == "summary":
                caption = summary_caption
            elif self.caption_mode == "abstract":
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
        atomic_write_text(self.directory / _REPORT_NAME,
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
            caption_mode=self.caption_mode, image_size=self.image_size, seed=self.seed,
            val_fraction=self.val_fraction, max_images_per_proposal=self.max_images_per_proposal,
            keep_color=self.keep_color, padding="white (255), image centred",
        )
        return table
