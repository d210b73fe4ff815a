"""Archive scale: IVF-PQ with exact re-ranking, indexes from embedding files, out-of-core memory,
serving from memory maps, growing every kind, crash-safe adds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from astropy.table import Table

from astrovl.cli import main
from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex
from astrovl.clip.archive import read_vector_files
from astrovl.testing.clip import clustered_unit_vectors, write_vector_shards


@pytest.fixture(scope="module")
def data():
    """20k clustered 64-d unit vectors, 100 queries from the same clusters, exact top 10."""
    base = clustered_unit_vectors(20_000, 64, n_clusters=64, seed=1)
    queries = clustered_unit_vectors(100, 64, n_clusters=64, seed=2)
    truth = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :10]
    return base, queries, truth


def _recall(index, queries, truth, **kw) -> float:
    return float(np.mean([len(set(index.search(q, k=10, **kw)["row"]) & set(t)) / 10
                          for q, t in zip(queries, truth)]))


@pytest.fixture(scope="module")
def ivfpq(data):
    index = EmbeddingIndex(64, kind="ivfpq")
    index.add(data[0])
    return index


def test_ivfpq_reranks_exactly_to_high_recall(ivfpq, data):
    base, queries, truth = data
    assert _recall(ivfpq, queries, truth) >= 0.9  # defaults
    q, t = queries[:30], truth[:30]
    assert _recall(ivfpq, q, t, rerank_depth=10) < _recall(ivfpq, q, t, rerank_depth=400)
    assert _recall(ivfpq, q, t, nprobe=1) < _recall(ivfpq, q, t, nprobe=64)
    hit = ivfpq.search(queries[0], k=5)
    np.testing.assert_allclose(hit["score"], base[hit["row"]] @ queries[0], rtol=1e-5)  # exact scores
    assert ivfpq.params["pq_m"] == 8 and ivfpq.params["nlist"] == 141
    exact = EmbeddingIndex(64)
    exact.add(base[:100])
    with pytest.raises(ValueError, match="rerank_depth does not apply"):
        exact.search(queries[0], rerank_depth=5)


def test_ivfpq_saves_maps_and_grows(ivfpq, data, tmp_path):
    base, queries, truth = data
    ivfpq.save(tmp_path / "pq")
    loaded = EmbeddingIndex.load(tmp_path / "pq")
    assert isinstance(loaded._vec.chunks[0], np.memmap) and loaded._faiss_file is not None  # mapped from disk
    for q in queries[:10]:
        assert list(loaded.search(q, k=10)["row"]) == list(ivfpq.search(q, k=10)["row"])
    filtered = loaded.search(queries[0], k=5, rows=np.arange(0, 20_000, 2))
    assert len(filtered) == 5 and (filtered["row"] % 2 == 0).all()
    extra = clustered_unit_vectors(50, 64, n_clusters=64, seed=3)
    loaded.add(extra)  # read into memory to grow; the file on disk stays as it was
    assert loaded.search(extra[7], k=1)["row"][0] == 20_007
    loaded.save(tmp_path / "pq")
    again = EmbeddingIndex.load(tmp_path / "pq")
    assert len(again) == 20_050 and again.search(extra[7], k=1)["row"][0] == 20_007


def test_float16_storage_and_opq(data, tmp_path):
    base, queries, truth = data
    index = EmbeddingIndex(64, kind="ivfpq", vector_dtype="float16")
    index.add(base)
    assert index.vectors.dtype == np.float16
    assert _recall(index, queries, truth) >= 0.9
    index.save(tmp_path / "f16")
    assert (tmp_path / "f16" / "vectors.safetensors").stat().st_size < base.nbytes * 0.51
    loaded = EmbeddingIndex.load(tmp_path / "f16")
    assert loaded.vectors.dtype == np.float16
    hit = loaded.search(queries[3], k=3)
    np.testing.assert_allclose(hit["score"], base[hit["row"]] @ queries[3], atol=2e-3)
    small = clustered_unit_vectors(400, 16, n_clusters=8, seed=5)  # OPQ trains slowly: a small set
    rotated = EmbeddingIndex(16, kind="ivfpq", opq=True, nlist=2, nprobe=2, pq_m=4)
    rotated.add(small)
    rotated.save(tmp_path / "opq")
    rotated = EmbeddingIndex.load(tmp_path / "opq")
    assert rotated.params["opq"] and type(rotated._structure()).__name__ == "IndexPreTransform"
    hits = rotated.search(small[0], k=5, rows=np.arange(0, 400, 3), rerank_depth=400)
    assert list(hits["row"]) == list(np.argsort(-(small[::3] @ small[0]), kind="stable")[:5] * 3)
    flat = EmbeddingIndex(64, vector_dtype="float16")
    flat.add(base)
    assert _recall(flat, queries, truth) >= 0.98  # exact search over float16 vectors


@pytest.mark.parametrize("kind", ["exact", "ivf", "ivfpq"])
def test_build_vectors_from_npy_files(kind, data, tmp_path, capsys):
    base, queries, truth = data
    parts = [base[:7_000], base[7_000:15_000].astype(np.float16), base[15_000:]]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"emb-{i}.npy")
        np.save(paths[-1], part * 3)  # not unit: normalised when indexed
        table = Table({"obs_id": [f"o{i}-{j}" for j in range(len(part))]})
        if i == 1:
            table.write(tmp_path / f"emb-{i}.parquet")
        else:
            table.write(tmp_path / f"emb-{i}.ecsv")
    argv = ["index", "build-vectors", *map(str, paths), "--index", str(tmp_path / "idx")]
    assert main(argv + (["--approximate", kind] if kind != "exact" else [])) == 0
    assert "20000 vectors" in capsys.readouterr().out
    index = EmbeddingIndex.load(tmp_path / "idx")
    assert index.kind == kind and len(index) == 20_000
    np.testing.assert_allclose(index.vectors, base, atol=1e-3)
    assert index.metadata["obs_id"][7_000] == "o1-0" and index.metadata["obs_id"][-1] == "o2-4999"
    assert _recall(index, queries, truth) >= 0.9


def test_build_vectors_records_the_model_and_checks_inputs(tmp_path, capsys):
    model = tmp_path / "tiny"
    emb = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
    emb.save_pretrained(model)
    vectors = emb.embed_text(["a spiral galaxy", "a globular cluster", "a nebula"])
    np.save(tmp_path / "v.npy", vectors)
    assert main(["index", "build-vectors", str(tmp_path / "v.npy"), "--index", str(tmp_path / "i"),
                 "--model", str(model), "--approximate", "hnsw"]) == 0
    index = EmbeddingIndex.load(tmp_path / "i")
    assert index.model_info["digest"] == emb.weights_digest and index.kind == "hnsw"
    assert index.search("a globular cluster", k=1)["row"][0] == 1  # text search loads the recorded model
    assert list(index.metadata.colnames) == ["file", "file_row"]
    np.save(tmp_path / "bad.npy", np.ones((3, 8), dtype=np.int32))
    with pytest.raises(ValueError, match="float32 or float16"):
        read_vector_files([tmp_path / "bad.npy"])
    np.save(tmp_path / "narrow.npy", np.ones((3, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="all embedding files must come from one model"):
        read_vector_files([tmp_path / "v.npy", tmp_path / "narrow.npy"])
    Table({"a": [1, 2]}).write(tmp_path / "narrow.ecsv")
    with pytest.raises(ValueError, match="has 2 rows"):
        read_vector_files([tmp_path / "narrow.npy"])
    np.save(tmp_path / "nan.npy", np.full((2, 64), np.nan, dtype=np.float32))
    assert main(["index", "build-vectors", str(tmp_path / "nan.npy"), "--index", str(tmp_path / "n")]) == 1
    assert "vector 0 contains NaN" in capsys.readouterr().err
    assert not (tmp_path / "n").exists() or not any((tmp_path / "n").iterdir())
    (tmp_path / "narrow.ecsv").unlink()
    assert main(["index", "build-vectors", str(tmp_path / "narrow.npy"), "--index", str(tmp_path / "m"),
                 "--model", str(model)]) == 1
    assert "64-d" in capsys.readouterr().err


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from astrovl.clip.archive import build_from_vector_files
    import faiss, astropy.table  # imports count in the baseline

    def status(key):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    cfg = json.loads(sys.argv[1])
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    base = status("VmRSS")
    build_from_vector_files(cfg["paths"], cfg["out"], kind=cfg["kind"], nlist=64, train_sample=20_000,
                            progress=False, **cfg["params"])
    print(json.dumps({"base_kib": base, "peak_kib": status("VmHWM")}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("kind, params", [("ivfpq", {"pq_m": 16}), ("ivf", {})])
def test_out_of_core_build_stays_within_a_memory_budget(kind, params, tmp_path):
    """250k x 256 float32 (244 MiB of vectors) build in clearly less extra memory than the vectors take.

    The growth is one chunk of 32 MiB with its copies, the training sample, the codes (``ivfpq``) or
    the cell of each row (``ivf``, whose lists faiss would hold: 252 MiB) and the metadata table
    (two columns of 250k rows, written as ECSV), about 150 MiB here."""
    paths = write_vector_shards(tmp_path / "shards", 250_000, 256, shard_rows=100_000, n_clusters=64)
    vector_bytes = 250_000 * 256 * 4
    cfg = {"paths": list(map(str, paths)), "out": str(tmp_path / "idx"), "kind": kind, "params": params}
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, json.dumps(cfg)],
                         capture_output=True, text=True, check=True, timeout=300)
    mem = json.loads(res.stdout.strip().splitlines()[-1])
    grown = (mem["peak_kib"] - mem["base_kib"]) * 1024
    assert 0 < grown < 0.8 * vector_bytes, (grown / 2**20, mem)
    index = EmbeddingIndex.load(tmp_path / "idx")
    assert len(index) == 250_000 and index.kind == kind
    q = np.array(np.load(paths[1], mmap_mode="r")[123])  # a stored vector finds itself first
    assert index.search(q, k=1)["row"][0] == 100_123


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf", "ivfpq"])
def test_index_add_grows_every_kind_and_a_crash_leaves_the_index(kind, tmp_path, m13_path, ngc1316_path,
                                                                  dss_path, monkeypatch, capsys):
    model = tmp_path / "tiny"
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0).save_pretrained(model)
    idx = tmp_path / "idx"
    flags = ["--approximate", kind] if kind != "exact" else []
    assert main(["index", "build", str(m13_path), str(ngc1316_path), "--index", str(idx), "--model", str(model),
                 *flags]) == 0
    before = {p.name: p.read_bytes() for p in idx.iterdir() if p.is_file()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:  # a failure while the new files are written
        m.setattr(Table, "write", crash)
        assert main(["index", "add", str(dss_path), "--index", str(idx)]) == 1
    assert "disk full" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in idx.iterdir() if p.is_file()} == before  # untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")] == []  # no leftovers
    assert main(["index", "add", str(dss_path), "--index", str(idx)]) == 0
    grown = EmbeddingIndex.load(idx)
    assert len(grown) == 3 and grown.kind == kind
    assert grown.search(grown.vectors[2].astype(np.float32), k=1)["row"][0] == 2
    if kind != "exact":
        assert grown._faiss.ntotal == 3  # the stored structure was extended, not rebuilt from nothing


def test_cli_states_the_library_rerank_depth(capsys):
    from astrovl.clip import faiss_structures as fs

    with pytest.raises(SystemExit):
        main(["index", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"re-scores exactly per query (default {fs.DEFAULT_RERANK_DEPTH}, or one per 6,000 vectors" in text
    assert fs.RERANK_ROWS_PER_CANDIDATE == 6_000


def test_default_rerank_depth_follows_the_index_size():
    from astrovl.clip import faiss_structures as fs

    assert [fs.default_rerank_depth(n) for n in (0, 2_000_000, 3_072_001, 10_000_000)] == [512, 512, 513, 1_667]
    grows = EmbeddingIndex(8, kind="ivfpq")
    assert grows.params["rerank_depth"] is None  # not fixed: follows len(index)
    assert grows._rerank_depth(None, 10) == 512 and grows._rerank_depth(None, 600) == 600
    grows._vec.append(np.zeros((6_000_000, 1), dtype=np.float32))  # only its length matters here
    assert len(grows) == 6_000_000 and grows._rerank_depth(None, 10) == 1_000
    fixed = EmbeddingIndex(8, kind="ivfpq", rerank_depth=300)
    assert fixed._rerank_depth(None, 10) == 300 and fixed._rerank_depth(40, 10) == 40


def test_search_defaults_are_set_once_kept_when_saved_and_taken_by_serve(ivfpq, data, tmp_path, monkeypatch,
                                                                         capsys):
    import astrovl.serve.app as app_module

    _, queries, truth = data
    ivfpq.save(tmp_path / "pq")
    index = EmbeddingIndex.load(tmp_path / "pq")
    narrow = [list(index.search(q, k=10, nprobe=1, rerank_depth=10)["row"]) for q in queries[:20]]
    index.set_search_defaults(nprobe=1, rerank_depth=10)
    assert [list(index.search(q, k=10)["row"]) for q in queries[:20]] == narrow
    assert _recall(index, queries, truth) < _recall(ivfpq, queries, truth)
    index.save(tmp_path / "narrow")
    again = EmbeddingIndex.load(tmp_path / "narrow")
    assert again.params["nprobe"] == 1 and again.params["rerank_depth"] == 10
    assert [list(again.search(q, k=10)["row"]) for q in queries[:20]] == narrow
    for bad, match in (({"ef_search": 5}, "ef_search does not apply to an index of kind 'ivfpq'"),
                       ({"nprobe": 0}, "nprobe=0 must be >= 1"), ({"rerank_depth": 0}, "rerank_depth=0")):
        with pytest.raises(ValueError, match=match):
            index.set_search_defaults(**bad)
    assert index.params["nprobe"] == 1  # a refused setting changes nothing
    with pytest.raises(ValueError, match="rerank_depth does not apply"):
        EmbeddingIndex(8, kind="ivf").set_search_defaults(rerank_depth=5)

    pytest.importorskip("starlette")
    runs = []
    monkeypatch.setattr(app_module, "run_app", lambda app, host, port, **kw: runs.append(app))
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0).save_pretrained(tmp_path / "tiny")  # 64-d, as the index
    serve = ["serve", str(tmp_path / "pq"), "--model", str(tmp_path / "tiny")]
    assert main([*serve, "--nprobe", "1", "--rerank-depth", "10"]) == 0
    served = runs[-1].state.service.index
    assert served.params["nprobe"] == 1 and served.params["rerank_depth"] == 10
    assert main([*serve, "--ef-search", "5"]) == 1
    assert "ef_search does not apply" in capsys.readouterr().err
    assert main([*serve, "--nprobe", "0"]) == 1
    assert "nprobe=0 must be >= 1" in capsys.readouterr().err
