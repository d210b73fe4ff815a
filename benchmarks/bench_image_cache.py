"""Peak memory of each process while CLIP training reads its images, per image cache kind.

A synthetic data set of the HubbleCLIP scale is written first: ``-n`` previews
(30,000 by default) of ``--size`` x ``--size`` pixels (512), 8-bit grey PNG files
as ``astrovl build-hubble`` writes them, with a manifest. Then, for each cache
kind, a fresh process reads every image through
:class:`~astrovl.datasets.torch_datasets.ImageTextTorchDataset` (the training
augmentation: rotation, flip, 224 crop, normalisation) with a DataLoader of
``--workers`` worker processes, for ``--epochs`` epochs, exactly as
:func:`~astrovl.training.train_clip` does. A sampling thread records, for the
main process and each worker, the peak of

``anon``
    private anonymous memory (``RssAnon``): what the process holds and the kernel
    cannot drop;
``file``
    file-backed resident pages (``RssFile``): page cache of the memory-mapped
    cache file, shared between the processes and reclaimable;
``uss`` / ``pss``
    unique and proportional set sizes (psutil).

Kinds: ``disk`` (one memory-mapped file shared by the workers: what
``image_cache="auto"`` picks with workers), ``none`` (decode every time) and,
at ``--legacy-n`` images only, ``memory-in-workers``: the former in-process
dict cache used inside DataLoader workers (each worker fills its own copy), to
show why it is no longer allowed there.

Usage::

    python benchmarks/bench_image_cache.py --quick
    python benchmarks/bench_image_cache.py -n 30000 --workers 2 --output cache.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import base_parser, environment, finish, print_environment, print_table


def _write_one(args) -> None:
    path, size, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.random((size // 32, size // 32))
    img = np.kron(small, np.ones((32, 32)))  # blocky structure, compresses like a preview
    yy, xx = np.mgrid[:size, :size]
    for _ in range(3):
        cy, cx, s = rng.uniform(0, size, 2).tolist() + [rng.uniform(5, 40)]
        img += 2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    img += 0.05 * rng.standard_normal((size, size))
    img = np.clip(255 * (img - img.min()) / (np.ptp(img) + 1e-9), 0, 255).astype(np.uint8)
    Image.fromarray(img, mode="L").save(path, optimize=False)


def make_dataset(root: Path, n: int, size: int, workers: int) -> None:
    """``n`` grey PNG previews and a manifest (reused when complete)."""
    from multiprocessing import Pool

    from astropy.table import Table

    from astrovl.datasets.records import read_manifest, write_manifest

    if (root / "manifest.ecsv").is_file() and len(read_manifest(root)) == n:
        return
    (root / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(root / "images" / f"p{i:06d}.png", size, i) for i in range(n)
            if not (root / "images" / f"p{i:06d}.png").is_file()]
    with Pool(max(1, workers)) as pool:
        for _ in pool.imap_unordered(_write_one, jobs, chunksize=64):
            pass
    table = Table({"id": [f"p{i:06d}" for i in range(n)], "split": ["train"] * n,
                   "image": [f"images/p{i:06d}.png" for i in range(n)],
                   "caption": [f"a synthetic preview number {i}" for i in range(n)]})
    write_manifest(table, root)


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class ProcessTreeMeter:
    """Peaks of anon/file/uss/pss memory for this process and each of its children."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peaks: dict[int, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample_once(self) -> None:
        import psutil

        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                full = proc.memory_full_info()
                values = {"anon": _status_kib(proc.pid, "RssAnon") * 1024,
                          "file": _status_kib(proc.pid, "RssFile") * 1024,
                          "uss": full.uss, "pss": getattr(full, "pss", 0), "rss": full.rss}
            except (psutil.Error, OSError):
                continue
            peak = self.peaks.setdefault(proc.pid, dict.fromkeys(values, 0))
            for k, v in values.items():
                peak[k] = max(peak[k], v)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample_once()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample_once()


