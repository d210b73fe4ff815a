"""Input that comes from others is not trusted.

Record files may name only ``http(s)`` URLs or files under a root the caller
passes explicitly; shared manifests hold no absolute local paths; files named by
an index's metadata are opened only under the index's image root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from astrovl.cli import main
from astrovl.datasets import OutreachDatasetBuilder
from astrovl.datasets.records import write_manifest
from astrovl.exceptions import DatasetError, ManifestError, UntrustedSourceError
from astrovl.utils.files import resolve_source

COMMON = dict(image_size=32, retry_delay=0.0, progress=False)


@pytest.fixture
def pictures(tmp_path, m13_path):
    """An image root with one picture, and a secret file next to it (outside the root)."""
    from astrovl import load_image

    root = tmp_path / "pictures"
    root.mkdir()
    load_image(m13_path).to_pil("L").save(root / "m13.png")
    secret = tmp_path / "secret.png"
    secret.write_bytes((root / "m13.png").read_bytes())
    return root, secret


# ---------------------------------------------------------------------------- resolve_source
@pytest.mark.parametrize("url", ["https://apod.nasa.gov/apod/image/x.jpg", "http://example.org/a.png",
                                 "HTTPS://EXAMPLE.ORG/B.PNG"])
def test_http_urls_are_allowed(url):
    assert resolve_source(url, None) == url


@pytest.mark.parametrize("source", ["file:///etc/passwd", "FILE:///etc/hosts", "ftp://example.org/a.fits",
                                    "data:image/png;base64,AAAA", "s3://bucket/key.fits",
                                    "javascript:alert(1)", "mast:HST/product/x.jpg"])
def test_other_schemes_are_refused(source, tmp_path):
    with pytest.raises(UntrustedSourceError, match="scheme") as err:
        resolve_source(source, tmp_path, what="record 7 (apod.json)")
    assert "record 7 (apod.json)" in str(err.value) and source in str(err.value)
    assert isinstance(err.value, DatasetError)


def test_local_files_need_an_explicit_root(pictures):
    root, _ = pictures
    with pytest.raises(UntrustedSourceError, match="no local image root"):
        resolve_source(str(root / "m13.png"), None)
    assert resolve_source("m13.png", root) == (root / "m13.png").resolve()
    assert resolve_source(str(root / "m13.png"), root) == (root / "m13.png").resolve()
    assert resolve_source("sub/../m13.png", root) == (root / "m13.png").resolve()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "base"])
def test_paths_outside_the_root_are_refused(pictures, how):
    root, secret = pictures
    base = None
    if how == "absolute":
        source = str(secret)
    elif how == "dotdot":
        source = "../secret.png"
    elif how == "symlink":
        os.symlink(secret, root / "innocent.png")
        source = "innocent.png"
    else:  # relative to a records file that lies outside the root
        source, base = "secret.png", secret.parent
    with pytest.raises(UntrustedSourceError, match="outside the local image root"):
        resolve_source(source, root, base=base)


# ---------------------------------------------------------------------------- outreach builder
def _records(tmp_path: Path, records: list[dict], name: str = "records.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize("image", ["file:///etc/passwd", "ftp://example.org/m13.png", "../secret.png"])
def test_outreach_builder_refuses_untrusted_records(tmp_path, pictures, image):
    root, secret = pictures
    recs = _records(root, [{"image": "m13.png", "caption": "M13."}, {"image": image, "caption": "Bad."}])
    builder = OutreachDatasetBuilder(recs, tmp_path / "ds", image_root=root, **COMMON)
    with pytest.raises(UntrustedSourceError) as err:
        builder.build()
    assert "record 1" in str(err.value) and image in str(err.value)
    assert not (tmp_path / "ds").exists()  # refused before anything was written


def test_outreach_builder_without_root_takes_only_urls(tmp_path, pictures):
    root, _ = pictures
    recs = _records(tmp_path, [{"image": str(root / "m13.png"), "caption": "M13."}])
    with pytest.raises(UntrustedSourceError, match="no local image root"):
        OutreachDatasetBuilder(recs, tmp_path / "ds", **COMMON).build()
    assert not (tmp_path / "ds").exists()


def test_outreach_records_relative_to_their_file_must_stay_in_the_root(tmp_path, pictures):
    root, secret = pictures
    # a records file beside the secret: its relative path resolves outside the root
    recs = _records(tmp_path, [{"image": "secret.png", "caption": "Secret."}])
    with pytest.raises(UntrustedSourceError, match="outside"):
        OutreachDatasetBuilder(recs, tmp_path / "ds", image_root=root, **COMMON).build()


def test_outreach_manifest_holds_no_absolute_local_path(tmp_path, pictures):
    root, _ = pictures
    recs = _records(root, [{"image": "m13.png", "caption": "The globular cluster M13.", "title": "M13"}])
    ds = OutreachDatasetBuilder(recs, tmp_path / "ds", image_root=root, **COMMON).build()
    assert list(ds.manifest["original"]) == ["m13.png"]
    text = (tmp_path / "ds" / "manifest.ecsv").read_text() + (tmp_path / "ds" / "build_report.json").read_text()
    assert str(tmp_path) not in text
    # the same records give the same ids on any machine (the key is the path within the root)
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    again = OutreachDatasetBuilder(moved / "records.jsonl", tmp_path / "ds2", image_root=moved, **COMMON).build()
    assert list(again.manifest["id"]) == list(ds.manifest["id"])


def test_cli_build_outreach_refuses_file_urls(tmp_path, pictures, capsys):
    root, _ = pictures
    recs = _records(tmp_path, [{"image": "file:///etc/passwd", "caption": "x"}])
    assert main(["build-outreach", str(tmp_path / "ds"), str(recs), "--image-root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "file:///etc/passwd" in err and "not allowed" in err
    assert not (tmp_path / "ds").exists()
    recs = _records(root, [{"image": "m13.png", "caption": "M13."}], name="ok.jsonl")
    assert main(["build-outreach", str(tmp_path / "ds"), str(recs), "--image-root", str(root),
                 "--image-size", "32"]) == 0
    assert (tmp_path / "ds" / "manifest.ecsv").is_file()


# ---------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("value", ["/home/someone/data/m13.fits", "~/data/m13.fits", "C:\\data\\m13.fits",
                                   "file:///data/m13.fits"])
def test_write_manifest_refuses_absolute_local_paths(tmp_path, value):
    table = Table({"id": ["a"], "split": ["train"], "image": ["images/a.png"], "caption": ["A / B."],
                   "original": [value]})
    with pytest.raises(ManifestError, match="'original' row 0") as err:
        write_manifest(table, tmp_path)
    assert repr(value) in str(err.value)
    assert not (tmp_path / "manifest.ecsv").exists()


def test_write_manifest_keeps_urls_and_free_text(tmp_path):
    table = Table({"id": ["a"], "split": ["train"], "image": ["images/a.png"],
                   "caption": ["/ a caption may start with anything"], "original": ["https://x.org/a.png"],
                   "data_uri": ["mast:HST/product/a.jpg"]})
    assert write_manifest(table, tmp_path).is_file()


# ---------------------------------------------------------------------------- napari: index metadata
class FakeIndex:
    """An index whose search returns fixed rows (files inside and outside its image root)."""

    def __init__(self, rows: list[str], image_root):
        self.rows = rows
        self.image_root = str(image_root)

    def search(self, query, k=10):
        n = min(k, len(self.rows))
        return Table({"rank": np.arange(1, n + 1), "score": np.linspace(0.9, 0.5, n),
                      "row": np.arange(n), "path": self.rows[:n]})


def test_search_job_opens_no_file_outside_the_image_root(pictures, monkeypatch):
    pytest.importorskip("magicgui")
    from astrovl_napari import _jobs
    from astrovl_napari._jobs import run_job, search_job

    root, secret = pictures
    opened = []
    monkeypatch.setattr(_jobs, "make_thumbnail",
                        lambda path, size: opened.append(Path(path)) or np.zeros((4, 4, 3), np.uint8))
    index = FakeIndex([str(root / "m13.png"), str(secret)], root)
    hits = run_job(search_job(index, "a cluster", k=2, thumbnail_size=16))
    assert [h.in_root for h in hits] == [True, False]
    assert opened == [(root / "m13.png").resolve()]  # the secret file was not read
    assert hits[0].thumbnail is not None and hits[1].thumbnail is None


def test_hits_without_a_recorded_root_are_all_outside(pictures):
    pytest.importorskip("magicgui")
    from astrovl_napari._results import hits_from_table

    root, secret = pictures
    table = FakeIndex([str(root / "m13.png")], root).search("x")
    assert [h.in_root for h in hits_from_table(table, None, None)] == [False]
    assert [h.in_root for h in hits_from_table(table, None, root)] == [True]
