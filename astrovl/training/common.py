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
    "warmup_schedule",
    "save_checkpoint",
    "load_checkpoint",
    "write_history",
    "plot_history",
    "CHECKPOINT_DIR",
    "checkpoint_errors",
    "checkpoint_to_resume",
    "trainable_state",
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


def warmup_schedule(optimizer, warmup_steps: int, total_steps: int, schedule: str = "constant"):
    """Linear warm-up then a constant or cosine learning rate, from torch's scheduler building blocks.

    The multiplier of the base learning rate after ``step`` calls of ``scheduler.step()`` is

    * ``(step + 1) / warmup_steps`` while ``step < warmup_steps`` (:class:`~torch.optim.lr_scheduler.LinearLR`),
    * then ``1`` (``"constant"``), or ``(1 + cos(pi * (step - warmup_steps) / max(1, total_steps -
      warmup_steps))) / 2`` (``"cosine"``, :class:`~torch.optim.lr_scheduler.CosineAnnealingLR`, which
      reaches 0 at ``total_steps``),

    chained with :class:`~torch.optim.lr_scheduler.SequentialLR`.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    warmup_steps : int
        Steps of linear warm-up (0: none).
    total_steps : int
        Steps of the whole run (the end of the cosine).
    schedule : {"constant", "cosine"}
        The rate after warm-up.

    Returns
    -------
    torch.optim.lr_scheduler.LRScheduler
        Its ``state_dict`` holds the position for resuming.
    """
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule={schedule!r} must be 'constant' or 'cosine'")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    if schedule == "constant":
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        after = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=0.0)
    if warmup_steps == 0:
        return after
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1)
    return SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])


def checkpoint_to_resume(output_dir, resume: bool) -> Path | None:
    """``output_dir/checkpoint`` when ``resume`` is asked for and a complete checkpoint is there, else None."""
    directory = Path(output_dir) / CHECKPOINT_DIR
    return directory if resume and (directory / "state.json").is_file() else None


def trainable_state(model) -> dict:
    """The parameters of ``model`` that require gradients, as contiguous CPU tensors by name."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory, *, model, optimizer, scheduler, state: dict, trainable_only: bool = False) -> Path:
    """Write a resumable checkpoint atomically (the directory is replaced as a whole).

    ``model.safetensors`` (all weights) or, with ``trainable_only``,
    ``trainable.safetensors`` (only the parameters that require gradients);
    ``optimizer.pt`` and ``scheduler.pt`` (plain tensor state dicts, loaded with
    ``weights_only=True``); ``rng.pt`` (the torch, CUDA, NumPy and Python random
    states, :func:`rng_state`) and ``state.json`` (``state``: step, data
    position, history).

    Parameters
    ----------
    directory : path
    model : torch.nn.Module
    optimizer : torch.optim.Optimizer
    scheduler : torch.optim.lr_scheduler.LRScheduler
    state : dict
        JSON-serialisable training state.
    trainable_only : bool
        Save only the trained parameters (frozen ones come from the starting model).

    Returns
    -------
    pathlib.Path
        ``directory``.
    """
    import torch
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    with atomic_directory(directory, kind="checkpoint", recognize=lambda p: (p / "state.json").is_file()) as tmp:
        if trainable_only:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        else:
            save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    return directory


def load_checkpoint(directory, *, model, optimizer, scheduler, trainable_only: bool = False) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``state`` dict.

    Weights are read with safetensors, optimizer, scheduler and random states with
    ``torch.load(weights_only=True)``.

    Parameters
    ----------
    directory : path
    model, optimizer, scheduler
        Built as for the run that wrote the checkpoint; restored in place.
    trainable_only : bool
        The checkpoint holds only the parameters that require gradients; they must
        be exactly the ones of ``model`` that require gradients now.

    Raises
    ------
    CheckpointError
        If files are missing, unreadable or do not match the model.
    """
    import torch
    from safetensors.torch import load_file, load_model

    directory = Path(directory)
    with checkpoint_errors(directory):
        state = json.loads((directory / "state.json").read_text("utf-8"))
        if trainable_only:
            weights = load_file(str(directory / "trainable.safetensors"))
            params = dict(model.named_parameters())
            expected = {n for n, p in params.items() if p.requires_grad}
            if set(weights) != expected:
                raise ValueError(f"{len(set(weights) ^ expected)} trainable weights differ (another stage or "
                                 "model?)")
            with torch.no_grad():
                for n, w in weights.items():
                    params[n].copy_(w.to(params[n].dtype))
        else:
            load_model(model, str(directory / "model.safetensors"), strict=True)
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        _load_scheduler(scheduler, optimizer, torch.load(directory / "scheduler.pt", weights_only=True))
        restore_rng_state(torch.load(directory / "rng.pt", weights_only=True))
    return state


def _load_scheduler(scheduler, optimizer, saved: dict) -> None:
    """Restore ``scheduler``; a single-scheduler state (checkpoints of the former ``LambdaLR``) is replayed.

    A :class:`~torch.optim.lr_scheduler.SequentialLR` cannot read the state of one
    scheduler; it is stepped from its start to the saved step instead, which gives
    the same rates (:func:`warmup_schedule` reproduces the former schedule).
    """
    import warnings

    if "_schedulers" in saved or not hasattr(scheduler, "_schedulers"):
        scheduler.load_state_dict(saved)
        return
    if scheduler.last_epoch != 0:
        raise ValueError("the scheduler must be at its first step to replay a saved single-scheduler state")
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the optimizer's state brought the saved rate; start the replay from step 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "step() before optimizer.step()": intended here
        for _ in range(int(saved["last_epoch"])):
            scheduler.step()


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
