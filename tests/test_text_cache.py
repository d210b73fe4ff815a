"""Text embeddings are cached per model identity and give the same numbers as without the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astrovl.clip import HUBBLE_CATEGORIES, TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex
from astrovl.clip.textcache import TEXT_CACHE


@pytest.fixture
def emb():
    TEXT_CACHE.clear()
    return CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0, device="cpu")


def test_cached_texts_equal_fresh_ones_and_skip_the_model(emb, monkeypatch):
    texts = ["a globular cluster", "a barred spiral", "a globular cluster"]
    first = emb.embed_text(texts)
    np.testing.assert_array_equal(first, emb.embed_text(texts, cache=False))
    calls = []
    real = emb._encode_texts
    monkeypatch.setattr(emb, "_encode_texts", lambda t, *a, **k: calls.append(list(t)) or real(t, *a, **k))
    np.testing.assert_array_equal(emb.embed_text(texts), first)
    assert not calls  # all from the cache
    emb.embed_text(["a barred spiral", "a new text"])
    assert calls == [["a new text"]]  # only the new text ran


def test_zero_shot_reuses_category_embeddings_with_the_same_numbers(emb, m13_path, monkeypatch):
    table = emb.zero_shot(m13_path, top_k=5)
    # the former computation: one embed_text call per category, averaged over the templates
    from astrovl.clip import DEFAULT_TEMPLATES

    txt = np.stack([emb.embed_text([t.format(c) for t in DEFAULT_TEMPLATES], cache=False).mean(axis=0)
                    for c in HUBBLE_CATEGORIES])
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    sims = emb.embed_images(m13_path, progress=False) @ txt.T
    order = np.argsort(-sims[0], kind="stable")[:5]
    assert list(table["category"]) == [HUBBLE_CATEGORIES[i] for i in order]
    np.testing.assert_allclose(table["score"], sims[0][order], atol=1e-5)
    calls = []
    real = emb.model.encode_text
    monkeypatch.setattr(emb.model, "encode_text", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = emb.zero_shot(m13_path, top_k=5)
    assert not calls and list(again["score"]) == list(table["score"])


def test_changed_weights_never_use_old_entries(emb):
    before = emb.embed_text(["an edge-on disk"])
    with torch.no_grad():
        emb.model.text_projection.mul_(2.0)  # in place: a new identity, as after a training step
        emb.model.token_embedding.weight.add_(0.1)
    after = emb.embed_text(["an edge-on disk"])
    np.testing.assert_array_equal(after, emb.embed_text(["an edge-on disk"], cache=False))
    assert not np.allclose(before, after)
    # two embedders with the same weights share entries
    twin = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=1, device="cpu")
    twin.model.load_state_dict(emb.model.state_dict())
    hits = TEXT_CACHE.hits
    np.testing.assert_array_equal(twin.embed_text(["an edge-on disk"]), after)
    assert TEXT_CACHE.hits == hits + 1


def test_repeated_index_text_searches_hit_the_cache(emb, m13_path, ngc1316_path):
    index = EmbeddingIndex.build(emb, [m13_path, ngc1316_path], progress=False)
    first = index.search("a globular cluster", k=2)
    misses = TEXT_CACHE.misses
    second = index.search("a globular cluster", k=2)
    assert TEXT_CACHE.misses == misses
    assert list(first["row"]) == list(second["row"]) and list(first["score"]) == list(second["score"])


def test_cache_is_bounded():
    from astrovl.clip.textcache import TextEmbeddingCache

    cache = TextEmbeddingCache(max_entries=3)
    cache.put_many("m", ["a", "b", "c", "d"], np.eye(4, dtype=np.float32))
    assert len(cache) == 3 and cache.get_many("m", ["a"]) == [None]
    assert cache.get_many("other", ["b"]) == [None]
