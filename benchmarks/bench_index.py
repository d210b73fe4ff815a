"""Build time, query latency and recall@k of ``EmbeddingIndex`` (exact, HNSW, IVF).

Two data sets of unit vectors (``--dim``, 512 by default as for ViT-B/16):

``random``
    vectors drawn uniformly on the sphere, queried with other random vectors: no
    structure at all, the hardest case for the approximate structures.
``modality-gap``
    clustered "image" vectors around one mean direction, queried with "text"
    vectors around another direction (as CLIP's image and text embeddings are),
    and, for comparison, with held-out "image" vectors. This checks that
    approximate search keeps its recall for text queries, which sit away from the
    image vectors (the problem quantized indexes have with text queries).

For every kind the table gives the build time (``add`` and the first search,
which builds the faiss structure), the memory the index added to the process
(its resident set size after building minus before: the metadata table, the
stored vectors and, for the approximate kinds, the faiss structure) and that
memory over the size of the vectors (``mem_ratio``; the exact kind keeps the
vectors once), the median, 95th- and 99th-percentile latency of one
``EmbeddingIndex.search(vector, k)`` call (including the astropy table it
returns), queries/s, and recall@k against a brute-force numpy ground truth.
``--sweep`` measures several search breadths (``ef_search`` or ``nprobe``, set per
query) on one built structure.

Usage::

    python benchmarks/bench_index.py --quick
    python benchmarks/bench_index.py -n 1000000 --queries 1000 --output index.json
    python benchmarks/bench_index.py -n 1000000 --datasets modality-gap --kinds ivf \\
        --sweep 8,16,24,32
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from _common import (
    base_parser,
    environment,
    finish,
    print_environment,
    print_table,
    rss_bytes,
    str_list,
)

KINDS = ("exact", "hnsw", "ivf")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_set(n: int, n_queries: int, dim: int, rng: np.random.Generator):
    """Uniform random unit vectors and random unit queries."""
    return unit(rng.standard_normal((n, dim), dtype=np.float32)), {
        "random": unit(rng.standard_normal((n_queries, dim), dtype=np.float32))
    }


def modality_gap_set(
    n: int, n_queries: int, dim: int, rng: np.random.Generator, n_clusters: int = 200
):
    """Clustered image-like vectors, with text-like and image-like queries.

    Image vectors are ``unit(m_img + content)``, text queries for the same content
    ``unit(m_txt + content + noise)`` with orthogonal mean directions ``m_img`` and
    ``m_txt``, so that a text query has a cosine of about 0.3-0.5 with its image
    while image vectors have about 0.5 with each other, as in CLIP.
    """
    means = unit(rng.standard_normal((2, dim), dtype=np.float32))
    m_img = means[0]
    m_txt = unit((means[1] - (means[1] @ m_img) * m_img)[None, :])[0]
    centers = unit(rng.standard_normal((n_clusters, dim), dtype=np.float32))

    def content(count: int) -> np.ndarray:
        labels = rng.integers(0, n_clusters, count)
        return unit(
            centers[labels] + 0.9 * unit(rng.standard_normal((count, dim), dtype=np.float32))
        )

    images = unit(m_img + content(n))
    held_out = content(n_queries)
    image_queries = unit(m_img + held_out)
    noise = unit(rng.standard_normal((n_queries, dim), dtype=np.float32))
    text_queries = unit(m_txt + unit(held_out + 0.6 * noise))
    return images, {"image-like": image_queries, "text-like": text_queries}


def ground_truth(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Indices of the exact top-k inner products (numpy, in query chunks)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        scores = queries[s : s + chunk] @ vectors.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[s : s + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def run_kind(
    kind: str,
    vectors: np.ndarray,
    query_sets: dict,
    truth: dict,
    k: int,
    params: dict,
    sweep: list[int] | None = None,
    add_batch: int | None = None,
):
    from astrovl import EmbeddingIndex

    index = EmbeddingIndex(vectors.shape[1], kind=kind, model_id="benchmark", **params)
    first = next(iter(query_sets.values()))[0]
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    step = add_batch or len(vectors)
    for start in range(0, len(vectors), step):  # one add, or many (amortised appends)
        index.add(vectors[start:start + step])
    index.search(first, k=k)  # builds the faiss structure
    build_s = time.perf_counter() - t0
    rss1 = rss_bytes()
    mem_gib = (rss1 - rss0) / 2**30 if rss0 is not None and rss1 is not None else float("nan")
    rows = []
    breadths = (sweep or [None]) if kind != "exact" else [None]
    option = {"hnsw": "ef_search", "ivf": "nprobe"}.get(kind)
    default = params.get(option) if option else None
    for breadth in breadths:
        extra = {option: breadth} if breadth is not None else {}
        for name, queries in query_sets.items():
            times, recalls = [], []
            for qi, q in enumerate(queries):
                t = time.perf_counter()
                result = index.search(q, k=k, **extra)
                times.append(time.perf_counter() - t)
                found = set(int(r) for r in result["row"])
                recalls.append(len(found & set(truth[name][qi].tolist())) / k)
            times_ms = np.asarray(times) * 1e3
            rows.append(
                {
                    "queries": name,
                    "kind": kind,
                    "n": len(vectors),
                    "search": f"{option}={breadth or default}" if option else "-",
                    "build_s": build_s,
                    "adds": -(-len(vectors) // step),
                    "mem_GiB": mem_gib,
                    "mem_ratio": mem_gib * 2**30 / vectors.nbytes,
                    "median_ms": float(np.median(times_ms)),
                    "p95_ms": float(np.percentile(times_ms, 95)),
                    "p99_ms": float(np.percentile(times_ms, 99)),
                    "queries_s": 1e3 / float(np.mean(times_ms)),
                    f"recall@{k}": float(statistics.fmean(recalls)),
                }
            )
    return rows


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "-n",
        "--n-vectors",
        type=int,
        default=None,
        help="vectors in the index (default 100000; 20000 with --quick)",
    )
    parser.add_argument(
        "--queries",
        type=int,
        default=None,
        help="queries per query set (default 500; 200 with --quick)",
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("-k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--kinds", type=str_list, default=list(KINDS), help="index kinds to run")
    parser.add_argument(
        "--datasets",
        type=str_list,
        default=["random", "modality-gap"],
        help="'random' and/or 'modality-gap'",
    )
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument(
        "--sweep",
        type=lambda text: [int(x) for x in str_list(text)],
        default=None,
        help="comma-separated search breadths to measure on the same structure, passed per "
        "query as ef_search (hnsw) or nprobe (ivf), e.g. 8,16,32",
    )
    parser.add_argument(
        "--add-batch",
        type=int,
        default=None,
        help="add the vectors in calls of this many (default: one call)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = [x for x in args.kinds if x not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; use {', '.join(KINDS)}")
    unknown = [x for x in args.datasets if x not in ("random", "modality-gap")]
    if unknown:
        parser.error(f"unknown data sets {unknown}; use random, modality-gap")
    n = args.n_vectors or (20_000 if args.quick else 100_000)
    n_queries = args.queries or (200 if args.quick else 500)
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)

    env = environment()
    print_environment(env)
    params = {
        "hnsw_m": args.hnsw_m,
        "ef_search": args.ef_search,
        "ef_construction": args.ef_construction,
        "nlist": args.nlist,
        "nprobe": args.nprobe,
    }
    print(
        f"{n:,} vectors of dimension {args.dim}, {n_queries} queries per set, k={args.k}, {params}"
    )
    rng = np.random.default_rng(args.seed)
    tables: dict[str, list[dict]] = {}
    for dataset in args.datasets:
        maker = random_set if dataset == "random" else modality_gap_set
        vectors, query_sets = maker(n, n_queries, args.dim, rng)
        truth = {name: ground_truth(vectors, q, args.k) for name, q in query_sets.items()}
        if dataset == "modality-gap":
            gt = truth["text-like"][:, 0]
            cos_pair = float(np.mean(np.sum(query_sets["text-like"] * vectors[gt], axis=1)))
            sample = vectors[rng.integers(0, n, 2000)]
            cos_img = float(np.mean(sample[:1000] @ sample[1000:].T))
            print(
                f"modality-gap set: mean cosine text query - its best image {cos_pair:.2f}, "
                f"image - image {cos_img:.2f}"
            )
        rows = []
        for kind in args.kinds:
            rows += run_kind(kind, vectors, query_sets, truth, args.k, params, args.sweep,
                             args.add_batch)
            print(f"  done: {dataset} {kind}", flush=True)
        tables[dataset] = rows
        print_table(f"EmbeddingIndex on the {dataset} set ({n:,} x {args.dim})", rows)
    notes = [
        "recall is measured against a brute-force numpy top-k; the exact kind should show 1.0",
        "latency is one public search() call per query, including the astropy Table it returns",
    ]
    finish("index", args, env, tables, notes)


if __name__ == "__main__":
    main()
