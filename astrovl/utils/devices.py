"""Torch device selection: one rule for every command, model and trainer.

:func:`resolve_device` turns what a user asked for into a :class:`torch.device`
and refuses a device this machine does not have (``--device cuda`` without
CUDA is an error everywhere, never a silent fall-back to the CPU).
"""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(device=None):
    """Return a :class:`torch.device` for ``device``.

    Parameters
    ----------
    device : str, torch.device or None
        ``None`` uses ``astrovl.conf.device``. ``"auto"`` (given here or set
        in the configuration) means CUDA when available, else CPU.

    Raises
    ------
    ValueError
        If the name is unknown, or CUDA (or MPS) is requested but not available.
    """
    import torch

    from ..config import conf

    if device is None:
        device = conf.device or "auto"
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise ValueError(
                f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
            ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was requested but CUDA is not available on this "
            "machine; use the CPU (--device cpu, device='cpu') or 'auto'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r} was requested but this machine has {torch.cuda.device_count()} "
            "CUDA device(s), numbered from 0"
        )
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(
            f"device {str(device)!r} was requested but MPS is not available on this machine; use the "
            "CPU (--device cpu, device='cpu') or 'auto'"
        )
    return dev
