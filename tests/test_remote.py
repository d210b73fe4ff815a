"""Tests against real archives and model hubs (run with ``pytest --remote-data=any``)."""

import numpy as np
import pytest


@pytest.mark.remote_data
def test_hubble_previews_from_real_mast(tmp_path):
    from astrovl import HubblePreviewDatasetBuilder

    # proposal 11359: Hubble WFC3 early release science, public previews
    builder = HubblePreviewDatasetBuilder.from_proposals([11359], tmp_path / "ds", caption_source="title",
                                                         max_images_per_proposal=2, image_size=128,
                                                         progress=False)
    ds = builder.build()
    assert 1 <= len(ds) <= 2
    assert builder.report["downloaded"] == len(ds)
    img = ds.load_image(0)
    assert max(img.data.shape[:2]) == 128
    again = HubblePreviewDatasetBuilder.from_proposals([11359], tmp_path / "ds", caption_source="title",
                                                       max_images_per_proposal=2, image_size=128,
                                                       progress=False)
    again.build()
    assert again.report["downloaded"] == 0 and again.report["skipped"] == len(ds)


@pytest.mark.remote_data
def test_pretrained_clip_zero_shot_on_m13(m13_path):
    from astrovl import CLIPEmbedder

    clip = CLIPEmbedder.from_pretrained("ViT-B-16", "openai", device="cpu")
    table = clip.zero_shot(m13_path, ["globular star cluster", "spiral galaxy", "planetary nebula"], top_k=3)
    assert table["category"][0] == "globular star cluster"
    assert np.all(np.diff(np.asarray(table["score"])) <= 0)
