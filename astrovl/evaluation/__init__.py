"""Evaluation: retrieval metrics (HubbleCLIP) and description scores (AstroLLaVA)."""

from __future__ import annotations

import importlib

_LAZY = {
    "top_k_percent_accuracy": "astrovl.evaluation.retrieval",
    "retrieval_curve": "astrovl.evaluation.retrieval",
    "recall_at_k": "astrovl.evaluation.retrieval",
    "median_rank": "astrovl.evaluation.retrieval",
    "plot_retrieval_curve": "astrovl.evaluation.retrieval",
    "DescriptionEvaluator": "astrovl.evaluation.descriptions",
    "GALAXY10_CLASSES": "astrovl.evaluation.descriptions",
    "GALAXY10_REFERENCES": "astrovl.evaluation.descriptions",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'astrovl.evaluation' has no attribute {name!r}")
