"""Seeded batch plans: which records each training step reads, as a pure function of the seed.

Both trainers draw an epoch's order of the records with :func:`epoch_order`
(``numpy.random.default_rng([seed, epoch])``), so a resumed run reads exactly
the batches an uninterrupted run would. They cut the epochs differently:

* :class:`StepBatches` (CLIP): the batch of global step ``s`` is a pure function
  of ``(seed, s)``; each epoch is cut into whole batches (the remainder of the
  permutation is left out of that epoch), each item comes with its own
  augmentation seed, and each process takes its contiguous slice of the global
  (contrastive) batch.
* :class:`EpochBatches` (LLaVA): each process takes every ``world``-th record of
  the epoch's order and cuts its share into micro-batches (the last one may be
  short); each batch carries the position after it (epoch, micro-batch), from
  which a resumed run starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

__all__ = ["epoch_order", "StepBatches", "EpochBatches", "TRAIN_ITEMS"]

#: the random stream of the training items' augmentation seeds (see :func:`astrovl.datasets.torch_datasets.item_seed`)
TRAIN_ITEMS = 0


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The seeded order of ``n`` records in ``epoch`` (a permutation of ``range(n)``)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class StepBatches:
    """Batch sampler of a run counted in steps: the batch of step ``s`` is a pure function of (seed, s).

    Each epoch is a seeded permutation of the records cut into ``n // batch_size``
    whole batches, so a batch never spans two epochs and never holds a record
    twice. Every item comes as ``(record index, augmentation seed)``. Each process
    takes its slice of the global batch.

    Parameters
    ----------
    n : int
        Number of records.
    batch_size : int
        Records of the global batch (all processes together).
    seed : int
    start_step, steps : int
        The sampler yields the batches of steps ``start_step`` to ``steps - 1``.
    rank, world : int
        This process and the number of processes.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, steps: int,
                 rank: int = 0, world: int = 1):
        from ..datasets.torch_datasets import item_seed

        self._item_seed = item_seed
        self.n, self.bs, self.seed = n, batch_size, seed
        self.start, self.steps, self.rank, self.world = start_step, steps, rank, world
        self.per_epoch = n // batch_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: epoch_order(self.n, epoch, self.seed & 0xFFFFFFFF)}
        return self._perms[epoch]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """The ``(record, augmentation seed)`` items of step ``step``, all processes together."""
        epoch, k = divmod(step, self.per_epoch)
        rows = self._perm(epoch)[k * self.bs:(k + 1) * self.bs]
        return [(int(i), self._item_seed(self.seed, TRAIN_ITEMS, step, j)) for j, i in enumerate(rows)]

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This process's share of :meth:`global_batch`."""
        per = self.bs // self.world
        return self.global_batch(step)[self.rank * per:(self.rank + 1) * per]

    def __iter__(self):
        for s in range(self.start, self.steps):
            yield self.batch(s)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


class EpochBatches:
    """Batch sampler of a run counted in epochs: micro-batches of ``(record, position after the batch)``.

    Each epoch is a seeded permutation of the records; this process takes every
    ``world``-th record and cuts them into batches of ``batch_size`` (the last one
    may be shorter); the first epoch starts at micro-batch ``micro`` (resuming).
    The plan goes on epoch after epoch, without end; it can be iterated again.

    Parameters
    ----------
    n : int
        Number of records.
    seed : int
    world, rank : int
        The number of processes and this process.
    batch_size : int
        Records per micro-batch of this process.
    epoch, micro : int
        Where the plan starts.
    """

    def __init__(self, *, n: int, seed: int, world: int, rank: int, batch_size: int, epoch: int = 0,
                 micro: int = 0):
        self.n, self.seed, self.world, self.rank = n, seed, world, rank
        self.batch_size, self.epoch, self.micro = batch_size, epoch, micro

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int]]]]:
        epoch, micro = self.epoch, self.micro
        while True:
            mine = epoch_order(self.n, epoch, self.seed)[self.rank::self.world]
            n_batches = math.ceil(len(mine) / self.batch_size)
            for b in range(micro, n_batches):
                position = (epoch + 1, 0) if b + 1 == n_batches else (epoch, b + 1)
                yield [(int(i), position) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]
            epoch, micro = epoch + 1, 0
