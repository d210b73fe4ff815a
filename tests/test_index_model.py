"""An index remembers its model: one identity per set of weights, lazy reload, clear mismatches."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex
from astrovl.clip.identity import weights_digest
from astrovl.clip.sharded import local_cluster
from astrovl.exceptions import IndexMismatchError, ModelNotFoundError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved to disk, and the embedder that saved it."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    emb = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0, device="cpu")
    emb.save_pretrained(path)
    return path, emb


def test_digest_is_one_identity_for_one_set_of_weights(saved):
    import torch

    path, emb = saved
    again = CLIPEmbedder.from_pretrained(path, device="cpu")
    assert again.weights_digest == emb.weights_digest and again.model_id == emb.model_id
    # recomputed from the tensors (not the stored value) it is the same
    assert weights_digest(again.model) == emb.weights_digest
    other = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=1, device="cpu")
    assert other.weights_digest != emb.weights_digest
    # bf16 weights hash like their float32 widening, and differ from the unrounded fp32 weights
    bf16 = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0, device="cpu")
    bf16.model.to(torch.bfloat16)
    widened = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0, device="cpu")
    widened.model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                   for k, v in bf16.model.state_dict().items()})
    assert bf16.weights_digest == widened.weights_digest != emb.weights_digest


def test_digest_follows_in_place_changes_and_is_cached(saved, monkeypatch):
    import torch

    from astrovl.clip import identity

    emb = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0, device="cpu")
    before = emb.weights_digest
    calls = []
    real = identity.weights_digest
    monkeypatch.setattr(identity, "weights_digest", lambda m: calls.append(1) or real(m))
    assert emb.weights_digest == before and not calls  # cached
    with torch.no_grad():
        emb.model.logit_scale.add_(1.0)  # an in-place write, as an optimizer step
    assert emb.weights_digest != before and len(calls) == 1


def test_index_reloads_its_model_lazily_once_across_threads(saved, tmp_path, m13_path, monkeypatch):
    path, _ = saved
    emb = CLIPEmbedder.from_pretrained(path, device="cpu")
    built = EmbeddingIndex.build(emb, [m13_path], progress=False)
    expected = built.search("a globular cluster", k=1)
    built.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["model"]["digest"] == emb.weights_digest
    assert manifest["model"]["source"]["kind"] == "directory"
    assert manifest["model"]["source"]["path"] == str(path.resolve())

    loads = []
    real = CLIPEmbedder.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPEmbedder, "from_pretrained", classmethod(counting))
    index = EmbeddingIndex.load(tmp_path / "idx")
    assert index._embedder is None and not loads  # nothing loaded yet
    assert index.model_info["source"]["path"] == str(path.resolve())
    results = []
    threads = [threading.Thread(target=lambda: results.append(index.search("a globular cluster", k=1)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(results) == 4
    for r in results:
        np.testing.assert_allclose(r["score"], expected["score"], atol=1e-6)


def test_index_moved_with_its_model_finds_it(saved, tmp_path, m13_path):
    path, _ = saved
    project = tmp_path / "project"
    shutil.copytree(path, project / "model")
    emb = CLIPEmbedder.from_pretrained(project / "model", device="cpu")
    EmbeddingIndex.build(emb, [m13_path], progress=False).save(project / "index")
    moved = tmp_path / "moved"
    shutil.move(project, moved)
    index = EmbeddingIndex.load(moved / "index")
    assert index.model_info["source"]["path"] == str((moved / "model").resolve())
    assert index.search("a star cluster", k=1)["row"][0] == 0
    shutil.rmtree(moved / "model")
    with pytest.raises(ModelNotFoundError, match="no longer exists"):
        EmbeddingIndex.load(moved / "index").search("a star cluster")


def test_changed_or_other_weights_name_the_model_the_index_needs(saved, tmp_path, m13_path):
    import torch

    path, _ = saved
    local = tmp_path / "model"
    shutil.copytree(path, local)
    emb = CLIPEmbedder.from_pretrained(local, device="cpu")
    EmbeddingIndex.build(emb, [m13_path], progress=False).save(tmp_path / "idx")
    other = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=7, device="cpu")
    with pytest.raises(IndexMismatchError, match=r"astrovl-tiny@[0-9a-f]{16}.*from_pretrained"):
        EmbeddingIndex.load(tmp_path / "idx", embedder=other)
    # the same weights through another door match
    assert EmbeddingIndex.load(tmp_path / "idx", embedder=CLIPEmbedder.from_pretrained(path)).embedder
    # the directory now holds other weights: the lazy reload refuses them
    changed = CLIPEmbedder.from_pretrained(local, device="cpu")
    with torch.no_grad():
        changed.model.logit_scale.add_(0.5)
    changed.save_pretrained(local)
    with pytest.raises(IndexMismatchError, match="now loads other weights"):
        EmbeddingIndex.load(tmp_path / "idx").search("text")


def test_an_unsaved_model_gives_a_clear_error(tmp_path, m13_path):
    emb = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0, device="cpu")
    assert emb.source is None
    EmbeddingIndex.build(emb, [m13_path], progress=False).save(tmp_path / "idx")
    index = EmbeddingIndex.load(tmp_path / "idx")
    assert index.embedder is None
    with pytest.raises(ValueError, match="never saved"):
        index.search("a cluster")
    # vectors still work
    assert index.search(index.vectors[0], k=1)["row"][0] == 0


def test_sharded_build_records_the_same_identity(saved, tmp_path, m13_path, ngc1316_path):
    distributed = pytest.importorskip("distributed")
    path, _ = saved
    emb = CLIPEmbedder.from_pretrained(path, device="cpu")
    source, digest = dict(emb.source), emb.weights_digest
    with local_cluster(1) as cluster, distributed.Client(cluster) as client:
        index = EmbeddingIndex.build(emb, [str(m13_path), str(ngc1316_path)], client=client, progress=False)
    assert emb.source == source  # the temporary copy for the workers is not the model's source
    assert index.model_info["digest"] == digest
    index.save(tmp_path / "idx")
    # the same weights in another layout (an open_clip directory) match
    from safetensors.torch import save_file

    oc = tmp_path / "open_clip_dir"
    oc.mkdir()
    cfg = {k: v for k, v in TINY_CLIP_CONFIG.items() if k != "model_name"}
    (oc / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in emb.model.state_dict().items()}, oc / "open_clip_model.safetensors")
    again = EmbeddingIndex.load(tmp_path / "idx", embedder=CLIPEmbedder.from_pretrained(oc))
    assert again.search("a galaxy", k=2)["row"].tolist() in ([0, 1], [1, 0])


def test_legacy_manifest_without_digest_still_loads(saved, tmp_path, m13_path):
    path, emb = saved
    EmbeddingIndex.build(CLIPEmbedder.from_pretrained(path), [m13_path], progress=False).save(tmp_path / "idx")
    manifest_path = tmp_path / "idx" / "index.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["model"]
    manifest_path.write_text(json.dumps(manifest))
    index = EmbeddingIndex.load(tmp_path / "idx", embedder=emb)  # id "name@digest" still matches
    assert index.model_info["digest"] == emb.weights_digest
    with pytest.raises(IndexMismatchError):
        EmbeddingIndex.load(tmp_path / "idx", embedder=CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=3))
