"""Tests of the outreach (APOD / ESO / ESA-Hubble) dataset builder.

Images are real telescope data (M13, NGC 1316 FITS, the Hubble eXtreme Deep Field);
URL downloads are served by a stand-in for :func:`astropy.utils.data.download_file`.
"""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from astropy.utils import data as astropy_data
from PIL import Image

from astrovl import load_image
from astrovl.datasets import ManifestDataset, OutreachDatasetBuilder, read_manifest
from astrovl.datasets.hubble import split_draw
from astrovl.datasets.outreach import load_outreach_records, strip_html
from astrovl.exceptions import DatasetError

XDF_URL = "https://apod.nasa.gov/apod/image/2401/xdf_hd.jpg"
M13_URL = "https://cdn.eso.org/images/large/m13.png"
DEAD_URL = "https://apod.nasa.gov/apod/image/2401/gone.jpg"


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


class FakeWeb:
    """Stands in for astropy.utils.data.download_file: serves bytes, counts requests."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self.files: dict[str, bytes] = {}
        self.calls: list[str] = []
        self.cleared: list[str] = []
        self.truncate_once: set[str] = set()

    def download_file(self, remote_url, cache=False, show_progress=True, pkgname="astropy",
                      **kwargs):
        assert cache is True and pkgname == "astrovl"
        self.calls.append(remote_url)
        if remote_url not in self.files:
            raise urllib.error.URLError("HTTP Error 404: Not Found")
        data = self.files[remote_url]
        if remote_url in self.truncate_once:
            self.truncate_once.discard(remote_url)
            data = data[: len(data) // 3]
        path = self.cache_dir / hashlib.md5(remote_url.encode()).hexdigest()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def clear_download_cache(self, hashorurl=None, pkgname="astropy"):
        self.cleared.append(hashorurl)


@pytest.fixture
def web(tmp_path, monkeypatch, m13_path, xdf_array):
    fake = FakeWeb(tmp_path / "web_cache")
    fake.files[XDF_URL] = _encode(Image.fromarray(np.ascontiguousarray(xdf_array[::5, ::5])),
                                  "JPEG")
    fake.files[M13_URL] = _encode(load_image(m13_path).to_pil("RGB"), "PNG")
    monkeypatch.setattr(astropy_data, "download_file", fake.download_file)
    monkeypatch.setattr(astropy_data, "clear_download_cache", fake.clear_download_cache)
    return fake


@pytest.fixture
def record_files(tmp_path, m13_path, ngc1316_path):
    src = tmp_path / "records"
    (src / "img").mkdir(parents=True)
    load_image(m13_path).to_pil("L").save(src / "img" / "m13.jpg", format="JPEG")
    apod = [
        {"date": "2024-01-05", "title": "The <i>Extreme</i> Deep Field", "media_type": "image",
         "explanation": "<p>Galaxies &amp; more galaxies fill this deep field.</p>",
         "url": XDF_URL.replace("_hd", ""), "hdurl": XDF_URL, "copyright": "NASA, ESA"},
        {"date": "2024-01-06", "title": "A launch", "media_type": "video",
         "explanation": "A rocket video.", "url": "https://www.youtube.com/embed/x"},
        {"date": "2024-01-07", "title": "Lost", "media_type": "image",
         "explanation": "An image that is no longer online.", "url": DEAD_URL},
    ]
    (src / "apod.json").write_text(json.dumps(apod))
    eso = [
        {"id": "eso1907a", "title": "Messier 13", "description": "The globular cluster M13.",
         "image": "img/m13.jpg", "source": "eso", "url": "https://www.eso.org/public/images/x/"},
        {"id": "eso1907b", "title": "No text", "image": "img/m13.jpg", "source": "eso"},
        {"id": "eso1907c", "title": "Same picture", "description": "Duplicate of M13.",
         "image": "img/m13.jpg", "source": "eso"},
        {"id": "eso2001a", "title": "M13 again", "description": "M13 from the web.",
         "image": M13_URL, "source": "ESO"},
    ]
    (src / "eso.jsonl").write_text("\n".join(json.dumps(r) for r in eso) + "\n")
    (src / "img" / "ngc1316.fits").write_bytes(Path(ngc1316_path).read_bytes())
    esa = Table({"image": [str(src / "img" / "ngc1316.fits")], "caption": ["The radio galaxy NGC 1316."],
                 "title": ["Fornax A"], "source": ["esahubble"], "credit": ["ESA/Hubble"]})
    esa.write(src / "esahubble.csv", format="ascii.csv")
    return [src / "apod.json", src / "eso.jsonl", src / "esahubble.csv"]


COMMON = dict(image_size=48, retry_delay=0.0, progress=False)


def test_strip_html():
    assert strip_html("<p>A&nbsp;<b>bright</b><br>star&#39;s glow</p>") == "A bright star's glow"


def test_build_outreach_dataset(tmp_path, record_files, web):
    builder = OutreachDatasetBuilder(record_files, tmp_path / "ds", val_fraction=0.25,
                                     image_root=record_files[0].parent, **COMMON)
    ds = builder.build()
    r = builder.report
    assert r["records"] == 8
    assert r["excluded"] == 2  # the video and the record without text
    assert r["duplicates"] == 1
    assert r["failed"] == 1 and DEAD_URL in r.failures[0]["item"]
    assert r["downloaded"] == 2 and r["converted"] == 2 and r["written"] == 4  # 2 URLs, 2 local files
    assert web.calls.count(DEAD_URL) == 4  # 1 + max_retries
    assert isinstance(ds, ManifestDataset) and len(ds) == 4
    m = read_manifest(tmp_path / "ds")
    by_title = {t: i for i, t in enumerate(m["title"])}
    assert set(by_title) == {"The Extreme Deep Field", "Messier 13", "M13 again", "Fornax A"}
    xdf = m[by_title["The Extreme Deep Field"]]
    assert xdf["caption"] == "Galaxies & more galaxies fill this deep field."
    assert xdf["source"] == "apod" and xdf["credit"] == "NASA, ESA"
    assert xdf["original"] == XDF_URL  # hdurl preferred
    assert m[by_title["M13 again"]]["source"] == "eso"
    assert m[by_title["Messier 13"]]["url"] == "https://www.eso.org/public/images/x/"
    assert set(m["source"]) == {"apod", "eso", "esahubble"}
    # local files are recorded relative to the image root: no absolute local path in the manifest
    assert m[by_title["Messier 13"]]["original"] == "img/m13.jpg"
    assert m[by_title["Fornax A"]]["original"] == "img/ngc1316.fits"
    # a record's split is the hash rule of its id and the seed (stable when records are added)
    from astrovl.datasets.hubble import assign_splits

    planned = assign_splits([p["id"] for p in builder._plan()], 0, 0.25)
    assert [str(s) for s in m["split"]] == [planned[str(i)] for i in m["id"]]
    root = (tmp_path / "ds").resolve()
    for i in range(len(ds)):
        path = ds.image_path(i)
        assert root in path.parents and path.parent.name == ds.manifest["source"][i]
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (48, 48)
    fornax = np.asarray(Image.open(ds.image_path(by_title["Fornax A"])))
    assert fornax.ndim == 2  # FITS read with load_image, kept grey
    assert (fornax[:7] == 255).all() and (fornax[-7:] == 255).all()  # 440x300 -> 48x33
    assert (fornax[8:40] != 255).mean() > 0.5
    assert ds.load_image(0).shape[:2] == (48, 48)


def test_corrupt_url_is_refetched(tmp_path, record_files, web):
    web.truncate_once.add(XDF_URL)
    builder = OutreachDatasetBuilder(record_files, tmp_path / "ds", image_root=record_files[0].parent,
                                     **COMMON)
    ds = builder.build()
    assert web.calls.count(XDF_URL) == 2 and XDF_URL in web.cleared
    assert "The Extreme Deep Field" in set(ds.manifest["title"])
    assert builder.report["failed"] == 1  # only the dead URL


def test_resume_skips_finished_images(tmp_path, record_files, web):
    root = record_files[0].parent
    first = OutreachDatasetBuilder(record_files, tmp_path / "ds", image_root=root, **COMMON).build()
    good_calls = [c for c in web.calls if c != DEAD_URL]
    web.calls.clear()
    builder = OutreachDatasetBuilder(record_files, tmp_path / "ds", image_root=root, **COMMON)
    second = builder.build()
    assert [c for c in web.calls if c != DEAD_URL] == []  # nothing fetched again
    assert len(good_calls) == 2
    assert builder.report["skipped"] == 4 and builder.report["downloaded"] == builder.report["converted"] == 0
    assert list(second.manifest["id"]) == list(first.manifest["id"])
    assert list(second.manifest["split"]) == list(first.manifest["split"])


def test_split_is_deterministic_by_record(tmp_path, m13_path):
    img = tmp_path / "m13.png"
    load_image(m13_path).to_pil("L").save(img)
    recs = []  # twenty distinct local copies
    for k in range(20):
        p = tmp_path / f"m13_{k}.png"
        p.write_bytes(img.read_bytes())
        recs.append({"image": str(p), "caption": f"Cluster view {k}.", "id": f"r{k}",
                     "source": "apod"})
    # the ids hold a digest of each file's path relative to the image root (the same on every
    # machine); val_fraction=0.5 keeps the small-set fallback of assign_splits out of the way
    COMMON_ROOT = {**COMMON, "image_root": tmp_path}
    a = OutreachDatasetBuilder(recs[:10], tmp_path / "a", seed=5, val_fraction=0.5, **COMMON_ROOT).build()
    b = OutreachDatasetBuilder(list(reversed(recs[:10])), tmp_path / "b", seed=5, val_fraction=0.5,
                               **COMMON_ROOT).build()
    val_a = set(a.split("val").manifest["id"])
    assert 1 <= len(val_a) < 10 and val_a == set(b.split("val").manifest["id"])
    assert len(a.split("train")) == 10 - len(val_a)
    # more records later: every record keeps the side its own hash gives it
    c = OutreachDatasetBuilder(recs, tmp_path / "c", seed=5, val_fraction=0.5, **COMMON_ROOT).build()
    split_c = dict(zip(c.manifest["id"], c.manifest["split"]))

    def by_hash(i):
        return "val" if split_draw(i, 5) < 0.5 else "train"

    assert all(split_c[i] == by_hash(i) for i in split_c)
    split_a = dict(zip(a.manifest["id"], a.manifest["split"]))
    if all(s == by_hash(i) for i, s in split_a.items()):  # no small-set fallback in a
        assert all(split_c[i] == s for i, s in split_a.items())


def test_missing_local_image_counts_as_failed(tmp_path, m13_path):
    (tmp_path / "m13.fits").write_bytes(Path(m13_path).read_bytes())
    recs = Table({"image": ["nope.jpg", "m13.fits"],
                  "caption": ["Missing.", "M13 FITS."], "title": ["a", "b"]})
    builder = OutreachDatasetBuilder(recs, tmp_path / "ds", image_root=tmp_path, **COMMON)
    ds = builder.build()
    assert builder.report["failed"] == 1 and "does not exist" in builder.report.failures[0]["reason"]
    assert len(ds) == 1 and ds.manifest["source"][0] == "outreach"


def test_bad_record_inputs(tmp_path):
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(DatasetError, match="unknown type"):
        load_outreach_records(tmp_path / "r.txt")
    with pytest.raises(DatasetError, match="does not exist"):
        load_outreach_records([tmp_path / "missing.json"])
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg"}\n{not json\n')
    with pytest.raises(DatasetError, match="line 2"):
        load_outreach_records(tmp_path / "bad.jsonl")
    (tmp_path / "scalar.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="list of JSON objects"):
        load_outreach_records(tmp_path / "scalar.json")
    with pytest.raises(TypeError, match="file paths, dicts or astropy Tables"):
        load_outreach_records([42])
    with pytest.raises(DatasetError, match="val_fraction"):
        OutreachDatasetBuilder([], tmp_path, val_fraction=1.5)


def test_relative_paths_follow_the_records_file(tmp_path, record_files):
    recs = load_outreach_records(record_files[1])
    assert recs[0]["_base"] == str(record_files[1].resolve().parent)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"records": [{"image": "records/img/m13.jpg",
                                                "caption": "M13."}]}))
    ds = OutreachDatasetBuilder(wrapped, tmp_path / "ds", image_root=tmp_path, **COMMON).build()
    assert len(ds) == 1
    assert ds.manifest["original"][0] == "records/img/m13.jpg"
