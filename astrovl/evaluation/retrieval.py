"""Retrieval metrics of the HubbleCLIP evaluation, computed in bounded memory.

Row ``i`` of ``image_embeddings`` and row ``i`` of ``text_embeddings`` form a
true pair. For every query (an image for ``direction="image_to_text"``, a text
for ``"text_to_image"``) the candidates of the other modality are ranked by
cosine similarity. For the true partner of each query two numbers are counted:
``g``, the candidates with a *strictly* higher similarity, and ``t``, the
candidates with the *same* similarity, the true partner itself included
(similarities within ``1e-6`` of each other count as the same: float32 rounding
of equal vectors).

Ties are never counted in favour of the true partner. A model that cannot tell
candidates apart must score what guessing scores:

* the *rank* of the true partner (:func:`true_partner_ranks`) is pessimistic by
  default, ``rank = g + t`` (the number of candidates scoring at least as high
  as the true partner, itself included); ``ties="average"`` gives the mean rank
  over the orders of the tied candidates, ``g + (t + 1) / 2``;
* the accuracies (top-k%, recall@k, the retrieval curve) are the expected
  fraction of hits when tied candidates are put in a random order: a query
  whose cut-off ``K`` falls among its ties counts ``(K - g) / t`` of a hit
  (1 when ``g + t <= K``, 0 when ``g >= K``);
* the median rank is the median of the mean ranks ``g + (t + 1) / 2``.

Without ties all of these are the plain rank ``g + 1``. A collapsed model whose
text vectors are all equal therefore scores ``K / N`` (about ``k %``), the
chance level, and a median rank of ``(N + 1) / 2``, not a perfect score.

The top-k% accuracy counts a hit when the true partner is within the first
``K = ceil(k / 100 * N)`` candidates (at least 1), where ``N`` is the number of
candidates. For random embeddings it is about ``k %``; for identical pairs of
distinct vectors it is 1.

Similarities are computed in blocks of ``chunk_size`` queries, so ``N = 100,000``
needs about ``chunk_size * N * 4`` bytes at a time, not ``N * N``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "true_partner_ranks",
    "partner_tie_counts",
    "TIE_TOLERANCE",
    "top_k_percent_accuracy",
    "retrieval_curve",
    "recall_at_k",
    "median_rank",
    "plot_retrieval_curve",
]

_DIRECTIONS = ("image_to_text", "text_to_image")
_TIE_RULES = ("max", "average")
#: cosine similarities closer than this count as equal (float32 rounding of equal vectors)
TIE_TOLERANCE = 1e-6


def _normalize(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D); got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{name} is empty; retrieval metrics need at least one pair")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has all-zero rows, which have no direction")
    return x / norms


def _pairs(image_embeddings, text_embeddings, direction: str):
    """Normalised (queries, candidates) of ``direction``, with the inputs checked."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not known; use one of {_DIRECTIONS}")
    img = _normalize(image_embeddings, "image_embeddings")
    txt = _normalize(text_embeddings, "text_embeddings")
    if img.shape != txt.shape:
        raise ValueError(
            f"image_embeddings {img.shape} and text_embeddings {txt.shape} must have the same "
            "shape: row i of each is one image-text pair"
        )
    return (img, txt) if direction == "image_to_text" else (txt, img)


