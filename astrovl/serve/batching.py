"""Micro-batching: requests that arrive within a few milliseconds share one model call.

A :class:`MicroBatcher` owns one worker thread. Callers :meth:`~MicroBatcher.submit`
items and get a :class:`concurrent.futures.Future`; the worker waits for the
first item, collects up to ``max_batch`` items that arrive within ``max_wait``
seconds of it, runs them through one call of its batch function, and sets each
future. The queue is bounded: past ``max_queue`` waiting items, ``submit``
raises :class:`ServiceBusy` (the web layer answers 503 with ``Retry-After``).

Nothing here knows about HTTP or about models.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from ..exceptions import QueryError

__all__ = ["MicroBatcher", "ServiceBusy"]

log = logging.getLogger(__name__)


class ServiceBusy(QueryError):
    """The queue of a :class:`MicroBatcher` is full: a 503 answer, to retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, status=503)
        self.retry_after = max(1, int(retry_after))


class MicroBatcher:
    """Run queued items in batches through one function, on one worker thread.

    Parameters
    ----------
    run : callable
        Takes a list of items, returns a list of results in the same order.
        An exception fails every item of that batch.
    max_batch : int
        Most items per call of ``run``.
    max_wait : float
        Seconds to wait, after the first item of a batch arrives, for more items.
    max_queue : int
        Most items waiting (not yet in a running batch); more are refused with
        :class:`ServiceBusy`.
    name : str
        Names the worker thread and the busy message ("the text model").

    Attributes
    ----------
    batches : int
        Batches run so far.
    largest_batch : int
        Largest batch run so far.
    """

    def __init__(self, run: Callable[[list], Sequence], *, max_batch: int = 8, max_wait: float = 0.005,
                 max_queue: int = 64, name: str = "the model"):
        if int(max_batch) < 1:
            raise ValueError(f"max_batch={max_batch!r} must be >= 1")
        if int(max_queue) < 1:
            raise ValueError(f"max_queue={max_queue!r} must be >= 1")
        if not (math.isfinite(max_wait) and max_wait >= 0):
            raise ValueError(f"max_wait={max_wait!r} must be a finite number of seconds >= 0")
        self.run = run
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait)
        self.max_queue = int(max_queue)
        self.name = name
        self.batches = 0
        self.largest_batch = 0
        self._pending: deque[tuple[object, Future]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._seconds_per_batch = 0.0

    def __len__(self) -> int:
        """Items waiting for a batch."""
        return len(self._pending)

    def submit(self, item) -> Future:
        """Queue ``item``; the future gets its result (or the exception of its batch).

        Raises
        ------
        ServiceBusy
            ``max_queue`` items are already waiting.
        RuntimeError
            The batcher was closed.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the queue of {self.name} is closed")
            if len(self._pending) >= self.max_queue:
                waiting = len(self._pending) / self.max_batch + 1
                raise ServiceBusy(f"{self.name} is busy: {len(self._pending)} requests are waiting; "
                                  "try again in a moment",
                                  retry_after=math.ceil(waiting * max(self._seconds_per_batch, 0.5)))
            future: Future = Future()
            self._pending.append((item, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"astrovl-batcher ({self.name})",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking items; the worker finishes what is queued, then ends."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _next_batch(self) -> list[tuple[object, Future]] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.max_wait
            while len(self._pending) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch, len(self._pending))
            return [self._pending.popleft() for _ in range(n)]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = list(self.run([item for item, _ in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function of {self.name} returned {len(results)} results "
                                       f"for {len(batch)} items")
            except BaseException as exc:  # every waiting caller hears of it; the worker goes on
                log.debug("batch of %d failed: %r", len(batch), exc)
                for _, future in batch:
                    future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results):
                    future.set_result(result)
            elapsed = time.perf_counter() - t0
            self._seconds_per_batch = elapsed if not self.batches else 0.8 * self._seconds_per_batch + 0.2 * elapsed
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
