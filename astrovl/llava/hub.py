"""Find checkpoints by name: local directories and Hugging Face hub ids.

Hub ids are resolved with :mod:`huggingface_hub` (its standard cache,
``HF_HOME``/``HF_HUB_CACHE``, ``revision=`` pinning, and offline use from the
cache with ``HF_HUB_OFFLINE=1``). Only the files a loader needs are fetched
(configuration, tokenizer and the weights of one format), never training
state such as ``training_args.bin``.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..exceptions import AstroVLWarning, ModelNotFoundError
from ..utils.hub import (
    directory_not_found,
    download_command,
    fetch_files,
    hub_cache_dir,
    is_local_name,
    looks_like_repo_id,
)

__all__ = ["ResolvedCheckpoint", "resolve_checkpoint", "resolve_reference", "fetch_files", "download_command",
           "hub_cache_dir", "looks_like_repo_id", "is_local_name", "KNOWN_CHECKPOINTS", "TrainingPathWarning"]

log = logging.getLogger(__name__)

#: Files every loader reads: configurations, tokenizers, chat templates.
CONFIG_PATTERNS = ("*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt", "*.py")

#: Released checkpoints often name their base or vision tower by a path on the machine that
#: trained them; these directory names are mapped to the hub ids they were downloaded from.
KNOWN_CHECKPOINTS = {
    "llava-v1.5-7b": "liuhaotian/llava-v1.5-7b",
    "llava-v1.5-13b": "liuhaotian/llava-v1.5-13b",
    "llava-1.5-7b-hf": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b-hf": "llava-hf/llava-1.5-13b-hf",
    "clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "clip-vit-large-patch14": "openai/clip-vit-large-patch14",
    "vicuna-7b-v1-5": "lmsys/vicuna-7b-v1.5",
    "vicuna-7b-v1.5": "lmsys/vicuna-7b-v1.5",
    "vicuna-13b-v1-5": "lmsys/vicuna-13b-v1.5",
    "vicuna-13b-v1.5": "lmsys/vicuna-13b-v1.5",
}


class TrainingPathWarning(AstroVLWarning):
    """A checkpoint names a path of the machine that trained it; a hub release stands in for it."""


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a named checkpoint lives on this machine.

    Attributes
    ----------
    path : pathlib.Path
        Local directory (a hub snapshot for hub ids).
    repo_id : str or None
        Hub id, or None for a local directory.
    revision : str or None
        Commit hash of the snapshot (hub ids), None for local directories.
    """

    path: Path
    repo_id: str | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        """The name to show: the hub id (with its revision) or the directory."""
        if self.repo_id is None:
            return str(self.path)
        return f"{self.repo_id}@{self.revision[:12]}" if self.revision else self.repo_id


def resolve_checkpoint(name_or_path: str | os.PathLike, *, revision: str | None = None,
                       patterns=CONFIG_PATTERNS, repo_type: str = "model") -> ResolvedCheckpoint:
    """Find a checkpoint: a local directory as it is, a hub id through the hub cache.

    Parameters
    ----------
    name_or_path : str or path-like
        A local directory or a hub id (``ORG/NAME``).
    revision : str, optional
        Branch, tag or commit of a hub id (default: ``main``).
    patterns : sequence of str
        Files to fetch for a hub id (default: configurations and tokenizers; the
        weights are fetched later by :func:`fetch_files`, once the layout is known).

    Raises
    ------
    ModelNotFoundError
        For a missing directory, a malformed name, or a hub id that is neither
        cached nor downloadable (the message names the cache and the command
        that downloads it).
    """
    path = Path(os.path.expanduser(str(name_or_path)))
    if is_local_name(name_or_path):
        if not path.is_dir():
            raise directory_not_found(name_or_path)
        if revision is not None:
            log.warning("revision=%r is ignored for the local directory %s", revision, path)
        return ResolvedCheckpoint(path.resolve())
    name = str(name_or_path)
    if path.exists():
        raise directory_not_found(name_or_path)
    if not looks_like_repo_id(name):
        raise ModelNotFoundError(
            f"{name!r} is neither an existing directory nor a Hugging Face hub id (ORG/NAME); pass a local "
            "checkpoint directory or a hub id such as 'UniverseTBD/AstroLLaVA_v3'")
    snapshot = fetch_files(name, patterns, revision=revision, repo_type=repo_type)
    return ResolvedCheckpoint(snapshot, repo_id=name, revision=snapshot.name)


def resolve_reference(name: str, *, what: str, revision: str | None = None,
                      patterns=CONFIG_PATTERNS) -> ResolvedCheckpoint:
    """Resolve a checkpoint that another checkpoint names (a LoRA base, a vision tower).

    Such names are often paths on the machine that trained the model; when the
    path does not exist here and its last component is a known release
    (:data:`KNOWN_CHECKPOINTS`), the hub id is used instead (and logged).
    """
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return ResolvedCheckpoint(path.resolve())
    if not looks_like_repo_id(name):
        known = KNOWN_CHECKPOINTS.get(path.name)
        if known is None:
            raise ModelNotFoundError(
                f"the {what} {name!r} is not a directory on this machine nor a hub id (directory not found); "
                "pass it explicitly (a local directory or a hub id)")
        warnings.warn(f"the {what} {name!r} is a path on the machine that trained the checkpoint and does not "
                      f"exist here; using the hub checkpoint {known!r} instead (pass it explicitly to choose "
                      "another)", TrainingPathWarning, stacklevel=3)
        name = known
    return resolve_checkpoint(name, revision=revision, patterns=patterns)
