"""Shared training utilities: schedules, seeds, checkpoints, metric logs and plots."""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..exceptions import CheckpointError
from ..utils.files import atomic_directory, atomic_write

__all__ = [
    "seed_everything",
    "lr_lambda",
    "save_checkpoint",
    "load_checkpoint",
    "write_history",
    "plot_history",
    "CHECKPOINT_DIR",
    "checkpoint_errors",
    "rng_state",
    "restore_rng_state",
]

CHECKPOINT_DIR = "checkpoint"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str = "constant"):
    """Multiplier of the base learning rate at each step: linear warm-up, then constant or cosine."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule={schedule!r} must be 'constant' or 'cosine'")

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def save_checkpoint(directory, *, model, optimizer, scheduler, state: dict, extra_files: dict | None = None) -> Path:
    """Write a resumable checkpoint atomically.

    ``model.safetensors`` (weights), ``optimizer.pt`` and ``scheduler.pt`` (plain
    tensor state dicts, loaded with ``weights_only=True``), ``rng.pt`` (RNG
    states) and ``state.json`` (step, data position, history).
    """
    import torch
    from safetensors.torch import save_model

    directory = Path(directory)
    with atomic_directory(directory, kind="checkpoint", recognize=lambda p: (p / "state.json").is_file()) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    return directory


def load_checkpoint(directory, *, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its state dict.

    Raises
    ------
    CheckpointError
        If files are missing, unreadable or do not match the model.
    """
    import torch
    from safetensors.torch import load_model

    directory = Path(directory)
    with checkpoint_errors(directory):
        state = json.loads((directory / "state.json").read_text("utf-8"))
        load_model(model, str(directory / "model.safetensors"), strict=True)
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        restore_rng_state(torch.load(directory / "rng.pt", weights_only=True))
    return state


def rng_state() -> dict:
    """The states of the torch (CPU and CUDA), NumPy and Python random generators, as tensors.

    Plain tensors, so that :func:`torch.load` reads them back with ``weights_only=True``.
    """
    import torch

    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([float(pos), float(has_gauss), float(cached)], dtype=torch.float64),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_extra": torch.tensor([float(version), float("nan") if gauss_next is None else gauss_next],
                                     dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (older checkpoints hold only some of it)."""
    import torch

    torch.set_rng_state(state["torch"])
    if "numpy_extra" in state:
        pos, has_gauss, cached = state["numpy_extra"].tolist()
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                             float(cached)))
    if "python_extra" in state:
        version, gauss_next = state["python_extra"].tolist()
        random.setstate((int(version), tuple(int(x) for x in state["python"].tolist()),
                         None if math.isnan(gauss_next) else gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def checkpoint_errors(directory) -> Iterator[None]:
    """Turn any failure while restoring ``directory`` into one clear :class:`CheckpointError`."""
    try:
        yield
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete ({exc.filename} missing); "
                              "delete it or start without resume") from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(directory)!r} is corrupt or does not match the model "
                              f"({type(exc).__name__}: {exc}); delete it or start without resume") from exc


def write_history(history, path) -> None:
    """Write a history table as CSV atomically."""
    with atomic_write(path, "w") as fh:
        history.write(fh, format="ascii.csv")


def plot_history(history, path=None, *, title: str = "training"):
    """Plot loss and accuracy curves; returns the matplotlib Figure (saved to ``path`` if given)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    ax1, ax2 = fig.subplots(1, 2)
    steps = np.asarray(history["step"])
    for col, style in (("train_loss", "-"), ("val_loss", "--")):
        if col in history.colnames:
            vals = np.asarray(history[col], dtype=float)
            ok = np.isfinite(vals)
            ax1.plot(steps[ok], vals[ok], style, label=col.replace("_", " "))
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.set_title(f"{title}: loss")
    acc_cols = [c for c in history.colnames if c.startswith("val_top")]
    for col in acc_cols:
        vals = np.asarray(history[col], dtype=float)
        ok = np.isfinite(vals)
        ax2.plot(steps[ok], vals[ok], "o-", label=col.replace("_", " "))
    if "random_top10" in history.meta:
        ax2.axhline(history.meta["random_top10"], ls="--", color="0.5", label="random")
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1)
    ax2.legend()
    ax2.set_title(f"{title}: retrieval")
    fig.tight_layout()
    if path is not None:
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
    return fig
