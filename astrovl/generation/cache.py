"""An append-only JSON Lines cache that lets long generation jobs resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["JSONLCache", "cache_key"]

log = logging.getLogger(__name__)


def cache_key(*parts: Any) -> str:
    """SHA-256 hex digest of ``parts`` (JSON-encoded, so the order and types matter)."""
    blob = json.dumps(list(parts), ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JSONLCache:
    """A persistent key -> JSON value store kept as one JSON object per line.

    Each :meth:`put` appends one complete line with a single ``write`` on a file
    opened for appending and flushes it to disk, so a job killed at any moment
    loses at most the record it was writing. Lines that cannot be parsed (for
    example the half-written last line of a killed job) are skipped when the file
    is read; the next append starts on a fresh line. When a key occurs more than
    once, the last value wins.

    Parameters
    ----------
    path : str or path-like
        The ``.jsonl`` file; created (with its parent directories) on first write.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> cache = JSONLCache(pathlib.Path(tempfile.mkdtemp()) / "summaries.jsonl")
    >>> cache.put("k1", {"caption": "galaxies; star formation"})
    >>> JSONLCache(cache.path).get("k1")
    {'caption': 'galaxies; star formation'}
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._data: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.skipped_lines = 0
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise IsADirectoryError(f"cache path {str(self.path)!r} is a directory; pass a .jsonl file path")
        with open(self.path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = raw.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line.decode("utf-8"))
                    key = rec["key"]
                    value = rec["value"]
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                    self.skipped_lines += 1
                    log.warning("skipping unreadable line %d of cache %s", lineno, self.path)
                    continue
                if not isinstance(key, str):
                    self.skipped_lines += 1
                    continue
                self._data[key] = value

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        return f"<JSONLCache {len(self)} entries at {str(self.path)!r}>"

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value stored under ``key`` (or ``default``)."""
        return self._data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (anything JSON can encode) under ``key`` and append it to the file."""
        line = json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.fstat(fd).st_size
                if size and not self._ends_with_newline(size):
                    data = b"\n" + data  # a previous job died mid-line; start afresh
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._data[key] = value

    def _ends_with_newline(self, size: int) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(size - 1)
            return fh.read(1) == b"\n"
