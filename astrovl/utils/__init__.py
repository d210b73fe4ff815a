"""Small shared helpers (files, paths, devices, optional imports, progress)."""

from .devices import resolve_device
from .files import (
    atomic_directory,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    prepare_output_dir,
    safe_join,
)
from .imports import optional_import
from .progress import progress_bar

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_directory",
    "safe_join",
    "check_output_dir",
    "prepare_output_dir",
    "resolve_device",
    "optional_import",
    "progress_bar",
]
