"""Hostile input against a real ``astrovl serve`` on loopback: never a 5xx, memory stays bounded.

One server process (tiny CLIP, a token of awkward characters, listening on
127.0.0.2, small upload and pixel limits) answers every attack below over real
HTTP. Every response is recorded; the last test asserts that none was >= 500,
that each carried the security headers, and that the server's resident memory
grew by less than 150 MB over the whole suite.
"""

from __future__ import annotations

import functools
import gzip
import http.client
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex  # noqa: E402
from astrovl.clip.index import common_image_root  # noqa: E402
from astrovl.serve.security import check_token, neutralise_bidi, same_origin_path  # noqa: E402
from astrovl.testing.serve import ServerProcess  # noqa: E402
from astrovl.utils.lru import LRUCache  # noqa: E402

HOST = "127.0.0.2"  # a loopback address other than the default: the Host check must accept it
TOKEN = "tøken+&= %/é✓#1"
RLO = "\u202e"
SECURITY = ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy")
RSS_GROWTH_LIMIT_MB = 150
RESPONSES: list[tuple[str, str, int, dict]] = []


def _wcs_fits(path, ra, dec, extra_card=None):
    yy, xx = np.mgrid[:48, :48]
    data = 10 + 400 * np.exp(-((xx - 20) ** 2 + (yy - 26) ** 2) / 30)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [24.5, 24.5]
    w.wcs.cdelt = [-0.001, 0.001]
    header = w.to_header()
    if extra_card:
        header[extra_card[0]] = extra_card[1]
    fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from PIL import Image

    base = tmp_path_factory.mktemp("hostile")
    images, outside = base / "images", base / "outside"
    images.mkdir()
    outside.mkdir()
    _wcs_fits(images / "m31.fits", 10.68, 41.27)
    _wcs_fits(images / "swap.fits", 83.8, -5.4)
    _wcs_fits(images / "sentinel.fits", 150.0, 2.2)
    Image.fromarray((np.random.default_rng(0).random((40, 32, 3)) * 255).astype(np.uint8)).save(
        images / "pic.png")
    _wcs_fits(outside / "secret.fits", 1.0, 2.0, ("SECRETKW", "do not serve"))
    (images / "link_out.fits").symlink_to(outside / "secret.fits")  # present when the index is built
    names = ["M31", "swapped later", f"label {RLO}txet desrever", "a picture", "link out", "NaN dec"]
    files = ["m31.fits", "swap.fits", "sentinel.fits", "pic.png", "link_out.fits", "m31.fits"]
    paths = [str(images / f) for f in files]
    meta = Table({"path": paths, "name": names, "kind": ["fits", "fits", "fits", "png", "fits", "fits"],
                  "ra": [10.68, 83.8, 150.0, np.nan, 1.0, 10.0],
                  "dec": [41.27, -5.4, 99.0, np.nan, 2.0, np.nan]})  # dec 99: a catalogue sentinel
    embedder = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
    embedder.save_pretrained(base / "clip")
    embedder = CLIPEmbedder.from_pretrained(base / "clip")
    EmbeddingIndex.build(embedder, paths, metadata=meta, progress=False,
                         image_root=common_image_root(paths)).save(base / "index")
    server = ServerProcess([base / "index", "--thumbnail-cache", base / "thumbs", "--log-level", "warning",
                            "--max-upload-mb", "1", "--max-image-mpix", "4"], base / "server.log",
                           host=HOST, token=TOKEN)
    with server:
        c = _Client(server.port, server.proc.pid)
        for target in ("/api/item/0", "/thumb/0.png", "/api/search?q=galaxy"):  # warm the caches
            assert c.get(target)[0] == 200
        assert _upload(c, "pic.png", (images / "pic.png").read_bytes())[0] == 200
        c.baseline_rss = c.rss_mb()
        yield {"client": c, "base": base, "images": images, "outside": outside, "log": base / "server.log",
               "rows": {n: i for i, n in enumerate(names)}, "server": server}


