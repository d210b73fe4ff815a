"""Shared helpers of the benchmark scripts: arguments, timing, memory, tables, JSON output.

The scripts in this folder are run directly (``python benchmarks/bench_*.py``); this
module is imported from the same folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "base_parser",
    "int_list",
    "str_list",
    "resolve_bench_device",
    "synchronize",
    "time_call",
    "MemoryMeter",
    "environment",
    "print_table",
    "print_environment",
    "finish",
]


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares.

    ``--device`` (``auto``: CUDA when available), ``--quick`` (small sizes that run
    in well under three minutes on two CPU cores), ``--output`` (JSON file) and
    ``--threads`` (torch intra-op threads).
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a fast smoke run (minutes on a laptop CPU)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="also write the figures and the environment to this JSON file",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    return parser


def int_list(text: str) -> list[int]:
    """Parse ``"1,8,32"`` into ``[1, 8, 32]`` (for argparse ``type=``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,8,32")
    return values


def str_list(text: str) -> list[str]:
    """Parse ``"a,b"`` into ``["a", "b"]`` (for argparse ``type=``)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
    return values


def resolve_bench_device(name: str, threads: int | None = None):
    """Return the torch device for ``--device`` and apply ``--threads``."""
    import torch

    from astrovl.utils.devices import resolve_device

    if threads is not None:
        torch.set_num_threads(int(threads))
    return resolve_device(name)


def synchronize(device) -> None:
    """Wait for queued CUDA work (no-op elsewhere) so that timings are complete."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, device=None, min_time: float = 0.0
) -> dict[str, float]:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``repeats`` timed calls.

    With ``min_time``, timed calls continue until that many seconds have passed.

    Returns
    -------
    dict
        ``median``, ``min``, ``mean`` seconds per call and ``n`` (calls timed).
    """
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max(1, repeats) or (time.perf_counter() - start_all) < min_time:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {
        "median": statistics.median(times),
        "min": min(times),
        "mean": statistics.fmean(times),
        "n": len(times),
    }


def rss_bytes() -> int | None:
    """Resident memory of this process in bytes, or None without psutil."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        return None


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MemoryMeter:
    """Peak memory of a block: CUDA allocator peak on a GPU, resident set size on a CPU.

    On CUDA, ``torch.cuda.max_memory_allocated`` after resetting the peak. On the
    CPU, a thread samples the resident set size (psutil) every ``interval``
    seconds; without psutil, the process high-water mark
    (``resource.getrusage``) is reported instead, which never goes down.

    Attributes
    ----------
    peak_mib : float
        Peak after the block: allocated GPU memory, or process RSS.
    kind : str
        ``"cuda_max_allocated"``, ``"rss_sampled"`` or ``"ru_maxrss"``.
    """

    def __init__(self, device, interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.peak_mib = float("nan")
        self.kind = ""
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes() or 0
            self._peak = max(self._peak, rss)
            self._stop.wait(self.interval)

    @contextmanager
    def measure(self):
        """Context manager around the block to measure."""
        is_cuda = getattr(self.device, "type", "") == "cuda"
        thread = None
        if is_cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        elif rss_bytes() is not None:
            self.kind = "rss_sampled"
            self._peak = rss_bytes() or 0
            self._stop.clear()
            thread = threading.Thread(target=self._sample, daemon=True)
            thread.start()
        else:
            self.kind = "ru_maxrss"
        try:
            yield self
        finally:
            if is_cuda:
                import torch

                torch.cuda.synchronize(self.device)
                self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            elif thread is not None:
                self._stop.set()
                thread.join()
                self._peak = max(self._peak, rss_bytes() or 0)
                self.peak_mib = self._peak / 2**20
            else:
                self.peak_mib = _maxrss_bytes() / 2**20


def environment(device=None) -> dict[str, Any]:
    """Machine and library versions, printed above every table and stored in the JSON."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device is not None and getattr(device, "type", "") == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
            info["cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover
        pass
    try:
        from astrovl import __version__

        info["astrovl"] = __version__
    except ImportError:  # pragma: no cover
        pass
    if device is not None:
        info["device"] = str(device)
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return info


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        if abs(value) >= 0.1:
            return f"{value:.3f}"
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """Print ``rows`` (dicts) as an aligned text table under ``title``."""
    print(f"\n{title}")
    if not rows:
        print("  (no rows)")
        return
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def print_environment(env: dict[str, Any]) -> None:
    """One line describing the machine."""
    keys = (
        "device",
        "gpu",
        "cpu_count",
        "load_avg_1min",
        "torch",
        "torch_threads",
        "astrovl",
        "python",
    )
    print("environment: " + ", ".join(f"{k}={env[k]}" for k in keys if k in env))


def finish(
    name: str,
    args: argparse.Namespace,
    env: dict[str, Any],
    tables: dict[str, list[dict]],
    notes: Sequence[str] = (),
) -> None:
    """Print notes and write the JSON file if ``--output`` was given (atomically)."""
    if hasattr(os, "getloadavg"):
        env["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
        notes = [
            *notes,
            f"1-minute load average at the end: {env['load_avg_1min_end']} "
            f"(on {os.cpu_count()} CPUs; other processes slow the figures down)",
        ]
    for note in notes:
        print(f"note: {note}")
    if args.output is None:
        return
    from astrovl.utils.files import atomic_write_text

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {
        "benchmark": name,
        "settings": settings,
        "environment": env,
        "tables": tables,
        "notes": list(notes),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(payload, indent=2, default=str))
    print(f"wrote {args.output}")
