"""Optional dependency imports with helpful errors."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["optional_import"]


def optional_import(module: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import ``module`` or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f" for {purpose}" if purpose else ""
        hint = f"pip install 'astrovl[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise ImportError(f"{module} is required{what}; install it with: {hint}") from exc