class _Client:
    """Raw HTTP on loopback (http.client sends paths exactly as written); every answer is recorded."""

    def __init__(self, port: int, pid: int):
        self.port, self.pid = port, pid
        self.host_header = f"{HOST}:{port}"
        self.baseline_rss = 0.0

    def request(self, method, target, body=None, headers=None, auth=True):
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        h = {"Host": self.host_header}
        if auth:
            h["Authorization"] = "Bearer " + TOKEN.encode("utf-8").decode("latin-1")
        h.update(headers or {})
        try:
            conn.request(method, target, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
            got = {k.lower(): v for k, v in r.getheaders()}
            status = r.status
        finally:
            conn.close()
        RESPONSES.append((method, target[:80], status, got))
        return status, data, got

    def get(self, target, **kw):
        status, data, _ = self.request("GET", target, **kw)
        return status, data

    def post_json(self, body: bytes, target="/api/search"):
        status, data, _ = self.request("POST", target, body=body, headers={"Content-Type": "application/json"})
        return status, data

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def _upload(client, name, data):
    boundary = "b" + uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, data, _ = client.request("POST", "/api/search", body=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, data


def _error(data) -> str:
    body = json.loads(data)
    assert body["error"] and "Traceback" not in body["error"]
    return body["error"]


def _png(width, height, rows: bytes | None = None) -> bytes:
    """A 1-bit greyscale PNG of ``width`` x ``height`` (all black unless ``rows`` is given)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    if rows is None:
        rows = (b"\0" * (1 + (width + 7) // 8)) * height
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def _fits_header(**cards) -> bytes:
    header = fits.Header([("SIMPLE", True), *cards.items()])
    return header.tostring().encode()


def _jpeg_claiming(width, height) -> bytes:
    """A small real JPEG whose frame header is rewritten to claim ``width`` x ``height``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    at = data.find(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# ---------------------------------------------------------------------- ids
@pytest.mark.parametrize("target", [
    "/api/item/%C2%B2", "/api/item/%E2%91%A0", "/api/item/%D9%A3", "/api/item/%EF%BC%91",
    "/thumb/%C2%B2.png", "/thumb/%E2%91%A0.png", "/api/item/" + "9" * 5000, "/api/item/-1",
    "/api/item/1e3", "/api/item/0x1", "/api/item/%20", "/api/item/1%00",
    "/api/search?q=x&k=%C2%B2", "/api/search?q=x&k=" + "9" * 5000, "/api/search?q=x&k=1.5",
])
def test_ids_in_paths_and_queries_are_ascii_digits_only(served, target):
    status, data = served["client"].get(target)
    assert status in (400, 404), (target, status, data[:200])
    assert "0-9" in _error(data) or "out of range" in _error(data) or "no item" in _error(data)


@pytest.mark.parametrize("body", [
    '{"id": "²"}', '{"id": "①"}', '{"id": "٣"}', '{"id": 1.5}', '{"id": true}', '{"id": [1]}',
    '{"id": {"a": 1}}', '{"id": "' + "9" * 5000 + '"}', '{"id": ' + "9" * 5000 + "}",
    '{"q": "x", "k": "²"}', '{"q": "x", "k": 1e999}', '{"q": "x", "k": NaN}', '{"q": "x", "k": [3]}',
])
def test_ids_and_numbers_in_json_are_ascii_digits_only(served, body):
    status, data = served["client"].post_json(body.encode())
    assert status in (400, 404), (body[:40], status, data[:200])
    _error(data)


def test_form_ids_are_ascii_digits_only(served):
    status, data, _ = served["client"].request(
        "POST", "/api/search", body=b"id=%C2%B2",
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 404 and "0-9" in _error(data)
    assert served["client"].post_json(b'{"id": 0}')[0] == 200  # a plain id still works


# ---------------------------------------------------------------------- JSON bounds
@pytest.mark.parametrize("body, status, words", [
    (b"[" * 100_000, 413, "limit"),
    (b"[" * 1000, 400, "nested"),
    (b'{"q": ' + b"{" * 40 + b"}" * 40 + b"}", 400, "nested"),
    (b'{"q": "' + b"[" * 50_000 + b'"}', 400, "characters"),  # brackets inside a string do not nest
    (b'{"q": "\xff\xfe"}', 400, "JSON"),
    (b"NaN", 400, "JSON"),
    (b'{"q": "x"' + b" " * 70_000 + b"}", 413, "limit"),
])
def test_json_bodies_are_bounded_before_parsing(served, body, status, words):
    got, data = served["client"].post_json(body)
    assert got == status, data[:300]
    assert words in _error(data)


# ---------------------------------------------------------------------- sky positions
def test_invalid_sky_positions_are_shown_as_given(served):
    c, rows = served["client"], served["rows"]
    status, data = c.get(f"/api/item/{rows[f'label {RLO}txet desrever']}")
    assert status == 200, data
    item = json.loads(data)
    assert (item["ra"], item["dec"]) == (150.0, 99.0) and "sky" not in item
    status, data = c.get(f"/api/item/{rows['NaN dec']}")
    assert status == 200
    good = json.loads(c.get(f"/api/item/{rows['M31']}")[1])
    assert good["sky"]["dec_dms"].startswith("+41:16")
    status, data = c.get("/api/search?q=galaxy&k=10")
    assert status == 200
    decs = {r["label"]: r["dec"] for r in json.loads(data)["results"]}
    assert decs[f"label {RLO}txet desrever"] == 99.0


# ---------------------------------------------------------------------- filters
def test_filter_terms_are_bounded(served):
    c = served["client"]
    status, data = c.post_json(json.dumps({"q": "galaxy", "filter": ["kind:fits"] * 65}).encode())
    assert status == 400 and "at most 64" in _error(data)
    status, data = c.post_json(json.dumps({"q": "galaxy", "filter": ["kind:" + "x" * 300]}).encode())
    assert status == 400 and "256" in _error(data)
    # ~0.9 MB: under the body limit; starlette >= 0.41 refuses so many form fields itself, older
    # starlette parses them and the service refuses the filter terms
    form = ("id=0&" + "&".join(f"filter=kind:{i}" for i in range(50_000))).encode()
    status, data, _ = c.request("POST", "/api/search", body=form,
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and ("at most 64" in _error(data) or "fields" in _error(data))
    for i in range(40):  # distinct filters, each cached
        status, _ = c.get(f"/api/search?q=galaxy&filter=kind:fits&filter=kind:v{i}")
        assert status == 200


def test_the_mask_cache_is_bounded_in_bytes():
    cache = LRUCache(128, max_bytes=10_000)
    for i in range(50):
        cache.put(("kind", str(i)), np.arange(500, dtype=np.int64))  # ~4 kB each
    assert cache.nbytes <= 10_000 and len(cache) == 2
    cache.put("huge", np.zeros(10_000))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and cache.nbytes <= 10_000
    from astrovl.serve.service import MASK_CACHE_BYTES

    assert MASK_CACHE_BYTES <= 256 * 2**20


# ---------------------------------------------------------------------- symbolic links
def test_image_files_are_checked_at_every_open(served):
    c, rows, images = served["client"], served["rows"], served["images"]
    row = rows["swapped later"]
    assert c.get(f"/thumb/{row}.png")[0] == 200
    first = json.loads(c.get(f"/api/item/{row}")[1])
    assert first["has_image"] and first["hdus"]
    # the file is replaced by a link to a file outside the image root after it was served
    link = images / "swap.tmp"
    link.symlink_to(served["outside"] / "secret.fits")
    os.replace(link, images / "swap.fits")
    status, data = c.get(f"/thumb/{row}.png")
    assert status == 403, data
    status, data = c.get(f"/thumb/{row}.png?size=large")
    assert status == 403
    status, data = c.get(f"/api/item/{row}")
    assert status == 200 and b"SECRETKW" not in data and not json.loads(data)["has_image"]
    status, data = c.get(f"/api/item/{rows['link out']}")  # a link present when the index was built
    assert status == 200 and b"SECRETKW" not in data
    assert c.get(f"/thumb/{rows['link out']}.png")[0] == 403


def test_the_image_root_is_never_widened_through_a_symlink(served, tmp_path):
    images = served["images"]
    files = [images / "m31.fits", images / "link_out.fits"]
    assert common_image_root(files) == str(images.resolve())
    recorded = json.loads((served["base"] / "index" / "index.json").read_text())["image_root"]
    assert (served["base"] / "index" / recorded).resolve() == images.resolve()
    # an index that records no root: the root found when serving is not widened either
    from astrovl.exceptions import QueryError
    from astrovl.serve.images import IndexImages

    found = IndexImages(Table({"path": [str(f) for f in files]}), cache_dir=tmp_path / "cache")
    assert found.root == images.resolve()
    with pytest.raises(QueryError) as exc:
        found.path(1)
    assert exc.value.status == 403
    # the command line records the same root
    from astrovl.cli import main

    assert main(["index", "build", str(images / "m31.fits"), str(images / "link_out.fits"),
                 "--index", str(tmp_path / "idx"), "--model", str(served["base"] / "clip")]) == 0
    recorded = json.loads((tmp_path / "idx" / "index.json").read_text())["image_root"]
    assert (tmp_path / "idx" / recorded).resolve() == images.resolve()


# ---------------------------------------------------------------------- decoding
@functools.lru_cache(maxsize=1)
def _bombs() -> dict[str, tuple[str, bytes, str]]:
    zeros = b"\0" * (16 * 2**20)
    return {
        "png 10000x9999": ("bomb.png", _png(10_000, 9_999), "million pixels"),
        "png header 100000x100000": ("bomb.png", _png(100_000, 100_000, rows=b""), "pixels"),
        "jpeg claiming 9000x9000": ("bomb.jpg", _jpeg_claiming(9_000, 9_000), "million pixels"),
        "fits header 3000x3000": ("bomb.fits", _fits_header(BITPIX=8, NAXIS=2, NAXIS1=3000, NAXIS2=3000),
                                  "million pixels"),
        "gzip fits 16 MB": ("bomb.fits.gz", gzip.compress(
            _fits_header(BITPIX=8, NAXIS=2, NAXIS1=4096, NAXIS2=4096) + zeros), "decompresses"),
        "gzip 16 MB of zeros": ("bomb.png.gz", gzip.compress(zeros), "decompresses"),
    }


@pytest.mark.parametrize("kind", list(_bombs()))
def test_decoded_size_is_bounded_before_decoding(served, kind):
    c = served["client"]
    name, data, words = _bombs()[kind]
    assert len(data) < 2**20  # each is under the upload limit
    before = c.rss_mb()
    status, body = _upload(c, name, data)
    assert status == 413, body[:300]
    message = _error(body)
    assert words in message and "limit" in message
    assert c.rss_mb() - before < 60  # refused before decoding: no decoded image was ever held


# ---------------------------------------------------------------------- tokens
def test_tokens_of_any_characters_work(served):
    c = served["client"]
    log = served["log"].read_text(encoding="utf-8")
    url = re.search(r"open (http://\S+)", log).group(1)
    assert TOKEN not in url and f"?token={quote(TOKEN, safe='')}" in url  # printed percent-encoded
    parts = urlsplit(url)
    status, _, headers = c.request("GET", f"{parts.path}?{parts.query}", auth=False)
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"].split(";")[0]
    assert cookie.isascii()
    assert c.get("/api/info", auth=False, headers={"Cookie": cookie})[0] == 200
    assert c.get("/api/info")[0] == 200  # Bearer with the UTF-8 bytes of the token
    for wrong in ("?token=%FF%FE", "?token=" + quote("tøken"), "?token=" + quote(TOKEN[:-1])):
        assert c.get("/api/info" + wrong, auth=False)[0] == 401
        assert c.get("/" + wrong, auth=False)[0] == 401
    raw = "astrovl_token=tøken✓".encode().decode("latin-1")
    assert c.get("/api/info", auth=False, headers={"Cookie": raw})[0] == 401
    assert c.get("/api/info", auth=False, headers={"Authorization": "Bearer \xff\xfe"})[0] == 401


@pytest.mark.parametrize("token", ["", " lead", "trail ", "a\nb", "a\x00b", "a\tb", f"a{RLO}b", "x" * 2000])
def test_unusable_tokens_are_refused_at_start_up(token, capsys):
    with pytest.raises(ValueError):
        check_token(token)
    if token:
        from astrovl.cli import main

        assert main(["serve", "no-such-index", "--token", token]) == 1
        assert "token" in capsys.readouterr().err


# ---------------------------------------------------------------------- redirects
@pytest.mark.parametrize("path", ["//evil.example/", "/%5Cevil.example/", "/\\evil.example/", "/\\\\evil",
                                  "/%2F%2Fevil.example/", "///evil.example", "/%09/evil.example",
                                  "/%5C%5Cevil.example", "/a/../..//evil.example", "/x?y=1&"])
def test_redirects_stay_on_this_server(served, path):
    c = served["client"]
    sep = "&" if "?" in path else "?"
    status, _, headers = c.request("GET", f"{path}{sep}token={quote(TOKEN, safe='')}", auth=False)
    assert status < 500
    location = headers.get("location")
    if location is not None:
        assert location.startswith("/") and not location.startswith("//"), location
        assert "\\" not in location and urlsplit(location).netloc == ""


def test_same_origin_path_examples():
    assert same_origin_path("//evil.example/") == "/evil.example/"
    assert same_origin_path("/\\evil.example/") == "/evil.example/"
    assert same_origin_path("/a\\b c") == "/a%5Cb%20c"


# ---------------------------------------------------------------------- headers, host, CLI
def test_security_headers_on_errors(served):
    c = served["client"]
    for method, target, length in [("GET", "/nope", None), ("DELETE", "/api/search", None),
                                   ("POST", "/api/search", 2 * 2**20),  # refused from its Content-Length
                                   ("GET", "/api/item/99999", None)]:
        sent = {"Content-Type": "application/json"}
        if length:
            sent["Content-Length"] = str(length)
        status, _, headers = c.request(method, target, body=b"[" if length else None, headers=sent)
        assert status in (404, 405, 413), (target, status)
        for name in SECURITY:
            assert name in headers, (target, name)
    status, _, headers = c.request("GET", "/api/info", auth=False)
    assert status == 401 and all(n in headers for n in SECURITY)


def test_host_check_accepts_the_listening_address(served):
    c = served["client"]
    assert c.get("/api/health")[0] == 200  # Host: 127.0.0.2:PORT
    assert c.get("/api/health", headers={"Host": f"localhost:{c.port}"})[0] == 200
    assert c.get("/api/health", headers={"Host": "evil.example"})[0] == 400


@pytest.mark.parametrize("flag, value", [("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"),
                                         ("--max-upload-mb", "-1"), ("--max-upload-mb", "0"),
                                         ("--max-image-mpix", "nan"), ("--max-image-mpix", "-5"),
                                         ("--port", "0"), ("--port", "70000"), ("--port", "８０"),
                                         ("--max-k", "0"), ("--max-k", "²")])
def test_cli_numbers_are_validated(flag, value, capsys):
    from astrovl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "no-such-index", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


# ---------------------------------------------------------------------- bidi
def test_bidi_controls_are_neutralised_in_displayed_text(served):
    c, rows = served["client"], served["rows"]
    item = json.loads(c.get(f"/api/item/{rows[f'label {RLO}txet desrever']}")[1])
    assert RLO in item["label"]  # the data is served as it is; the page neutralises it
    assert neutralise_bidi(item["label"]) == "label <U+202E>txet desrever"
    js = (Path(__file__).parents[1] / "astrovl" / "serve" / "static" / "app.js").read_text("utf-8")
    assert js.count(".textContent =") == 1  # only through setText, which neutralises
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's shown() is not run")
    source = js[js.index("  const BIDI_CONTROLS"):js.index("  function setText")]
    text = "a\u202ab\u202bc\u202cd\u202de\u202ef\u2066g\u2067h\u2068i\u2069j\u200ek\u200fl\u061cm"
    out = subprocess.run([node, "-e", source + f"process.stdout.write(shown({json.dumps(text)}));"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out == neutralise_bidi(text) and not any(ch in out for ch in text if ord(ch) > 127)


# ---------------------------------------------------------------------- the verdict
def test_no_5xx_and_bounded_memory(served):
    c = served["client"]
    for _ in range(3):  # the heaviest attacks again: memory must not keep growing
        for name, data, _words in _bombs().values():
            assert _upload(c, name, data)[0] == 413
        form = "&".join(f"filter=kind:{i}" for i in range(50_000)).encode()
        assert c.request("POST", "/api/search", body=form,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 400
        assert c.post_json(b"[" * 60_000)[0] == 400
    assert c.get("/api/health")[0] == 200
    failures = [r[:3] for r in RESPONSES if r[2] >= 500]
    assert not failures, failures
    missing = [r[:3] for r in RESPONSES if not all(n in r[3] for n in SECURITY)]
    assert not missing, missing
    growth = c.rss_mb() - c.baseline_rss
    logging.getLogger(__name__).info("server RSS %.0f MB -> %.0f MB (%+.1f MB) over %d requests",
                                     c.baseline_rss, c.rss_mb(), growth, len(RESPONSES))
    assert growth < RSS_GROWTH_LIMIT_MB, f"server RSS grew by {growth:.0f} MB over {len(RESPONSES)} requests"
