"""Shared training utilities: schedules, seeds, checkpoints, resuming, metric logs and plots."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..exceptions import CheckpointError, DatasetError, OutputDirectoryError
from ..utils.files import CHECKPOINT_OUTPUT, atomic_directory, atomic_write, remove_outputs

__all__ = [
    "seed_everything",
    "warmup_schedule",
    "save_checkpoint",
    "load_checkpoint",
    "write_history",
    "plot_history",
    "LOSS_STYLES",
    "CHECKPOINT_DIR",
    "checkpoint_errors",
    "checkpoint_to_resume",
    "trainable_state",
    "rng_state",
    "restore_rng_state",
    "read_rng_state",
    "checkpoint_step",
    "choose_start",
    "settings_differences",
    "check_resume_settings",
    "records_digest",
    "check_record_images",
    "worker_error_message",
    "named_data_errors",
]

CHECKPOINT_DIR = "checkpoint"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def warmup_schedule(optimizer, warmup_steps: int, total_steps: int, schedule: str = "constant", *,
                    warmup_from_zero: bool = False):
    """Linear warm-up then a constant or cosine learning rate, from torch's scheduler building blocks.

    The multiplier of the base learning rate after ``step`` calls of ``scheduler.step()`` is

    * ``(step + 1) / warmup_steps`` while ``step < warmup_steps`` (:class:`~torch.optim.lr_scheduler.LinearLR`),
    * then ``1`` (``"constant"``), or ``(1 + cos(pi * (step - warmup_steps) / max(1, total_steps -
      warmup_steps))) / 2`` (``"cosine"``, :class:`~torch.optim.lr_scheduler.CosineAnnealingLR`, which
      reaches 0 at ``total_steps``),

    chained with :class:`~torch.optim.lr_scheduler.SequentialLR`.

    With ``warmup_from_zero`` (the LLaVA recipe), the warm-up starts at 0 instead:
    the multiplier is ``step / warmup_steps`` while ``step < warmup_steps``, then
    the same constant or cosine, from one :class:`~torch.optim.lr_scheduler.LambdaLR`
    (the rates, and the saved state, of transformers'
    ``get_constant_schedule_with_warmup`` and ``get_cosine_schedule_with_warmup``).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    warmup_steps : int
        Steps of linear warm-up (0: none).
    total_steps : int
        Steps of the whole run (the end of the cosine).
    schedule : {"constant", "cosine"}
        The rate after warm-up.
    warmup_from_zero : bool
        Start the warm-up at a rate of 0 (step 0) rather than ``1 / warmup_steps``.

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
    if warmup_from_zero:
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, functools.partial(_from_zero_multiplier, warmup_steps=warmup_steps,
                                                     total_steps=total_steps, cosine=schedule == "cosine"))
    if schedule == "constant":
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        after = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=0.0)
    if warmup_steps == 0:
        return after
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1)
    return SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])


