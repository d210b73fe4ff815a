"""Archive scale: an index built out of core from embedding files, then served from disk.

Synthetic clustered 512-d unit vectors (``--n``, 10 million by default, 2048
clusters) are written as ``.npy`` shards; then, each in a fresh process:

``build``
    ``astrovl.clip.archive.build_from_vector_files`` (what ``astrovl index
    build-vectors`` runs) makes an index of ``--kind`` (``ivfpq`` by default):
    wall time and the peak resident set size of the building process (its
    ``VmHWM``: ``ru_maxrss`` would count the parent's memory at fork).
``serve``
    ``EmbeddingIndex.load`` (memory-mapped vectors, faiss structure read with
    ``IO_FLAG_MMAP``) answers ``--latency-queries`` vector queries one at a
    time through ``search`` (which returns an astropy table): p50 and p99
    latency, recall@10 against an exact top 10 on ``--recall-queries`` queries
    (computed chunk by chunk over the shards, never all vectors at once), and
    the resident set size of the serving process after the queries.

The disk size is that of the index folder (vectors, structure, metadata). The
shards are written to ``--workdir`` (default: a temporary folder; about
``n * dim * 4`` bytes) and removed at the end unless ``--keep``.

Usage::

    python benchmarks/bench_archive.py --quick            # 200,000 vectors
    python benchmarks/bench_archive.py --n 2000000 --workdir /big/scratch
    python benchmarks/bench_archive.py                    # 10 million (needs ~45 GB of disk)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from _common import base_parser, environment, finish, print_environment, print_table

BUILD = textwrap.dedent("""
    import json, sys, time
    from astrovl.clip.archive import build_from_vector_files
    cfg = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    build_from_vector_files(cfg["shards"], cfg["index"], kind=cfg["kind"], vector_dtype=cfg["dtype"],
                            progress=False, **cfg["params"])
    with open("/proc/self/status") as fh:
        status = dict(line.split(":", 1) for line in fh)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": int(status["VmHWM"].split()[0]) * 1024}))
""")

SERVE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from astrovl.clip import EmbeddingIndex
    cfg = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    index = EmbeddingIndex.load(cfg["index"])
    load_s = time.perf_counter() - t0
    queries, truth = np.load(cfg["queries"]), np.load(cfg["truth"])
    times, hits = [], []
    for i in range(cfg["latency_queries"]):
        q = queries[i % len(queries)]
        t = time.perf_counter()
        rows = index.search(q, k=10)["row"]
        times.append(time.perf_counter() - t)
        if i < len(truth):
            hits.append(len(set(rows) & set(truth[i])) / 10)
    with open("/proc/self/status") as fh:
        status = dict(line.split(":", 1) for line in fh)
    rss, peak, anon = (int(status[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM", "RssAnon"))
    print(json.dumps({"load_s": load_s, "p50_ms": 1e3 * float(np.percentile(times, 50)),
                      "p99_ms": 1e3 * float(np.percentile(times, 99)), "recall10": float(np.mean(hits)),
                      "rss": rss, "peak_rss": peak, "anon": anon}))
""")


def exact_top10(shards, queries: np.ndarray) -> np.ndarray:
    """Exact top 10 of ``queries`` over the shards, read chunk by chunk."""
    from astrovl.clip.archive import RowFile

    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    offset = 0
    for path in shards:
        rows = RowFile.from_npy(path)
        for start in range(0, len(rows), 262_144):
            block = rows[start:start + 262_144].astype(np.float32)
            scores = queries @ block.T
            top = np.argpartition(-scores, min(10, scores.shape[1] - 1), axis=1)[:, :10]
            best_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
            best_i = np.concatenate([best_i, top + offset + start], axis=1)
            order = np.argsort(-best_s, axis=1, kind="stable")[:, :10]
            best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
        offset += len(rows)
    return best_i


