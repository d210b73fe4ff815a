"""The metadata table of an index folder: ECSV, or FITS for large tables that read back exactly."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from astropy.table import MaskedColumn, Table

from astrovl.clip import EmbeddingIndex
from astrovl.clip import index_metadata as im


def _table(n: int) -> Table:
    rng = np.random.default_rng(0)
    t = Table({"file": [f"part-{i // 7:05d}.npy" for i in range(n)], "file_row": np.arange(n),
               "ok": np.arange(n) % 2 == 0})
    t["flux"] = rng.random(n).astype(np.float32) * u.Jy
    t["flux"].description = "flux in the F606W band"
    t["visits"] = MaskedColumn(np.arange(n) % 5, mask=np.arange(n) % 3 == 0)
    return t


def _assert_same(a: Table, b: Table) -> None:
    assert a.colnames == b.colnames
    for name in a.colnames:
        assert a[name].dtype.kind == b[name].dtype.kind, name
        assert a[name].unit == b[name].unit and a[name].description == b[name].description
        assert np.array_equal(np.ma.getmaskarray(a[name]), np.ma.getmaskarray(b[name])), name
        assert list(np.ma.filled(a[name], 0) if a[name].dtype.kind != "U" else a[name]) == \
            list(np.ma.filled(b[name], 0) if b[name].dtype.kind != "U" else b[name]), name


def test_large_tables_go_to_fits_and_read_back_exactly(tmp_path):
    t = _table(300)
    written = im.write_metadata(t, tmp_path, fits_rows=100)
    assert written.name == im.METADATA_FITS and not (tmp_path / im.METADATA).exists()
    back = im.read_metadata(tmp_path)
    _assert_same(t, back)
    assert back["file"].dtype.kind == "U" and back["file"][10] == "part-00001.npy"
    assert back.meta == {}


def test_small_tables_stay_readable_ecsv(tmp_path):
    t = _table(50)
    assert im.write_metadata(t, tmp_path, fits_rows=100).name == im.METADATA
    _assert_same(t, im.read_metadata(tmp_path))


@pytest.mark.parametrize("change", ["unicode", "meta", "masked_text", "object"])
def test_what_fits_cannot_hold_exactly_stays_ecsv(change, tmp_path):
    t = _table(200)
    if change == "unicode":
        t["file"] = [*t["file"][:3], "NGC 4038 – the Antennæ", *t["file"][4:]]
    elif change == "meta":
        t.meta["survey"] = "DECaLS"
    elif change == "masked_text":
        t["file"] = MaskedColumn(list(t["file"]), mask=np.arange(200) % 4 == 0)
    else:
        t["extra"] = np.array([{"a": i} for i in range(200)], dtype=object)
    assert im.write_metadata(t, tmp_path, fits_rows=100).name == im.METADATA
    assert not (tmp_path / im.METADATA_FITS).exists()
    back = im.read_metadata(tmp_path)
    if change == "object":
        assert back["extra"][5] == {"a": 5}
        del t["extra"], back["extra"]
    _assert_same(t, back)
    assert back.meta == t.meta


def test_index_saves_and_loads_large_metadata_as_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(im, "FITS_METADATA_ROWS", 100)
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    index = EmbeddingIndex(16)
    index.add(vectors, _table(300))
    index.save(tmp_path / "idx")
    assert (tmp_path / "idx" / im.METADATA_FITS).is_file()
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    _assert_same(index.metadata, loaded.metadata)
    hits = loaded.search(vectors[42], k=3)
    assert hits["row"][0] == 42 and hits["file"][0] == "part-00006.npy"
    # saving again (say after an add) replaces the FITS table with the grown one
    loaded.add(vectors[:5], _table(5))
    loaded.save(tmp_path / "idx")
    again = EmbeddingIndex.load(tmp_path / "idx")
    assert len(again.metadata) == 305 and again.metadata["file_row"][-1] == 4
