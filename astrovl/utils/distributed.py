"""One process first: a step of a multi-process job that fills a cache, done once.

Under ``accelerate launch``, ``torchrun`` or another launcher every process runs
the same program. A step that writes a cache all processes read (converting a
checkpoint to another layout) must then run on one process while the others
wait, and the others must reuse what it wrote instead of writing it again.
:func:`main_process_first` does this:

* with an initialised ``torch.distributed`` process group (accelerate and
  ``train_llava`` create one), process 0 runs the block first while the others
  wait at a barrier; then the first process of each other machine (``LOCAL_RANK``
  0), whose cache may be a disk of its own; then all the others. Every process
  of the group must enter the block (it holds collective barriers), as with
  accelerate's ``main_process_first``;
* without a process group (a ``torchrun`` script that has not called
  ``init_process_group`` yet, or independent processes sharing a cache), a file
  lock, when one is given, lets the processes of one machine or of a shared file
  system run the block one at a time: the first fills the cache, the others find
  it filled.

A process that fails inside the block still releases the others, which then
run the block themselves (and usually fail with the same clear error) instead of
waiting forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcessRanks", "process_ranks", "main_process_first"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessRanks:
    """Where this process stands in a multi-process job.

    Attributes
    ----------
    rank : int
        Global rank (0 for a single process).
    local_rank : int
        Rank on this machine.
    world_size : int
        Number of processes of the job.
    initialized : bool
        Whether a ``torch.distributed`` process group is initialised (the ranks
        then come from it, else from the ``RANK``, ``LOCAL_RANK`` and
        ``WORLD_SIZE`` environment variables of the launcher).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        """True for process 0 of the job."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """True for the first process of this machine."""
        return self.local_rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name}={value!r} is not a whole number; the "
                         "launcher (accelerate, torchrun) sets it to the process's rank or count") from None


def _process_group():
    """The ``torch.distributed`` module when a process group is initialised, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def process_ranks() -> ProcessRanks:
    """The rank, local rank and number of processes of this process (see :class:`ProcessRanks`)."""
    dist = _process_group()
    if dist is not None:
        rank, world = int(dist.get_rank()), int(dist.get_world_size())
        local = _env_int("LOCAL_RANK")
        if local is None:
            per_machine = _env_int("LOCAL_WORLD_SIZE")
            local = rank % per_machine if per_machine else rank
        return ProcessRanks(rank, local, world, True)
    rank = _env_int("RANK") or 0
    local = _env_int("LOCAL_RANK")
    return ProcessRanks(rank, rank if local is None else local, _env_int("WORLD_SIZE") or 1, False)


@contextlib.contextmanager
def _file_lock(path: str | os.PathLike | None) -> Iterator[None]:
    if path is None:
        yield
        return
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


@contextlib.contextmanager
def main_process_first(lock: str | os.PathLike | None = None, *,
                       what: str = "this step") -> Iterator[ProcessRanks]:
    """Run the block on process 0 first, then on the others (see the module notes).

    Parameters
    ----------
    lock : path-like, optional
        A lock file (created if needed) that the processes hold one at a time
        while they run the block: it orders processes that share no process group
        (or several machines sharing a file system).
    what : str
        What the block does, for the log.

    Yields
    ------
    ProcessRanks
        This process's ranks.

    Examples
    --------
    Fill a cache once; the other processes find it filled:

    >>> from astrovl.utils.distributed import main_process_first
    >>> with main_process_first(what="building the cache") as ranks:
    ...     ranks.world_size
    1
    """
    ranks = process_ranks()
    dist = _process_group() if ranks.world_size > 1 else None
    if dist is not None:
        if not ranks.is_main:
            log.debug("process %d waits while process 0 runs %s", ranks.rank, what)
            dist.barrier()
        if not ranks.is_local_main:
            dist.barrier()
    elif ranks.world_size > 1 and lock is None:
        log.debug("%d processes and no process group: every process runs %s itself", ranks.world_size, what)
    try:
        with _file_lock(lock):
            yield ranks
    finally:
        if dist is not None:
            # the same two barriers on every process, in the same order
            if ranks.is_main:
                dist.barrier()
            if ranks.is_local_main:
                dist.barrier()
