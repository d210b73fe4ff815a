"""A collapsed text tower scores chance in train_clip's validation, so it is never a flattering "best"."""

from __future__ import annotations

import math

import pytest
import torch

from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder
from astrovl.datasets import SyntheticSkyDataset
from astrovl.training import CLIPTrainingConfig, train_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    return SyntheticSkyDataset.generate(tmp_path_factory.mktemp("sky"), n_images=40, image_size=64,
                                        seed=2, val_fraction=0.5, progress=False)


def _collapsed_text_tower(seed: int = 0) -> CLIPEmbedder:
    """A tiny model whose every caption has the same embedding (ln_final outputs a constant)."""
    emb = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=seed)
    with torch.no_grad():
        emb.model.ln_final.weight.zero_()
        emb.model.ln_final.bias.copy_(torch.linspace(-1, 1, emb.model.ln_final.bias.numel()))
    return emb


def test_a_collapsed_run_scores_chance_and_its_best_is_chance(sky, tmp_path):
    emb = _collapsed_text_tower()
    val = sky.split("val")
    txt = emb.embed_text(list(val.captions[:5]), progress=False)
    assert (abs(txt - txt[0]) < 1e-6).all()  # collapsed indeed
    # head mode keeps the towers frozen: the text side stays collapsed at every validation
    res = train_clip(emb, sky.split("train"), val,
                     CLIPTrainingConfig(mode="head", steps=2, batch_size=8, lr=1e-3, warmup_steps=0,
                                        eval_every=1, head_hidden=16, best_metric="val_top10",
                                        output_dir=str(tmp_path / "run"), progress=False, tensorboard=False,
                                        augment=False))
    n = len(val)
    chance = math.ceil(0.1 * n) / n
    # counting ties for the true caption would report 1.0 here and keep this run as the best forever
    assert list(res.history["val_top10"]) == pytest.approx([chance, chance])
    best = res.embedder
    best_txt = best.embed_text(list(val.captions), progress=False)
    from astrovl.evaluation import top_k_percent_accuracy

    assert top_k_percent_accuracy(best.embed_images(val, progress=False), best_txt, 10) == pytest.approx(chance)
