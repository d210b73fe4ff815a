"""Atomic file writes and safe paths."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..exceptions import ManifestError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_directory", "safe_join"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True) -> Iterator:
    """Open a temporary file next to ``path`` and rename it over ``path`` on success.

    Readers never see a half-written file: on any exception the temporary file is
    removed and ``path`` is left untouched.

    Parameters
    ----------
    path : str or path-like
        Final destination.
    mode : {"wb", "w"}
        Binary or text mode.
    fsync : bool
        Flush the file to the disk before the rename (default). Writers of many
        small files can pass False and sync once at the end (``os.sync``); the
        rename still makes each file appear whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual permissions
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place on success.

    Yields the temporary directory to fill. If ``path`` exists and ``overwrite`` is
    true, it is replaced only after the new content is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def safe_join(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """Join ``relative`` to ``root`` and refuse results outside ``root``.

    Raises
    ------
    ManifestError
        If ``relative`` is absolute or climbs out of ``root`` (``..``, symlinks).
    """
    root_path = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute():
        raise ManifestError(
            f"path {str(relative)!r} is absolute; dataset paths must be relative to the "
            f"dataset root {str(root_path)!r}"
        )
    full = (root_path / rel).resolve()
    if full != root_path and root_path not in full.parents:
        raise ManifestError(
            f"path {str(relative)!r} escapes the dataset root {str(root_path)!r}; "
            "remove '..' components or symbolic links that leave the root"
        )
    return full
