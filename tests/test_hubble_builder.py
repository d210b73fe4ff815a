"""Tests of the Hubble preview dataset builder, with MAST mocked at the astroquery boundary.

Observation rows come from the MAST response recorded in astroquery's own test data
(``caom.json``); preview files are real telescope images (M13, NGC 1316, the Hubble
eXtreme Deep Field) encoded as JPEG/PNG/GIF.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.table import MaskedColumn, Table, vstack
from astropy.utils.exceptions import AstropyUserWarning
from PIL import Image

from astrovl import load_image
from astrovl.datasets import HubblePreviewDatasetBuilder, ManifestDataset, read_manifest
from astrovl.datasets.hubble import assign_splits, is_complete_png, resize_and_pad
from astrovl.exceptions import DatasetError, GenerationError

mast = pytest.importorskip("astroquery.mast")
import astroquery.mast.tests  # noqa: E402

MAST_DATA = Path(astroquery.mast.tests.__file__).parent / "data"

ABSTRACTS = """\
Proposal ID: 5371
Cycle: 4
Title: HST Medium-Deep Survey
PI: R. Griffiths
Category: Cosmology
Abstract:
We obtain parallel images of random fields to measure the sizes
and shapes of faint field galaxies.

-------------------------------------------------------------
Proposal ID: 5092
Cycle: 4
Title: GTO Low Latitude Parallel Program
PI: S. Groth
Category: Stellar Populations
Abstract:
Deep parallel images of the Galactic plane trace the stellar luminosity function.
"""


def mast_json_table(path: Path) -> Table:
    """Turn a recorded MAST JSON response into the masked Table astroquery returns."""
    payload = json.loads(path.read_text())
    cols = {}
    for field in payload["fields"]:
        name, kind = field["name"], field["type"]
        values = [rec.get(name) for rec in payload["data"]]
        mask = [v is None for v in values]
        if kind == "float":
            data = [np.nan if v is None else float(v) for v in values]
        elif kind == "int":
            data = [0 if v is None else int(v) for v in values]
        elif kind == "boolean":
            data = [bool(v) for v in values]
        else:
            data = ["" if v is None else str(v) for v in values]
        cols[name] = MaskedColumn(data, name=name, mask=mask)
    return Table(cols)


@pytest.fixture(scope="module")
def caom_hst() -> Table:
    table = mast_json_table(MAST_DATA / "caom.json")
    hst = table[table["obs_collection"] == "HST"]
    assert len(hst) == 4 and set(hst["proposal_id"]) == {"5371", "5092"}
    return hst


def clone_observation(template: Table, proposal_id: int, obsid: str, obs_id: str) -> Table:
    row = template[:1].copy()
    row["proposal_id"] = [str(proposal_id)]
    row["obsid"] = [obsid]
    row["obs_id"] = [obs_id]
    return row


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pictures(m13_path, ngc1316_path, xdf_array) -> dict[str, bytes]:
    """Real telescope images as preview-like files."""
    xdf = Image.fromarray(np.ascontiguousarray(xdf_array[::6, ::6]))
    return {
        "m13.jpg": _encode(load_image(m13_path).to_pil("L"), "JPEG"),
        "ngc1316.png": _encode(load_image(ngc1316_path).to_pil("L"), "PNG"),  # 440 x 300
        "xdf.jpg": _encode(xdf, "JPEG"),
        "xdf.gif": _encode(xdf.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
    }


class FakeMast:
    """Stands in for the MAST service behind astroquery: product lists and file downloads."""

    def __init__(self):
        self.products: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.downloads: list[str] = []
        self.product_queries: list[list[str]] = []
        self.truncate_once: set[str] = set()
        self.garbage_once: set[str] = set()
        self.always_fail: set[str] = set()
        self.interrupt_at: int | None = None

    def add(self, obs_row, filename: str, data: bytes | None, product_type: str = "PREVIEW"):
        uri = f"mast:HST/product/{filename}"
        if data is not None:
            self.files[uri] = data
        self.products.append({
            "obsID": str(obs_row["obsid"]), "parent_obsid": str(obs_row["obsid"]),
            "obs_collection": "HST", "dataproduct_type": "image",
            "obs_id": str(obs_row["obs_id"]), "description": f"{product_type} {filename}",
            "type": "S", "dataURI": uri, "productType": product_type,
            "productGroupDescription": "", "productSubGroupDescription": "",
            "productDocumentationURL": "", "project": "HST", "prvversion": "",
            "proposal_id": str(obs_row["proposal_id"]), "productFilename": filename,
            "size": len(data or b""), "dataRights": "PUBLIC",
        })
        return uri

    def get_product_list(self, observations):
        ids = [str(o) for o in observations]
        self.product_queries.append(ids)
        rows = [p for p in self.products if p["parent_obsid"] in set(ids)]
        if not rows:
            return Table(names=list(self.products[0]) if self.products else ["obsID"])
        return Table(rows=rows)

    def download_file(self, uri, *, local_path=None, cache=True, verbose=True, **kwargs):
        self.downloads.append(uri)
        if self.interrupt_at is not None and len(self.downloads) >= self.interrupt_at:
            raise KeyboardInterrupt
        url = "https://mast.stsci.edu/api/v0.1/Download/file?uri=" + uri
        if uri in self.always_fail:
            return "ERROR", "HTTPError: 503 Server Error: Service Unavailable", url
        data = self.files[uri]
        if uri in self.truncate_once:
            self.truncate_once.discard(uri)
            data = data[: len(data) // 2]
        elif uri in self.garbage_once:
            self.garbage_once.discard(uri)
            data = b"<html><body>Service temporarily unavailable</body></html>"
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        Path(local_path).write_bytes(data)
        return "COMPLETE", None, url


@pytest.fixture
def fake_mast(monkeypatch):
    fake = FakeMast()
    monkeypatch.setattr(mast.Observations, "get_product_list", fake.get_product_list)
    monkeypatch.setattr(mast.Observations, "download_file", fake.download_file)
    return fake


def populate_caom(fake: FakeMast, caom: Table, pictures: dict[str, bytes]) -> dict[str, str]:
    """Two previews + one colour preview + science files per recorded observation."""
    names = {}
    cycle = ["m13.jpg", "ngc1316.png", "xdf.jpg", "xdf.gif"]
    for i, row in enumerate(caom):
        base = str(row["obs_id"]).lower()
        names[f"{base}_drz"] = fake.add(row, f"{base}_drz.{cycle[i][-3:]}", pictures[cycle[i]])
        names[f"{base}_c0f"] = fake.add(row, f"{base}_c0f.jpg", pictures["m13.jpg"])
        names[f"{base}_color"] = fake.add(row, f"{base}_color_drz.jpg", pictures["xdf.jpg"])
        fake.add(row, f"{base}_c0f.fits", b"SIMPLE", product_type="SCIENCE")
        fake.add(row, f"{base}_drz.fits", b"SIMPLE", product_type="PREVIEW")  # not a picture
    return names


COMMON = dict(image_size=64, retry_delay=0.0, progress=False)


def test_missing_columns_are_named(tmp_path, caom_hst):
    bad = caom_hst.copy()
    bad.remove_columns(["obsid", "proposal_id"])
    with pytest.raises(DatasetError, match=r"\['obsid', 'proposal_id'\]"):
        HubblePreviewDatasetBuilder(bad, tmp_path, abstracts=ABSTRACTS, caption_source="abstract")


def test_bad_options(tmp_path, caom_hst):
    with pytest.raises(DatasetError, match="needs a summarizer"):
        HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=ABSTRACTS)
    with pytest.raises(DatasetError, match="needs the proposal abstracts"):
        HubblePreviewDatasetBuilder(caom_hst, tmp_path, caption_source="abstract")
    with pytest.raises(DatasetError, match="caption_source"):
        HubblePreviewDatasetBuilder(caom_hst, tmp_path, caption_source="poem")
    with pytest.raises(TypeError, match="astropy Table"):
        HubblePreviewDatasetBuilder({"obsid": 1}, tmp_path, caption_source="title")


def test_build_from_recorded_mast_rows(tmp_path, caom_hst, pictures, fake_mast):
    names = populate_caom(fake_mast, caom_hst, pictures)
    builder = HubblePreviewDatasetBuilder(caom_hst, tmp_path / "ds", abstracts=ABSTRACTS,
                                          caption_source="abstract", **COMMON)
    ds = builder.build()
    report = builder.report
    assert report["observations"] == 4 and report["excluded"] == 0
    assert report["previews"] == 8 and report["selected"] == 8  # colour and .fits dropped
    assert report["downloaded"] == 8 and report["failed"] == 0 and report["records"] == 8
    assert "downloaded" in str(report) and report.to_table()["value"].sum() > 0
    assert sorted(fake_mast.downloads) == sorted(v for k, v in names.items() if "color" not in k)
    # every product list query asked for the recorded obsids
    assert sorted(fake_mast.product_queries[0]) == sorted(caom_hst["obsid"])

    assert isinstance(ds, ManifestDataset) and len(ds) == 8
    m = read_manifest(tmp_path / "ds")
    for col in ("id", "split", "image", "caption", "obs_id", "proposal_id", "cycle", "instrument",
                "filters", "target", "ra", "dec", "abstract", "objects", "use_cases", "category",
                "title", "source"):
        assert col in m.colnames
    assert m["proposal_id"].dtype.kind == "i" and set(m["proposal_id"]) == {5371, 5092}
    assert set(m["cycle"]) == {4}
    assert set(m["source"]) == {"mast"}
    row = m[np.asarray(m["obs_id"]) == "U27XCS01T"][0]
    assert row["instrument"] == "WFPC2/WFC" and row["filters"] == "F814W"
    assert row["target"] == "LO-LAT"
    assert row["ra"] == pytest.approx(23.11817129395) and row["dec"] == pytest.approx(60.64213575852)
    assert row["caption"].startswith("Category: Cosmology. We obtain parallel images")
    assert row["image"].startswith("images/5371/") and row["image"].endswith(".png")
    caps = ds.captions
    assert all(c.startswith("Category: ") for c in caps)
    for i in range(len(ds)):
        path = ds.image_path(i)
        assert path.parent.parent == (tmp_path / "ds" / "images").resolve()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 64)
    # raw downloads are removed after conversion; no temporary files remain
    assert not list((tmp_path / "ds").rglob("*.part"))
    assert not [p for p in (tmp_path / "ds" / "downloads").rglob("*") if p.is_file()]
    saved = json.loads((tmp_path / "ds" / "build_report.json").read_text())
    assert saved["counts"]["downloaded"] == 8


def test_colour_previews_kept_on_request(tmp_path, caom_hst, pictures, fake_mast):
    populate_caom(fake_mast, caom_hst, pictures)
    builder = HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=ABSTRACTS,
                                          caption_source="abstract", keep_color=True, **COMMON)
    ds = builder.build()
    assert builder.report["previews"] == 12 and len(ds) == 12
    assert sum("color" in str(p) for p in ds.manifest["image"]) == 4
    with Image.open(ds.image_path(int(np.flatnonzero(
            np.char.find(np.asarray(ds.manifest["image"]).astype(str), "color") >= 0)[0]))) as im:
        assert im.mode == "RGB"


def _many_previews(fake, caom, pictures, proposal_id=9000, n=12):
    obs = clone_observation(caom, proposal_id, "2099000001", "IB9000010")
    for i in range(n):
        fake.add(obs[0], f"ib90000{i:02d}q_drz.jpg", pictures["m13.jpg"])
    return obs


def test_per_proposal_cap_is_random_and_seeded(tmp_path, caom_hst, pictures, fake_mast):
    obs = _many_previews(fake_mast, caom_hst, pictures)
    text = "Proposal ID: 9000\nCycle: 17\nTitle: Clusters\nCategory: Star Clusters\nAbstract:\nM13.\n"

    def chosen(seed, name):
        b = HubblePreviewDatasetBuilder(obs, tmp_path / name, abstracts=text,
                                        caption_source="abstract", max_images_per_proposal=5,
                                        seed=seed, **COMMON)
        ds = b.build()
        assert b.report["previews"] == 12 and b.report["selected"] == 5
        return sorted(ds.manifest["image"])

    first, again, other = chosen(0, "a"), chosen(0, "b"), chosen(1, "c")
    assert len(first) == 5 and first == again
    assert first != other
    # not simply the first five files
    assert first != [f"images/9000/ib90000{i:02d}q_drz.png" for i in range(5)] or \
        other != [f"images/9000/ib90000{i:02d}q_drz.png" for i in range(5)]


def test_resize_keeps_aspect_and_pads_white(ngc1316_path):
    src = load_image(ngc1316_path).to_pil("L")  # 440 x 300
    out = resize_and_pad(src, 64)
    arr = np.asarray(out)
    assert out.size == (64, 64) and out.mode == "L"
    # 440x300 -> 64x44: 10 white rows above and below
    assert (arr[:10] == 255).all() and (arr[-10:] == 255).all()
    inner = arr[10:54]
    assert (inner != 255).mean() > 0.5
    assert (inner[0] != 255).any() and (inner[-1] != 255).any()
    # the picture's content is preserved (downsampled mean close to the original)
    ref = np.asarray(src.resize((64, 44), Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(inner.astype(float) - ref).max() <= 1
    tall = resize_and_pad(src.transpose(Image.Transpose.ROTATE_90), 32)  # 300 x 440
    t = np.asarray(tall)
    assert (t[:, :5] == 255).all() and (t[:, -5:] == 255).all() and (t[:, 6:26] != 255).any()
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))  # fully transparent -> white
    assert (np.asarray(resize_and_pad(rgba, 16)) == 255).all()


def test_built_png_is_padded(tmp_path, caom_hst, pictures, fake_mast):
    populate_caom(fake_mast, caom_hst, pictures)
    ds = HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=ABSTRACTS,
                                     caption_source="abstract", **COMMON).build()
    i = [k for k, p in enumerate(ds.manifest["image"]) if "u27xqe01t_drz" in p][0]  # ngc1316
    arr = np.asarray(Image.open(ds.image_path(i)))
    assert (arr[:10] == 255).all() and (arr[-10:] == 255).all()
    assert (arr[12:52] != 255).mean() > 0.5


def test_split_by_proposal(tmp_path, caom_hst, pictures, fake_mast):
    tables, lines = [], []
    for k in range(8):
        pid = 11000 + k
        obs = clone_observation(caom_hst, pid, f"20990{k:05d}", f"IC{k:02d}01010")
        for j in range(2):
            fake_mast.add(obs[0], f"ic{k:02d}0101{j}_drz.jpg", pictures["m13.jpg"])
        tables.append(obs)
        lines.append(f"Proposal ID: {pid}\nCycle: 18\nCategory: Galaxies\nAbstract:\nText {k}.\n")
    obs = vstack(tables)
    catalog = "\n-----\n".join(lines)

    def splits(seed, name):
        ds = HubblePreviewDatasetBuilder(obs, tmp_path / name, abstracts=catalog,
                                         caption_source="abstract", val_fraction=0.25, seed=seed,
                                         **COMMON).build()
        m = ds.manifest
        train = set(m["proposal_id"][np.asarray(m["split"]) == "train"])
        val = set(m["proposal_id"][np.asarray(m["split"]) == "val"])
        assert not train & val and len(train | val) == 8
        assert len(val) == 2 and len(ds.split("val")) == 4
        return val

    assert splits(3, "a") == splits(3, "b")
    assert assign_splits(range(8), 3, 0.25) == assign_splits(reversed(range(8)), 3, 0.25)
    assert list(assign_splits([1, 2], 0, 0.1).values()).count("val") == 1
    # stable: adding proposals (new cycles) never moves a proposal between train and val
    few, many = assign_splits(range(100), 7, 0.1), assign_splits(range(5000), 7, 0.1)
    assert all(many[k] == v for k, v in few.items())
    assert 0.08 < list(many.values()).count("val") / 5000 < 0.12
    assert assign_splits(range(100), 8, 0.1) != few  # the seed matters


def test_corrupt_download_is_refetched_and_failures_counted(tmp_path, caom_hst, pictures,
                                                            fake_mast):
    names = populate_caom(fake_mast, caom_hst, pictures)
    truncated, garbage, dead = names["u27xcs01t_drz"], names["u2803e01t_drz"], names["u2803e02t_c0f"]
    fake_mast.truncate_once.add(truncated)
    fake_mast.garbage_once.add(garbage)
    fake_mast.always_fail.add(dead)
    builder = HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=ABSTRACTS,
                                          caption_source="abstract", max_retries=2, **COMMON)
    ds = builder.build()
    assert fake_mast.downloads.count(truncated) == 2
    assert fake_mast.downloads.count(garbage) == 2
    assert fake_mast.downloads.count(dead) == 3  # 1 + max_retries
    assert builder.report["failed"] == 1 and builder.report["downloaded"] == 7
    assert builder.report.failures[0]["item"] == dead and "503" in builder.report.failures[0]["reason"]
    assert len(ds) == 7 and dead not in set(ds.manifest["data_uri"])
    i = list(ds.manifest["data_uri"]).index(truncated)
    assert is_complete_png(ds.image_path(i), 64)
    # the one that failed is tried again on the next run and then succeeds
    fake_mast.always_fail.clear()
    before = len(fake_mast.downloads)
    again = HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=ABSTRACTS,
                                        caption_source="abstract", max_retries=2, **COMMON)
    assert len(again.build()) == 8
    assert fake_mast.downloads[before:] == [dead]
    assert again.report["skipped"] == 7


def test_resume_downloads_nothing_new(tmp_path, caom_hst, pictures, fake_mast):
    populate_caom(fake_mast, caom_hst, pictures)
    kw = dict(abstracts=ABSTRACTS, caption_source="abstract", **COMMON)
    first = HubblePreviewDatasetBuilder(caom_hst, tmp_path, **kw).build()
    n_downloads, n_queries = len(fake_mast.downloads), len(fake_mast.product_queries)
    builder = HubblePreviewDatasetBuilder(caom_hst, tmp_path, **kw)
    second = builder.build()
    assert len(fake_mast.downloads) == n_downloads  # nothing fetched again
    assert len(fake_mast.product_queries) == n_queries  # product lists cached
    assert builder.report["skipped"] == 8 and builder.report["downloaded"] == 0
    assert list(second.manifest["id"]) == list(first.manifest["id"])
    assert list(second.manifest["split"]) == list(first.manifest["split"])
    # a deleted and a damaged image are the only ones fetched again
    first.image_path(0).unlink()
    first.image_path(1).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    builder.build()
    assert len(fake_mast.downloads) == n_downloads + 2
    assert builder.report["downloaded"] == 2 and builder.report["skipped"] == 6


def test_interrupted_build_finishes_on_rerun(tmp_path, caom_hst, pictures, fake_mast):
    populate_caom(fake_mast, caom_hst, pictures)
    kw = dict(abstracts=ABSTRACTS, caption_source="abstract", **COMMON)
    fake_mast.interrupt_at = 4
    with pytest.raises(KeyboardInterrupt):
        HubblePreviewDatasetBuilder(caom_hst, tmp_path, **kw).build()
    done = sorted((tmp_path / "images").rglob("*.png"))
    assert len(done) == 3 and all(is_complete_png(p, 64) for p in done)
    assert not (tmp_path / "manifest.ecsv").exists()
    fake_mast.interrupt_at = None
    fake_mast.downloads.clear()
    builder = HubblePreviewDatasetBuilder(caom_hst, tmp_path, **kw)
    ds = builder.build()
    assert len(fake_mast.downloads) == 5 and builder.report["skipped"] == 3
    assert len(ds) == 8 and len(set(ds.manifest["id"])) == 8
    assert not list(tmp_path.rglob("*.part"))


class CountingSummarizer:
    """Test double of the summarizer interface: summarize(text) -> fields + caption."""

    def __init__(self):
        self.calls: list[str] = []

    def summarize(self, text):
        self.calls.append(text)
        if "luminosity function" in text:
            raise GenerationError("invalid JSON after 5 attempts")
        words = [w.strip(".,").lower() for w in text.split()]
        objects = ["faint field galaxies", words[-1]]
        uses = ["galaxy size evolution", "galaxy morphology"]
        return SimpleNamespace(objects_and_phenomena=objects, science_use_cases=uses,
                               caption=f"{', '.join(objects)}; {', '.join(uses)}")


def test_summary_captions_and_cache(tmp_path, caom_hst, pictures, fake_mast):
    populate_caom(fake_mast, caom_hst, pictures)
    summarizer = CountingSummarizer()
    builder = HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=ABSTRACTS,
                                          summarizer=summarizer, **COMMON)
    ds = builder.build()
    assert len(summarizer.calls) == 2  # one per proposal, not per image
    assert builder.report["summary_failed"] == 1
    # proposal 5092's summary failed: its images are neither downloaded nor listed
    assert set(ds.manifest["proposal_id"]) == {5371} and len(ds) == 4
    assert len(fake_mast.downloads) == 4
    assert set(ds.captions) == {"faint field galaxies, galaxies; galaxy size evolution, "
                                "galaxy morphology"}
    assert set(ds.manifest["objects"]) == {"faint field galaxies; galaxies"}
    assert set(ds.manifest["use_cases"]) == {"galaxy size evolution; galaxy morphology"}
    assert ds.manifest["abstract"][0].startswith("We obtain parallel images")
    again = CountingSummarizer()
    HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=ABSTRACTS, summarizer=again,
                                **COMMON).build()
    assert len(again.calls) == 1  # only the failed one is retried; the other is cached
    # another summarizer model (or prompt version) never reuses the cached captions
    other = CountingSummarizer()
    other.model_id = "another/model"
    HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=ABSTRACTS, summarizer=other,
                                **COMMON).build()
    assert len(other.calls) == 2
    newer = CountingSummarizer()
    newer.model_id, newer.prompt_version = "another/model", "summary-v2"
    HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=ABSTRACTS, summarizer=newer,
                                **COMMON).build()
    assert len(newer.calls) == 2
    assert (tmp_path / "summaries.jsonl").is_file()


def test_excluded_without_abstract(tmp_path, caom_hst, pictures, fake_mast):
    populate_caom(fake_mast, caom_hst, pictures)
    only_5371 = ABSTRACTS.split("-----")[0]
    builder = HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=only_5371,
                                          caption_source="abstract", **COMMON)
    ds = builder.build()
    assert builder.report["excluded"] == 2
    assert {e["reason"] for e in builder.report.exclusions} == {"proposal 5092 has no abstract"}
    assert set(ds.manifest["proposal_id"]) == {5371}
    assert set(fake_mast.product_queries[0]) == set(
        caom_hst["obsid"][caom_hst["proposal_id"] == "5371"])


def test_title_mode_uses_observation_titles(tmp_path, caom_hst, pictures, fake_mast):
    populate_caom(fake_mast, caom_hst, pictures)
    ds = HubblePreviewDatasetBuilder(caom_hst, tmp_path, caption_source="title",
                                     **COMMON).build()
    caps = dict(zip(ds.manifest["proposal_id"], ds.captions))
    assert caps[5371] == "HST MEDIUM-DEEP SURVEY: CYCLE4MEDIUM LOW GAL. LAT."
    assert caps[5092] == "GTO LOW LATITUDE PARALLEL PROGRAM - CYCLE 4"
    assert set(ds.manifest["cycle"]) == {-1}



def test_former_caption_mode_keyword_still_works(tmp_path, caom_hst):
    with pytest.warns(DeprecationWarning, match="caption_source"):
        builder = HubblePreviewDatasetBuilder(caom_hst, tmp_path, caption_mode="title", **COMMON)
    assert builder.caption_source == "title"
    with pytest.warns(DeprecationWarning):
        assert builder.caption_mode == "title"
    with pytest.warns(DeprecationWarning), pytest.raises(DatasetError, match="disagree"):
        HubblePreviewDatasetBuilder(caom_hst, tmp_path, caption_source="abstract", caption_mode="title",
                                    abstracts=ABSTRACTS)
    import astrovl.datasets.hubble as hubble

    with pytest.warns(DeprecationWarning):
        assert hubble.CAPTION_MODES == hubble.CAPTION_SOURCES == ("summary", "abstract", "title")

def test_no_previews_warns_and_gives_empty_dataset(tmp_path, caom_hst, fake_mast):
    for row in caom_hst:
        fake_mast.add(row, f"{str(row['obs_id']).lower()}_c0f.fits", b"x", product_type="SCIENCE")
    builder = HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=ABSTRACTS,
                                          caption_source="abstract", **COMMON)
    with pytest.warns(AstropyUserWarning, match="no PREVIEW images"):
        ds = builder.build()
    assert len(ds) == 0 and builder.report["records"] == 0
    assert len(ManifestDataset(tmp_path)) == 0


def test_from_proposals_and_cycles_query_mast(tmp_path, caom_hst, monkeypatch):
    calls = []

    def query_criteria(**criteria):
        calls.append(criteria)
        wanted = set(criteria["proposal_id"])
        return caom_hst[[str(p) in wanted for p in caom_hst["proposal_id"]]]

    monkeypatch.setattr(mast.Observations, "query_criteria", query_criteria)
    b = HubblePreviewDatasetBuilder.from_proposals([5371, "5092"], tmp_path, abstracts=ABSTRACTS,
                                                   caption_source="abstract", **COMMON)
    assert calls == [{"obs_collection": "HST", "proposal_id": ["5092", "5371"],
                      "dataRights": "PUBLIC"}]
    assert len(b.observations) == 4
    calls.clear()
    b = HubblePreviewDatasetBuilder.from_cycles(4, tmp_path, abstracts=ABSTRACTS,
                                                caption_source="abstract", **COMMON)
    assert calls[0]["proposal_id"] == ["5092", "5371"] and len(b.observations) == 4
    with pytest.raises(DatasetError, match=r"no proposal in cycle\(s\) \[31\].*cycles \[4\]"):
        HubblePreviewDatasetBuilder.from_cycles([31], tmp_path, abstracts=ABSTRACTS,
                                                caption_source="abstract")
    with pytest.raises(DatasetError, match="not an integer"):
        HubblePreviewDatasetBuilder.from_proposals(["abc"], tmp_path, caption_source="title")
    monkeypatch.setattr(mast.Observations, "query_criteria", lambda **kw: caom_hst[:0])
    with pytest.raises(DatasetError, match="no public HST observations"):
        HubblePreviewDatasetBuilder.from_proposals([1], tmp_path, caption_source="title",
                                                   retry_delay=0.0)


def test_dataset_feeds_torch_training(tmp_path, caom_hst, pictures, fake_mast):
    torch_datasets = pytest.importorskip("astrovl.datasets.torch_datasets")
    populate_caom(fake_mast, caom_hst, pictures)
    ds = HubblePreviewDatasetBuilder(caom_hst, tmp_path, abstracts=ABSTRACTS,
                                     caption_source="abstract", **COMMON).build()
    train = ds.split("train")
    tds = torch_datasets.ImageTextTorchDataset(train, 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    image, caption = tds[(0, 7)]
    assert tuple(image.shape) == (3, 32, 32)
    assert caption == train.captions[0] and caption.startswith("Category: ")


def test_product_file_names_cannot_escape_the_root(tmp_path, caom_hst, pictures, fake_mast):
    fake_mast.add(caom_hst[0], "../../escape_drz.jpg", pictures["m13.jpg"])
    ds = HubblePreviewDatasetBuilder(caom_hst, tmp_path / "ds", abstracts=ABSTRACTS,
                                     caption_source="abstract", **COMMON).build()
    assert list(ds.manifest["image"]) == ["images/5371/escape_drz.png"]
    assert (tmp_path / "ds" / "images" / "5371" / "escape_drz.png").is_file()
    assert not (tmp_path / "escape_drz.png").exists()