def run_kind(root: str, kind: str, workers: int, epochs: int, limit: int, crop: int, cache_dir: str) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from astrovl.datasets import ManifestDataset
    from astrovl.datasets.torch_datasets import ImageTextTorchDataset
    from astrovl.training.clip import _collate

    torch.set_num_threads(1)
    ds = ManifestDataset(root)
    if limit < len(ds):
        ds = ds.subset(np.arange(limit))
    cache = {"disk": "disk", "none": "none", "memory-in-workers": "memory"}[kind]
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    with ProcessTreeMeter() as meter:
        data = ImageTextTorchDataset(ds, crop, mean, std, augment=True, cache=cache, cache_dir=cache_dir,
                                     cache_max_bytes=1 << 40)
        # one loader over all epochs, as train_clip iterates its step sampler
        per_epoch = -(-len(ds) // 32)
        sampler = [[(i, epoch * len(ds) + i) for i in range(s, min(len(ds), s + 32))]
                   for epoch in range(epochs) for s in range(0, len(ds), 32)]
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=_collate,
                                             num_workers=workers, prefetch_factor=4 if workers else None)
        t0 = te = time.perf_counter()
        rates = []
        for k, _ in enumerate(loader, start=1):
            if k % per_epoch == 0:
                rates.append(len(ds) / (time.perf_counter() - te))
                te = time.perf_counter()
        del loader
        seconds = time.perf_counter() - t0
    if hasattr(data.cache, "remove"):
        data.cache.remove()
    me = os.getpid()
    main = meter.peaks.get(me, {})
    others = [v for pid, v in meter.peaks.items() if pid != me]
    worker_peak = {k: max((v[k] for v in others), default=0) for k in ("anon", "file", "uss", "pss", "rss")}
    return {"kind": kind, "images": len(ds), "workers": workers, "epochs": epochs,
            "img_per_s_first_epoch": rates[0], "img_per_s_last_epoch": rates[-1], "seconds": seconds,
            **{f"main_{k}_mib": main.get(k, 0) / 2**20 for k in ("anon", "file", "uss", "pss")},
            **{f"worker_{k}_mib": worker_peak[k] / 2**20 for k in ("anon", "file", "uss", "pss")}}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30_000, help="images in the data set")
    parser.add_argument("--size", type=int, default=512, help="side of the previews in pixels")
    parser.add_argument("--crop", type=int, default=224, help="training crop (the model input)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per kind (the first fills the cache)")
    parser.add_argument("--kinds", default="disk,none,memory-in-workers")
    parser.add_argument("--legacy-n", type=int, default=2000,
                        help="images for memory-in-workers (each worker keeps a full copy)")
    parser.add_argument("--data", type=Path, default=None,
                        help="where the synthetic data set is written (default: a temporary directory)")
    parser.add_argument("--run-one", default=None, help=argparse_suppress())
    args = parser.parse_args()
    if args.run_one:
        spec = json.loads(args.run_one)
        print(json.dumps(run_kind(**spec)))
        return
    if args.quick:
        args.n, args.size, args.legacy_n, args.epochs = 1500, 256, 500, 2
    env = environment()
    print_environment(env)
    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="astrovl-bench-cache-")
        args.data = Path(tmp.name)
    root = args.data / f"previews-{args.n}-{args.size}"
    t0 = time.perf_counter()
    make_dataset(root, args.n, args.size, os.cpu_count() or 1)
    print(f"data set: {args.n} grey PNG previews of {args.size} px in {time.perf_counter() - t0:.0f} s "
          f"({sum(f.stat().st_size for f in (root / 'images').iterdir()) / 2**30:.2f} GiB)")
    rows = []
    for kind in [k for k in args.kinds.split(",") if k]:
        spec = {"root": str(root), "kind": kind, "workers": args.workers, "epochs": args.epochs,
                "limit": args.legacy_n if kind == "memory-in-workers" else args.n, "crop": args.crop,
                "cache_dir": str(args.data / f"cache-{kind}")}
        out = subprocess.run([sys.executable, __file__, "--run-one", json.dumps(spec)], capture_output=True,
                             text=True)
        if out.returncode:
            raise RuntimeError(f"the {kind} run failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print_table(f"{kind}", rows[-1:])
    columns = ("kind", "images", "workers", "img_per_s_first_epoch", "img_per_s_last_epoch",
               "main_anon_mib", "worker_anon_mib", "worker_file_mib", "worker_uss_mib", "worker_pss_mib",
               "main_file_mib")
    print_table(f"peak memory per process, {args.size} px grey previews, {args.workers} workers, "
                f"{args.epochs} epochs (MiB)", rows, columns)
    one = args.size * args.size / 2**20
    finish("bench_image_cache", args, env, {"cache": rows},
           notes=[f"one decoded preview is {one:.2f} MiB; {args.n} of them {args.n * one / 1024:.1f} GiB",
                  "anon: private memory (cannot be reclaimed); file: shared page cache of the "
                  "memory-mapped cache file (reclaimable)"])
    if tmp is not None:
        tmp.cleanup()


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