def run(script: str, cfg: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", script, json.dumps(cfg)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="number of vectors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=2048, help="clusters of the synthetic vectors")
    parser.add_argument("--kind", default="ivfpq", choices=("ivfpq", "ivf", "hnsw", "exact"))
    parser.add_argument("--vector-dtype", default="float32", choices=("float32", "float16"),
                        help="how the index stores the vectors")
    parser.add_argument("--shard-dtype", default="float32", choices=("float32", "float16"),
                        help="dtype of the synthetic .npy shards (float16 halves their disk)")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--rerank-depth", type=int, default=None,
                        help="default: the library's (512, or one per 6,000 vectors in larger indexes)")
    parser.add_argument("--shard-rows", type=int, default=1_000_000, help="rows per .npy shard")
    parser.add_argument("--recall-queries", type=int, default=100)
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None, help="where shards and index go")
    parser.add_argument("--keep", action="store_true", help="keep the shards and the index")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 200_000)
    env = environment()
    print_environment(env)
    from astrovl.clip.faiss_structures import default_rerank_depth
    from astrovl.testing.clip import clustered_unit_vectors, write_vector_shards

    work = Path(args.workdir or tempfile.mkdtemp(prefix="astrovl-bench-archive-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        shards = write_vector_shards(work / "shards", args.n, args.dim, shard_rows=args.shard_rows,
                                     dtype=args.shard_dtype, n_clusters=args.clusters, seed=0)
        gen_s = time.perf_counter() - t0
        queries = clustered_unit_vectors(max(args.recall_queries, 1), args.dim, n_clusters=args.clusters, seed=1)
        t0 = time.perf_counter()
        truth = exact_top10(shards, queries[:args.recall_queries])
        truth_s = time.perf_counter() - t0
        np.save(work / "queries.npy", queries)
        np.save(work / "truth.npy", truth)
        params = {"nprobe": args.nprobe}
        if args.kind == "ivfpq" and args.rerank_depth is not None:
            params["rerank_depth"] = args.rerank_depth
        build = run(BUILD, {"shards": [str(p) for p in shards], "index": str(work / "index"),
                            "kind": args.kind, "dtype": args.vector_dtype, "params": params})
        serve = run(SERVE, {"index": str(work / "index"), "queries": str(work / "queries.npy"),
                            "truth": str(work / "truth.npy"), "latency_queries": args.latency_queries})
        manifest = json.loads((work / "index" / "index.json").read_text())
        row = {"n": args.n, "dim": args.dim, "kind": args.kind, "shards": args.shard_dtype, "dtype": args.vector_dtype,
               "nlist": manifest["params"].get("nlist"), "nprobe": args.nprobe,
               "rerank": (manifest["params"].get("rerank_depth") or default_rerank_depth(args.n))
               if args.kind == "ivfpq" else None,
               "vectors_GiB": args.n * args.dim * np.dtype(args.shard_dtype).itemsize / 2**30,
               "build_s": build["seconds"], "build_peak_GiB": build["peak_rss"] / 2**30,
               "disk_GiB": folder_bytes(work / "index") / 2**30, "load_s": serve["load_s"],
               "p50_ms": serve["p50_ms"], "p99_ms": serve["p99_ms"], "recall@10": serve["recall10"],
               "serve_rss_GiB": serve["rss"] / 2**30, "serve_private_GiB": serve["anon"] / 2**30}
        print_table("archive-scale index (build from .npy shards, serve from disk)", [row])
        notes = [f"writing the synthetic shards took {gen_s:.0f} s, the exact top 10 of "
                 f"{args.recall_queries} queries {truth_s:.0f} s (not counted in build_s)",
                 "p50/p99: one EmbeddingIndex.search(vector, k=10) call in a fresh process, including "
                 "the astropy table it returns; serve_rss: that process's resident set after the queries "
                 "(memory-mapped pages it touched count: page cache, shared and reclaimable); "
                 "serve_private: the part of it that is the process's own (RssAnon)"]
        finish("bench_archive", args, env, {"archive": [row]}, notes)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