def _from_zero_multiplier(step: int, *, warmup_steps: int, total_steps: int, cosine: bool) -> float:
    """The multiplier of :func:`warmup_schedule` with ``warmup_from_zero`` after ``step`` steps."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if not cosine:
        return 1.0
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


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
    with atomic_directory(directory, kind=CHECKPOINT_OUTPUT) as tmp:
        if trainable_only:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        else:
            save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    return directory


def load_checkpoint(directory, *, model, optimizer, scheduler, trainable_only: bool = False,
                    restore_rng: bool = True) -> dict:
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
    restore_rng : bool
        Restore the random states now. A training loop passes False and restores
        them with ``restore_rng_state(read_rng_state(directory))`` after
        everything that draws random numbers at start-up (creating a DataLoader
        iterator draws its base seed from torch's generator), so that the run
        continues with the very numbers an uninterrupted run would draw.

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
        if restore_rng:
            restore_rng_state(torch.load(directory / "rng.pt", weights_only=True))
    return state


def read_rng_state(directory) -> dict:
    """The random states saved in the checkpoint ``directory`` (restore with :func:`restore_rng_state`)."""
    import torch

    with checkpoint_errors(directory):
        return torch.load(Path(directory) / "rng.pt", weights_only=True)


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


def checkpoint_step(output_dir) -> int | None:
    """The step of the resumable checkpoint in ``output_dir``, or None when it holds none.

    Raises
    ------
    CheckpointError
        The checkpoint's ``state.json`` cannot be read.
    """
    path = Path(output_dir) / CHECKPOINT_DIR / "state.json"
    if not path.is_file():
        return None
    with checkpoint_errors(path.parent):
        return int(json.loads(path.read_text("utf-8"))["step"])


def choose_start(output_dir, *, resume: bool, overwrite: bool, outputs) -> int | None:
    """Decide how a training run starts in ``output_dir``, which holds a resumable checkpoint or not.

    A folder holding a checkpoint is never replaced silently: the caller must
    ask to resume from it or to start again.

    Parameters
    ----------
    output_dir : path
        The run's folder (already checked to be an astrovl output of the run's
        kind, see :func:`astrovl.utils.files.prepare_output_dir`).
    resume, overwrite : bool
        Continue from the checkpoint, or start again: ``overwrite`` removes the
        entries ``outputs`` of the earlier run (and nothing else).
    outputs : sequence of str
        Names of what the trainer writes in its folder.

    Returns
    -------
    int or None
        The checkpoint's step when the run resumes, None when it starts at step 0.

    Raises
    ------
    ValueError
        Both ``resume`` and ``overwrite``.
    OutputDirectoryError
        The folder holds a checkpoint and neither was asked for.
    """
    if resume and overwrite:
        raise ValueError("resume=True (--resume) and overwrite=True (--overwrite) exclude each other; "
                         "choose one")
    step = checkpoint_step(output_dir)
    if overwrite:
        removed = remove_outputs(output_dir, outputs)
        if removed:
            import logging

            logging.getLogger(__name__).warning("overwrite: removed the earlier run's %s from %s",
                                                ", ".join(p.name for p in removed), output_dir)
        return None
    if step is not None and not resume:
        raise OutputDirectoryError(
            f"the folder {str(output_dir)!r} holds the resumable checkpoint of an earlier run at step {step}: "
            f"pass --resume to continue from step {step}, or --overwrite to start again (resume=True or "
            "overwrite=True in Python)"
        )
    return step if resume else None


def _json_value(value):
    return json.loads(json.dumps(value, default=str))


def settings_differences(saved: dict, current: dict, may_change, ignore=()) -> tuple[dict, dict]:
    """Compare the settings of a checkpoint with those of a resumed run.

    Parameters
    ----------
    saved : dict
        The settings the checkpoint was written with (read from JSON).
    current : dict
        The settings of the resumed run.
    may_change : collection of str
        Names whose value may differ.
    ignore : collection of str
        Names not compared at all (where the run is written, whether it resumes).

    Returns
    -------
    fixed, changed : dict
        ``name -> (checkpoint value, current value)`` for the settings that differ
        and may not, and for those that differ and may. Names missing on either
        side (checkpoints of older versions) are not compared.
    """
    fixed, changed = {}, {}
    for name in sorted(set(saved) & set(current)):
        if name in ignore:
            continue
        old, new = saved[name], _json_value(current[name])
        if old != new:
            (changed if name in may_change else fixed)[name] = (old, new)
    return fixed, changed


def check_resume_settings(checkpoint, saved: dict, current: dict, may_change, ignore=()) -> dict:
    """Refuse to resume with settings that cannot change; return those that changed and may.

    See :func:`settings_differences` for the parameters.

    Raises
    ------
    CheckpointError
        Naming each setting that differs from the checkpoint's and cannot change.
    """
    fixed, changed = settings_differences(saved, current, may_change, ignore)
    if fixed:
        diffs = "; ".join(f"{name} is {new!r} but the checkpoint was written with {old!r}"
                          for name, (old, new) in fixed.items())
        raise CheckpointError(
            f"cannot resume from {str(checkpoint)!r}: {diffs}. These settings cannot change when a run resumes; "
            "resume with the checkpoint's values, or pass --overwrite (overwrite=True) to start again"
        )
    return changed


def records_digest(items) -> str:
    """A short digest of JSON-serialisable training records (what a checkpoint was trained on)."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for item in items:
        h.update(json.dumps(item, sort_keys=True, default=str).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def check_record_images(records, *, what: str = "training") -> None:
    """Check that the image of every record exists and has a readable header, before any step.

    Only the headers are read (:func:`astrovl.imaging.readers.check_image`),
    so a large dataset is checked in seconds; a record whose file is missing or
    broken is found before the first step instead of hours into the run.

    Parameters
    ----------
    records : iterable of (str, path)
        ``(record id, image path)``.
    what : str
        Which records, for the message.

    Raises
    ------
    DatasetError
        Listing the id and path of each record whose image cannot be read (the
        first ten, and how many there are).
    """
    from ..imaging.readers import check_image

    bad, total = [], 0
    for rid, path in records:
        total += 1
        try:
            check_image(path)
        except Exception as exc:
            bad.append(f"record {str(rid)!r}: {exc}")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DatasetError(f"{len(bad)} of {total} {what} images cannot be read, so training did not start: "
                           f"{shown}. Fix the files or remove these records")


def worker_error_message(exc: BaseException) -> str:
    """The message of an exception, with the original message of one raised in a DataLoader worker.

    torch re-raises a worker's exception with a message that starts
    ``"Caught DatasetError in DataLoader worker process 0."`` and holds the
    original traceback; the original message (which names the record and its
    image) is taken from its last lines.
    """
    text = str(exc)
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return text
    cls = type(exc)
    qualified = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    at = text.rfind(f"\n{qualified}: ")
    if at >= 0:
        return text[at + len(qualified) + 3:].strip()
    return text.strip().splitlines()[-1]


def named_data_errors(batches):
    """Yield from ``batches`` (a DataLoader iterator); its :class:`DatasetError` s keep their own message.

    A data error raised in a DataLoader worker reaches the training process with
    torch's ``"Caught ... in DataLoader worker process N"`` message; it is raised
    again with the worker's message, which names the record and its image.
    """
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DatasetError as exc:
            raise DatasetError(worker_error_message(exc)) from exc
        yield batch


def write_history(history, path) -> None:
    """Write a history table as CSV atomically."""
    with atomic_write(path, "w") as fh:
        history.write(fh, format="ascii.csv")


#: how :func:`plot_history` draws each loss column: (label, line style, marker size)
LOSS_STYLES = {"train_loss": ("training loss", "-o", 3), "val_loss": ("validation loss", "--s", 4)}


def plot_history(history, path=None, *, title: str = "training", xlabel: str = "step",
                 loss_label: str = "loss"):
    """Plot the loss curves, and the retrieval accuracies when there are any; returns the Figure.

    One panel of ``train_loss`` and ``val_loss`` (only the steps where a value was
    computed, not NaN) against ``step``; with ``val_top*`` columns (CLIP) a second
    panel of the accuracies, with the ``random_top10`` of ``history.meta`` as a
    dashed line.

    Parameters
    ----------
    history : astropy.table.Table
        As the trainers return it.
    path : path, optional
        Where to write the PNG (atomically).
    title : str
    xlabel, loss_label : str
        Axis labels of the loss panel.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    acc_cols = [c for c in history.colnames if c.startswith("val_top")]
    fig = Figure(figsize=(9, 3.5) if acc_cols else (6, 3.5))
    axes = fig.subplots(1, 2) if acc_cols else [fig.subplots()]
    steps = np.asarray(history["step"])
    ax1 = axes[0]
    for col, (label, style, size) in LOSS_STYLES.items():
        if col in history.colnames:
            vals = np.asarray(history[col], dtype=float)
            ok = np.isfinite(vals)
            if ok.any() or col == "train_loss":
                ax1.plot(steps[ok], vals[ok], style, ms=size, label=label)
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel(loss_label)
    ax1.legend()
    ax1.set_title(f"{title}: loss" if acc_cols else title)
    if acc_cols:
        _plot_accuracy(axes[1], history, steps, acc_cols, title)
    fig.tight_layout()
    if path is not None:
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
    return fig


def _plot_accuracy(ax, history, steps, acc_cols, title: str) -> None:
    for col in acc_cols:
        vals = np.asarray(history[col], dtype=float)
        ok = np.isfinite(vals)
        ax.plot(steps[ok], vals[ok], "o-", label=col.replace("_", " "))
    if "random_top10" in history.meta:
        ax.axhline(history.meta["random_top10"], ls="--", color="0.5", label="random")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"{title}: retrieval")
