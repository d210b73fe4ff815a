"""Torch device selection."""

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
        If CUDA is requested but not available.
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
            "machine; pass device='cpu' (or 'auto')"
        )
    return dev
