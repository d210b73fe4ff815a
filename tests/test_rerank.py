"""Re-ranking CLIP search results with a vision-language model (EmbeddingIndex.search(rerank=...))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex
from astrovl.exceptions import QueryError


class ByNumber:
    """Scores an image by the number in its file name (sky_000007.fits -> 7), records its calls."""

    def __init__(self, sign: float = 1.0):
        self.sign = sign
        self.calls: list[tuple[str, list[str]]] = []

    def rerank_scores(self, query, images):
        self.calls.append((query, list(images)))
        return np.array([self.sign * int(Path(p).name.split("_")[1].split(".")[0]) for p in images], float)


@pytest.fixture(scope="module")
def embedder():
    return CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    from astrovl.datasets import SyntheticSkyDataset

    return SyntheticSkyDataset.generate(tmp_path_factory.mktemp("sky"), n_images=30, image_size=32, seed=4,
                                        val_fraction=0.0, progress=False)


@pytest.fixture(scope="module")
def saved_index(tmp_path_factory, embedder, sky):
    """An index naming its images relative to the folder above it, saved and loaded again."""
    root = sky.root
    meta = Table({"path": [str(Path(root.name) / p) for p in sky.manifest["image"]],
                  "label": [str(x) for x in sky.manifest["label"]]})
    index = EmbeddingIndex.build(embedder, sky.image_paths, metadata=meta, progress=False)
    directory = root.parent / "index"
    index.save(directory)
    return EmbeddingIndex.load(directory, embedder=embedder)


def test_rerank_order_follows_the_model(saved_index):
    model = ByNumber()
    clip = saved_index.search("a spiral galaxy", k=12)
    hits = saved_index.search("a spiral galaxy", k=5, rerank=model, rerank_top=12)
    # one call, CLIP's best 12 images in CLIP's order, found under the index's folder
    assert len(model.calls) == 1
    query, images = model.calls[0]
    assert query == "a spiral galaxy"
    assert [Path(p).name for p in images] == [Path(p).name for p in clip["path"]]
    assert all(Path(p).is_file() for p in images)
    # the 5 best of them by the model's score, best first, with both scores
    expected = sorted(clip, key=lambda r: -int(Path(r["path"]).name[4:10]))[:5]
    assert list(hits["row"]) == [int(r["row"]) for r in expected]
    assert hits.colnames[:5] == ["rank", "rerank_score", "score", "clip_rank", "row"]
    assert list(hits["rank"]) == [1, 2, 3, 4, 5]
    assert np.all(np.diff(hits["rerank_score"]) < 0)
    np.testing.assert_allclose(hits["rerank_score"], [int(Path(p).name[4:10]) for p in hits["path"]])
    by_row = {int(r["row"]): r for r in clip}
    for r in hits:
        assert r["clip_rank"] == by_row[int(r["row"])]["rank"]
        assert r["score"] == pytest.approx(float(by_row[int(r["row"])]["score"]))
        assert r["label"] == by_row[int(r["row"])]["label"]
    # the opposite scores give the opposite order
    low = saved_index.search("a spiral galaxy", k=5, rerank=ByNumber(-1.0), rerank_top=12)
    assert list(low["row"]) == [int(r["row"]) for r in sorted(clip, key=lambda r: int(r["path"][-11:-5]))[:5]]


def test_rerank_bounds_of_k_and_top(saved_index):
    n = len(saved_index)
    model = ByNumber()
    # rerank_top beyond the index: every row is a candidate
    hits = saved_index.search("a nebula", k=3, rerank=model, rerank_top=10 * n)
    assert len(model.calls[-1][1]) == n and len(hits) == 3
    # default: max(k, 50) candidates, here all 30
    saved_index.search("a nebula", k=2, rerank=model)
    assert len(model.calls[-1][1]) == n
    # k = rerank_top: the same rows as CLIP, re-ordered
    clip = saved_index.search("a nebula", k=7)
    hits = saved_index.search("a nebula", k=7, rerank=model, rerank_top=7)
    assert sorted(hits["row"]) == sorted(clip["row"]) and list(hits["clip_rank"]) != list(range(1, 8))
    # only the allowed rows are candidates
    rows = np.arange(0, n, 3)
    hits = saved_index.search("a nebula", k=4, rerank=model, rerank_top=8, rows=rows)
    assert len(model.calls[-1][1]) == 8 and set(hits["row"]) <= set(rows)
    with pytest.raises(ValueError, match="rerank_top=3 is smaller than k=4"):
        saved_index.search("a nebula", k=4, rerank=model, rerank_top=3)
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        saved_index.search("a nebula", k=0, rerank=model, rerank_top=3)


def test_rerank_errors(saved_index, embedder, sky, tmp_path):
    with pytest.raises(ValueError, match="rerank_top= goes with rerank="):
        saved_index.search("a nebula", k=3, rerank_top=10)
    with pytest.raises(TypeError, match="rerank_scores"):
        saved_index.search("a nebula", k=3, rerank=object())
    with pytest.raises(TypeError, match="give a text"):
        saved_index.search(np.zeros(saved_index.dim, np.float32) + 1, k=3, rerank=ByNumber())
    # an index of vectors without its model cannot embed the text query
    bare = EmbeddingIndex(saved_index.dim)
    bare.add(saved_index.vectors, saved_index.metadata)
    with pytest.raises(ValueError, match="needs the index's embedder"):
        bare.search("a nebula", k=3, rerank=ByNumber())
    # metadata that names no image files
    nameless = EmbeddingIndex(saved_index.dim, embedder=embedder)
    nameless.add(saved_index.vectors, Table({"label": saved_index.metadata["label"]}))
    with pytest.raises(QueryError, match="none of the columns"):
        nameless.search("a nebula", k=3, rerank=ByNumber())
    # a file that is not there any more
    gone = EmbeddingIndex(saved_index.dim, embedder=embedder)
    gone.add(saved_index.vectors, Table({"path": [str(tmp_path / f"sky_{i:06d}.fits")
                                                  for i in range(len(saved_index))]}))
    with pytest.raises(QueryError, match="was not found"):
        gone.search("a nebula", k=3, rerank=ByNumber(), rerank_top=5)
    # a model that answers with the wrong number of scores
    class Short:
        def rerank_scores(self, query, images):
            return np.zeros(len(images) - 1)

    with pytest.raises(ValueError, match="returned 4 scores for 5 images"):
        saved_index.search("a nebula", k=3, rerank=Short(), rerank_top=5)


def test_astrollava_rerank_scores_match_its_score(tmp_path, sky):
    """One vision pass per image, batched: the same numbers as scoring each image on its own."""
    pytest.importorskip("transformers")
    from astrovl.llava import AstroLLaVA
    from astrovl.testing.llava import make_tiny_llava

    model = AstroLLaVA.from_pretrained(make_tiny_llava(tmp_path / "tiny"), device="cpu")
    images = sky.image_paths[:5]
    query = "A barred spiral galaxy."
    got = model.rerank_scores(query, images, batch_size=2)
    assert got.shape == (5,) and np.isfinite(got).all()
    single = [model._score_unbatched(img, [query])[0] for img in images]
    np.testing.assert_allclose(got, single, rtol=1e-4, atol=1e-4)
    assert len(set(np.round(got, 6))) > 1  # the image matters
    with pytest.raises(ValueError, match="empty"):
        model.rerank_scores(query, [])
    with pytest.raises(ValueError, match="text is empty"):
        model.rerank_scores("  ", images)
