"""Fuzz ``astrovl.load_image`` with seeded mutated copies of real FITS files.

The cases come from :mod:`astrovl.imaging.fuzz` (bit flips, truncation, header
cards with absurd values, damaged compressed tiles, duplicated blocks, applied
to the FITS files installed with astropy's test data). Every case is written to
a temporary file and loaded with ``load_image(path)``; the script counts

* ``loaded``: an AstroImage came back;
* ``refused``: an astrovl error (a ``ValueError`` or ``OSError``) naming the file;
* ``other``: any other exception, or an astrovl error that does not name the file;
* ``slow``: cases that took longer than ``--slow`` seconds (default 5).

It also reports the peak memory: the process's peak resident set size above the
resident size after the first case (``ru_maxrss``), and with ``--trace-memory``
the largest ``tracemalloc`` peak of one case, alone and relative to the largest of
the file size, the loaded image and 1 MiB (a floor for fixed overheads).

Usage::

    python benchmarks/bench_fits_fuzz.py --quick
    python benchmarks/bench_fits_fuzz.py --cases 10000 --seed 0 --trace-memory --output fuzz.json
"""

from __future__ import annotations

import collections
import resource
import sys
import tempfile
import time

from _common import base_parser, environment, finish, print_environment, print_table


def _rss_peak_mib() -> float:
    # Linux reports kilobytes, macOS bytes
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="number of mutated files")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutations")
    parser.add_argument("--slow", type=float, default=5.0, help="seconds above which a case is slow")
    parser.add_argument("--trace-memory", action="store_true",
                        help="measure each case's peak memory with tracemalloc (slower)")
    parser.add_argument("--show", type=int, default=20, help="print up to this many 'other' cases")
    parser.add_argument("--progress", type=int, default=500, help="print a line every N cases")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases = min(args.cases, 200)

    from astrovl.imaging.fuzz import MUTATIONS, fuzz_cases, run_case, seed_files

    env = environment()
    env["device"] = "cpu"
    print_environment(env)
    seeds = seed_files()
    print(f"seed files: {', '.join(name for name, _ in seeds)}; {args.cases} cases, "
          f"seed {args.seed}")

    counts = {m: collections.Counter() for m in MUTATIONS}
    others, slow = [], []
    peak_case = {"bytes": 0, "ratio": 0.0, "case": None}
    rss_start = None
    total_time = 0.0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(fuzz_cases(args.cases, seed=args.seed, files=seeds)):
            result = run_case(case, tmp, trace_memory=args.trace_memory)
            if rss_start is None:
                rss_start = _rss_peak_mib()
            total_time += result.seconds
            counts[case.mutation][result.outcome] += 1
            if result.seconds > args.slow:
                counts[case.mutation]["slow"] += 1
                slow.append(result)
            if result.outcome == "other":
                others.append(result)
            if args.trace_memory:
                # relative to the file or the image, with a 1 MiB floor (fixed overheads)
                ratio = result.peak_bytes / max(len(case.data), result.output_bytes, 2**20)
                if ratio > peak_case["ratio"]:
                    peak_case.update(ratio=ratio, case=f"{case.seed}/{case.mutation}: {case.detail}")
                peak_case["bytes"] = max(peak_case["bytes"], result.peak_bytes)
            if args.progress and (i + 1) % args.progress == 0:
                done = sum(sum(c[k] for k in ("loaded", "refused", "other")) for c in counts.values())
                print(f"  {i + 1} cases, {time.perf_counter() - started:.0f} s, "
                      f"other so far: {len(others)}", flush=True)
                assert done == i + 1

    rows = []
    for mutation in MUTATIONS:
        c = counts[mutation]
        rows.append({"mutation": mutation, "cases": sum(c[k] for k in ("loaded", "refused", "other")),
                     "loaded": c["loaded"], "refused": c["refused"], "other": c["other"],
                     "slow": c["slow"]})
    total = {k: sum(r[k] for r in rows) for k in ("cases", "loaded", "refused", "other", "slow")}
    rows.append({"mutation": "total", **total})
    print_table(f"load_image on {args.cases} mutated FITS files (seed {args.seed})", rows)

    slowest = max((r.seconds for r in slow), default=0.0)
    memory = {
        "peak_rss_mib": round(_rss_peak_mib(), 1),
        "peak_rss_above_first_case_mib": round(_rss_peak_mib() - (rss_start or 0.0), 1),
        "mean_seconds_per_case": round(total_time / max(args.cases, 1), 4),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if args.trace_memory:
        memory["max_traced_peak_mib"] = round(peak_case["bytes"] / 2**20, 2)
        memory["max_traced_peak_over_file_output_or_1MiB"] = round(peak_case["ratio"], 2)
        memory["case_with_that_ratio"] = peak_case["case"]
    print_table("time and memory", [memory])
    for r in others[: args.show]:
        print(f"OTHER {r.case.seed}/{r.case.mutation} ({r.case.detail}): {r.error[:300]}")
    for r in sorted(slow, key=lambda r: -r.seconds)[: args.show]:
        print(f"SLOW {r.seconds:.1f} s {r.case.seed}/{r.case.mutation} ({r.case.detail})")
    notes = [f"slowest case above --slow: {slowest:.1f} s" if slow else
             f"no case took longer than {args.slow} s"]
    finish("bench_fits_fuzz", args, env,
           {"counts": rows, "memory": [memory],
            "other": [{"seed": r.case.seed, "mutation": r.case.mutation, "detail": r.case.detail,
                       "error": r.error} for r in others]},
           notes)


if __name__ == "__main__":
    main()
