"""No silent random weights: a warning, and an identity (and index) that says ``random``."""

from __future__ import annotations

import json

import pytest
import torch

from astrovl.cli import main
from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex


def test_an_open_clip_name_without_weights_warns_and_is_marked_random(monkeypatch):
    import open_clip.factory

    # a registered open_clip architecture name, as "ViT-S-32" is, but small enough for a quick test
    cfg = {k: v for k, v in TINY_CLIP_CONFIG.items() if k != "model_name"}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "astrovl-tiny-named", cfg)
    with pytest.warns(UserWarning, match=r"'astrovl-tiny-named' has no pretrained weights.*from_config"):
        emb = CLIPEmbedder.from_pretrained("astrovl-tiny-named", device="cpu")
    assert emb.random_weights is True
    assert emb.source is None  # random weights cannot be loaded again
    assert EmbeddingIndex(emb.embed_dim, embedder=emb).model_info["random"] is True


def test_from_config_is_random_without_a_warning_until_trained():
    emb = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)  # no warning (pytest runs warnings as errors)
    assert emb.random_weights is True
    with torch.no_grad():
        emb.model.logit_scale.add_(0.5)  # an optimizer step writes in place like this
    assert emb.random_weights is False


def test_the_index_its_manifest_and_the_cli_show_random_weights(tmp_path, m13_path, capsys):
    random_dir, trained_dir = tmp_path / "random", tmp_path / "trained"
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0).save_pretrained(random_dir)
    assert json.loads((random_dir / "astrovl_clip.json").read_text())["random_weights"] is True
    assert CLIPEmbedder.from_pretrained(random_dir).random_weights is True  # the saved record survives
    trained = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
    with torch.no_grad():
        trained.model.text_projection.mul_(1.5)
    trained.save_pretrained(trained_dir)
    assert "random_weights" not in json.loads((trained_dir / "astrovl_clip.json").read_text())
    assert CLIPEmbedder.from_pretrained(trained_dir).random_weights is False

    index = tmp_path / "index"
    assert main(["index", "build", str(m13_path), "--index", str(index), "--model", str(random_dir)]) == 0
    assert "(random weights" in capsys.readouterr().out
    assert json.loads((index / "index.json").read_text())["model"]["random"] is True
    assert EmbeddingIndex.load(index).model_info["random"] is True
    assert main(["search", str(index), "a globular cluster", "-k", "1", "--format", "csv"]) == 0
    err = capsys.readouterr().err
    assert "random weights" in err and "carry no meaning" in err

    other = tmp_path / "index-trained"
    assert main(["index", "build", str(m13_path), "--index", str(other), "--model", str(trained_dir)]) == 0
    assert "random" not in capsys.readouterr().out
    assert EmbeddingIndex.load(other).model_info["random"] is False
    assert main(["search", str(other), "a globular cluster", "-k", "1", "--format", "csv"]) == 0
    assert "random" not in capsys.readouterr().err
