import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import NDData

from astrovl import load_image
from astrovl.clip import HUBBLE_CATEGORIES, TINY_CLIP_CONFIG, CLIPEmbedder
from astrovl.exceptions import CheckpointError, ModelNotFoundError


@pytest.fixture(scope="module")
def embedder():
    return CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0, device="cpu")


def test_categories_are_the_77_of_the_paper():
    assert len(HUBBLE_CATEGORIES) == 77
    assert len(set(HUBBLE_CATEGORIES)) == 77
    assert "barred spiral galaxies" in HUBBLE_CATEGORIES
    assert "Einstein rings" in HUBBLE_CATEGORIES


def test_attributes(embedder):
    assert embedder.embed_dim == 64
    assert embedder.image_size == 64
    assert embedder.context_length == 32
    assert embedder.model_id.startswith("astrovl-tiny@")
    assert embedder.tokenizer(["a galaxy"]).shape == (1, 32)


def test_every_input_kind_embeds_to_unit_vectors(embedder, m13_path, m13_rice_path, ngc1316_path):
    with fits.open(m13_path) as hdul:
        data, header = hdul[0].data.astype(float), hdul[0].header
        inputs = [str(m13_path), m13_path, hdul, hdul[0], (data, header), data,
                  NDData(data), load_image(m13_path), m13_rice_path, ngc1316_path]
        vec = embedder.embed_images(inputs, batch_size=4, progress=False)
    assert vec.shape == (len(inputs), 64) and vec.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    # the same pixels through different doors give the same embedding
    for i in range(1, 8):
        np.testing.assert_allclose(vec[i], vec[0], atol=1e-5)
    # a single input gives one row
    assert embedder.embed_images(m13_path, progress=False).shape == (1, 64)


def test_text_and_similarity(embedder, m13_path):
    t = embedder.embed_text(["globular cluster", "spiral galaxy"])
    assert t.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    sim = embedder.similarity([m13_path, m13_path], ["globular cluster", "spiral galaxy", "nebula"])
    assert sim.shape == (2, 3)
    assert np.all(np.abs(sim) <= 1.0 + 1e-5)


def test_save_load_round_trip_identical(embedder, tmp_path, m13_path):
    path = embedder.save_pretrained(tmp_path / "model")
    cfg = json.loads((path / "astrovl_clip.json").read_text())
    assert cfg["format"] == "astrovl-clip" and cfg["embed_dim"] == 64
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.pt")) and not list(path.glob("*.bin"))
    again = CLIPEmbedder.from_pretrained(path)
    assert again.model_id == embedder.model_id
    np.testing.assert_array_equal(again.embed_images(m13_path, progress=False),
                                  embedder.embed_images(m13_path, progress=False))
    np.testing.assert_array_equal(again.embed_text(["a"]), embedder.embed_text(["a"]))


def test_zero_shot_table(embedder, m13_path, ngc1316_path):
    table = embedder.zero_shot([m13_path, ngc1316_path], top_k=3)
    assert table.colnames == ["image", "source", "rank", "category", "score", "probability"]
    assert len(table) == 6
    assert set(table["category"]) <= set(HUBBLE_CATEGORIES)
    for i in (0, 1):
        rows = table[table["image"] == i]
        assert list(rows["rank"]) == [1, 2, 3]
        assert np.all(np.diff(rows["score"]) <= 0)
    custom = embedder.zero_shot(m13_path, categories=["a", "b"], top_k=5, templates=("{}",))
    assert len(custom) == 2
    np.testing.assert_allclose(custom["probability"].sum(), 1.0, atol=1e-5)


def test_local_checkpoint_file_loads_safely(embedder, tmp_path, m13_path):
    import torch
    from safetensors.torch import save_file

    # an open_clip-style checkpoint of a registered architecture
    name = "ViT-B-32"
    big = CLIPEmbedder.from_config(name, seed=1)
    sd = {k: v.contiguous() for k, v in big.model.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    loaded = CLIPEmbedder.from_pretrained(name, str(tmp_path / "w.safetensors"))
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k])
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "w.pt")
    loaded2 = CLIPEmbedder.from_pretrained(name, str(tmp_path / "w.pt"))
    assert torch.equal(loaded2.model.logit_scale, big.model.logit_scale)


def test_errors(embedder, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        embedder.embed_images([], progress=False)
    with pytest.raises(ValueError, match="empty"):
        embedder.embed_text([])
    with pytest.raises(ModelNotFoundError, match="neither a saved astrovl model directory"):
        CLIPEmbedder.from_pretrained("no-such-model-name")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="save_pretrained"):
        CLIPEmbedder.from_pretrained(tmp_path / "empty")
    bad = tmp_path / "bad"
    embedder.save_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        CLIPEmbedder.from_pretrained(bad)
    with pytest.raises(ValueError, match="template"):
        embedder.zero_shot(np.ones((8, 8)), templates=("no placeholder",))
    with pytest.raises(TypeError):
        embedder.embed_images(12345)


def test_text_embeddings_skip_the_padding_without_changing_them(embedder):
    import torch

    texts = ["a", "a dense globular cluster of old stars", "two merging galaxies with long tidal tails " * 6]
    tokens = embedder.tokenizer(texts)
    with torch.inference_mode():
        full = torch.nn.functional.normalize(embedder.model.encode_text(tokens).float(), dim=-1).numpy()
    np.testing.assert_allclose(embedder.embed_text(texts), full, atol=1e-5)  # one batch, one cut
    for i, text in enumerate(texts):  # each alone, cut at its own length
        np.testing.assert_allclose(embedder.embed_text(text)[0], full[i], atol=1e-5)
