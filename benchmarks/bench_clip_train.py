"""CLIP training speed: ``train_clip`` against a plain open_clip training loop, side by side.

Two loops train the same architecture at the same batch size:

``open_clip`` (the reference)
    A plain loop made only of open_clip's and torch's own pieces, written the way
    open_clip's trainer (``open_clip_train``) runs a step: ``open_clip.create_model(name)``
    with random weights (for the tiny model, a copy of the model that
    ``CLIPEmbedder.from_config(TINY_CLIP_CONFIG)`` builds), ``open_clip.ClipLoss``,
    ``torch.optim.AdamW`` with open_clip's parameter groups, betas and eps, the
    ``logit_scale`` clamp after each step; in ``fp32`` as a naive loop, and as ``amp``
    with bf16 autocast from ``open_clip_train.precision.get_autocast("amp_bf16")``
    as open_clip's trainer does. Its batches are slices of synthetic tensors already
    on the device (no data loading at all), which favours the reference.
``train_clip``
    :func:`astrovl.training.train_clip` itself, in the ``CLIPTrainingConfig``
    variants below, on two kinds of input (``--inputs``):

    ``tensors``  the same synthetic image tensors and captions as the reference:
                 the data set class ``train_clip`` builds is swapped for one that
                 serves them from memory, so ``train_clip``'s own loop (DataLoader,
                 tokenization, host-to-device copy, forward, loss, backward,
                 optimizer, clamp, per-step loss read-back) is what is timed
    ``fits``     a rendered ``SyntheticSkyDataset`` (FITS files and a manifest):
                 decoding, augmentation and random crops are included

Variants of ``train_clip``:

``fp32``      ``CLIPTrainingConfig(precision="fp32")``
``bf16``      ``precision="bf16"`` (bf16 autocast)
``compile``   ``compile=True`` (``torch.compile``), at the default precision
``bf16+compile``

Steps run in intervals of ``--interval`` steps; the first interval (start-up,
compilation) is a warm-up and the median samples/s of the others is reported.
``train_clip`` records the samples/s of each interval itself (validation and
checkpoints excluded); the reference loop is timed the same way. ``x_ref_fp32``
and ``x_ref_amp`` are each row's steps/s divided by the reference's.

Defaults: the tiny model with batch 32 on a CPU (16 with ``--quick``), ViT-B-16
at 224 pixels with batch 32 on CUDA. On CUDA, ``train_clip`` always uses the
channels-last memory format and the fused AdamW (not configurable), and the
peak is ``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/bench_clip_train.py --quick
    python benchmarks/bench_clip_train.py --device cuda --model ViT-B-16 --batch-size 32
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import logging
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

from _common import (
    MemoryMeter,
    base_parser,
    environment,
    finish,
    print_environment,
    print_table,
    resolve_bench_device,
    str_list,
    synchronize,
)

VARIANTS = {
    "fp32": {"precision": "fp32", "compile": False},
    "bf16": {"precision": "bf16", "compile": False},
    "compile": {"precision": "auto", "compile": True},
    "bf16+compile": {"precision": "bf16", "compile": True},
}
REFERENCES = ("fp32", "amp")
INPUTS = ("tensors", "fits")

_OBJECTS = (
    "spiral galaxy",
    "elliptical galaxy",
    "globular cluster",
    "emission nebula",
    "gravitational lens arc",
    "edge-on disk galaxy",
    "merging galaxy pair",
    "open cluster",
)
_USES = (
    "star formation",
    "stellar populations",
    "dark matter mapping",
    "galaxy evolution",
    "cluster dynamics",
    "interstellar medium",
)


def synthetic_pairs(n: int, image_size: int, seed: int = 0):
    """``n`` random normalized image tensors ``(n, 3, S, S)`` and ``n`` varied captions."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    images = torch.randn((n, 3, image_size, image_size), generator=gen)
    captions = [
        f"{_OBJECTS[i % len(_OBJECTS)]}, image {i}; {_USES[(i // 3) % len(_USES)]}"
        for i in range(n)
    ]
    return images, captions


class TensorRecords:
    """Stands in for a ManifestDataset: in-memory images and a ``caption`` column."""

    def __init__(self, images, captions):
        from astropy.table import Table

        self.images = images
        self.manifest = Table({"caption": list(captions)})

    def __len__(self) -> int:
        return len(self.images)