def partner_tie_counts(image_embeddings, text_embeddings, direction: str = "image_to_text",
                       chunk_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Count, for each query, the candidates above and level with its true partner.

    Parameters
    ----------
    image_embeddings, text_embeddings : array-like, shape (N, D)
        Row ``i`` of each forms a pair. Rows need not be normalized.
    direction : {"image_to_text", "text_to_image"}
    chunk_size : int
        Number of queries per block.

    Returns
    -------
    greater, tied : numpy.ndarray of int64, shape (N,)
        ``greater``: candidates with a strictly higher similarity than the true
        partner; ``tied``: candidates with the same similarity (within
        ``1e-6``), the true partner included (so ``tied >= 1``).
    """
    queries, cands = _pairs(image_embeddings, text_embeddings, direction)
    n = len(queries)
    greater = np.empty(n, dtype=np.int64)
    tied = np.empty(n, dtype=np.int64)
    step = max(1, int(chunk_size))
    for start in range(0, n, step):
        stop = min(n, start + step)
        sims = queries[start:stop] @ cands.T
        true = sims[np.arange(stop - start), np.arange(start, stop)][:, None]
        above = sims > true + TIE_TOLERANCE
        greater[start:stop] = above.sum(axis=1)
        tied[start:stop] = (sims >= true - TIE_TOLERANCE).sum(axis=1) - greater[start:stop]
    return greater, tied


def true_partner_ranks(image_embeddings, text_embeddings, direction: str = "image_to_text",
                       chunk_size: int = 512, *, ties: str = "max") -> np.ndarray:
    """Return the 1-based rank of each query's true partner.

    Parameters
    ----------
    image_embeddings, text_embeddings : array-like, shape (N, D)
        Row ``i`` of each forms a pair. Rows need not be normalized.
    direction : {"image_to_text", "text_to_image"}
    chunk_size : int
        Number of queries per block.
    ties : {"max", "average"}
        ``"max"`` (pessimistic): the number of candidates scoring at least as
        high as the true partner, itself included (int64). ``"average"``: the
        mean rank over the orders of the tied candidates (float64). See the
        module notes.

    Examples
    --------
    >>> import numpy as np
    >>> true_partner_ranks(np.ones((3, 2)), np.ones((3, 2))).tolist()   # all tied
    [3, 3, 3]
    >>> true_partner_ranks(np.ones((3, 2)), np.ones((3, 2)), ties="average").tolist()
    [2.0, 2.0, 2.0]
    """
    if ties not in _TIE_RULES:
        raise ValueError(f"ties={ties!r} is not known; use one of {_TIE_RULES}")
    greater, tied = partner_tie_counts(image_embeddings, text_embeddings, direction, chunk_size)
    if ties == "max":
        return greater + tied
    return greater + (tied + 1) / 2.0


def _hits(greater: np.ndarray, tied: np.ndarray, limit) -> np.ndarray:
    """Expected hit of each query within the first ``limit`` candidates, ties in a random order."""
    return np.clip((np.asarray(limit, dtype=float) - greater) / tied, 0.0, 1.0)


def _k_count(k_percent: float, n: int) -> int:
    if not 0 < k_percent <= 100:
        raise ValueError(f"k_percent={k_percent!r} must be in (0, 100]")
    return max(1, math.ceil(k_percent / 100.0 * n - 1e-9))


def top_k_percent_accuracy(image_embeddings, text_embeddings, k_percent: float = 10.0,
                           direction: str = "image_to_text", chunk_size: int = 512,
                           batch_size: int | None = None) -> float:
    """Fraction of queries whose true partner is within the top ``k_percent`` % of candidates.

    Two definitions, both of the HubbleCLIP/PAPERCLIP work:

    * ``batch_size=None`` (the paper's retrieval curves): every query is ranked
      against all ``N`` candidates; a hit is a true partner within the first
      ``K = ceil(k_percent / 100 * N)``.
    * ``batch_size=B`` (PAPERCLIP's metric during training, with ``B = 100`` and
      ``direction="text_to_image"``): the pairs are cut into consecutive batches
      of ``B`` in the given order, the last partial batch is dropped, and each
      query is ranked against the ``B`` candidates of its own batch; a hit is a
      true partner within the first ``K = ceil(k_percent / 100 * B)``. With
      ``B = 100``, ``k_percent`` of 1, 5, 10 and 20 are the top-1, 5, 10 and 20
      of 100.

    Candidates tied with the true partner are taken in a random order and the
    expected number of hits is counted (see the module notes), so a model that
    gives every candidate the same score gets ``K / N``, the chance level.

    Parameters
    ----------
    image_embeddings, text_embeddings : array-like, shape (N, D)
        Row ``i`` of each forms a pair.
    k_percent : float
        Percentage of the candidates that counts as a hit.
    direction : {"image_to_text", "text_to_image"}
        Which modality is the query.
    chunk_size : int
        Queries per block of the full-set computation.
    batch_size : int, optional
        Rank within consecutive batches of this many pairs instead of the whole set.

    Returns
    -------
    float
        Accuracy in ``[0, 1]``; about ``k_percent / 100`` for random embeddings
        and for a collapsed model.

    Raises
    ------
    ValueError
        If ``batch_size`` is given and there are fewer than ``batch_size`` pairs.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.eye(4)
    >>> top_k_percent_accuracy(x, x, k_percent=25)
    1.0
    >>> top_k_percent_accuracy(x, np.ones((4, 4)), k_percent=25)   # every caption the same
    0.25
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(size=(250, 8))
    >>> top_k_percent_accuracy(img, img, 1, "text_to_image", batch_size=100)  # 200 pairs used
    1.0
    """
    if batch_size is None:
        greater, tied = partner_tie_counts(image_embeddings, text_embeddings, direction, chunk_size)
        return float(np.mean(_hits(greater, tied, _k_count(k_percent, len(greater)))))
    batch_size = int(batch_size)
    img, txt = np.asarray(image_embeddings), np.asarray(text_embeddings)
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size} must be >= 2")
    n_batches = len(img) // batch_size
    if n_batches == 0:
        raise ValueError(f"batch_size={batch_size} needs at least {batch_size} pairs; got {len(img)}")
    limit = _k_count(k_percent, batch_size)
    hits = [_hits(*partner_tie_counts(img[b * batch_size:(b + 1) * batch_size],
                                      txt[b * batch_size:(b + 1) * batch_size], direction, chunk_size), limit)
            for b in range(n_batches)]
    return float(np.mean(np.concatenate(hits)))


def retrieval_curve(image_embeddings, text_embeddings, k_percents=None,
                    direction: str = "image_to_text", chunk_size: int = 512):
    """Top-k% accuracy as a function of k (ties as in :func:`top_k_percent_accuracy`).

    Returns
    -------
    k_percents, accuracy : numpy.ndarray
        ``k_percents`` defaults to 1, 2, ..., 100.
    """
    ks = np.arange(1, 101, dtype=float) if k_percents is None else np.asarray(k_percents, float)
    greater, tied = partner_tie_counts(image_embeddings, text_embeddings, direction, chunk_size)
    n = len(greater)
    acc = np.array([np.mean(_hits(greater, tied, _k_count(k, n))) for k in ks])
    return ks, acc


def recall_at_k(image_embeddings, text_embeddings, k: int = 1,
                direction: str = "image_to_text", chunk_size: int = 512) -> float:
    """Fraction of queries whose true partner is within the first ``k`` candidates.

    Candidates tied with the true partner are taken in a random order and the
    expected fraction is returned (see the module notes): 1/N for recall@1 of a
    collapsed model.
    """
    if int(k) < 1:
        raise ValueError(f"k={k!r} must be a positive integer")
    greater, tied = partner_tie_counts(image_embeddings, text_embeddings, direction, chunk_size)
    return float(np.mean(_hits(greater, tied, int(k))))


def median_rank(image_embeddings, text_embeddings, direction: str = "image_to_text",
                chunk_size: int = 512) -> float:
    """Median rank of the true partner (1 is best), ties at their mean rank (``ties="average"``)."""
    return float(np.median(true_partner_ranks(image_embeddings, text_embeddings, direction, chunk_size,
                                              ties="average")))


def plot_retrieval_curve(results: dict, *, direction: str = "image_to_text", ax=None,
                         title: str | None = None):
    """Plot top-k% accuracy curves of several models on one axes.

    Parameters
    ----------
    results : dict
        ``{label: (image_embeddings, text_embeddings)}`` or
        ``{label: (k_percents, accuracy)}`` (1-D arrays) per model.
    direction : str
        Used when embeddings are given.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
        Curves with the random expectation (``accuracy = k / 100``) as a dashed line.
    """
    import matplotlib

    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 4))
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    for label, (a, b) in results.items():
        a_arr, b_arr = np.asarray(a), np.asarray(b)
        if a_arr.ndim == 1 and b_arr.ndim == 1:
            ks, acc = a_arr, b_arr
        else:
            ks, acc = retrieval_curve(a_arr, b_arr, direction=direction)
        ax.plot(ks, acc, label=str(label))
    ax.plot([0, 100], [0, 1], ls="--", color="0.5", label="random")
    ax.set_xlabel("k (% of candidates)")
    ax.set_ylabel("top-k% accuracy")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    ax.set_title(title or direction.replace("_", " "))
    ax.legend(loc="lower right")
    _ = matplotlib  # matplotlib is a hard dependency; imported for clarity
    return fig
