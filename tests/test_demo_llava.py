"""The AstroLLaVA part of the demo on a cut-down configuration, and the parts it is built from."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table

from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def embedder():
    return CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)


def test_exported_vision_tower_embeds_like_the_clip_model(embedder, m13_path):
    import torch

    from astrovl.clip.export import transformers_vision_tower

    tower, processor = transformers_vision_tower(embedder)
    assert tower.config.hidden_size == 128 and tower.config.num_hidden_layers == 2
    assert processor.crop_size == {"height": 64, "width": 64}
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = embedder.model.encode_image(pixels)
        theirs = tower(pixel_values=pixels).image_embeds
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_new_llava_sees_through_the_given_tower(embedder):
    import torch

    from astrovl.clip.export import transformers_vision_tower
    from astrovl.llava.build import new_llava, train_bpe_tokenizer

    tower, processor = transformers_vision_tower(embedder)
    tok = train_bpe_tokenizer(["a spiral galaxy; measure the arm pitch angle", "USER: ASSISTANT:"] * 3,
                              vocab_size=300)
    model = new_llava(tower, processor, tok, vision_feature_layer=-1, device="cpu")
    assert model.model.config.image_seq_length == 64
    inside = {k.removeprefix("vision_model."): v for k, v in model.model.model.vision_tower.state_dict().items()}
    for name, value in tower.vision_model.state_dict().items():
        torch.testing.assert_close(inside[name], value)
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(["x"], vocab_size=100)


def test_demo_astrollava_part_cut_down(tmp_path, embedder):
    """Two stages of train_llava, saving, scoring, re-ranking and the report section, on a small sky."""
    from astrovl.clip import EmbeddingIndex
    from astrovl.datasets import SyntheticSkyDataset
    from astrovl.demo import _write_results
    from astrovl.demo.astrollava import AstroLLaVASettings, report_section, run_astrollava
    from astrovl.llava import AstroLLaVA
    from astrovl.reporting import HTMLReport

    out = tmp_path / "demo"
    out.mkdir()
    ds = SyntheticSkyDataset.generate(out / "data", n_images=66, image_size=64, seed=1, val_fraction=0.34,
                                      progress=False)
    val = ds.split("val")
    model_dir = embedder.save_pretrained(out / "clip")
    clip = CLIPEmbedder.from_pretrained(model_dir)
    meta = Table({"path": [str(p) for p in val.image_paths], "label": [str(x) for x in val.manifest["label"]]})
    EmbeddingIndex.build(clip, val.image_paths, metadata=meta, progress=False).save(out / "index")
    settings = AstroLLaVASettings(stage1_epochs=1.0, stage2_epochs=1.0, batch_size=8, vocab_size=300,
                                  max_eval_images=11, rerank_top=12, num_workers=0)
    queries = {"two merging galaxies": ("merger",), "edge-on disk galaxy": ("edge_on_disk", "edge_on_bulge")}
    result = run_astrollava(out, ds, clip, out / "index", seed=0, device="cpu", settings=settings,
                            queries=queries, progress=False)

    # both stages ran with the real training code and wrote their runs
    for stage in ("stage1", "stage2"):
        assert (out / "llava-training" / stage / "model" / "config.json").is_file()
    h1, h2 = result.histories["stage 1"], result.histories["stage 2"]
    assert h1.meta["stage"] == 1 and h2.meta["stage"] == 2
    assert h1.meta["records"] == 44 and h2.meta["records"] == 88  # captions; captions + conversations
    assert h1.meta["trainable_parameters"] < h2.meta["trainable_parameters"]
    assert len(h1) and len(h2) and np.isfinite(h2["train_loss"]).all()
    # the saved model loads like any other and answers about a FITS file
    loaded = AstroLLaVA.from_pretrained(result.model_dir, device="cpu")
    assert all(str(p).endswith(".fits") for p in result.eval_images)
    assert len(list((out / "llava-training" / "images").glob("*.png"))) == 66
    answer = loaded.ask(result.eval_images[0], "What kind of object is this?", max_new_tokens=8)
    assert isinstance(answer, str)
    assert result.ask_command.startswith("astrovl ask ") and str(result.model_dir) in result.ask_command
    # re-ranking: every query, CLIP alone and re-ranked
    rr = result.rerank
    assert [q["query"] for q in rr["queries"]] == list(queries)
    for q in rr["queries"]:
        assert 0.0 <= q["precision_at_10_clip"] <= 1.0 and 0.0 <= q["precision_at_10_reranked"] <= 1.0
    table = result.rerank_tables["two merging galaxies"]
    assert len(table) == 10 and np.all(np.diff(table["rerank_score"]) <= 0)
    # scores, when the MiniLM sentence model is installed; otherwise the reason
    if result.evaluation is None:
        assert "MiniLM" in result.score_note and result.scores == {"skipped": result.score_note}
    else:
        s = result.scores
        assert s["n_classes"] == 11 and s["n_images"] == 11 == len(result.evaluation) == len(result.control)
        assert 0.0 <= s["class_accuracy"] <= 1.0 and -1.0 <= s["semantic_score"] <= 1.0
        assert s["control"] == "the same model before training"
        assert sorted(result.evaluation["label"]) == sorted(result.control["label"])
    # the report section and results.json
    report = HTMLReport("t")
    report_section(report, result)
    text = report.render()
    assert "<h2>AstroLLaVA</h2>" in text and text.count("data:image/png;base64,") >= 1 + 8 * bool(result.evaluation)
    summary = Table(rows=[{"model": "scratch", "top10_image_to_text": 0.5, "top10_text_to_image": 0.4,
                           "random": 0.1, "n_val": 22},
                          {"model": "shuffled", "top10_image_to_text": 0.1, "top10_text_to_image": 0.1,
                           "random": 0.1, "n_val": 22}])
    results = json.loads(_write_results(out, summary, result, "", 12.0).read_text())
    assert set(results) == {"clip", "control", "llava", "rerank", "seconds"}
    assert results["clip"]["top10_image_to_text"] == 0.5 and results["control"]["model"] == "shuffled"
    assert results["rerank"]["precision_at_10_clip"] == pytest.approx(rr["precision_at_10_clip"])
    assert results["llava"]["model_dir"] == str(result.model_dir)
    if result.evaluation is not None:
        for key in ("class_accuracy", "n_classes", "semantic_score", "control_semantic_score",
                    "control_class_accuracy"):
            assert key in results["llava"]


def test_synthetic_conversations_come_from_the_labels(tmp_path):
    from astrovl.datasets import SyntheticSkyDataset
    from astrovl.training.llava_data import load_conversation_records

    ds = SyntheticSkyDataset.generate(tmp_path / "sky", n_images=22, image_size=32, seed=0, val_fraction=0.5,
                                      progress=False)
    records = ds.conversation_records(seed=0)
    assert len(records) == 22
    for rec, row in zip(records, ds.manifest):
        conv = rec["conversations"]
        assert conv[0]["value"].startswith("<image>\n") and len(conv) in (4, 6)
        assert conv[1]["value"].lower().startswith(str(row["objects"]).lower())
        assert str(row["use_cases"]) in conv[-1]["value"]
        assert rec["split"] == row["split"]
    train = load_conversation_records(records, stage=2, image_root=ds.root, split="train")
    assert len(train) == 11 and all(r["image"].is_file() for r in train)
