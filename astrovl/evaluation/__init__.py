"""Evaluation: retrieval metrics (HubbleCLIP) and description scores (AstroLLaVA).

The Galaxy10 DECaLS loader and classes live in :mod:`astrovl.datasets.galaxy10`; they are
importable from here too.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "top_k_percent_accuracy": "astrovl.evaluation.retrieval",
    "retrieval_curve": "astrovl.evaluation.retrieval",
    "recall_at_k": "astrovl.evaluation.retrieval",
    "median_rank": "astrovl.evaluation.retrieval",
    "plot_retrieval_curve": "astrovl.evaluation.retrieval",
    "DescriptionEvaluator": "astrovl.evaluation.descriptions",
    "GALAXY10_CLASSES": "astrovl.datasets.galaxy10",
    "GALAXY10_REFERENCES": "astrovl.evaluation.descriptions",
    "GALAXY10_KEYWORDS": "astrovl.evaluation.descriptions",
    "GALAXY10_PROMPT": "astrovl.evaluation.descriptions",
    "GALAXY10_CLASS_NAMES": "astrovl.datasets.galaxy10",
    "GALAXY10_FEATURES": "astrovl.evaluation.descriptions",
    "GALAXY10_DATASET": "astrovl.datasets.galaxy10",
    "PUBLISHED_SEMANTIC_SCORES": "astrovl.evaluation.descriptions",
    "load_galaxy10": "astrovl.datasets.galaxy10",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
