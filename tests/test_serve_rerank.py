"""``astrovl serve --rerank``: text searches re-ordered by a vision-language model, with both scores.

A scorer whose score is the number in an image's file name gives a known
order; a tiny AstroLLaVA (random weights, real architecture) checks the real
model end to end, on the command line and on a real uvicorn server on loopback.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from starlette.testclient import TestClient  # noqa: E402

from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex  # noqa: E402
from astrovl.serve import SearchService, create_app  # noqa: E402
from astrovl.testing.serve import free_port  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _number(image) -> int:
    """7 for an image read from ``.../sky_000007.fits``."""
    return int(Path(str(image.source)).name.split("_")[1].split(".")[0])


class ByNumber:
    """Scores an image by the number in its file name; records its calls."""

    source = "by-number"

    def __init__(self):
        self.calls: list[tuple[str, list]] = []

    def rerank_scores(self, query, images):
        self.calls.append((query, list(images)))
        return np.array([float(_number(im)) for im in images])


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from astrovl.datasets import SyntheticSkyDataset

    base = tmp_path_factory.mktemp("serve-rerank")
    sky = SyntheticSkyDataset.generate(base / "images", n_images=16, image_size=32, seed=3, val_fraction=0.0,
                                       progress=False)
    embedder = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
    meta = Table({"path": [str(p) for p in sky.image_paths], "name": [f"sky {i}" for i in range(len(sky))],
                  "label": [str(x) for x in sky.manifest["label"]]})
    index = EmbeddingIndex.build(embedder, sky.image_paths, metadata=meta, progress=False)
    index.save(base / "index")
    return {"base": base, "index": index, "embedder": embedder, "images": base / "images"}


def _app(archive, **kw):
    return create_app(archive["index"], archive["embedder"], index_dir=archive["base"] / "index",
                      image_root=archive["images"], thumbnail_cache=archive["base"] / "thumbs", **kw)


def test_text_search_follows_the_model_and_carries_both_scores(archive):
    model = ByNumber()
    client = TestClient(_app(archive, rerank=model, rerank_top=10))
    info = client.get("/api/info").json()
    assert info["rerank"] == {"model": "by-number", "top": 10}
    clip = client.get("/api/search", params={"q": "a spiral galaxy", "k": 10, "rerank": "0"}).json()
    assert "rerank" not in clip and all("rerank_score" not in r for r in clip["results"])
    r = client.get("/api/search", params={"q": "a spiral galaxy", "k": 4})
    assert r.status_code == 200
    answer = r.json()
    # one call with CLIP's best 10 images, in CLIP's order
    query, images = model.calls[-1]
    assert query == "a spiral galaxy"
    assert [_number(im) for im in images] == [_number_of(archive, x["id"]) for x in clip["results"]]
    # the best 4 of them by the model's score, both scores given
    expected = sorted(clip["results"], key=lambda x: -_number_of(archive, x["id"]))[:4]
    assert [x["id"] for x in answer["results"]] == [x["id"] for x in expected]
    assert [x["rank"] for x in answer["results"]] == [1, 2, 3, 4]
    by_id = {x["id"]: x for x in clip["results"]}
    for x in answer["results"]:
        assert x["rerank_score"] == pytest.approx(_number_of(archive, x["id"]))
        assert x["score"] == pytest.approx(by_id[x["id"]]["score"])
        assert x["clip_rank"] == by_id[x["id"]]["rank"]
    assert answer["rerank"] == {"model": "by-number", "candidates": 10, "top": 10}
    # the JSON API says the same; k above rerank_top scores k candidates
    posted = client.post("/api/search", json={"q": "a spiral galaxy", "k": 4}).json()
    assert [x["id"] for x in posted["results"]] == [x["id"] for x in answer["results"]]
    assert client.post("/api/search", json={"q": "a spiral galaxy", "k": 12, "rerank": True}).json()[
        "rerank"]["candidates"] == 12
    off = client.post("/api/search", json={"q": "a spiral galaxy", "k": 10, "rerank": False}).json()
    assert [x["id"] for x in off["results"]] == [x["id"] for x in clip["results"]]


def _number_of(archive, row: int) -> int:
    return int(Path(str(archive["index"].metadata["path"][row])).name.split("_")[1].split(".")[0])


def test_filters_apply_before_re_ranking_and_unreadable_images_rank_last(archive, tmp_path):
    model = ByNumber()
    client = TestClient(_app(archive, rerank=model, rerank_top=5))
    label = str(archive["index"].metadata["label"][0])
    answer = client.get("/api/search", params={"q": "x", "k": 3, "filter": f"label:{label}"}).json()
    rows = np.flatnonzero(np.asarray(archive["index"].metadata["label"]) == label)
    assert set(x["id"] for x in answer["results"]) <= set(rows.tolist())
    assert {_number(im) for im in model.calls[-1][1]} <= {_number_of(archive, int(r)) for r in rows}
    # a candidate whose file is outside the image root is not read: no model score, listed last
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    index = EmbeddingIndex(archive["index"].dim, embedder=archive["embedder"])
    meta = archive["index"].metadata.copy()
    paths = [str(p) for p in meta["path"]]
    moved = outside / Path(paths[0]).name
    moved.write_bytes(Path(paths[0]).read_bytes())
    meta["path"] = [str(moved), *paths[1:]]
    index.add(archive["index"].vectors, meta)
    service = SearchService(index, archive["embedder"], image_root=archive["images"],
                            thumbnail_cache=tmp_path / "t", reranker=ByNumber(), rerank_top=16)
    answer = service.search_text("x", k=16)
    assert answer["results"][-1]["id"] == 0 and answer["results"][-1]["rerank_score"] is None
    assert all(x["rerank_score"] is not None for x in answer["results"][:-1])


def test_rerank_switch_errors(archive):
    plain = TestClient(_app(archive))
    assert plain.get("/api/info").json()["rerank"] is None
    r = plain.get("/api/search", params={"q": "a nebula", "rerank": "1"})
    assert r.status_code == 400 and "--rerank MODEL" in r.json()["error"]
    assert plain.get("/api/search", params={"q": "a nebula", "rerank": "0"}).status_code == 200
    client = TestClient(_app(archive, rerank=ByNumber()))
    for bad in ("maybe", "2", ""):
        r = client.get("/api/search", params={"q": "a nebula", "rerank": bad})
        assert r.status_code == 400 and "yes/no switch" in r.json()["error"], bad
    r = client.post("/api/search", json={"q": "a nebula", "rerank": 1})
    assert r.status_code == 400 and "yes/no switch" in r.json()["error"]
    r = client.post("/api/search", json={"id": 3, "rerank": True})
    assert r.status_code == 400 and "text query" in r.json()["error"]
    assert client.post("/api/search", json={"id": 3, "rerank": False}).status_code == 200


def test_bad_settings_are_refused_at_start(archive, tmp_path):
    with pytest.raises(ValueError, match="rerank_top=0 must be a whole number >= 1"):
        _app(archive, rerank=ByNumber(), rerank_top=0)
    with pytest.raises(ValueError, match="rerank_top goes with a re-ranking model"):
        _app(archive, rerank_top=5)
    with pytest.raises(TypeError, match="rerank_scores"):
        SearchService(archive["index"], archive["embedder"], reranker=object())
    # an index whose metadata names no image files
    nameless = EmbeddingIndex(archive["index"].dim, embedder=archive["embedder"])
    nameless.add(archive["index"].vectors, Table({"name": archive["index"].metadata["name"]}))
    with pytest.raises(ValueError, match="names? no image files|naming image files"):
        SearchService(nameless, archive["embedder"], thumbnail_cache=tmp_path, reranker=ByNumber())


def test_cli_serve_rerank_with_a_tiny_astrollava_on_loopback(monkeypatch, archive, tmp_path, capsys):
    """The real model, named on the command line, answers a real server on loopback."""
    pytest.importorskip("transformers")
    import httpx
    import uvicorn

    from astrovl import AstroLLaVA
    from astrovl.cli import main
    from astrovl.serve import app as app_module
    from astrovl.testing.llava import make_tiny_llava

    llava_dir = make_tiny_llava(tmp_path / "llava")
    clip_dir = tmp_path / "clip"
    archive["embedder"].save_pretrained(clip_dir)
    runs = []
    monkeypatch.setattr(app_module, "run_app", lambda app, host, port, **kw: runs.append(app))
    monkeypatch.delenv("ASTROVL_SERVE_TOKEN", raising=False)
    common = ["serve", str(archive["base"] / "index"), "--model", str(clip_dir), "--thumbnail-cache",
              str(tmp_path / "t"), "--image-root", str(archive["images"])]
    # bad settings are refused before anything is loaded or served
    with pytest.raises(SystemExit):
        main([*common, "--rerank", str(llava_dir), "--rerank-top", "0"])
    assert "must be a whole number of at least 1" in capsys.readouterr().err
    assert main([*common, "--rerank-top", "5"]) == 1
    assert "--rerank-top goes with --rerank MODEL" in capsys.readouterr().err
    assert not runs
    assert main([*common, "--rerank", str(llava_dir), "--rerank-top", "6"]) == 0
    assert "re-ranked by" in capsys.readouterr().out
    app = runs[-1]

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        answer = httpx.get(f"{url}/api/search", params={"q": "A barred spiral galaxy.", "k": 4}, timeout=120).json()
        clip = httpx.get(f"{url}/api/search", params={"q": "A barred spiral galaxy.", "k": 6, "rerank": "off"},
                         timeout=120).json()
    finally:
        server.should_exit = True
        thread.join(10)
    results = answer["results"]
    assert len(results) == 4 and answer["rerank"]["candidates"] == 6
    # the model's own scores of CLIP's 6 candidates give the order
    model = AstroLLaVA.from_pretrained(llava_dir, device="cpu")
    paths = [str(archive["index"].metadata["path"][x["id"]]) for x in clip["results"]]
    expected = model.rerank_scores("A barred spiral galaxy.", paths)
    order = np.argsort(-expected, kind="stable")[:4]
    assert [x["id"] for x in results] == [clip["results"][i]["id"] for i in order]
    np.testing.assert_allclose([x["rerank_score"] for x in results], expected[order], rtol=1e-4, atol=1e-4)
    assert [x["clip_rank"] for x in results] == [int(i) + 1 for i in order]
    assert all(isinstance(x["score"], float) for x in results)


class Busy:
    """A model whose calls last a while and record how many ran at once."""

    source = "busy-model"

    def __init__(self):
        self.running = self.most = 0
        self.guard = threading.Lock()

    def _call(self, result):
        with self.guard:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self.guard:
            self.running -= 1
        return result

    def generate_chats(self, requests):
        return self._call(["answer"] * len(requests))

    def rerank_scores(self, query, images):
        return self._call(np.zeros(len(images)))


def _together(model, calls: int = 3) -> int:
    """Most calls of ``model`` running at once when the assistant and re-ranking call it together."""
    threads = [threading.Thread(target=model.generate_chats, args=([1],)) for _ in range(calls)]
    threads += [threading.Thread(target=model.rerank_scores, args=("q", [1, 2])) for _ in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return model.most if isinstance(model, Busy) else model.model.most


def test_one_model_for_assistant_and_reranking_is_loaded_once_and_taken_in_turns(archive, monkeypatch):
    from astrovl.llava import AstroLLaVA
    from astrovl.serve.models import TakingTurns

    loaded = []
    monkeypatch.setattr(AstroLLaVA, "from_pretrained", classmethod(lambda cls, name, device=None:
                                                                   loaded.append(name) or Busy()))
    app = _app(archive, llava="some/astrollava", rerank="some/astrollava")
    assert loaded == ["some/astrollava"]
    shared = app.state.service.reranker
    assert isinstance(shared, TakingTurns) and app.state.assistant.llava is shared
    assert app.state.assistant.model_id == "some/astrollava"
    assert _together(shared) == 1
    assert _together(Busy()) > 1  # the same calls overlap without turns
    app = _app(archive, llava="some/astrollava", rerank="another/astrollava")  # two models: each its own
    assert loaded[1:] == ["some/astrollava", "another/astrollava"]
    assert isinstance(app.state.service.reranker, Busy) and app.state.assistant.llava is not app.state.service.reranker
    model = Busy()  # one object given twice, as the command line does for one name
    app = _app(archive, llava=model, rerank=model)
    assert app.state.service.reranker.model is model and app.state.assistant.llava is app.state.service.reranker
