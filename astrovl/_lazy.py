"""Lazy attribute exports: heavy submodules load on first use of a public name."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(module_name: str, names: dict[str, str]) -> tuple[Callable, Callable]:
    """Return ``(__getattr__, __dir__)`` for a module exporting ``names`` lazily.

    ``names`` maps each public name to the module that defines it. The first
    access imports that module and caches the value in the package namespace.
    """

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            setattr(sys.modules[module_name], name, value)
            return value
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    def __dir__():
        module = sys.modules[module_name]
        return sorted(set(vars(module)) | set(getattr(module, "__all__", ())) | set(names))

    return __getattr__, __dir__
