"""Optional dependency imports with errors that name the extra to install.

The core install (``pip install astrovl``) holds what loading images and CLIP
search need. Everything else comes with an extra of the package, and
:data:`EXTRAS` says which: an import of a missing optional module raises an
:class:`ImportError` that says ``pip install 'astrovl[EXTRA]'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "optional_import", "missing_dependency", "extra_for"]

#: top-level import name of each optional dependency -> the extra of astrovl that installs it
EXTRAS: dict[str, str] = {
    # LLaVA models, their conversion and training
    "transformers": "llava",
    "accelerate": "llava",
    "peft": "llava",
    "sentencepiece": "llava",
    "google.protobuf": "llava",
    # dataset builders: archive queries and guided caption / conversation generation
    "astroquery": "datasets",
    "outlines": "datasets",
    "llguidance": "datasets",
    "pydantic": "datasets",
    # evaluation of generated descriptions and the Galaxy10 DECaLS benchmark
    "sentence_transformers": "evaluation",
    "h5py": "evaluation",
    "pyarrow": "evaluation",
    # embedding archives on a dask cluster
    "dask": "distributed",
    "distributed": "distributed",
    # the napari plugin
    "napari": "napari",
    "magicgui": "napari",
    "qtpy": "napari",
    # the web search service
    "starlette": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    # the offline language models of the dataset generators
    "gguf": "offline-models",
}


def extra_for(module: str) -> str | None:
    """The extra of astrovl that installs ``module`` (``None`` when it has none).

    Parameters
    ----------
    module : str
        Import name, e.g. ``"transformers"`` or ``"pyarrow.parquet"``.

    Returns
    -------
    str or None
        The extra's name (a key of ``pip install 'astrovl[EXTRA]'``).
    """
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        extra = EXTRAS.get(".".join(parts[:n]))
        if extra is not None:
            return extra
    return None


def missing_dependency(module: str, extra: str | None = None,
                       purpose: str | None = None) -> ImportError:
    """The :class:`ImportError` to raise when the optional ``module`` cannot be imported.

    Parameters
    ----------
    module : str
        Import name of the missing module.
    extra : str, optional
        Extra of astrovl that installs it; looked up in :data:`EXTRAS` by default.
    purpose : str, optional
        What the module is needed for, e.g. ``"LLaVA models"``.

    Returns
    -------
    ImportError
        With a message naming the module, the purpose and the ``pip install``
        command (``name`` is set to ``module``).
    """
    extra = extra or extra_for(module)
    what = f" for {purpose}" if purpose else ""
    hint = f"pip install 'astrovl[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
    return ImportError(f"{module} is required{what}; install it with: {hint}", name=module)


def optional_import(module: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import the optional ``module`` or raise an ImportError that says how to install it.

    Parameters
    ----------
    module : str
        Import name, e.g. ``"transformers"``.
    extra : str, optional
        Extra of astrovl that installs it; looked up in :data:`EXTRAS` by default.
    purpose : str, optional
        What the module is needed for, named in the error.

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    ImportError
        When ``module`` (or one of its own dependencies) cannot be imported; the
        message says ``pip install 'astrovl[EXTRA]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_dependency(module, extra, purpose) from exc