class TensorPairs:
    """Stands in for ImageTextTorchDataset: serves ready tensors, no decoding.

    A plain map-style dataset (``__getitem__`` and ``__len__``) at module level, so that
    DataLoader workers can receive it under any start method.
    """

    def __init__(self, dataset, image_size, mean, std, *, captions=None, **kwargs):
        self.images = dataset.images
        self.captions = (
            list(captions)
            if captions is not None
            else [str(c) for c in dataset.manifest["caption"]]
        )

    def __len__(self) -> int:
        return len(self.images)

    def _image(self, i: int):
        return self.images[int(i)]

    def __getitem__(self, item):
        i = item[0] if isinstance(item, tuple) else item
        return self.images[int(i)], self.captions[int(i)]


def reference_loop(
    model,
    tokenizer,
    images,
    captions,
    *,
    device,
    batch: int,
    interval: int,
    intervals: int,
    amp: bool,
    lr: float = 1e-5,
    weight_decay: float = 1e-3,
) -> list:
    """Train ``model`` with open_clip's pieces; return samples/s of each interval (warm-up first)."""
    import open_clip
    import torch

    try:
        from open_clip_train.precision import get_autocast
    except ImportError:  # open_clip without its training package: the same autocast call
        from contextlib import nullcontext
        from functools import partial

        def get_autocast(precision, device_type="cuda"):
            if precision == "amp_bf16":
                return partial(torch.autocast, device_type=device_type, dtype=torch.bfloat16)
            return nullcontext

    model.output_dict = True
    model.train()

    def exclude(n, p):  # open_clip_train.main: no weight decay on gains, biases, logit_scale
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
        ],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_fn = open_clip.ClipLoss()
    autocast = get_autocast("amp_bf16" if amp else "fp32", device_type=device.type)
    images = images.to(device)
    tokens = tokenizer(captions).to(device)
    n = len(images)

    def step(k: int) -> None:
        s = (k * batch) % n
        optimizer.zero_grad()
        with autocast():
            model_out = model(images[s : s + batch], tokens[s : s + batch])
            losses = loss_fn(**model_out, output_dict=True)
            total_loss = sum(losses.values())
        total_loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    rates, k = [], 0
    for _ in range(intervals + 1):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(interval):
            step(k)
            k += 1
        synchronize(device)
        rates.append(interval * batch / (time.perf_counter() - t0))
    return rates


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


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
        help=f"train_clip variants, any of {', '.join(VARIANTS)} (default fp32,bf16,compile on "
        "a CPU, fp32,bf16,bf16+compile on CUDA; no compile with --quick on a CPU)",
    )
    parser.add_argument(
        "--references",
        type=str_list,
        default=list(REFERENCES),
        help="reference loops, any of fp32, amp, or 'none'",
    )
    parser.add_argument(
        "--inputs",
        type=str_list,
        default=list(INPUTS),
        help="train_clip inputs: 'tensors' (the reference's synthetic tensors), 'fits' (a "
        "rendered SyntheticSkyDataset), or both",
    )
    parser.add_argument("--mode", default="finetune", help="CLIPTrainingConfig.mode")
    parser.add_argument(
        "--n-images",
        type=int,
        default=None,
        help="synthetic images and tensors (default: 4 x the batch size)",
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
        help="reuse or keep the rendered synthetic dataset in this folder (default: temporary)",
    )
    args = parser.parse_args(argv)

    device = resolve_bench_device(args.device, args.threads)
    is_cuda = device.type == "cuda"
    model_name = args.model or ("ViT-B-16" if is_cuda else "tiny")
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
    references = [] if args.references == ["none"] else args.references
    for values, known, what in (
        (variants, VARIANTS, "variants"),
        (references, REFERENCES, "references"),
        (args.inputs, INPUTS, "inputs"),
    ):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"unknown {what} {unknown}; use {', '.join(known)}")
    if batch < 2:
        parser.error("--batch-size must be at least 2 (contrastive training)")

    import open_clip
    import torch

    import astrovl.datasets.torch_datasets as torch_datasets
    from astrovl import CLIPEmbedder, SyntheticSkyDataset
    from astrovl.clip import TINY_CLIP_CONFIG
    from astrovl.training import CLIPTrainingConfig, train_clip

    logging.getLogger("astrovl").setLevel(logging.WARNING)
    env = environment(device)
    print_environment(env)
    # the base model stays on the CPU; each run copies it to the device and frees it after
    base = CLIPEmbedder.from_config(
        TINY_CLIP_CONFIG if model_name == "tiny" else model_name, device="cpu", seed=0
    )
    n_params = sum(p.numel() for p in base.model.parameters())
    size = base.image_size
    n_pool = args.n_images or 4 * batch
    print(
        f"model: {base.model_name}, {n_params / 1e6:.1f} M parameters, input {size}px; "
        f"batch {batch}, {interval} steps x ({intervals} + 1 warm-up) intervals"
    )
    images, captions = synthetic_pairs(n_pool, size, seed=0)

    rows = []

    def add_row(loop, variant, inputs, rates, wall, meter):
        steady = rates[1:] or rates
        sps = statistics.median(steady)
        rows.append(
            {
                "loop": loop,
                "variant": variant,
                "inputs": inputs,
                "batch": batch,
                "steps_s": sps / batch,
                "samples_s": sps,
                "x_ref_fp32": float("nan"),
                "x_ref_amp": float("nan"),
                "warmup_s": interval * batch / rates[0] if rates else float("nan"),
                "wall_s": wall,
                "peak_mib": meter.peak_mib,
            }
        )
        print(f"  done: {loop} {variant} ({inputs})", flush=True)

    for ref in references:
        _free(device)
        if model_name == "tiny":
            ref_model = copy.deepcopy(base.model).to(device)  # the embedder's own architecture
        else:
            torch.manual_seed(0)
            ref_model = open_clip.create_model(model_name, device=device)
        meter = MemoryMeter(device)
        t0 = time.perf_counter()
        with meter.measure(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rates = reference_loop(
                ref_model,
                base.tokenizer,
                images,
                captions,
                device=device,
                batch=batch,
                interval=interval,
                intervals=intervals,
                amp=ref == "amp",
            )
        add_row("open_clip", ref, "tensors", rates, time.perf_counter() - t0, meter)
        del ref_model

    with tempfile.TemporaryDirectory(prefix="astrovl-bench-") as tmp:
        sources = {}
        if "tensors" in args.inputs:
            val_images, val_captions = synthetic_pairs(batch, size, seed=1)
            sources["tensors"] = (
                TensorRecords(images, captions),
                TensorRecords(val_images, val_captions),
            )
        if "fits" in args.inputs:
            data_dir = args.data or Path(tmp) / "sky"
            side = size + max(16, size // 8)  # room for the random crop
            t0 = time.perf_counter()
            sky = SyntheticSkyDataset.generate(
                data_dir, n_images=n_pool, image_size=side, seed=0, val_fraction=0.2, progress=False
            )
            print(f"synthetic sky: {n_pool} images of {side}px in {time.perf_counter() - t0:.1f} s")
            sources["fits"] = (sky.split("train"), sky.split("val"))
        for inputs in args.inputs:
            train, val = sources[inputs]
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
                    output_dir=str(Path(tmp) / f"run-{inputs}-{name}"),
                    device=str(device),
                    progress=False,
                    tensorboard=False,
                    seed=0,
                )
                config = dataclasses.replace(config, **VARIANTS[name])
                _free(device)
                meter = MemoryMeter(device)
                patch = (
                    mock.patch.object(torch_datasets, "ImageTextTorchDataset", TensorPairs)
                    if inputs == "tensors"
                    else contextlib.nullcontext()
                )
                t0 = time.perf_counter()
                with meter.measure(), warnings.catch_warnings(), patch:
                    warnings.simplefilter("ignore")  # torch.compile / inductor chatter
                    result = train_clip(base, train, val, config)
                wall = time.perf_counter() - t0
                add_row(
                    "train_clip",
                    name,
                    inputs,
                    [float(r) for r in result.history["samples_per_s"]],
                    wall,
                    meter,
                )
                del result
                if name.endswith("compile"):
                    torch._dynamo.reset()

    ref_rows = {r["variant"]: r for r in rows if r["loop"] == "open_clip"}
    for r in rows:
        for key, ref in (("x_ref_fp32", "fp32"), ("x_ref_amp", "amp")):
            if ref in ref_rows:
                r[key] = r["steps_s"] / ref_rows[ref]["steps_s"]
    print_table(f"CLIP training speed on {device} ({base.model_name}, mode {args.mode})", rows)
    notes = [
        "open_clip rows: the reference loop on synthetic tensors already on the device; "
        "train_clip rows: train_clip on the same tensors ('tensors') or on rendered FITS "
        "files ('fits')",
        "x_ref_fp32 / x_ref_amp: steps/s divided by the open_clip fp32 / amp (bf16 autocast) "
        "reference's",
        "warmup_s is the wall time of the first interval (start-up and compilation); wall_s "
        "includes validation, checkpoints and, for train_clip, copying the model",
        f"float32 matmul precision: {torch.get_float32_matmul_precision()!r} (torch default; "
        "the same for both loops)",
    ]
    if args.mode != "finetune":
        notes.append(f"train_clip runs mode {args.mode!r}; the reference trains all weights")
    if is_cuda:
        notes.append("channels_last and fused AdamW are always on in train_clip under CUDA")
    else:
        notes.append("peak_mib on a CPU is the resident set size of the whole process")
    finish("clip_train", args, env, {"clip_train": rows}, notes)


if __name__ == "__main__":
    main()
