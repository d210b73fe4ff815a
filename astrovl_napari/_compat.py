"""Keep torch usable inside a napari session that renders with Mesa.

Mesa's OpenGL drivers (llvmpipe software rendering, radeonsi...) load the
system ``libLLVM``. Triton, which ``torch`` imports lazily (through
``torch._dynamo``, for example when torchvision or open_clip load), carries
its own LLVM; loading it into a process that already holds Mesa's LLVM
crashes the interpreter with a segmentation fault. napari creates its OpenGL
context before the plugin first imports torch, so the plugin checks for that
situation and, only then, keeps triton from loading: torch then runs without
triton (eager inference, which is all the widgets need). Set the environment
variable ``ASTROVL_ALLOW_TRITON=1`` to skip the check.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["avoid_llvm_clash"]

log = logging.getLogger(__name__)


def _llvm_loaded() -> bool:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            return any("libLLVM" in line for line in fh)
    except OSError:
        return False


def avoid_llvm_clash() -> bool:
    """Block the ``triton`` import when a system ``libLLVM`` is already loaded (Linux only).

    Call before code that may import torch. Does nothing when triton is already
    imported (it loaded before the OpenGL driver: no clash), off Linux, or with
    ``ASTROVL_ALLOW_TRITON=1``.

    Returns
    -------
    bool
        True when triton was blocked by this call or an earlier one.
    """
    if "triton" in sys.modules:
        return sys.modules["triton"] is None
    if not sys.platform.startswith("linux") or os.environ.get("ASTROVL_ALLOW_TRITON") == "1":
        return False
    if not _llvm_loaded():
        return False
    sys.modules["triton"] = None  # "import triton" now raises ImportError: torch runs without it
    log.warning(
        "the OpenGL driver loaded the system LLVM, which crashes triton on import; torch runs "
        "without triton in this session (set ASTROVL_ALLOW_TRITON=1 to disable this guard)"
    )
    return True
