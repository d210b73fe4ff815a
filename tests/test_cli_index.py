"""`astrovl index` and `astrovl search` with an index that remembers its model."""

from __future__ import annotations

import pytest
from astropy.table import Table

from astrovl.cli import main
from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny"
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0).save_pretrained(path)
    return path


def test_search_and_add_need_no_model(tmp_path, tiny_dir, m13_path, ngc1316_path, dss_path, capsys):
    index = tmp_path / "index"
    assert main(["index", "build", str(m13_path), str(ngc1316_path), "--index", str(index),
                 "--model", str(tiny_dir)]) == 0
    assert main(["search", str(index), "globular cluster", "-k", "2", "-o", str(tmp_path / "h.ecsv")]) == 0
    assert len(Table.read(tmp_path / "h.ecsv")) == 2
    assert main(["index", "add", str(dss_path), "--index", str(index)]) == 0
    loaded = EmbeddingIndex.load(index)
    assert len(loaded) == 3 and list(loaded.metadata["path"])[-1] == str(dss_path)
    assert main(["search", str(index), "--image", str(dss_path), "-k", "1", "--format", "csv"]) == 0
    rank, score, row, path = capsys.readouterr().out.strip().splitlines()[-1].split(",")[:4]
    assert (rank, row, path) == ("1", "2", str(dss_path)) and float(score) == pytest.approx(1.0, abs=1e-5)


def test_another_model_is_refused_with_the_model_the_index_needs(tmp_path, tiny_dir, m13_path, capsys):
    index = tmp_path / "index"
    assert main(["index", "build", str(m13_path), "--index", str(index), "--model", str(tiny_dir)]) == 0
    other = tmp_path / "other"
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=5).save_pretrained(other)
    capsys.readouterr()
    assert main(["search", str(index), "a cluster", "--model", str(other)]) == 1
    err = capsys.readouterr().err
    assert "built with model 'astrovl-tiny@" in err and str(tiny_dir.resolve()) in err
    assert main(["index", "add", str(m13_path), "--index", str(index), "--model", str(other)]) == 1
    assert "built with model" in capsys.readouterr().err
    assert len(EmbeddingIndex.load(index)) == 1  # nothing was added


def test_pretrained_without_model_is_refused(tmp_path, tiny_dir, m13_path, capsys):
    index = tmp_path / "index"
    assert main(["index", "build", str(m13_path), "--index", str(index), "--model", str(tiny_dir)]) == 0
    capsys.readouterr()
    for argv in (["search", str(index), "a cluster", "--pretrained", "openai"],
                 ["embed", str(m13_path), "--pretrained", "openai"],
                 ["index", "build", str(m13_path), "--index", str(tmp_path / "i2"), "--pretrained", "openai"]):
        assert main(argv) == 1
        assert "--pretrained 'openai' needs --model" in capsys.readouterr().err


def test_index_add_has_no_approximate_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["index", "add", "x.fits", "--index", str(tmp_path), "--approximate", "hnsw"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --approximate" in capsys.readouterr().err
