"""One rule for model names: a local directory or a Hugging Face hub id.

Every loader of astrovl (LLaVA checkpoints, CLIP models, datasets) decides with
:func:`is_local_name` whether a name is a path on this machine or a hub id, so
that a relative path such as ``./checkpoints/llava-v1.5-7b`` or
``checkpoints/run1/final`` is never sent to the hub:

- a name that is an existing directory is local;
- a name that starts with ``./``, ``../``, ``/``, ``~`` (or a Windows drive or
  backslash) is local, existing or not;
- a name with more than one ``/`` is local (hub ids have exactly one:
  ``ORG/NAME``);
- anything else of the form ``ORG/NAME`` is a hub id.

A local name that does not exist is reported as "directory not found"
(:func:`directory_not_found`).

Every hub lookup of astrovl goes through this module too: :func:`fetch_files`
(a snapshot of the files matching some patterns: LLaVA checkpoints, the
Galaxy10 dataset) and :func:`fetch_file` (one file: the CLIP loader, which tries
the open_clip and transformers layouts in turn), both through
``huggingface_hub`` and its cache, so that ``HF_HUB_OFFLINE=1`` and the cache
settings hold everywhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..exceptions import ModelNotFoundError

__all__ = ["is_local_name", "looks_like_repo_id", "directory_not_found", "hub_cache_dir", "hub_offline",
           "download_command", "fetch_files", "fetch_file"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\", "\\")


def is_local_name(name: str | os.PathLike) -> bool:
    """True if ``name`` means a path on this machine, never a hub id (see the module docstring)."""
    if isinstance(name, os.PathLike):
        return True
    text = str(name)
    if text in (".", "..") or text.startswith(_LOCAL_PREFIXES) or re.match(r"^[A-Za-z]:[\\/]", text):
        return True
    if text.count("/") > 1 or "\\" in text:
        return True
    return Path(os.path.expanduser(text)).is_dir()


def looks_like_repo_id(name: str | os.PathLike) -> bool:
    """True if ``name`` is a hub id ``ORG/NAME`` (and not a local name, see :func:`is_local_name`)."""
    if is_local_name(name):
        return False
    text = str(name)
    return bool(_REPO_ID.match(text)) and ".." not in text


def directory_not_found(name: str | os.PathLike, what: str = "checkpoint") -> ModelNotFoundError:
    """The error for a local name that does not exist."""
    path = Path(os.path.expanduser(str(name)))
    if path.exists():
        return ModelNotFoundError(f"{str(name)!r} is a file, not a {what} directory; pass the directory that "
                                  "holds its files, or a hub id (ORG/NAME)")
    return ModelNotFoundError(
        f"{what} directory not found: {str(name)!r} (resolved to {str(path.absolute())!r}). A name that starts "
        "with './', '../', '/' or '~', or that has more than one '/', is a local path and is never looked up "
        "on the Hugging Face hub; hub ids have the form ORG/NAME")


def hub_cache_dir() -> str:
    """The Hugging Face hub cache directory in use (``HF_HUB_CACHE``, under ``HF_HOME``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """True when huggingface_hub may not download (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_command(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str:
    """The shell command that downloads ``repo_id`` into the cache, for this huggingface_hub."""
    import huggingface_hub

    version = tuple(int(p) for p in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    cmd = "hf download" if version >= (0, 34) else "huggingface-cli download"
    cmd += f" {repo_id}"
    if revision:
        cmd += f" --revision {revision}"
    if repo_type != "model":
        cmd += f" --repo-type {repo_type}"
    return cmd


def _not_found(repo_id: str, revision: str | None, repo_type: str, exc: Exception | None,
               what: str = "") -> ModelNotFoundError:
    cache = hub_cache_dir()
    rev = f" at revision {revision!r}" if revision else ""
    kind = "dataset" if repo_type == "dataset" else "model"
    if hub_offline():
        why = f"it is not in the Hugging Face cache {cache!r} and HF_HUB_OFFLINE=1 forbids downloading it"
    else:
        why = (f"it could not be downloaded into the Hugging Face cache {cache!r} "
               f"({type(exc).__name__}: {str(exc).splitlines()[0] if exc and str(exc) else 'not found'})")
    return ModelNotFoundError(
        f"{kind} {repo_id!r}{rev}{what}: {why}. Download it on a machine with internet access with "
        f"`{download_command(repo_id, revision, repo_type)}` (it goes to {cache!r}; set HF_HOME or "
        f"HF_HUB_CACHE to put the cache elsewhere), or pass a local directory"
    )


def fetch_files(repo_id: str, patterns, *, revision: str | None = None, repo_type: str = "model") -> Path:
    """Download (or find in the cache) the files of ``repo_id`` matching ``patterns``.

    Returns the snapshot directory. Raises :class:`ModelNotFoundError` with the
    download command when the repository (or revision) is neither cached nor
    downloadable.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type,
                                      allow_patterns=list(patterns)))
    except Exception as exc:  # not cached offline, HTTP errors (missing, gated, private), network
        raise _not_found(repo_id, revision, repo_type, exc) from exc


def fetch_file(repo_id: str, filename: str, *, revision: str | None = None,
               cache_dir: str | os.PathLike | None = None) -> Path:
    """Download (or find in the cache) one file of the model repository ``repo_id``.

    Parameters
    ----------
    repo_id : str
        ``ORG/NAME``.
    filename : str
        Path of the file in the repository.
    revision : str, optional
        Branch, tag or commit (default the main branch).
    cache_dir : path-like, optional
        Hub cache (default ``HF_HUB_CACHE``).

    Returns
    -------
    pathlib.Path
        The file in the snapshot of the cache (its parent is the snapshot directory).

    Raises
    ------
    Exception
        ``huggingface_hub``'s own errors (missing file or repository, offline
        without the file in the cache) as they are: a caller trying several
        files in turn reports them together.
    """
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
