"""Models by any name: transformers CLIP conversion, open_clip and transformers hub repositories."""

from __future__ import annotations

import numpy as np
import pytest

from astrovl.clip import CLIPEmbedder, EmbeddingIndex
from astrovl.exceptions import CheckpointError, ModelNotFoundError
from astrovl.testing import write_hub_snapshot
from astrovl.testing.clip import (
    TINY_OPEN_CLIP_CONFIG,
    make_tiny_open_clip,
    make_tiny_transformers_clip,
)

TEXTS = ["a barred spiral galaxy", "Two merging galaxies, with tidal tails!", "M13"]


@pytest.fixture(scope="module", params=[True, False], ids=["legacy-eos", "eos"])
def hf_clip(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "clip"
    return make_tiny_transformers_clip(path, seed=3, legacy_eos=request.param)


def test_transformers_clip_converts_with_identical_embeddings(hf_clip):
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    ref = CLIPModel.from_pretrained(hf_clip).eval()
    emb = CLIPEmbedder.from_pretrained(hf_clip, device="cpu")
    assert emb.embed_dim == 16 and emb.image_size == 32 and emb.context_length == 77
    assert emb.source == {"kind": "directory", "path": str(hf_clip.resolve())}
    # the checkpoint's own tokenizer and open_clip's give the same ids up to the end of text
    hf_tok = CLIPTokenizer.from_pretrained(hf_clip)
    hf_ids = hf_tok(TEXTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    ours = emb.tokenizer(TEXTS)
    for a, b in zip(hf_ids, ours):
        end = int((b == 49407).nonzero()[0]) + 1
        assert a[:end].tolist() == b[:end].tolist()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # transformers 5 returns an output object, 4.x the projected tensor itself
        img_ref = ref.get_image_features(pixel_values=pixels)
        img_ref = getattr(img_ref, "pooler_output", img_ref)
        txt_ref = ref.get_text_features(input_ids=hf_ids)
        txt_ref = getattr(txt_ref, "pooler_output", txt_ref)
        img = emb.model.encode_image(pixels)
        txt = emb.model.encode_text(ours)
    np.testing.assert_allclose(img.numpy(), img_ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(txt.numpy(), txt_ref.numpy(), atol=1e-4)
    unit = torch.nn.functional.normalize(txt_ref, dim=-1).numpy()
    np.testing.assert_allclose(emb.embed_text(TEXTS), unit, atol=1e-4)
    np.testing.assert_allclose(float(emb.model.logit_scale.detach()), float(ref.logit_scale.detach()), rtol=1e-6)


def test_transformers_clip_by_hub_id_offline(hf_clip, hub_cache, tmp_path, m13_path):
    repo = "openai/clip-vit-base-patch16"
    rev = write_hub_snapshot(hub_cache, repo, hf_clip).name
    assert (hub_cache / "models--openai--clip-vit-base-patch16" / "refs" / "main").read_text() == rev
    emb = CLIPEmbedder.from_pretrained(repo, device="cpu")
    assert emb.source == {"kind": "hub", "repo_id": repo, "revision": rev, "format": "transformers"}
    assert emb.model_name == repo
    local = CLIPEmbedder.from_pretrained(hf_clip, device="cpu")
    assert emb.weights_digest == local.weights_digest  # one identity for the same weights
    np.testing.assert_array_equal(emb.embed_text(TEXTS), local.embed_text(TEXTS))
    # an index built with the hub model loads it again, at the recorded revision, by itself
    EmbeddingIndex.build(emb, [m13_path], progress=False).save(tmp_path / "idx")
    index = EmbeddingIndex.load(tmp_path / "idx")
    assert index.model_info["source"]["revision"] == rev
    assert index.search("a globular cluster", k=1)["row"][0] == 0
    assert index.embedder.source["kind"] == "hub"
    # saving and reloading keeps the identity
    saved = emb.save_pretrained(tmp_path / "copy")
    assert CLIPEmbedder.from_pretrained(saved).weights_digest == emb.weights_digest


def test_open_clip_hub_repository_offline(hub_cache, tmp_path):
    import torch

    from astrovl.clip.loading import build_model

    src = make_tiny_open_clip(tmp_path / "oc", seed=4)
    rev = write_hub_snapshot(hub_cache, "astro/tiny-open-clip", src).name
    for name in ("hf-hub:astro/tiny-open-clip", "astro/tiny-open-clip"):
        emb = CLIPEmbedder.from_pretrained(name, device="cpu")
        assert emb.model_name == "hf-hub:astro/tiny-open-clip"
        assert emb.source == {"kind": "hub", "repo_id": "astro/tiny-open-clip", "revision": rev,
                              "format": "open_clip"}
        assert emb.embed_dim == TINY_OPEN_CLIP_CONFIG["embed_dim"]
        assert emb.image_mean == (0.5, 0.5, 0.5) and emb.image_std == (0.25, 0.25, 0.25)
    torch.manual_seed(4)
    same = build_model(TINY_OPEN_CLIP_CONFIG)
    from astrovl.clip.identity import weights_digest

    assert emb.weights_digest == weights_digest(same)
    again = CLIPEmbedder.from_pretrained("astro/tiny-open-clip", revision=rev)
    assert again.weights_digest == emb.weights_digest


def test_hub_errors_are_clear(hub_cache, tmp_path):
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        CLIPEmbedder.from_pretrained("nobody/no-such-clip")
    with pytest.raises(ModelNotFoundError, match="hf-hub:ORG/NAME"):
        CLIPEmbedder.from_pretrained("hf-hub:not-a-repo-id")
    # a transformers repository of another model type is refused before anything is built
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    (other / "model.safetensors").write_bytes(b"")
    write_hub_snapshot(hub_cache, "someone/bert", other)
    with pytest.raises(CheckpointError, match="model_type 'clip'"):
        CLIPEmbedder.from_pretrained("someone/bert")
    with pytest.raises(ModelNotFoundError, match="holds no CLIP model"):
        CLIPEmbedder.from_pretrained(tmp_path)
