"""The curated category list for image -> text retrieval (HubbleCLIP appendix B)."""

from __future__ import annotations

import json
from importlib import resources

__all__ = ["HUBBLE_CATEGORIES", "DEFAULT_TEMPLATES", "load_categories"]


def load_categories() -> list[str]:
    """Return the 77 Hubble science categories shipped with astrovl."""
    text = resources.files("astrovl").joinpath("data/hubble_categories.json").read_text("utf-8")
    return list(json.loads(text))


HUBBLE_CATEGORIES: tuple[str, ...] = tuple(load_categories())

#: Prompt templates averaged for zero-shot classification ("{}" is the category).
DEFAULT_TEMPLATES: tuple[str, ...] = ("{}", "an astronomical image of {}")
