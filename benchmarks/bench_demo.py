"""Where the time of ``astrovl demo`` goes: wall-clock and CPU seconds of each stage.

Runs :func:`astrovl.demo.run_demo` (the default run of ``astrovl demo``, or its
``--quick`` / ``--skip-llava`` variants) into a temporary folder, with a timer
around each of its stages: the synthetic data, the two CLIP trainings (model
and shuffled-caption control), their scoring, the index with its searches and
zero-shot classification, the AstroLLaVA part and, inside it, the picture
copies, the model build, the MiniLM load, training stage 1 and stage 2, the
captioning and scoring of the held-out images (untrained control and trained
model), the re-ranking comparison; then the report and ``results.json``.

CPU seconds are the user + system time of this process (all its threads) and
of the data-loader worker processes it waited for: on a machine shared with
other work, wall-clock time grows with the load while CPU time stays near the
work done, so both are printed, with the load average before and after.

Usage::

    python benchmarks/bench_demo.py                 # the default demo (the 480 s budget)
    python benchmarks/bench_demo.py --skip-llava    # the CLIP-only run
    python benchmarks/bench_demo.py --quick         # the cut-down run of the tests

It runs on the CPU by default, where the demo's time budget (480 s on two
cores) applies; ``--device cuda`` (or ``auto``) times it on a GPU.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from _common import (
    base_parser,
    environment,
    finish,
    print_environment,
    print_table,
    resolve_bench_device,
)

#: (module[:class], attribute, stage name or names of its successive calls)
STAGES = [
    ("astrovl.demo", "_make_data", "data: synthetic sky"),
    ("astrovl.demo", "_train_clips", "CLIP: train model + control"),
    ("astrovl.demo", "_score_clips", "CLIP: score both"),
    ("astrovl.demo", "_search_index", "CLIP: index, searches, zero-shot"),
    ("astrovl.demo", "_llava_part", "AstroLLaVA part (total)"),
    ("astrovl.demo.astrollava", "picture_copies", "  LLaVA: PNG copies of the images"),
    ("astrovl.demo.astrollava", "build_llava", "  LLaVA: build (tokenizer, model)"),
    ("astrovl.demo.astrollava", "_scorer", "  LLaVA: load MiniLM"),
    ("astrovl.training", "train_llava", ["  LLaVA: train stage 1", "  LLaVA: train stage 2"]),
    ("astrovl.evaluation.descriptions:DescriptionEvaluator", "evaluate_model",
     ["  LLaVA: evaluate untrained (control)", "  LLaVA: evaluate trained"]),
    ("astrovl.demo.astrollava", "compare_rerank", "  LLaVA: re-rank comparison"),
    ("astrovl.demo", "_write_report", "report.html"),
    ("astrovl.demo", "_write_results", "results.json"),
]


def _cpu() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


class StageTimer:
    """Wraps functions so that each call records its wall-clock and CPU seconds."""

    def __init__(self):
        self.rows: list[dict] = []
        self._undo: list = []

    def wrap(self, owner, attribute: str, names) -> None:
        original = getattr(owner, attribute)
        calls = [0]
        timer = self

        def timed(*args, **kwargs):
            name = names[min(calls[0], len(names) - 1)] if isinstance(names, list) else names
            calls[0] += 1
            t0, (c0, k0) = time.perf_counter(), _cpu()
            try:
                return original(*args, **kwargs)
            finally:
                c1, k1 = _cpu()
                timer.rows.append({"stage": name, "wall_s": time.perf_counter() - t0, "cpu_s": c1 - c0,
                                   "worker_cpu_s": k1 - k0})

        setattr(owner, attribute, timed)
        self._undo.append((owner, attribute, original))

    @contextmanager
    def installed(self):
        import importlib

        for module, attribute, names in STAGES:
            path, _, cls = module.partition(":")
            owner = importlib.import_module(path)
            if cls:
                owner = getattr(owner, cls)
            if not hasattr(owner, attribute):
                raise SystemExit(f"bench_demo: {module}.{attribute} is gone; update STAGES")
            self.wrap(owner, attribute, names)
        try:
            yield self
        finally:
            for owner, attribute, original in reversed(self._undo):
                setattr(owner, attribute, original)


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--skip-llava", action="store_true", help="the CLIP-only run (astrovl demo --skip-llava)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the demo here (a new or empty folder) instead of a temporary one")
    # the demo's time budget (480 s on 2 cores) is a CPU budget
    parser.set_defaults(device="cpu")
    args = parser.parse_args(argv)
    from astrovl.demo import run_demo

    device = str(resolve_bench_device(args.device, args.threads))
    env = environment(device)
    print_environment(env)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, StageTimer().installed() as timer:
        out = args.keep or Path(tmp) / "demo"
        t0, (c0, k0) = time.perf_counter(), _cpu()
        result = run_demo(out, quick=args.quick, llava=not args.skip_llava, device=device, progress=False)
        c1, k1 = _cpu()
        total = {"stage": "total", "wall_s": time.perf_counter() - t0, "cpu_s": c1 - c0, "worker_cpu_s": k1 - k0}
    rows = [*timer.rows, total]
    for r in rows:
        r["cpu_total_s"] = r["cpu_s"] + r["worker_cpu_s"]
    print_table(f"astrovl demo{' --quick' if args.quick else ''}{' --skip-llava' if args.skip_llava else ''} "
                f"on {device}: seconds per stage", rows, ["stage", "wall_s", "cpu_s", "worker_cpu_s", "cpu_total_s"])
    notes = [f"1-minute load average at the start: {load_start:.2f} (on {os.cpu_count()} CPUs)",
             "cpu_s: user + system seconds of this process; worker_cpu_s: of the data-loader processes it "
             "waited for"]
    if result.llava is not None:
        s = result.llava.scores
        if "class_accuracy" in s:
            notes.append(f"AstroLLaVA class accuracy {s['class_accuracy']:.3f} (chance {s['chance']:.3f}, "
                         f"control {s['control_class_accuracy']:.3f})")
        r = result.llava.rerank
        notes.append(f"precision@10 CLIP {r['precision_at_10_clip']:.2f}, re-ranked {r['precision_at_10_reranked']:.2f}")
    elif result.llava_note:
        notes.append(f"AstroLLaVA part: {result.llava_note}")
    finish("bench_demo", args, env, {"stages": rows}, notes)


if __name__ == "__main__":
    sys.exit(main())
