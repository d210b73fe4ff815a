"""Training routines: CLIP (HubbleCLIP recipe) and LLaVA (two-stage AstroLLaVA recipe)."""

from __future__ import annotations

from .._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
