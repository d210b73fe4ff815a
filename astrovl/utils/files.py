"""Atomic file writes, safe output folders and safe paths.

Output folders
--------------
Every folder astrovl writes (an index, a model, a converted checkpoint, a
training run, a dataset) carries a marker file, :data:`OUTPUT_MARKER`
(``.astrovl-output.json``, holding ``{"kind": ..., "astrovl_version": ...}``).
astrovl replaces or fills a folder only when it is missing, empty, or an
earlier astrovl output of the same kind; a folder holding anything else is
refused with :class:`~astrovl.exceptions.OutputDirectoryError`, which names
the folder and suggests a new subfolder. So a user's files are never deleted
or overwritten by a save.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..exceptions import ManifestError, OutputDirectoryError, UntrustedSourceError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_directory", "safe_join",
           "OUTPUT_MARKER", "read_output_marker", "write_output_marker", "is_output_of", "check_output_dir",
           "prepare_output_dir", "remove_outputs", "resolve_source", "is_within", "INDEX_OUTPUT",
           "CLIP_MODEL_OUTPUT", "LLAVA_MODEL_OUTPUT", "CLIP_TRAINING_OUTPUT", "LLAVA_TRAINING_OUTPUT",
           "HUBBLE_DATASET_OUTPUT", "OUTREACH_DATASET_OUTPUT", "SYNTHETIC_DATASET_OUTPUT", "CHECKPOINT_OUTPUT",
           "IMAGE_CACHE_OUTPUT", "THUMBNAIL_CACHE_OUTPUT", "DEMO_OUTPUT"]

#: name of the file that marks a folder as an astrovl output (see the module documentation)
OUTPUT_MARKER = ".astrovl-output.json"

# kinds of astrovl output folders (the ``kind`` of their marker) that astrovl wrote before it marked them
#: an embedding index (:meth:`astrovl.clip.EmbeddingIndex.save`)
INDEX_OUTPUT = "index"
#: a CLIP model (:meth:`astrovl.CLIPEmbedder.save_pretrained`)
CLIP_MODEL_OUTPUT = "clip-model"
#: a LLaVA model in the transformers layout (a conversion, :meth:`astrovl.AstroLLaVA.save_pretrained`)
LLAVA_MODEL_OUTPUT = "llava-model"
#: a CLIP training run (:func:`astrovl.training.train_clip`)
CLIP_TRAINING_OUTPUT = "clip-training"
#: a LLaVA training run (:func:`astrovl.training.train_llava`)
LLAVA_TRAINING_OUTPUT = "llava-training"
#: a Hubble preview dataset (:class:`astrovl.HubblePreviewDatasetBuilder`)
HUBBLE_DATASET_OUTPUT = "hubble-dataset"
#: an outreach dataset (:class:`astrovl.OutreachDatasetBuilder`)
OUTREACH_DATASET_OUTPUT = "outreach-dataset"
#: a synthetic sky dataset (:class:`astrovl.SyntheticSkyDataset`)
SYNTHETIC_DATASET_OUTPUT = "synthetic-dataset"
#: a training checkpoint (``checkpoint/`` of a training run)
CHECKPOINT_OUTPUT = "checkpoint"
#: the image cache of a training run (``astrovl.datasets.imagecache.DiskImageCache``)
IMAGE_CACHE_OUTPUT = "image-cache"
#: the thumbnail cache of ``astrovl serve``
THUMBNAIL_CACHE_OUTPUT = "thumbnail-cache"
#: the demonstration's output folder (``astrovl demo``)
DEMO_OUTPUT = "demo"


def _is_thumbnail_cache(directory: Path) -> bool:
    """True when every entry of ``directory`` is a two-hex-digit folder (the thumbnail cache's layout)."""
    return all(len(p.name) == 2 and p.is_dir() and all(c in "0123456789abcdef" for c in p.name)
               for p in directory.iterdir())


def _json_format(path: Path) -> object:
    """The ``"format"`` of the JSON object in ``path`` (None when unreadable or not an object)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


#: how a folder written before output folders were marked is recognised, per kind (the files its
#: writer always wrote; the names are those of the writing modules, checked by the tests)
_EARLIER_OUTPUTS: dict[str, Callable[[Path], bool]] = {
    INDEX_OUTPUT: lambda d: _json_format(d / "index.json") == "astrovl-embedding-index",
    CLIP_MODEL_OUTPUT: lambda d: _json_format(d / "astrovl_clip.json") == "astrovl-clip",
    LLAVA_MODEL_OUTPUT: lambda d: (d / "astrovl_conversion.json").is_file(),
    CLIP_TRAINING_OUTPUT: lambda d: (d / "checkpoint" / "state.json").is_file() or (
        (d / "config.json").is_file() and (d / "metrics.csv").is_file()),
    LLAVA_TRAINING_OUTPUT: lambda d: (d / "checkpoint" / "state.json").is_file(),
    HUBBLE_DATASET_OUTPUT: lambda d: (d / "products.ecsv").is_file() or (d / "build_report.json").is_file(),
    OUTREACH_DATASET_OUTPUT: lambda d: (d / "build_report.json").is_file(),
    SYNTHETIC_DATASET_OUTPUT: lambda d: (d / "images" / "sky_000000.fits").is_file(),
    CHECKPOINT_OUTPUT: lambda d: (d / "state.json").is_file(),
    IMAGE_CACHE_OUTPUT: lambda d: (d / "cache.json").is_file(),
    THUMBNAIL_CACHE_OUTPUT: lambda d: _is_thumbnail_cache(d),
    DEMO_OUTPUT: lambda d: (d / "report.html").is_file(),
}


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


def read_output_marker(path: str | os.PathLike) -> dict | None:
    """The marker of the astrovl output folder ``path`` (``{"kind": ...}``), or None.

    None when ``path`` is not a folder, has no marker, or its marker is unreadable.
    """
    try:
        marker = json.loads((Path(path) / OUTPUT_MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def write_output_marker(directory: str | os.PathLike, kind: str) -> Path:
    """Mark ``directory`` (which must exist) as an astrovl output of ``kind``; returns the marker path."""
    from .. import __version__

    path = Path(directory) / OUTPUT_MARKER
    atomic_write_text(path, json.dumps({"kind": str(kind), "astrovl_version": __version__}, indent=1) + "\n")
    return path


def is_output_of(directory: str | os.PathLike, kind: str) -> bool:
    """True when the folder ``directory`` is astrovl's output of ``kind``.

    A marked folder is one when its marker names ``kind``. An unmarked folder
    is one when astrovl wrote it before it marked its output folders: the
    kinds of this module's ``*_OUTPUT`` constants (:data:`INDEX_OUTPUT`,
    :data:`CLIP_MODEL_OUTPUT`, :data:`CHECKPOINT_OUTPUT`...) are recognised by
    the files their writers always wrote; other kinds never are. This is the
    one rule every writer of astrovl applies (through :func:`check_output_dir`,
    :func:`prepare_output_dir` and :func:`atomic_directory`).

    Parameters
    ----------
    directory : path-like
    kind : str
        The kind of output (one of the constants above, or another marker kind).

    Returns
    -------
    bool
    """
    directory = Path(directory)
    if not directory.is_dir():
        return False
    marker = read_output_marker(directory)
    if marker is not None:
        return marker["kind"] == kind
    earlier = _EARLIER_OUTPUTS.get(kind)
    return earlier is not None and earlier(directory)


def _foreign_entries(path: Path) -> list[str]:
    """Names in ``path`` other than the marker and its temporary files, sorted."""
    with os.scandir(path) as it:
        names = [e.name for e in it]
    return sorted(n for n in names if n != OUTPUT_MARKER
                  and not (n.startswith(f".{OUTPUT_MARKER}.") and n.endswith(".part")))


def check_output_dir(path: str | os.PathLike, kind: str, *,
                     recognize: Callable[[Path], bool] | None = None) -> bool:
    """Check that astrovl may write the output folder ``path`` of ``kind``.

    Allowed: a missing path, an empty folder, or a folder marked as an earlier
    astrovl output of the same ``kind``.

    Parameters
    ----------
    path : path-like
        The output folder.
    kind : str
        What is written there (``"index"``, ``"clip-model"``, ``"clip-training"``...).
    recognize : callable, optional
        ``recognize(path) -> bool``: True for an unmarked folder that is
        nevertheless an earlier output of this kind (written by an astrovl
        version before markers existed). By default :func:`is_output_of`
        decides (the kinds astrovl wrote before it marked its folders).

    Returns
    -------
    bool
        True when ``path`` exists (and may be replaced or filled), False when it
        does not exist.

    Raises
    ------
    OutputDirectoryError
        ``path`` is a file, holds files astrovl did not write, or holds another
        kind of astrovl output. The message names the folder and suggests a new
        subfolder.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return False
    if not path.is_dir():
        raise OutputDirectoryError(
            f"the output {str(path)!r} is a file, not a folder; astrovl does not replace it. "
            f"Choose a new folder, e.g. {str(path.with_name(path.name + '-' + kind))!r}"
        )
    marker = read_output_marker(path)
    if marker is not None:
        if marker["kind"] == kind:
            return True
        raise OutputDirectoryError(
            f"the folder {str(path)!r} holds an astrovl output of another kind ({marker['kind']!r}), "
            f"not a {kind!r}; astrovl does not replace it. Write into a new subfolder instead, "
            f"e.g. {str(path / kind)!r}"
        )
    try:
        entries = _foreign_entries(path)
    except OSError as exc:
        raise OutputDirectoryError(f"the output folder {str(path)!r} cannot be read ({exc})") from exc
    if recognize is None:
        recognize = functools.partial(is_output_of, kind=kind)
    if not entries or recognize(path):
        return True
    shown = ", ".join(repr(n) for n in entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise OutputDirectoryError(
        f"the folder {str(path)!r} is not empty ({shown}) and is not an astrovl {kind!r} output; "
        "astrovl never replaces or fills a folder holding files it did not write. Write into a "
        f"new subfolder instead, e.g. {str(path / kind)!r}, or into an empty folder"
    )


def prepare_output_dir(path: str | os.PathLike, kind: str, *,
                       recognize: Callable[[Path], bool] | None = None) -> Path:
    """Create or reuse the output folder ``path``, filled piece by piece (a build, a training run).

    The folder is allowed when missing, empty, or an earlier astrovl output of
    the same ``kind`` (so an interrupted job resumes into its own folder); the
    marker is written before anything else.

    Parameters
    ----------
    path : path-like
    kind : str
    recognize : callable, optional
        See :func:`check_output_dir`.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    OutputDirectoryError
        See :func:`check_output_dir`.
    """
    path = Path(path)
    check_output_dir(path, kind, recognize=recognize)
    path.mkdir(parents=True, exist_ok=True)
    marker = read_output_marker(path)
    if marker is None or marker["kind"] != kind:
        write_output_marker(path, kind)
    return path


def remove_outputs(directory: str | os.PathLike, names) -> list[Path]:
    """Remove the entries ``names`` that astrovl wrote in its output folder ``directory``.

    Used to start a job again in the folder of an earlier one (``--overwrite``):
    only the named entries go (files, or folders with their content); anything
    else in the folder, and the folder's marker, stays.

    Parameters
    ----------
    directory : path-like
        An astrovl output folder (it must carry :data:`OUTPUT_MARKER`).
    names : iterable of str
        Plain names of entries directly in ``directory`` (no separators).

    Returns
    -------
    list of pathlib.Path
        What was removed.

    Raises
    ------
    OutputDirectoryError
        ``directory`` is not marked as an astrovl output.
    ValueError
        A name is not a plain entry name.
    """
    directory = Path(directory)
    if read_output_marker(directory) is None:
        raise OutputDirectoryError(f"the folder {str(directory)!r} is not an astrovl output folder; "
                                   "astrovl removes nothing from it")
    removed = []
    for name in names:
        if not name or name in (".", "..", OUTPUT_MARKER) or "/" in name or os.sep in name:
            raise ValueError(f"{name!r} is not the name of an entry of an output folder")
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True, *, kind: str = "output",
                     recognize: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place on success.

    Yields the temporary directory to fill; on success it is marked as an
    astrovl output of ``kind`` and renamed to ``path``. An existing ``path`` is
    replaced only when it is empty or an earlier astrovl output of the same
    ``kind`` (see :func:`check_output_dir`), and only after the new content is
    complete: an exception inside the block leaves it untouched.

    Parameters
    ----------
    path : path-like
        Final folder.
    overwrite : bool
        False refuses any existing ``path``.
    kind : str
        What the folder holds (``"index"``, ``"clip-model"``...).
    recognize : callable, optional
        See :func:`check_output_dir`.

    Raises
    ------
    OutputDirectoryError
        ``path`` holds files astrovl did not write, or another kind of output
        (checked before the block runs and again before the swap).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputDirectoryError(f"{path} already exists; pass overwrite=True to replace it")
    check_output_dir(path, kind, recognize=recognize)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        write_output_marker(tmp, kind)
        if check_output_dir(path, kind, recognize=recognize):
            old = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_source(source: str | os.PathLike, root: str | os.PathLike | None, *,
                   base: str | os.PathLike | None = None, what: str = "source") -> str | Path:
    """Check an image source named by someone else's record; return the URL or the local file.

    Parameters
    ----------
    source : str or path-like
        An ``http://`` or ``https://`` URL, or a local path.
    root : path-like or None
        The only directory local files may come from, passed explicitly by the
        caller; None allows no local files.
    base : path-like, optional
        The directory relative paths are taken from (for example the folder of
        the records file); default ``root``.
    what : str
        Where ``source`` comes from, for error messages (``"record 3 (apod.json)"``).

    Returns
    -------
    str or pathlib.Path
        The URL unchanged, or the resolved path (which lies under ``root``).

    Raises
    ------
    UntrustedSourceError
        Any other scheme (``file://``, ``ftp://``, ``data:``...), a local path
        without ``root``, or a path outside ``root`` (``..``, symbolic links).
    """
    import re

    text = os.fspath(source).strip() if isinstance(source, os.PathLike) else str(source).strip()
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", text)
    if scheme and not re.match(r"^[A-Za-z]:[\\/]", text):  # not a Windows drive letter
        if scheme.group(1).lower() in ("http", "https") and text.lower().startswith(("http://", "https://")):
            return text
        raise UntrustedSourceError(
            f"{what} names {text!r}: the scheme {scheme.group(1)!r}: is not allowed; records may name "
            "only http:// or https:// URLs, or files under the local image root passed explicitly"
        )
    if root is None:
        raise UntrustedSourceError(
            f"{what} names the local file {text!r}, but no local image root was given; records may "
            "name only http(s) URLs unless the caller passes the directory local images may come "
            "from (image_root=..., --image-root)"
        )
    root_path = Path(root).expanduser().resolve()
    candidate = Path(text).expanduser()
    start = Path(base).expanduser() if base is not None else root_path
    full = (candidate if candidate.is_absolute() else start / candidate).resolve()
    if not is_within(full, root_path):
        raise UntrustedSourceError(
            f"{what} names {text!r}, which lies outside the local image root {str(root_path)!r}; "
            "records may name only files under that root (no '..' or links out of it) or http(s) URLs"
        )
    return full


def is_within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when ``path`` is the folder ``root`` or lies under it, both resolved (links followed)."""
    full, root_path = Path(path).resolve(), Path(root).resolve()
    return full == root_path or root_path in full.parents


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
    if not is_within(full, root_path):
        raise ManifestError(
            f"path {str(relative)!r} escapes the dataset root {str(root_path)!r}; "
            "remove '..' components or symbolic links that leave the root"
        )
    return full
