"""Out-of-core ``"ivf"`` files: the bytes faiss itself writes, built and grown without holding the lists."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from astrovl.clip import EmbeddingIndex
from astrovl.clip import faiss_structures as fs
from astrovl.clip.archive import build_from_vector_files
from astrovl.clip.ivf_file import GrownStructure, assign, write_from_lists, write_from_rows
from astrovl.testing.clip import clustered_unit_vectors


@pytest.fixture(scope="module")
def vectors():
    return clustered_unit_vectors(6_000, 32, n_clusters=16, seed=3)


def _trained(vectors, nlist):
    params = {**fs.default_params(), "nlist": nlist, "nprobe": 8}
    structure = fs.new_structure("ivf", vectors.shape[1], params, len(vectors))
    fs.train_on(structure, vectors[:2_000])
    return structure


def _blocks(rows, sizes):
    start = 0
    for size in sizes:
        yield rows[start:start + size]
        start += size


def test_file_from_rows_is_the_file_faiss_writes(vectors, tmp_path):
    """Blocks of uneven sizes, placed cell by cell, give faiss's own bytes, and faiss maps them."""
    structure = _trained(vectors, nlist=40)
    reference = faiss.clone_index(structure)
    reference.add(vectors)  # faiss holds every list in memory
    path = tmp_path / "ivf.faiss"
    write_from_rows(path, structure, assign(structure, vectors), _blocks(vectors, [1, 999, 2_500, 2_500]))
    assert path.read_bytes() == faiss.serialize_index(reference).tobytes()
    mapped = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    d_ref, i_ref = reference.search(vectors[:20], 10)
    d_map, i_map = mapped.search(vectors[:20], 10)
    np.testing.assert_array_equal(i_map, i_ref)
    np.testing.assert_array_equal(d_map, d_ref)
    assert structure.ntotal == 0  # the structure given is left without vectors


def test_file_with_mostly_empty_cells_reads_back(vectors, tmp_path):
    """100 rows over 400 cells: faiss would list the sizes sparsely; the full list reads the same."""
    structure = _trained(vectors, nlist=400)
    cells = assign(structure, vectors[:100])
    assert len(np.unique(cells)) < 200
    write_from_rows(tmp_path / "ivf.faiss", structure, cells, [vectors[:100]])
    reference = faiss.clone_index(structure)
    reference.add(vectors[:100])
    read = faiss.read_index(str(tmp_path / "ivf.faiss"))
    for cell in range(400):
        assert read.invlists.list_size(cell) == reference.invlists.list_size(cell)
    np.testing.assert_array_equal(read.search(vectors[:30], 5)[1], reference.search(vectors[:30], 5)[1])


def test_file_refuses_rows_that_do_not_match_the_cells(vectors, tmp_path):
    structure = _trained(vectors, nlist=8)
    cells = assign(structure, vectors[:100])
    with pytest.raises(ValueError, match="more rows than the 100 cells"):
        write_from_rows(tmp_path / "a", structure, cells, [vectors[:101]])
    with pytest.raises(ValueError, match="99 rows were given for 100 cells"):
        write_from_rows(tmp_path / "b", structure, cells, [vectors[:99]])
    with pytest.raises(ValueError, match="does not fit a structure of dimension 32"):
        write_from_rows(tmp_path / "c", structure, cells, [vectors[:100, :16]])


def test_mapped_structure_grows_without_reading_its_lists(vectors, tmp_path):
    structure = _trained(vectors, nlist=40)
    write_from_rows(tmp_path / "ivf.faiss", structure, assign(structure, vectors[:4_000]), [vectors[:4_000]])
    mapped = faiss.read_index(str(tmp_path / "ivf.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    grown = GrownStructure(mapped)
    grown.add(vectors[4_000:5_000])
    grown.add(vectors[5_000:])
    reference = faiss.clone_index(structure)
    reference.add(vectors)
    assert mapped.ntotal == 6_000
    selector = faiss.SearchParametersIVF(nprobe=8, sel=faiss.IDSelectorRange(3_500, 4_500))
    for params in (None, selector):  # row filters reach both the mapped lists and the new ones
        np.testing.assert_array_equal(mapped.search(vectors[::97], 10, params=params)[1],
                                      reference.search(vectors[::97], 10, params=params)[1])
    write_from_lists(tmp_path / "grown.faiss", mapped)
    assert (tmp_path / "grown.faiss").read_bytes() == faiss.serialize_index(reference).tobytes()


def test_index_built_out_of_core_equals_one_built_in_memory(vectors, tmp_path):
    """``build_from_vector_files(kind="ivf")`` against ``EmbeddingIndex`` holding its structure in memory;
    then ``add`` to the mapped index, saved in place and loaded again."""
    paths = []
    for i, part in enumerate(np.array_split(vectors[:5_000], 3)):
        paths.append(tmp_path / f"part-{i}.npy")
        np.save(paths[-1], part)
    build_from_vector_files(paths, tmp_path / "idx", kind="ivf", nlist=40, progress=False)
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    memory = EmbeddingIndex(32, kind="ivf", nlist=40)
    memory.add(vectors[:5_000])
    memory._structure()  # trained on the same first rows, as the build samples all 5,000
    queries = clustered_unit_vectors(20, 32, n_clusters=16, seed=4)
    for q in queries:
        assert list(loaded.search(q, k=10)["row"]) == list(memory.search(q, k=10)["row"])
    on_disk = (tmp_path / "idx" / "index.faiss").read_bytes()
    loaded.add(vectors[5_000:])
    memory.add(vectors[5_000:])
    assert loaded._faiss.ntotal == 6_000 and (tmp_path / "idx" / "index.faiss").read_bytes() == on_disk
    only = {"row": np.arange(4_900, 5_100)}
    for q in queries[:5]:
        assert list(loaded.search(q, k=10)["row"]) == list(memory.search(q, k=10)["row"])
        assert set(loaded.search(q, k=5, rows=only["row"])["row"]) <= set(only["row"])
    loaded.save(tmp_path / "idx")
    again = EmbeddingIndex.load(tmp_path / "idx")
    assert again._faiss.ntotal == 6_000 and again._faiss_file is not None
    assert again.search(vectors[5_500], k=1)["row"][0] == 5_500
