import json

import numpy as np
import pytest
from astropy.table import Table

from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex
from astrovl.clip.sharded import local_cluster
from astrovl.exceptions import CheckpointError, IndexMismatchError


@pytest.fixture(scope="module")
def embedder():
    return CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_search_agrees_with_numpy():
    rng = np.random.default_rng(0)
    vec = _unit(rng.normal(size=(500, 32)).astype(np.float32))
    idx = EmbeddingIndex(32)
    idx.add(vec, {"name": [f"v{i}" for i in range(500)]})
    q = _unit(rng.normal(size=(1, 32)).astype(np.float32))[0]
    res = idx.search(q, k=10)
    expected = np.argsort(-(vec @ q))[:10]
    np.testing.assert_array_equal(res["row"], expected)
    np.testing.assert_allclose(res["score"], (vec @ q)[expected], rtol=1e-5)
    assert list(res["name"]) == [f"v{i}" for i in expected]


def test_hnsw_recall_on_20k_with_modality_gap():
    kind = "hnsw"
    rng = np.random.default_rng(1)
    dim = 64
    vec = _unit(rng.normal(size=(20_000, dim)).astype(np.float32))
    # text-like queries: near some image vectors but shifted by a common offset (modality gap)
    gap = _unit(rng.normal(size=(1, dim)).astype(np.float32)) * 0.8
    targets = vec[rng.choice(len(vec), 50, replace=False)]
    queries = _unit(targets + 0.5 * rng.normal(size=targets.shape).astype(np.float32) / np.sqrt(dim) + gap)
    exact = EmbeddingIndex(dim)
    exact.add(vec)
    approx = EmbeddingIndex(dim, kind=kind)
    approx.add(vec)
    recalls = []
    for q in queries:
        a = set(exact.search(q, k=10)["row"])
        b = set(approx.search(q, k=10)["row"])
        recalls.append(len(a & b) / 10)
    assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_ivf_recall_for_same_modality_queries():
    rng = np.random.default_rng(2)
    vec = _unit(rng.normal(size=(5_000, 32)).astype(np.float32))
    exact, approx = EmbeddingIndex(32), EmbeddingIndex(32, kind="ivf", nlist=50, nprobe=25)
    exact.add(vec)
    approx.add(vec)
    queries = _unit(vec[:40] + 0.05 * rng.normal(size=(40, 32)).astype(np.float32))
    recalls = [len(set(exact.search(q, k=10)["row"]) & set(approx.search(q, k=10)["row"])) / 10
               for q in queries]
    assert np.mean(recalls) >= 0.95


def test_build_search_save_load_round_trip(embedder, tmp_path, m13_path, ngc1316_path, dss_path):
    images = [m13_path, ngc1316_path, dss_path]
    meta = Table({"path": [str(p) for p in images], "target": ["M13", "NGC 1316", "DSS"]})
    idx = EmbeddingIndex.build(embedder, images, metadata=meta, progress=False)
    assert len(idx) == 3
    hit = idx.search(ngc1316_path, k=1)
    assert hit["target"][0] == "NGC 1316"
    assert hit["score"][0] == pytest.approx(1.0, abs=1e-4)
    # a string naming an existing image file is an image query, not text
    as_str = idx.search(str(ngc1316_path), k=1)
    assert as_str["target"][0] == "NGC 1316" and as_str["score"][0] == pytest.approx(1.0, abs=1e-4)
    text_hits = idx.search("a globular cluster", k=3)
    assert len(text_hits) == 3 and set(text_hits["target"]) == {"M13", "NGC 1316", "DSS"}
    idx.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["count"] == 3 and manifest["dim"] == 64 and manifest["model_id"] == embedder.model_id
    again = EmbeddingIndex.load(tmp_path / "idx", embedder=embedder)
    np.testing.assert_array_equal(again.vectors, idx.vectors)
    res = again.search("a globular cluster", k=3)
    np.testing.assert_array_equal(res["row"], text_hits["row"])
    # vector-only use without an embedder
    bare = EmbeddingIndex.load(tmp_path / "idx")
    assert bare.search(idx.vectors[2], k=1)["target"][0] == "DSS"
    with pytest.raises(ValueError, match="embedder"):
        bare.search("text query")


def test_default_metadata_and_add(embedder, m13_path):
    idx = EmbeddingIndex.build(embedder, [m13_path], progress=False)
    assert idx.metadata["source"][0] == str(m13_path)
    idx.add(embedder.embed_images([np.ones((16, 16))], progress=False), {"source": ["flat"]})
    assert len(idx) == 2


