import numpy as np
import pytest

from astrovl.evaluation import (
    median_rank,
    plot_retrieval_curve,
    recall_at_k,
    retrieval_curve,
    top_k_percent_accuracy,
)
from astrovl.evaluation.retrieval import TIE_TOLERANCE, partner_tie_counts, true_partner_ranks


def test_identical_pairs_give_one():
    x = np.random.default_rng(0).normal(size=(50, 16))
    assert top_k_percent_accuracy(x, x, 10) == 1.0
    assert recall_at_k(x, x, 1) == 1.0
    assert median_rank(x, x) == 1.0


def test_random_embeddings_give_about_k_percent():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32))
    for k in (5, 10, 30):
        acc = top_k_percent_accuracy(img, txt, k)
        assert abs(acc - k / 100) < 0.03, (k, acc)


def test_hand_computed_4x4_case():
    # image i and text i are the pair; similarities chosen by hand
    img = np.eye(4)
    txt = np.array([[1.0, 0, 0, 0],      # text 0 closest to image 0 -> rank 1 for image 0
                    [0.9, 0.1, 0, 0],     # text 1 is closer to image 0 than to image 1
                    [0, 0, 1.0, 0],
                    [0, 0.2, 0, 0.1]])
    # image_to_text ranks: image0 -> texts sims [1, .994, 0, 0] true=1 -> rank 1
    # image1 -> sims of texts to e1: [0, .110, 0, .894] true=.110 -> rank 2
    # image2 -> rank 1; image3 -> sims [0,0,0,.447] true .447 -> rank 1
    ranks = true_partner_ranks(img, txt, "image_to_text")
    assert list(ranks) == [1, 2, 1, 1]
    assert top_k_percent_accuracy(img, txt, 25) == 0.75   # k = ceil(0.25*4) = 1
    assert top_k_percent_accuracy(img, txt, 50) == 1.0    # k = 2
    # text_to_image: text1 = (.9,.1) normalized -> image0 scores higher than image1 -> rank 2;
    # text3 = (0,.894,0,.447) -> image1 scores higher than image3 -> rank 2
    t2i = true_partner_ranks(img, txt, "text_to_image")
    assert list(t2i) == [1, 2, 1, 2]
    assert top_k_percent_accuracy(img, txt, 25, direction="text_to_image") == 0.5


def test_ties_never_count_in_favour_of_the_true_partner():
    img = np.ones((3, 2))
    txt = np.ones((3, 2))
    assert list(true_partner_ranks(img, txt)) == [3, 3, 3]
    assert list(true_partner_ranks(img, txt, ties="average")) == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="ties"):
        true_partner_ranks(img, txt, ties="min")


def test_partial_ties_count_the_expected_hits():
    # image 0: caption 0 ties with caption 1, caption 2 scores higher -> g=1, t=2
    img = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = np.array([[1.0, 0.2], [1.0, 0.2], [1.0, 0.0]])
    greater, tied = partner_tie_counts(img, txt)
    assert greater[0] == 1 and tied[0] == 2
    assert true_partner_ranks(img, txt)[0] == 3
    assert true_partner_ranks(img, txt, ties="average")[0] == 2.5
    # image 1: its caption ties with caption 0 (g=0, t=2); image 2: two captions above it (g=2, t=1)
    assert list(greater) == [1, 0, 2] and list(tied) == [2, 2, 1]
    # within the first two: image 0 half a hit (one of two tied captions comes second), image 1 a hit
    assert recall_at_k(img, txt, 2) == pytest.approx((0.5 + 1 + 0) / 3)
    assert recall_at_k(img, txt, 1) == pytest.approx((0 + 0.5 + 0) / 3)


@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_a_collapsed_model_scores_chance_not_perfect(direction):
    """Every text vector equal (a collapsed text tower): top-k% is k%, recall@1 is 1/N."""
    rng = np.random.default_rng(4)
    n = 200
    img = rng.normal(size=(n, 16))
    txt = np.tile(rng.normal(size=(1, 16)), (n, 1))
    for k in (1, 10, 50):
        assert top_k_percent_accuracy(img, txt, k, direction=direction) == pytest.approx(k / 100)
    assert recall_at_k(img, txt, 1, direction=direction) == pytest.approx(1 / n)
    ks, acc = retrieval_curve(img, txt, direction=direction)
    np.testing.assert_allclose(acc, ks / 100, atol=1e-12)
    assert median_rank(img, txt, direction=direction) == pytest.approx((n + 1) / 2)
    assert top_k_percent_accuracy(img, txt, 10, direction="text_to_image", batch_size=100) == pytest.approx(0.10)


def test_float32_rounding_of_equal_vectors_is_a_tie():
    rng = np.random.default_rng(5)
    img = rng.normal(size=(64, 512)).astype(np.float32)
    same = rng.normal(size=512).astype(np.float32)
    txt = np.tile(same, (64, 1))
    txt[::2] *= 3.0  # the same direction, other lengths: equal after normalisation up to rounding
    greater, tied = partner_tie_counts(img, txt)
    assert (greater == 0).all() and (tied == 64).all()


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(2)
    img, txt = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    a = true_partner_ranks(img, txt, chunk_size=7)
    b = true_partner_ranks(img, txt, chunk_size=1000)
    np.testing.assert_array_equal(a, b)
    # brute force check
    sims = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    # pessimistic ranks: everything at least as high as the true partner (within the tie tolerance)
    expected = (sims >= np.diag(sims)[:, None] - TIE_TOLERANCE).sum(axis=1)
    np.testing.assert_array_equal(a, expected)


def test_curve_is_monotonic_and_plot_has_random_line():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(200, 8))
    txt = img + 0.8 * rng.normal(size=(200, 8))
    ks, acc = retrieval_curve(img, txt)
    assert ks[0] == 1 and ks[-1] == 100
    assert np.all(np.diff(acc) >= 0) and acc[-1] == 1.0
    fig = plot_retrieval_curve({"model": (img, txt), "given": (ks, acc)})
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["model", "given", "random"]
    assert ax.get_lines()[-1].get_linestyle() == "--"


@pytest.mark.parametrize("bad", [np.zeros((0, 4)), np.zeros((3,)), np.full((3, 4), np.nan)])
def test_bad_inputs_raise(bad):
    good = np.ones((3, 4))
    with pytest.raises(ValueError):
        top_k_percent_accuracy(bad, good if bad.ndim == 2 and len(bad) else good)


def test_mismatched_shapes_and_k_raise():
    with pytest.raises(ValueError, match="same shape"):
        top_k_percent_accuracy(np.ones((3, 4)), np.ones((4, 4)))
    with pytest.raises(ValueError, match="k_percent"):
        top_k_percent_accuracy(np.eye(3), np.eye(3), 0)
    with pytest.raises(ValueError, match="direction"):
        top_k_percent_accuracy(np.eye(3), np.eye(3), direction="sideways")
