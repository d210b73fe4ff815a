"""Training speed of ``train_clip`` (steps/s, samples/s, peak memory) on a synthetic sky.

A :class:`~astrovl.SyntheticSkyDataset` is rendered to a temporary folder and
``train_clip`` runs for ``(intervals + 1) * interval`` steps with validation
every ``interval`` steps. ``train_clip`` records the training samples/s of each
interval (data loading, forward, backward and optimizer step; validation and
checkpoints excluded); the first interval (start-up, ``torch.compile``) is
dropped and the median of the others is reported.

Variants run side by side on the same data:

``fp32``      ``CLIPTrainingConfig(precision="fp32")``
``bf16``      ``precision="bf16"`` (bf16 autocast)
``compile``   ``compile=True`` (``torch.compile``), at the default precision
``bf16+compile``

The defaults are the tiny model with batch 32 on a CPU (``fp32``, ``bf16``
and ``compile``; ``--quick`` leaves ``compile`` out), and ViT-B-16 with batch
32 on CUDA (``fp32``, ``bf16``, ``bf16+compile``). On CUDA, ``train_clip``
always uses the channels-last memory format and the fused AdamW; there is no
setting to turn these off, so they are not a variant here.

Usage::

    python benchmarks/bench_clip_train.py --quick
    python benchmarks/bench_clip_train.py --device cuda --model ViT-B-16 --batch-size 32
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from _common import (
    MemoryMeter,
    base_parser,
    environment,
    finish,
    print_environment,
    print_table,
    resolve_bench_device,
    str_list,
)

VARIANTS = {
    "fp32": {"precision": "fp32", "compile": False},
    "bf16": {"precision": "bf16", "compile": False},
    "compile": {"precision": "auto", "compile": True},
    "bf16+compile": {"precision": "bf16", "compile": True},
}


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        help="'tiny' (TINY_CLIP_CONFIG) or an open_clip name; default tiny on a CPU, "
        "ViT-B-16 on CUDA",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (16 with --quick)")
    parser.add_argument(
        "--interval",
        type=int,
        default=None,
        help="steps per timed interval (default 10 on a CPU, 25 on CUDA; 5 with --quick)",
    )
    parser.add_argument(
        "--intervals",
        type=int,
        default=None,
        help="timed intervals after the warm-up one (default 3; 2 with --quick)",
    )
    parser.add_argument(
        "--variants",
        type=str_list,
        default=None,
        help=f"any of {', '.join(VARIANTS)} (default fp32,bf16,compile on a CPU, "
        "fp32,bf16,bf16+compile on CUDA; no compile with --quick on a CPU)",
    )
    parser.add_argument("--mode", default="finetune", help="CLIPTrainingConfig.mode")
    parser.add_argument(
        "--n-images",
        type=int,
        default=None,
        help="synthetic images rendered (default: 4 x the batch size)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers (default: train_clip's choice, 0 on CPU, 8 on CUDA)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="reuse or keep a synthetic dataset in this folder (default: temporary)",
    )
    args = parser.parse_args(argv)

    device = resolve_bench_device(args.device, args.threads)
    is_cuda = device.type == "cuda"
    model = args.model or ("ViT-B-16" if is_cuda else "tiny")
    batch = args.batch_size or (16 if args.quick else 32)
    interval = args.interval or (5 if args.quick else 25 if is_cuda else 10)
    intervals = args.intervals or (2 if args.quick else 3)
    variants = args.variants or (
        ["fp32", "bf16", "bf16+compile"]
        if is_cuda
        else ["fp32", "bf16"]
        if args.quick
        else ["fp32", "bf16", "compile"]
    )
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; use {', '.join(VARIANTS)}")

    from astrovl import CLIPEmbedder, SyntheticSkyDataset
    from astrovl.clip import TINY_CLIP_CONFIG
    from astrovl.training import CLIPTrainingConfig, train_clip

    logging.getLogger("astrovl").setLevel(logging.WARNING)
    env = environment(device)
    print_environment(env)
    base = CLIPEmbedder.from_config(
        TINY_CLIP_CONFIG if model == "tiny" else model, device=device, seed=0
    )
    n_params = sum(p.numel() for p in base.model.parameters())
    print(
        f"model: {base.model_name}, {n_params / 1e6:.1f} M parameters, input {base.image_size}px; "
        f"batch {batch}, {interval} steps x ({intervals} + 1 warm-up) intervals"
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="astrovl-bench-") as tmp:
        data_dir = args.data or Path(tmp) / "sky"
        n_images = args.n_images or 4 * batch
        size = base.image_size + max(16, base.image_size // 8)  # room for the random crop
        t0 = time.perf_counter()
        sky = SyntheticSkyDataset.generate(
            data_dir, n_images=n_images, image_size=size, seed=0, val_fraction=0.2, progress=False
        )
        print(f"synthetic sky: {n_images} images of {size}px in {time.perf_counter() - t0:.1f} s")
        train, val = sky.split("train"), sky.split("val")
        for name in variants:
            config = CLIPTrainingConfig(
                mode=args.mode,
                steps=(intervals + 1) * interval,
                batch_size=batch,
                lr=1e-5,
                warmup_steps=0,
                eval_every=interval,
                max_val=batch,
                num_workers=args.num_workers,
                output_dir=str(Path(tmp) / f"run-{name}"),
                device=str(device),
                progress=False,
                tensorboard=False,
                seed=0,
            )
            config = dataclasses.replace(config, **VARIANTS[name])
            meter = MemoryMeter(device)
            t0 = time.perf_counter()
            with meter.measure(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.compile / inductor chatter
                result = train_clip(base, train, val, config)
            wall = time.perf_counter() - t0
            rates = [float(r) for r in result.history["samples_per_s"]]
            steady = rates[1:] or rates
            sps = statistics.median(steady)
            rows.append(
                {
                    "variant": name,
                    "model": base.model_name,
                    "batch": batch,
                    "steps_s": sps / batch,
                    "samples_s": sps,
                    "first_interval_s": interval * batch / rates[0] if rates else float("nan"),
                    "wall_s": wall,
                    "peak_mib": meter.peak_mib,
                    "memory": meter.kind,
                }
            )
            print(f"  done: {name}", flush=True)
    print_table(f"train_clip speed on {device} ({args.mode})", rows)
    notes = []
    ref = rows[0]
    for r in rows[1:]:
        notes.append(
            f"{r['variant']} / {ref['variant']}: {r['steps_s'] / ref['steps_s']:.2f}x steps/s"
        )
    notes.append(
        "first_interval_s is the wall time of the first interval (includes start-up and "
        "compilation); wall_s includes validation, checkpoints and dataset loading"
    )
    if is_cuda:
        notes.append("channels_last and fused AdamW are always on under CUDA (not configurable)")
    finish("clip_train", args, env, {"clip_train": rows}, notes)


if __name__ == "__main__":
    main()
