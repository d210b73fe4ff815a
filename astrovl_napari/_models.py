"""A registry that loads models lazily and shares them between widgets.

The "Search" and "Classify" widgets both use a CLIP model; when they name the
same model and device they get the same :class:`~astrovl.CLIPEmbedder`
instance, loaded once. Loading happens on first use (in a worker thread), never
when a widget is created.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._compat import avoid_llvm_clash

__all__ = ["ModelSpec", "ModelRegistry", "default_registry", "load_model"]

KINDS = ("clip", "llava")


@dataclass(frozen=True)
class ModelSpec:
    """What to load.

    Attributes
    ----------
    kind : {"clip", "llava"}
    name : str
        A model name (open_clip name, ``hf-hub:`` id, Hugging Face repo id) or a
        local directory. Empty means the configured default
        (``astrovl.conf.clip_model`` / ``astrovl.conf.llava_model``).
    pretrained : str or None
        open_clip pretrained tag or checkpoint file (CLIP only).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
    """

    kind: str
    name: str = ""
    pretrained: str | None = None
    device: str = "auto"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model kind {self.kind!r} is not known; use one of {KINDS}")

    def normalized(self) -> ModelSpec:
        """The same spec with defaults filled in and local paths made absolute."""
        from astrovl import conf

        name = (self.name or "").strip()
        pretrained = (self.pretrained or "").strip() or None
        if not name:
            if self.kind == "clip":
                name = conf.clip_model
                pretrained = pretrained or (conf.clip_pretrained or None)
            else:
                name = conf.llava_model
        name = _absolute_if_local(name)
        if pretrained is not None:
            pretrained = _absolute_if_local(pretrained)
        device = (self.device or "auto").strip().lower() or "auto"
        return ModelSpec(self.kind, name, pretrained if self.kind == "clip" else None, device)

    def describe(self) -> str:
        """Short text for status lines."""
        extra = f" ({self.pretrained})" if self.pretrained else ""
        return f"{self.name}{extra} on {self.device}"


def _absolute_if_local(name: str) -> str:
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        return str(Path(expanded).resolve())
    return name


def load_model(spec: ModelSpec) -> Any:
    """Load the model that ``spec`` names (a :class:`~astrovl.CLIPEmbedder` or :class:`~astrovl.AstroLLaVA`).

    ``spec`` should be normalized (see :meth:`ModelSpec.normalized`).
    """
    avoid_llvm_clash()  # before the first torch import
    if spec.kind == "clip":
        from astrovl.clip import CLIPEmbedder

        return CLIPEmbedder.from_pretrained(spec.name, spec.pretrained, device=spec.device)
    from astrovl.llava import AstroLLaVA

    return AstroLLaVA.from_pretrained(spec.name, device=spec.device)


class ModelRegistry:
    """Thread-safe cache of loaded models keyed by :class:`ModelSpec`.

    Parameters
    ----------
    loader : callable, optional
        ``loader(spec) -> model``; default :func:`load_model`.

    Examples
    --------
    >>> from astrovl_napari import ModelRegistry, ModelSpec
    >>> registry = ModelRegistry(loader=lambda spec: f"model for {spec.name}")
    >>> a = registry.get(ModelSpec("clip", "./my-clip", device="cpu"))
    >>> b = registry.get(ModelSpec("clip", "./my-clip", device="cpu"))
    >>> a is b, registry.load_count
    (True, 1)
    """

    def __init__(self, loader: Callable[[ModelSpec], Any] | None = None):
        self._loader = loader or load_model
        self._models: dict[ModelSpec, Any] = {}
        self._locks: dict[ModelSpec, threading.Lock] = {}
        self._guard = threading.Lock()
        self.load_count = 0

    @staticmethod
    def _key(spec: ModelSpec) -> ModelSpec:
        avoid_llvm_clash()  # before the first torch import
        spec = spec.normalized()
        if spec.device == "auto":
            from astrovl.utils import resolve_device

            spec = ModelSpec(spec.kind, spec.name, spec.pretrained, str(resolve_device("auto")))
        return spec

    def get(self, spec: ModelSpec) -> Any:
        """Return the model for ``spec``, loading it on first use.

        Concurrent calls for the same spec wait for one load instead of loading twice.
        """
        key = self._key(spec)
        with self._guard:
            if key in self._models:
                return self._models[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if key in self._models:
                    return self._models[key]
            model = self._loader(key)
            with self._guard:
                self._models[key] = model
                self.load_count += 1
            return model

    def is_loaded(self, spec: ModelSpec) -> bool:
        """True when ``spec`` is already in memory."""
        key = self._key(spec)
        with self._guard:
            return key in self._models

    def put(self, spec: ModelSpec, model: Any) -> None:
        """Register an already loaded model under ``spec`` (for models built in a session)."""
        key = self._key(spec)
        with self._guard:
            self._models[key] = model

    def loaded(self) -> list[ModelSpec]:
        """Specs of the models in memory."""
        with self._guard:
            return list(self._models)

    def clear(self, kind: str | None = None) -> None:
        """Forget loaded models (all, or those of one ``kind``) so their memory can be freed."""
        with self._guard:
            for key in [k for k in self._models if kind is None or k.kind == kind]:
                del self._models[key]


_DEFAULT: ModelRegistry | None = None
_DEFAULT_GUARD = threading.Lock()


def default_registry() -> ModelRegistry:
    """The registry shared by all widgets of the plugin."""
    global _DEFAULT
    with _DEFAULT_GUARD:
        if _DEFAULT is None:
            _DEFAULT = ModelRegistry()
        return _DEFAULT