def test_errors(embedder, tmp_path, m13_path):
    with pytest.raises(ValueError, match="empty"):
        EmbeddingIndex.build(embedder, [], progress=False)
    idx = EmbeddingIndex(64)
    with pytest.raises(IndexMismatchError, match="dimension"):
        idx.add(np.ones((2, 10)))
    with pytest.raises(ValueError, match="metadata has 2 rows"):
        EmbeddingIndex.build(embedder, [m13_path], metadata={"a": [1, 2]}, progress=False)
    with pytest.raises(ValueError, match="empty"):
        EmbeddingIndex(64).search(np.ones(64))
    built = EmbeddingIndex.build(embedder, [m13_path], progress=False)
    built.save(tmp_path / "ok")
    other = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=1)
    with pytest.raises(IndexMismatchError, match="built with model"):
        EmbeddingIndex.load(tmp_path / "ok", embedder=other)
    small = dict(TINY_CLIP_CONFIG, embed_dim=32)
    with pytest.raises(IndexMismatchError, match="32-d"):
        EmbeddingIndex.load(tmp_path / "ok", embedder=CLIPEmbedder.from_config(small))
    with pytest.raises(CheckpointError, match="not an astrovl embedding index"):
        EmbeddingIndex.load(tmp_path / "missing")
    (tmp_path / "ok" / "vectors.safetensors").write_bytes(b"\x00\x01broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        EmbeddingIndex.load(tmp_path / "ok")


def test_sharded_build_on_local_cluster_matches(embedder, tmp_path, m13_path, ngc1316_path, dss_path):
    distributed = pytest.importorskip("distributed")
    images = [str(m13_path), str(ngc1316_path), str(dss_path)] * 2
    single = EmbeddingIndex.build(embedder, images, progress=False)
    with local_cluster(2) as cluster, distributed.Client(cluster) as client:
        sharded = EmbeddingIndex.build(embedder, images, client=client, shard_size=2, progress=False)
    np.testing.assert_allclose(sharded.vectors, single.vectors, atol=1e-5)
    assert list(sharded.metadata["source"]) == list(single.metadata["source"])


def test_search_breadth_can_be_set_per_call():
    rng = np.random.default_rng(5)
    vec = _unit(rng.normal(size=(8_000, 64)).astype(np.float32))
    queries = _unit(rng.normal(size=(30, 64)).astype(np.float32))
    exact = EmbeddingIndex(64)
    exact.add(vec)
    truth = [set(exact.search(q, k=10)["row"]) for q in queries]

    def recall(index, **kw):
        return np.mean([len(t & set(index.search(q, k=10, **kw)["row"])) / 10
                        for q, t in zip(queries, truth)])

    hnsw = EmbeddingIndex(64, kind="hnsw", hnsw_m=8, ef_construction=40, ef_search=16)
    hnsw.add(vec)
    narrow, wide = recall(hnsw, ef_search=10), recall(hnsw, ef_search=1_000)
    assert narrow < 0.6 < 0.9 <= wide, (narrow, wide)
    assert recall(hnsw) < wide  # the override does not stick
    ivf = EmbeddingIndex(64, kind="ivf", nlist=64, nprobe=4)
    ivf.add(vec)
    assert recall(ivf, nprobe=1) < recall(ivf) < recall(ivf, nprobe=64) == 1.0
    with pytest.raises(ValueError, match="nprobe does not apply"):
        hnsw.search(queries[0], nprobe=4)
    with pytest.raises(ValueError, match="ef_search does not apply"):
        exact.search(queries[0], ef_search=4)
    with pytest.raises(ValueError, match="must be >= 1"):
        ivf.search(queries[0], nprobe=0)


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_search_restricted_to_rows(kind):
    from astropy.table import Table

    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(400, 16)).astype(np.float32)
    meta = Table({"kind": ["a", "b"] * 200, "n": np.arange(400) % 7})
    index = EmbeddingIndex(16, kind=kind)
    index.add(vectors, meta)
    rows = index.rows_where({"kind": "b", "n": [3, "4"]})
    assert len(rows) and all(meta["kind"][rows] == "b") and set(meta["n"][rows]) <= {3, 4}
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = unit[5]
    expected = rows[np.argsort(-(unit[rows] @ q))[:5]]
    np.testing.assert_array_equal(index.search(q, k=5, rows=rows)["row"], expected)
    mask = np.zeros(len(index), dtype=bool)
    mask[rows] = True
    np.testing.assert_array_equal(index.search(q, k=5, rows=mask)["row"], expected)
    assert len(index.search(q, k=5, rows=rows[:2])) == 2  # fewer allowed rows than k
    assert len(index.search(q, k=5, rows=np.zeros(len(index), dtype=bool))) == 0
    with pytest.raises(ValueError, match="0..399"):
        index.search(q, rows=[400])
    with pytest.raises(ValueError, match="one entry per row"):
        index.search(q, rows=np.ones(3, dtype=bool))
    with pytest.raises(KeyError, match="no column 'telescope'"):
        index.rows_where({"telescope": "HST"})
