"""A Hugging Face hub cache written by hand, so that test models load by hub id offline.

:func:`write_hub_snapshot` is the one writer every test helper and test uses.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ..utils.files import OUTPUT_MARKER

__all__ = ["write_hub_snapshot"]


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_hub_snapshot(cache_dir: str | os.PathLike, repo_id: str, source: str | os.PathLike, *,
                       revision: str | None = None, ref: str | None = "main", repo_type: str = "model") -> Path:
    """Put the files of directory ``source`` into a Hugging Face hub cache as ``repo_id``.

    The layout huggingface_hub writes: ``models--ORG--NAME/blobs/<sha256>``,
    ``snapshots/<revision>/<file>`` (relative symbolic links to the blobs; plain
    copies where links are not possible) and ``refs/<ref>`` holding the revision.

    Parameters
    ----------
    cache_dir : path
        The hub cache (what ``HF_HUB_CACHE`` points at).
    repo_id : str
        ``ORG/NAME``.
    source : path
        Directory whose files (recursively) become the snapshot (but for
        astrovl's output marker).
    revision : str, optional
        40-character commit hash; default a hash of the content.
    ref : str or None
        Branch or tag to point at the revision (None: no ref, only the commit).
    repo_type : {"model", "dataset"}

    Returns
    -------
    pathlib.Path
        The snapshot directory (its name is the revision).
    """
    source = Path(source)
    # astrovl's output marker says who wrote the source folder; it is no file of the repository
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER)
    shas = {p: _sha(p) for p in files}
    if revision is None:
        revision = hashlib.sha1("".join(f"{p.relative_to(source)}:{s}" for p, s in shas.items()).encode()
                                ).hexdigest()
    prefix = {"model": "models", "dataset": "datasets"}[repo_type]
    repo = Path(cache_dir) / f"{prefix}--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for p, sha in shas.items():
        blob = repo / "blobs" / sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snapshot / p.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            os.symlink(os.path.relpath(blob, link.parent), link)
        except OSError:
            shutil.copyfile(blob, link)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(revision)
    return snapshot
