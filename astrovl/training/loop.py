"""The loop every training run shares: its state, its steps, resuming and checkpoint hooks.

A trainer is a *task* (:class:`~astrovl.training.clip.CLIPTask`,
:class:`~astrovl.training.llava.LLaVATask`) that builds the model, data and
optimiser of a run, takes a training step on a batch, evaluates, checkpoints
and exports; this module holds what does not depend on the system trained:

* :class:`RunState`: the optimiser step, the history rows, the best validation
  value so far and the record of earlier resumes, as a checkpoint keeps them;
* :func:`run_steps`: draw batches and train until the last step, calling the
  task's hook after every optimiser step (where it logs, validates and writes
  its checkpoint);
* :func:`log_resume`: the message of a resumed (or already finished) run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RunState", "run_steps", "log_resume"]


@dataclass
class RunState:
    """Where a training run is.

    Attributes
    ----------
    step : int
        Optimiser steps taken.
    rows : list of dict
        The history: one row of metrics per logging or validation step.
    best : float or None
        The best value of the validation metric so far (lower is better), if tracked.
    resumes : list of dict
        ``{"step": ..., "changed": {setting: [old, new]}}`` for each time the run was resumed.
    start_step : int
        The step this call started from.
    finished : bool
        The run had already reached its last step when this call started.
    """

    step: int = 0
    rows: list[dict] = field(default_factory=list)
    best: float | None = None
    resumes: list[dict] = field(default_factory=list)
    start_step: int = 0
    finished: bool = False

    @classmethod
    def resumed(cls, checkpoint: dict, total: int) -> RunState:
        """The state kept in a checkpoint's ``state.json`` (with ``"changed"``, see ``check_resume_settings``).

        This resume is added to :attr:`resumes`; :attr:`finished` is set when the
        checkpoint's run had finished and ``total`` steps do not go further.
        """
        step = int(checkpoint["step"])
        resumes = list(checkpoint.get("resumes", [])) + [
            {"step": step, "changed": {k: list(v) for k, v in checkpoint["changed"].items()}}]
        return cls(step=step, rows=[dict(r) for r in checkpoint.get("history", [])],
                   best=checkpoint.get("best_value"), resumes=resumes, start_step=step,
                   finished=bool(checkpoint.get("finished")) and total <= step)


def run_steps(batches: Iterator, state: RunState, total: int, train_step: Callable[[object], bool],
              after_step: Callable[[RunState], None], bar=None) -> RunState:
    """Train on ``batches`` until ``state.step`` reaches ``total``.

    Parameters
    ----------
    batches : iterator
        The run's batches from where it stands (a batch is drawn only while steps remain).
    state : RunState
        Advanced in place.
    total : int
        The last step of the run.
    train_step : callable
        ``train_step(batch)`` trains on one batch and returns True when it
        completed an optimiser step (False for a micro-batch that only
        accumulated gradients).
    after_step : callable
        ``after_step(state)`` after each optimiser step, with ``state.step``
        already counted: logging, validation, checkpoints.
    bar : progress bar, optional
        Advanced by one per optimiser step.

    Returns
    -------
    RunState
        ``state``.
    """
    while state.step < total:
        batch = next(batches, None)
        if batch is None:
            break
        if train_step(batch):
            state.step += 1
            if bar is not None:
                bar.update(1)
            after_step(state)
    return state


def log_resume(step: int, total: int, changed: dict, *, finished: bool = False, out: Path | None = None,
               logger: logging.Logger | None = None) -> None:
    """Log, on the trainer's ``logger``, that a run resumed from ``step`` (settings ``changed``) or had finished."""
    log = logger or logging.getLogger(__name__)
    if finished:
        log.warning("the run in %s finished at step %d; nothing to train, its outputs are left as they are",
                    out, step)
        return
    log.warning("resumed from step %d (of %d)%s", step, total,
                "; changed since the checkpoint: " + ", ".join(f"{k} {old!r} -> {new!r}"
                                                             for k, (old, new) in changed.items())
                if changed else "")
