"""Training routines: CLIP (HubbleCLIP recipe) and LLaVA (two-stage AstroLLaVA recipe)."""

from __future__ import annotations

import importlib

_LAZY = {
    "train_clip": "astrovl.training.clip",
    "CLIPTrainingConfig": "astrovl.training.clip",
    "CLIPTrainingResult": "astrovl.training.clip",
    "interpolate_weights": "astrovl.training.clip",
    "train_llava": "astrovl.training.llava",
    "LLaVATrainingConfig": "astrovl.training.llava",
    "LLaVATrainingResult": "astrovl.training.llava",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'astrovl.training' has no attribute {name!r}")
