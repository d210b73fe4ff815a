"""Search settings of an archive index: recall@10 and latency per ``nprobe`` and re-rank depth.

Runs on the folder ``bench_archive.py --keep`` leaves (``WORKDIR/index``, with
``queries.npy`` and ``truth.npy``, the exact top 10 of each query). One
process loads the index; for each setting ``NPROBE:DEPTH`` it answers every
query twice, one at a time through ``EmbeddingIndex.search`` (astropy table
included): the first pass reads the candidates that are not in the page cache
from disk, the second finds them cached. ``--drop-caches`` empties the page
cache first (root only: ``/proc/sys/vm/drop_caches``), so that the first
setting's first pass is a cold one.

Usage::

    python benchmarks/bench_archive.py --threads 2 --workdir /scratch/bench --keep
    python benchmarks/bench_archive_settings.py /scratch/bench --drop-caches \\
        --settings 32:1667,32:1024,16:1024,16:1667
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from _common import base_parser, environment, finish, print_environment, print_table, str_list


def drop_page_cache() -> None:
    """Write dirty pages out and empty the page cache (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        raise SystemExit(f"--drop-caches: cannot empty the page cache ({exc}); run as root or leave it out") from None


def passes(index, queries: np.ndarray, truth: np.ndarray, **settings) -> list[dict]:
    """Two passes over the queries with ``settings``: recall@10, p50 and p99 of each."""
    out = []
    for label in ("first", "again"):
        hits, times = [], []
        for q, t in zip(queries, truth):
            start = time.perf_counter()
            rows = index.search(q, k=10, **settings)["row"]
            times.append(time.perf_counter() - start)
            hits.append(len(set(rows) & set(t)) / 10)
        out.append({"pass": label, "recall@10": float(np.mean(hits)),
                    "p50_ms": 1e3 * float(np.percentile(times, 50)),
                    "p99_ms": 1e3 * float(np.percentile(times, 99))})
    return out


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="the --workdir of a bench_archive.py --keep run")
    parser.add_argument("--settings", type=str_list, default=["32:0"],
                        help="NPROBE:DEPTH pairs, comma-separated (DEPTH 0: the index's default)")
    parser.add_argument("--drop-caches", action="store_true", help="empty the page cache first (root)")
    args = parser.parse_args(argv)
    import faiss

    from astrovl.clip import EmbeddingIndex

    if args.threads is not None:
        faiss.omp_set_num_threads(int(args.threads))
    env = environment()
    print_environment(env)
    if args.drop_caches:
        drop_page_cache()
    queries, truth = np.load(args.workdir / "queries.npy"), np.load(args.workdir / "truth.npy")
    start = time.perf_counter()
    index = EmbeddingIndex.load(args.workdir / "index")
    load_s = time.perf_counter() - start
    rows = []
    for setting in args.settings:
        nprobe, depth = (int(x) for x in setting.split(":"))
        kw = {"nprobe": nprobe}
        if index.kind == "ivfpq" and depth:
            kw["rerank_depth"] = depth
        for row in passes(index, queries[:len(truth)], truth, **kw):
            rows.append({"n": len(index), "kind": index.kind, "nprobe": nprobe,
                         "rerank": depth or ("default" if index.kind == "ivfpq" else "-"), **row})
    print_table("archive index search settings (one query at a time, fresh process)", rows)
    with open("/proc/self/status") as fh:
        status = dict(line.split(":", 1) for line in fh)
    rss, own = (int(status[key].split()[0]) / 2**20 for key in ("VmRSS", "RssAnon"))
    finish("bench_archive_settings", args, env, {"settings": rows},
           [f"load {load_s:.2f} s; resident set after the queries {rss:.2f} GiB, {own:.2f} GiB of it "
            "the process's own (the rest mapped page cache)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
