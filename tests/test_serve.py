"""The web service of ``astrovl serve``: every endpoint and every bad input, against the real app."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("multipart")

from starlette.testclient import TestClient  # noqa: E402

from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex  # noqa: E402
from astrovl.exceptions import QueryError  # noqa: E402
from astrovl.serve import create_app  # noqa: E402
from astrovl.serve.images import IndexImages  # noqa: E402

EVIL = '<img src=x onerror="document.title=\'pwned\'">'
M31 = (10.6847, 41.2690)


def _wcs_fits(path, ra, dec, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    data = rng.normal(10, 1, (64, 64)) + 400 * np.exp(-((xx - 30) ** 2 + (yy - 34) ** 2) / 40)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [32.5, 32.5]
    w.wcs.cdelt = [-0.001, 0.001]
    header = w.to_header()
    header["OBJECT"] = "generated"
    header["TELESCOP"] = EVIL
    fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(path)


def _picture(path, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
    arr[10:30, 5:20] = [250, 200, 40]
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, m13_path, ngc1316_path, dss_path, m13_rice_path):
    """A small index over real and generated images, with rows that must not be served."""
    base = tmp_path_factory.mktemp("serve")
    images = base / "images"
    images.mkdir()
    outside = base / "outside"
    outside.mkdir()
    files = {
        "M13": shutil.copy(m13_path, images / "m13.fits"),
        "NGC 1316": shutil.copy(ngc1316_path, images / "ngc1316.fits"),
        "DSS plate": shutil.copy(dss_path, images / "dss.fits.gz"),
        "M13 rice": shutil.copy(m13_rice_path, images / "m13_rice.fits"),
    }
    _wcs_fits(images / "m31_generated.fits", *M31, seed=1)
    files["M31 generated"] = images / "m31_generated.fits"
    _picture(images / "picture.png", seed=2)
    files["a picture"] = images / "picture.png"
    embedder = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
    names = list(files)
    paths = [str(files[n]) for n in names]
    meta = Table({"path": paths, "name": names,
                  "instrument": ["WFC3", "ACS", "DSS", "WFC3", "ACS", "camera"],
                  "proposal_id": [101, 102, 103, 101, 102, 104]})
    index = EmbeddingIndex.build(embedder, paths, metadata=meta, progress=False)
    # rows that name files the service must refuse or cannot read
    _wcs_fits(outside / "secret.fits", 1.0, 2.0, seed=3)
    (images / "link.fits").symlink_to(outside / "secret.fits")
    (images / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50 + b"garbage")
    rng = np.random.default_rng(0)
    extra = [("outside", str(outside / "secret.fits")), ("symlink", str(images / "link.fits")),
             ("missing", str(images / "missing.fits")), ("broken", str(images / "broken.fits")),
             (EVIL, "picture.png"), ("no file", "<ndarray (4, 4)>")]
    index.add(rng.normal(size=(len(extra), index.dim)).astype(np.float32),
              Table({"path": [p for _, p in extra], "name": [n for n, _ in extra],
                     "instrument": ["ACS"] * len(extra), "proposal_id": [105] * len(extra)}))
    index_dir = base / "index"
    index.save(index_dir)
    rows = {n: i for i, n in enumerate(names + [n for n, _ in extra])}
    return {"base": base, "images": images, "index": index, "index_dir": index_dir, "embedder": embedder,
            "rows": rows, "paths": files}


@pytest.fixture(scope="module")
def app(archive, tmp_path_factory):
    return create_app(archive["index"], archive["embedder"], index_dir=archive["index_dir"],
                      image_root=archive["images"], thumbnail_cache=tmp_path_factory.mktemp("thumbs"),
                      max_k=50)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _error(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == status and body["error"]
    assert "Traceback" not in body["error"]
    return body["error"]


# ---------------------------------------------------------------------- health, info, page
def test_health_and_info(client, archive):
    assert client.get("/api/health").json() == {"status": "ok", "count": len(archive["index"])}
    info = client.get("/api/info").json()
    assert info["count"] == len(archive["index"]) == 12
    assert info["dim"] == archive["embedder"].embed_dim == 64
    assert info["kind"] == "exact"
    assert info["model"]["id"] == archive["embedder"].model_id
    assert info["model"]["random"] is True  # an untrained model built from a config: the page says so
    assert info["columns"] == ["path", "name", "instrument", "proposal_id"]
    assert info["filters"]["instrument"] == ["ACS", "DSS", "WFC3", "camera"]
    assert info["filters"]["proposal_id"] == ["101", "102", "103", "104", "105"]
    assert "path" not in info["filters"] and "name" not in info["filters"]
    assert info["max_k"] == 50 and info["max_upload_bytes"] == 50 * 2**20
    assert info["label_column"] == "name"


def test_page_and_static_files_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    for asset in ("static/app.js", "static/style.css"):
        assert asset in text
        assert client.get("/" + asset).status_code == 200
    # no external assets, no inline script, and a policy that forbids both
    assert "http://" not in text and "https://" not in text and "<script>" not in text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    app_js = client.get("/static/app.js").text
    assert "innerHTML" not in app_js and "insertAdjacentHTML" not in app_js  # text only via textContent
    _error(client.get("/static/../../etc/passwd"), 404)
    _error(client.get("/static/secret.py"), 404)


# ---------------------------------------------------------------------- text search
def test_text_search_matches_the_library(client, archive):
    r = client.get("/api/search", params={"q": "a globular star cluster", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == {"kind": "text", "text": "a globular star cluster"}
    assert body["count"] == len(body["results"]) == 5
    expected = archive["index"].search("a globular star cluster", k=5)
    assert [x["id"] for x in body["results"]] == list(expected["row"])
    np.testing.assert_allclose([x["score"] for x in body["results"]], expected["score"], atol=1e-4)
    assert [x["rank"] for x in body["results"]] == [1, 2, 3, 4, 5]
    for x in body["results"]:
        assert x["label"] == archive["index"].metadata["name"][x["id"]]
        assert x["metadata"]["name"] == x["label"]
        assert x["thumbnail"] == (f"/thumb/{x['id']}.png" if x["has_image"] else None)
    assert body["took_ms"] >= 0


def test_results_carry_sky_positions_from_the_wcs(client, archive):
    body = client.get("/api/search", params={"q": "anything", "k": 50}).json()
    by_id = {x["id"]: x for x in body["results"]}
    rows = archive["rows"]
    m31 = by_id[rows["M31 generated"]]
    assert m31["ra"] == pytest.approx(M31[0], abs=1e-3) and m31["dec"] == pytest.approx(M31[1], abs=1e-3)
    m13 = by_id[rows["M13"]]
    assert m13["ra"] == pytest.approx(250.42, abs=0.05) and m13["dec"] == pytest.approx(36.46, abs=0.05)
    assert by_id[rows["a picture"]]["ra"] is None
    assert by_id[rows["no file"]]["has_image"] is False and by_id[rows["no file"]]["thumbnail"] is None
    assert by_id[rows["outside"]]["has_image"] is False


def test_repeated_text_queries_use_cached_embeddings(app, client, monkeypatch):
    service = app.state.service
    calls = []
    original = service.embedder.embed_text
    monkeypatch.setattr(service.embedder, "embed_text", lambda texts, **kw: calls.append(texts) or original(texts, **kw))
    first = client.get("/api/search", params={"q": "an edge-on disk   galaxy"}).json()
    again = client.get("/api/search", params={"q": " an edge-on disk galaxy "}).json()
    assert calls == [["an edge-on disk galaxy"]]
    assert [x["id"] for x in first["results"]] == [x["id"] for x in again["results"]]


def test_filters_restrict_the_results(client, archive):
    meta = archive["index"].metadata
    body = client.get("/api/search", params={"q": "galaxy", "filter": "instrument:ACS"}).json()
    assert body["filters"] == {"instrument": ["ACS"]}
    ids = [x["id"] for x in body["results"]]
    assert ids and all(meta["instrument"][i] == "ACS" for i in ids)
    assert len(ids) == int(np.sum(meta["instrument"] == "ACS"))
    both = client.get("/api/search", params=[("q", "galaxy"), ("filter", "instrument:WFC3"),
                                             ("filter", "instrument:DSS"), ("filter", "proposal_id:101")]).json()
    assert sorted(x["id"] for x in both["results"]) == [archive["rows"]["M13"], archive["rows"]["M13 rice"]]
    none = client.get("/api/search", params={"q": "galaxy", "filter": "instrument:JWST"}).json()
    assert none["count"] == 0 and none["results"] == []


@pytest.mark.parametrize("params, status, words", [
    ({"q": ""}, 400, "empty"),
    ({"q": "   "}, 400, "empty"),
    ({}, 400, "needs q="),
    ({"q": "x" * 1001}, 400, "at most 1000"),
    ({"q": "galaxy", "k": "0"}, 400, "out of range"),
    ({"q": "galaxy", "k": "-3"}, 400, "out of range"),
    ({"q": "galaxy", "k": "51"}, 400, "1 to 50"),
    ({"q": "galaxy", "k": "ten"}, 400, "not a whole number"),
    ({"q": "galaxy", "k": "1e3"}, 400, "not a whole number"),
    ({"q": "galaxy", "filter": "telescope:HST"}, 400, "unknown filter column 'telescope'"),
    ({"q": "galaxy", "filter": "instrument"}, 400, "column:value"),
    ({"q": "galaxy", "filter": ":ACS"}, 400, "column:value"),
    ({"q": "galaxy", "sort": "date"}, 400, "unknown query parameter"),
])
def test_malformed_text_queries_get_4xx_json(client, params, status, words):
    assert words in _error(client.get("/api/search", params=params), status)


# ---------------------------------------------------------------------- image search and more like this
def test_upload_search_finds_the_same_image(client, archive):
    rows = archive["rows"]
    for name, upload in [("M13", "m13.fits"), ("NGC 1316", "ngc1316.fits"), ("DSS plate", "dss.fits.gz"),
                         ("a picture", "picture.png")]:
        data = archive["paths"][name].read_bytes()
        r = client.post("/api/search", params={"k": 3}, files={"file": (upload, data)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query"] == {"kind": "image", "name": upload}
        twins = {rows[name], rows["M13 rice"]} if name == "M13" else {rows[name]}  # same pixels
        assert body["results"][0]["id"] in twins
        assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)


def test_upload_with_a_path_as_file_name_is_only_a_name(client, archive):
    data = archive["paths"]["M13"].read_bytes()
    r = client.post("/api/search", files={"file": ("../../../etc/passwd.fits", data)})
    assert r.status_code == 200
    assert r.json()["query"]["name"] == "passwd.fits"


def test_upload_filters_and_k(client, archive):
    data = archive["paths"]["M13"].read_bytes()
    r = client.post("/api/search", params={"k": 2, "filter": "instrument:ACS"}, files={"file": ("m.fits", data)})
    body = r.json()
    assert body["count"] == 2
    assert all(archive["index"].metadata["instrument"][x["id"]] == "ACS" for x in body["results"])


def test_more_like_this_leaves_the_item_out(client, archive):
    row = archive["rows"]["M13"]
    body = client.post("/api/search", params={"k": 4}, json={"id": row}).json()
    assert body["query"] == {"kind": "like", "id": row, "label": "M13"}
    ids = [x["id"] for x in body["results"]]
    assert row not in ids and len(ids) == 4
    expected = [r for r in archive["index"].search(archive["index"].vectors[row], k=5)["row"] if r != row][:4]
    assert ids == expected
    assert body["results"][0]["id"] == archive["rows"]["M13 rice"]  # the same image, compressed
    scores = [x["score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True)
    form = client.post("/api/search", params={"k": 4}, data={"id": str(row)}).json()
    assert [x["id"] for x in form["results"]] == ids
    by_text = client.post("/api/search", json={"q": "nebula", "k": 3}).json()
    assert by_text["query"]["kind"] == "text" and by_text["count"] == 3


def _fits_bytes(header_cards):
    header = fits.Header(header_cards)
    return header.tostring().encode() + b"\0" * 2880


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "table", "huge", "gzip-garbage",
                                  "gzip-bomb", "text"])
def test_bad_uploads_get_4xx(client, archive, kind):
    good = archive["paths"]["M13"].read_bytes()
    table = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table({"a": [1, 2]}))]).writeto(table)
    uploads = {
        "garbage": ("x.fits", b"SIMPLE  = nonsense" * 10, 400, "could not be read"),
        "empty": ("x.png", b"", 400, "empty"),
        "truncated": ("x.fits", good[: len(good) // 2], 400, "could not be read"),
        "table": ("x.fits", table.getvalue(), 400, "could not be read"),
        "huge": ("x.fits", _fits_bytes([("SIMPLE", True), ("BITPIX", -64), ("NAXIS", 2),
                                         ("NAXIS1", 100_000), ("NAXIS2", 100_000)]), 413, "declares"),
        "gzip-garbage": ("x.fits.gz", b"\x1f\x8b" + b"nonsense" * 20, 400, "gzip"),
        "gzip-bomb": ("x.fits.gz", gzip.compress(b"\0" * (9 * 2**20)), 413, "decompresses"),
        "text": ("notes.txt", b"hello, this is not an image", 400, "could not be read"),
    }
    name, data, status, words = uploads[kind]
    if kind == "gzip-bomb":
        small = _small_app(archive, max_upload_bytes=2**20)
        r = small.post("/api/search", files={"file": (name, data)})
    else:
        r = client.post("/api/search", files={"file": (name, data)})
    message = _error(r, status)
    assert words in message
    assert "/tmp" not in message and "astrovl-upload" not in message  # no server paths leak
    assert client.get("/api/health").status_code == 200  # still serving


def _small_app(archive, **kw):
    app = create_app(archive["index"], archive["embedder"], index_dir=archive["index_dir"],
                     image_root=archive["images"], **kw)
    return TestClient(app, raise_server_exceptions=False)


def test_upload_size_limit(archive):
    client = _small_app(archive, max_upload_bytes=100_000)
    big = archive["paths"]["NGC 1316"].read_bytes() + b"\0" * 200_000
    assert "limit" in _error(client.post("/api/search", files={"file": ("big.fits", big)}), 413)

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b"\0" * 10_000

    r = client.post("/api/search", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert "limit" in _error(r, 413)
    small = archive["paths"]["M31 generated"].read_bytes()
    assert client.post("/api/search", files={"file": ("m31.fits", small)}).status_code == 200


@pytest.mark.parametrize("request_kw, status, words", [
    ({"json": {"id": 999}}, 404, "no item 999"),
    ({"json": {"id": -1}}, 404, "no item -1"),
    ({"json": {"id": "seven"}}, 404, "not a whole number"),
    ({"json": {"id": True}}, 400, "not a whole number"),
    ({"json": {"id": 1, "path": "/etc/passwd"}}, 400, "JSON object"),
    ({"json": [1, 2]}, 400, "JSON object"),
    ({"json": {}}, 400, "names no query"),
    ({"json": {"q": ""}}, 400, "empty"),
    ({"json": {"id": 1, "k": 0}}, 400, "out of range"),
    ({"json": {"id": 1, "filter": 5}}, 400, "filter must be"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "multipart/form-data"),
    ({"data": {"other": "1"}}, 400, "neither a 'file'"),
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400, ""),
])
def test_malformed_posts_get_4xx(client, request_kw, status, words):
    assert words in _error(client.post("/api/search", **request_kw), status)


# ---------------------------------------------------------------------- items and thumbnails
def test_item_detail_with_header_and_sky_position(client, archive):
    row = archive["rows"]["M31 generated"]
    item = client.get(f"/api/item/{row}").json()
    assert item["id"] == row and item["label"] == "M31 generated"
    assert item["metadata"]["instrument"] == "ACS"
    assert item["ra"] == pytest.approx(M31[0], abs=1e-3) and item["dec"] == pytest.approx(M31[1], abs=1e-3)
    assert item["sky"]["ra_hms"].startswith("00:42:4") and item["sky"]["dec_dms"].startswith("+41:16")
    assert item["image"] == {"file": "m31_generated.fits", "format": "FITS", "shape": [64, 64], "error": None}
    cards = {k: v for k, v, _ in item["hdus"][0]["cards"]}
    assert cards["CTYPE1"] == "RA---TAN" and cards["OBJECT"] == "generated"
    assert cards["TELESCOP"] == EVIL  # text comes back as data, the page shows it as text
    assert item["thumbnail"] == f"/thumb/{row}.png"
    ngc = client.get(f"/api/item/{archive['rows']['NGC 1316']}").json()
    assert [h["index"] for h in ngc["hdus"]] == [0, 1]  # primary and the compressed image HDU
    assert ngc["image"]["shape"] == [300, 440]
    # NGC 1316 (Fornax A) is at RA 03h22m41.7s, Dec -37d12m30s
    assert ngc["ra"] == pytest.approx(50.674, abs=0.05) and ngc["dec"] == pytest.approx(-37.208, abs=0.05)
    pic = client.get(f"/api/item/{archive['rows']['a picture']}").json()
    assert pic["image"]["format"] == "PNG" and pic["image"]["shape"] == [48, 40]
    assert pic["hdus"] == [] and pic["ra"] is None and "sky" not in pic
    nofile = client.get(f"/api/item/{archive['rows']['no file']}").json()
    assert nofile["has_image"] is False and nofile["thumbnail"] is None and nofile["metadata"]["name"] == "no file"


@pytest.mark.parametrize("path, status", [("/api/item/12", 404), ("/api/item/-1", 404), ("/api/item/abc", 404),
                                          ("/api/item/1.5", 404), ("/api/item/", 404),
                                          ("/thumb/99.png", 404), ("/thumb/abc.png", 404),
                                          ("/thumb/1.jpg", 404), ("/thumb/..%2F..%2Fetc%2Fpasswd", 404)])
def test_unknown_items_get_404(client, path, status):
    _error(client.get(path), status)


def test_thumbnails_are_rendered_once_and_cached(app, client, archive):
    from PIL import Image

    row = archive["rows"]["NGC 1316"]
    cache = app.state.service.images.cache_dir
    r = client.get(f"/thumb/{row}.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (256, 175)  # 440 x 300 scaled, aspect kept
    pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 5  # a real picture, not a blank one
    cached = list(cache.rglob("*.png"))
    assert len(cached) >= 1
    large = client.get(f"/thumb/{row}.png", params={"size": "large"})
    assert Image.open(io.BytesIO(large.content)).size == (440, 300)  # never enlarged past the image
    assert large.headers["etag"] != r.headers["etag"]
    assert "size=large" in _error(client.get(f"/thumb/{row}.png", params={"size": "4000"}), 400)
    assert "size=large" in _error(client.get(f"/thumb/{row}.png", params={"path": "/etc/passwd"}), 400)
    etag = r.headers["etag"]
    assert client.get(f"/thumb/{row}.png", headers={"if-none-match": etag}).status_code == 304
    # the second request is served from the disk cache without reading the FITS file again
    calls = []
    images = app.state.service.images
    original = images._render
    images._render = lambda *a: calls.append(a) or original(*a)
    try:
        again = client.get(f"/thumb/{row}.png")
    finally:
        images._render = original
    assert again.content == r.content and calls == []


def test_thumbnails_use_the_display_scaling(client, archive):
    from PIL import Image

    from astrovl import load_image

    row = archive["rows"]["M13"]
    got = np.asarray(Image.open(io.BytesIO(client.get(f"/thumb/{row}.png").content)).convert("L"), float)
    pil = load_image(archive["paths"]["M13"]).to_pil("L")
    pil.thumbnail((256, 256), Image.Resampling.LANCZOS)
    np.testing.assert_allclose(got, np.asarray(pil, float), atol=2)


def test_files_outside_the_image_root_are_never_served(client, archive):
    rows = archive["rows"]
    assert "outside the index's image root" in _error(client.get(f"/thumb/{rows['outside']}.png"), 403)
    assert "outside the index's image root" in _error(client.get(f"/thumb/{rows['symlink']}.png"), 403)
    assert "names no image file" in _error(client.get(f"/thumb/{rows['missing']}.png"), 404)
    assert "names no image file" in _error(client.get(f"/thumb/{rows['no file']}.png"), 404)
    assert "could not be read" in _error(client.get(f"/thumb/{rows['broken']}.png"), 422)
    outside = client.get(f"/api/item/{rows['outside']}").json()
    assert outside["has_image"] is False and "hdus" not in outside and "outside" in outside["image_error"]
    # a relative path is found under the image root
    assert client.get(f"/thumb/{rows[EVIL]}.png").status_code == 200


def test_image_root_defaults_to_the_common_directory(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "c").mkdir()
    for p in ("a/b/1.png", "a/c/2.png", "x.png"):
        _picture(tmp_path / p, seed=0)
    meta = Table({"path": [str(tmp_path / "a/b/1.png"), "a/c/2.png", "<array>"]})
    images = IndexImages(meta, index_dir=tmp_path / "index", cache_dir=tmp_path / "cache")
    assert images.root == (tmp_path / "a").resolve()
    assert images.path(1) == (tmp_path / "a/c/2.png").resolve()  # relative to the index's parent
    with pytest.raises(QueryError, match="names no image file"):
        images.path(2)
    bad = Table({"path": [str(tmp_path / "a/b/1.png"), "../x.png"]})
    images = IndexImages(bad, index_dir=tmp_path / "idx", image_root=tmp_path / "a",
                         cache_dir=tmp_path / "cache")
    with pytest.raises(QueryError, match="outside") as exc:
        images.path(1)  # climbs out of the recorded root
    assert exc.value.status in (403, 404)


# ---------------------------------------------------------------------- safety
def test_token_is_required_on_every_request_when_set(archive, tmp_path):
    app = create_app(archive["index"], archive["embedder"], index_dir=archive["index_dir"],
                     image_root=archive["images"], thumbnail_cache=tmp_path, token="s3cret-token")
    client = TestClient(app, raise_server_exceptions=False)
    for path in ("/api/health", "/api/info", "/api/search?q=x", "/api/item/0", "/thumb/0.png", "/static/app.js"):
        r = client.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
    assert "needs a token" in client.get("/").text
    assert client.post("/api/search", json={"id": 0}).status_code == 401
    wrong = {"authorization": "Bearer s3cret-tokem"}
    assert client.get("/api/health", headers=wrong).status_code == 401
    good = {"authorization": "Bearer s3cret-token"}
    assert client.get("/api/health", headers=good).status_code == 200
    assert client.post("/api/search", json={"id": 0}, headers=good).status_code == 200
    assert client.get("/api/info", params={"token": "s3cret-token"}).status_code == 200
    # opening the page with ?token= sets a cookie and drops the token from the address
    r = client.get("/", params={"token": "s3cret-token", "q": "galaxy"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/?q=galaxy"
    cookie = r.headers["set-cookie"]
    assert "astrovl_token=s3cret-token" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    browser = TestClient(app, raise_server_exceptions=False, cookies={"astrovl_token": "s3cret-token"})
    assert browser.get("/").status_code == 200 and browser.get("/thumb/0.png").status_code == 200
    assert TestClient(app, cookies={"astrovl_token": "nope"}).get("/").status_code == 401
    fresh = TestClient(app, raise_server_exceptions=False)
    assert fresh.get("/", params={"token": "nope"}, follow_redirects=False).status_code == 401


def test_token_comparison_is_constant_time(monkeypatch, archive, tmp_path):
    import hmac

    from astrovl.serve import security

    compared = []
    original = hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest",
                        lambda a, b: compared.append((a, b)) or original(a, b))
    app = create_app(archive["index"], archive["embedder"], thumbnail_cache=tmp_path, token="abc")
    TestClient(app).get("/api/health", headers={"authorization": "Bearer abd"})
    assert compared == [(b"abd", b"abc")]


def test_host_header_is_checked_on_loopback(archive, tmp_path):
    from astrovl.serve import LOOPBACK_HOSTS

    app = create_app(archive["index"], archive["embedder"], thumbnail_cache=tmp_path,
                     allowed_hosts=LOOPBACK_HOSTS)
    ok = TestClient(app, base_url="http://127.0.0.1:8000")
    assert ok.get("/api/health").status_code == 200
    assert TestClient(app, base_url="http://localhost:8123").get("/api/health").status_code == 200
    evil = TestClient(app, base_url="http://attacker.example:8000", raise_server_exceptions=False)
    assert "Host header" in _error(evil.get("/api/health"), 400)


def test_cors_is_off_by_default(client, archive, tmp_path):
    r = client.get("/api/info", headers={"origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers
    app = create_app(archive["index"], archive["embedder"], thumbnail_cache=tmp_path,
                     cors_origins=["https://team.example"])
    r = TestClient(app).get("/api/info", headers={"origin": "https://team.example"})
    assert r.headers["access-control-allow-origin"] == "https://team.example"


def test_unknown_routes_and_methods_are_json(client):
    assert "under /api/" in _error(client.get("/admin"), 404)
    assert "not allowed" in _error(client.delete("/api/search"), 405)
    assert "not allowed" in _error(client.post("/api/item/1"), 405)


def test_unexpected_errors_are_json_without_traceback(app, client, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app.state.service, "item", boom)
    r = client.get("/api/item/0")
    message = _error(r, 500)
    assert "secret internal detail" not in message and "RuntimeError" in message
    assert r.headers["x-content-type-options"] == "nosniff"  # security headers on errors too
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert client.get("/api/health").status_code == 200


# ---------------------------------------------------------------------- concurrency
def test_model_is_never_entered_twice_and_the_loop_stays_free(app, archive):
    import httpx

    service = app.state.service
    inside, most = 0, 0
    lock = threading.Lock()
    original_text, original_images = service.embedder.embed_text, service.embedder.embed_images

    def guarded(func):
        def run(*a, **k):
            nonlocal inside, most
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.05)  # a slow model: the event loop must keep answering meanwhile
            try:
                return func(*a, **k)
            finally:
                with lock:
                    inside -= 1
        return run

    data = archive["paths"]["M13"].read_bytes()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            texts = [c.get("/api/search", params={"q": f"query number {i}"}) for i in range(12)]
            uploads = [c.post("/api/search", files={"file": ("m.fits", data)}) for _ in range(4)]
            slow = asyncio.gather(*texts, *uploads)
            await asyncio.sleep(0.02)
            t0 = time.perf_counter()
            health = await c.get("/api/health")
            health_s = time.perf_counter() - t0
            return await slow, health, health_s

    service.embedder.embed_text = guarded(original_text)
    service.embedder.embed_images = guarded(original_images)
    try:
        responses, health, health_s = asyncio.run(scenario())
    finally:
        service.embedder.embed_text, service.embedder.embed_images = original_text, original_images
    assert all(r.status_code == 200 for r in responses)
    assert most == 1
    assert health.status_code == 200 and health_s < 0.4  # 16 x 50 ms of model time were queued


# ---------------------------------------------------------------------- construction and the command line
def test_create_app_from_a_directory_and_without_a_model(archive, tmp_path):
    app = create_app(archive["index_dir"], archive["embedder"], thumbnail_cache=tmp_path)
    client = TestClient(app)
    assert client.get("/api/info").json()["name"] == f"{archive['index_dir'].parent.name}/index"
    assert client.get("/api/search", params={"q": "x", "k": 1}).status_code == 200
    bare = EmbeddingIndex.load(archive["index_dir"])
    if bare.embedder is None:
        with pytest.raises(ValueError, match="needs the model"):
            create_app(bare)


def test_cli_serve_binds_loopback_and_warns_on_all_interfaces(monkeypatch, archive, tmp_path, capsys):
    from astrovl.cli import main
    from astrovl.serve import app as app_module

    clip_dir = tmp_path / "clip"
    archive["embedder"].save_pretrained(clip_dir)
    runs = []
    monkeypatch.setattr(app_module, "run_app", lambda app, host, port, **kw: runs.append((app, host, port)))
    monkeypatch.delenv("ASTROVL_SERVE_TOKEN", raising=False)
    assert main(["serve", str(archive["index_dir"]), "--model", str(clip_dir),
                 "--thumbnail-cache", str(tmp_path / "t")]) == 0
    app, host, port = runs[-1]
    assert (host, port) == ("127.0.0.1", 8000)
    out = capsys.readouterr()
    assert "open http://127.0.0.1:8000/" in out.out and "warning" not in out.err
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/api/health").status_code == 200
    assert TestClient(app, base_url="http://evil.example").get("/api/health").status_code == 400
    monkeypatch.setenv("ASTROVL_SERVE_TOKEN", "from-env")
    assert main(["serve", str(archive["index_dir"]), "--model", str(clip_dir), "--host", "0.0.0.0",
                 "--port", "8765", "--thumbnail-cache", str(tmp_path / "t")]) == 0
    app, host, port = runs[-1]
    out = capsys.readouterr()
    assert "warning: listening on 0.0.0.0" in out.err
    assert "?token=from-env" in out.out
    assert TestClient(app).get("/api/health").status_code == 401
    assert TestClient(app).get("/api/health", headers={"authorization": "Bearer from-env"}).status_code == 200
    with pytest.raises(SystemExit):  # refused by the argument parser
        main(["serve", str(archive["index_dir"]), "--port", "70000"])
    # an index that records no model source needs --model
    assert main(["serve", str(archive["index_dir"]), "--thumbnail-cache", str(tmp_path / "t")]) == 1
    assert "needs the model that built it" in capsys.readouterr().err


def test_json_answers_are_strict_json(client):
    r = client.get("/api/search", params={"q": "galaxy", "k": 50})
    assert r.status_code == 200
    body = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    # results without a sky position carry null, not NaN
    assert body["results"] and any(x["ra"] is None for x in body["results"])
