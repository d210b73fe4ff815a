"""The index keeps its vectors once, appends without copying everything, and finds the same rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table

from astrovl.clip import EmbeddingIndex
from astrovl.clip.chunks import ChunkedRows


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _reference(vectors, q, k):
    """The former implementation: one faiss IndexFlatIP over all vectors."""
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(q[None, :], k)


def test_appends_are_amortised_and_exact():
    copies = []

    def concat(parts):
        copies.append(sum(len(p) for p in parts))
        return np.concatenate(parts)

    rows = ChunkedRows(concat)
    n = 3000
    for i in range(n):
        rows.append(np.full((1, 2), i))
        assert len(rows.chunks) <= math.log2(i + 1) + 1
    assert sum(copies) <= n * math.log2(n)  # each row copied O(log n) times, not O(n)
    assert sum(len(c) for c in rows.chunks) == n  # no spare capacity
    picked = rows.take([2999, 0, 1500, 7])
    assert picked[:, 0].tolist() == [2999, 0, 1500, 7]
    assert rows.compact()[:, 0].tolist() == list(range(n)) and len(rows.chunks) == 1


def test_exact_index_holds_one_copy_and_matches_flat_search(tmp_path):
    rng = np.random.default_rng(0)
    vectors = _unit(rng.normal(size=(2000, 32)))
    index = EmbeddingIndex(32)
    for start in range(0, 2000, 37):  # many small adds: several chunks
        part = vectors[start:start + 37]
        index.add(part, {"name": [f"v{i}" for i in range(start, start + len(part))]})
    assert len(index._vec.chunks) > 1 and index._faiss is None
    assert sum(c.nbytes for c in index._vec.chunks) == vectors.nbytes  # the vectors, once
    vectors = np.concatenate(index._vec.chunks)  # as stored (normalised by add)
    for q in _unit(rng.normal(size=(20, 32))):
        hits = index.search(q, k=15)
        ref_scores, ref_rows = _reference(vectors, q, 15)
        np.testing.assert_array_equal(hits["row"], ref_rows[0])
        np.testing.assert_allclose(hits["score"], ref_scores[0], rtol=1e-6)
        assert list(hits["name"]) == [f"v{r}" for r in ref_rows[0]]
    # saved and loaded (memory-mapped), then extended: the same answers
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert isinstance(loaded._vec.chunks[0], np.memmap)
    np.testing.assert_array_equal(loaded.vectors, vectors)
    extra = _unit(rng.normal(size=(50, 32)))
    loaded.add(extra, {"name": [f"x{i}" for i in range(50)]})
    both = np.concatenate([vectors, extra])
    q = extra[3]
    ref_scores, ref_rows = _reference(both, q, 5)
    hits = loaded.search(q, k=5)
    np.testing.assert_array_equal(hits["row"], ref_rows[0])
    assert hits["name"][0] == "x3"
    in_memory = EmbeddingIndex.load(tmp_path / "idx", mmap=False)
    assert not isinstance(in_memory._vec.chunks[0], np.memmap)
    np.testing.assert_array_equal(in_memory.search(q, k=5)["row"], EmbeddingIndex.load(tmp_path / "idx").search(q, k=5)["row"])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_keep_working_with_chunks(kind, tmp_path):
    rng = np.random.default_rng(1)
    vectors = _unit(rng.normal(size=(3000, 16)))
    index = EmbeddingIndex(16, kind=kind, nlist=16, nprobe=16)
    index.add(vectors[:1000])
    index.search(vectors[0], k=1)  # builds the structure
    index.add(vectors[1000:])  # goes into the built structure
    hits = index.search(vectors[2500], k=1)
    assert hits["row"][0] == 2500 and hits["score"][0] == pytest.approx(1.0, abs=1e-5)
    index.save(tmp_path / kind)
    again = EmbeddingIndex.load(tmp_path / kind)
    assert again.search(vectors[2999], k=1)["row"][0] == 2999


def test_metadata_of_many_adds(tmp_path):
    index = EmbeddingIndex(4)
    for i in range(10):
        index.add(np.eye(4)[[i % 4]] + 0.01 * i, {"n": [i]} if i % 2 else {"n": [i], "extra": ["e"]})
    table = index.metadata
    assert list(table["n"]) == list(range(10)) and len(index._meta.chunks) == 1
    with pytest.raises(ValueError, match="metadata rows"):
        index.metadata = Table({"n": [1]})


def test_rows_are_read_from_the_vectors_file_exactly(tmp_path, monkeypatch):
    """Re-ranking reads scattered rows from the file (no pages mapped): the same values as the map, in the
    order asked (repeats too); a truncated file is an error naming it; without ``preadv``, the map."""
    from astrovl.clip.index_files import VECTORS, map_vectors, read_rows

    vectors = np.random.default_rng(0).standard_normal((500, 24)).astype(np.float16)
    index = EmbeddingIndex(24, vector_dtype="float16")
    index.add(vectors)
    index.save(tmp_path / "idx")
    mapped = map_vectors(tmp_path / "idx" / VECTORS)
    rows = np.array([499, 3, 3, 250, 0, 17])
    np.testing.assert_array_equal(read_rows(mapped, rows), np.asarray(mapped[rows]))
    np.testing.assert_array_equal(read_rows(mapped, rows), index.vectors[rows])
    assert read_rows(mapped, []).shape == (0, 24)
    with monkeypatch.context() as m:
        m.delattr("os.preadv")
        np.testing.assert_array_equal(read_rows(mapped, rows), np.asarray(mapped[rows]))
    size = (tmp_path / "idx" / VECTORS).stat().st_size
    with open(tmp_path / "idx" / VECTORS, "r+b") as fh:
        fh.truncate(size - 10)
    with pytest.raises(OSError, match=r"vectors.safetensors.*row 499 is cut short"):
        read_rows(mapped, [499])
