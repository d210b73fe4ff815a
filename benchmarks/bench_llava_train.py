"""Stage-2 LoRA training speed of ``train_llava``: tokens/s and peak memory.

:func:`astrovl.training.train_llava` runs with ``LLaVATrainingConfig(stage=2,
lora=True)`` (LoRA on the language model's attention and MLP layers, the
projector trained fully, vision tower frozen; bf16 and gradient checkpointing by
default on CUDA) on LLaVA conversation records written from a rendered
``SyntheticSkyDataset``: three question/answer turns per image (a description, the
kind of object, what it can be used for), with FITS images.

Each optimizer step is timed from the start of one forward pass to the start of
the next (a forward pre-hook on the model, with a CUDA synchronisation), so a
step's time includes loading and collating its batch, the forward and backward
passes, gradient clipping, the optimizer and the scheduler. The first
``--warmup`` steps are left out. Tokens are the non-padding input tokens of each
step (``attention_mask.sum()``, image tokens included); ``answer_tokens`` are
those the loss is computed on.

Models (``--shape``): ``tiny`` (``make_tiny_llava``, any device) and ``7b``
(LLaVA-1.5-7B shapes with random bf16 weights built on the GPU; CUDA only; see
``_llava_shapes.py``). ``--model DIR`` trains a local transformers LLaVA instead.

Usage::

    python benchmarks/bench_llava_train.py --quick
    python benchmarks/bench_llava_train.py --device cuda --shape 7b --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _common import (
    MemoryMeter,
    base_parser,
    environment,
    finish,
    print_environment,
    print_table,
    resolve_bench_device,
    synchronize,
)
from _llava_shapes import SHAPES, build_llava

_USES = {
    "spiral": "the structure of spiral arms and where stars form along them",
    "barred": "how bars move gas toward the centre of a galaxy",
    "elliptical": "the light profiles and old stellar populations of elliptical galaxies",
    "cluster": "the ages and dynamics of star clusters",
    "lens": "the mass distribution of the lensing galaxy, dark matter included",
    "nebula": "the gas and dust of the interstellar medium",
    "merger": "how interactions and mergers change galaxies",
}


def conversation_records(sky) -> list[dict]:
    """LLaVA conversation records (three turns) for every image of ``sky``."""
    records = []
    for i in range(len(sky)):
        row = sky.manifest[i]
        label = str(row["label"]).replace("_", " ")
        use = next((v for k, v in _USES.items() if k in label), "the morphology of galaxies")
        records.append(
            {
                "id": str(row["id"]),
                "image": str(row["image"]),
                "conversations": [
                    {
                        "from": "human",
                        "value": "<image>\nDescribe this astronomical image in detail.",
                    },
                    {"from": "gpt", "value": str(row["caption"])},
                    {"from": "human", "value": "What kind of object is this?"},
                    {"from": "gpt", "value": f"It is an example of the class '{label}'."},
                    {"from": "human", "value": "What could an astronomer learn from it?"},
                    {"from": "gpt", "value": f"Images like this one help to study {use}."},
                ],
            }
        )
    return records


class StepClock:
    """Forward pre-hook: a timestamp, the token count and the answer tokens of every micro-batch."""

    def __init__(self, device):
        self.device = device
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.answers: list[int] = []
        self.lengths: list[int] = []

    def __call__(self, module, args, kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        mask = kwargs.get("attention_mask")
        labels = kwargs.get("labels")
        self.tokens.append(int(mask.sum()) if mask is not None else -1)
        self.answers.append(int((labels != -100).sum()) if labels is not None else -1)
        self.lengths.append(int(mask.shape[1]) if mask is not None else -1)


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="tiny",
        help="'tiny' (any device) or '7b' (LLaVA-1.5-7B shapes, random bf16 weights, CUDA only)",
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="a local transformers LLaVA directory instead"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="records per step (default 4 on a CPU, 16 on CUDA as in LLaVA-1.5)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 20; 10 with --quick)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3)")
    parser.add_argument(
        "--lora-r",
        type=int,
        default=None,
        help="LoRA rank (default 128 as in LLaVA-1.5, 8 for the tiny model)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: train_llava's choice (on for stage 2 on CUDA, off on a CPU)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers (default 0 on a CPU, 4 on CUDA)",
    )
    parser.add_argument(
        "--n-images",
        type=int,
        default=None,
        help="synthetic images (default 4 x batch size, at least one per class)",
    )
    args = parser.parse_args(argv)
    if args.model is not None and args.shape != "tiny":
        parser.error("give either --model or --shape 7b, not both")

    from transformers.utils import logging as hf_logging

    from astrovl import AstroLLaVA, SyntheticSkyDataset
    from astrovl.datasets.synthetic import SYNTHETIC_CLASSES
    from astrovl.training import LLaVATrainingConfig, train_llava

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("astrovl").setLevel(logging.WARNING)
    device = resolve_bench_device(args.device, args.threads)
    is_cuda = device.type == "cuda"
    big = args.model is not None or args.shape == "7b"
    if args.shape == "7b" and not is_cuda:
        parser.error(
            f"--shape 7b needs --device cuda (7B bf16 weights and their training state); the "
            f"device here is {device}. Use the default --shape tiny on a CPU"
        )
    batch = args.batch_size or (16 if is_cuda else 4)
    steps = args.steps or (10 if args.quick else 20)
    warmup = 3 if args.warmup is None else args.warmup
    lora_r = args.lora_r or (128 if big else 8)
    num_workers = args.num_workers if args.num_workers is not None else (4 if is_cuda else 0)
    env = environment(device)
    print_environment(env)

    rows = []
    with tempfile.TemporaryDirectory(prefix="astrovl-bench-") as tmp:
        n_images = max(args.n_images or 4 * batch, len(SYNTHETIC_CLASSES))
        t0 = time.perf_counter()
        sky = SyntheticSkyDataset.generate(
            Path(tmp) / "sky",
            n_images=n_images,
            image_size=128,
            seed=0,
            val_fraction=0.0,
            progress=False,
        )
        data = Path(tmp) / "conversations.json"
        data.write_text(json.dumps(conversation_records(sky)), encoding="utf-8")
        print(
            f"data: {n_images} FITS images of 128 px with 3-turn conversations "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        t0 = time.perf_counter()
        if args.model is None:
            llava, label = build_llava(args.shape, device, tmp)
        else:
            llava = AstroLLaVA.from_pretrained(args.model, device=device)
            label = str(args.model)
        synchronize(device)
        n_params = sum(p.numel() for p in llava.model.parameters())
        print(
            f"model: {label}, {n_params / 1e6:,.1f} M parameters, dtype {llava.model.dtype}, "
            f"built in {time.perf_counter() - t0:.1f} s"
        )
        config = LLaVATrainingConfig(
            stage=2,
            lora=True,
            lora_r=lora_r,
            lora_alpha=2 * lora_r,
            output_dir=str(Path(tmp) / "run"),
            max_steps=warmup + steps + 1,
            batch_size=batch,
            gradient_checkpointing=args.gradient_checkpointing,
            device=str(device),
            num_workers=num_workers,
            save_every=10**9,  # only the final save, after the last timed step
            log_every=10**9,
            progress=False,
        )
        clock = StepClock(device)
        handle = llava.model.register_forward_pre_hook(clock, with_kwargs=True)
        meter = MemoryMeter(device)
        t0 = time.perf_counter()
        try:
            with meter.measure(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = train_llava(llava, str(data), config, image_root=sky.root)
        finally:
            handle.remove()
        wall = time.perf_counter() - t0
        trainable = int(result.history.meta.get("trainable_parameters", 0))
        gc_attr = next(
            (
                a
                for a in ("is_activation_checkpointing", "is_gradient_checkpointing")
                if hasattr(type(llava.model), a)
            ),
            None,
        )
        gc_on = bool(getattr(llava.model, gc_attr)) if gc_attr else None
    times = np.diff(clock.times)  # step k lasts from forward k to forward k + 1
    timed = slice(warmup, warmup + steps)
    seconds = float(times[timed].sum())
    tokens = int(np.sum(clock.tokens[timed]))
    answers = int(np.sum(clock.answers[timed]))
    rows.append(
        {
            "model": label,
            "batch": batch,
            "lora_r": lora_r,
            "grad_ckpt": gc_on,
            "steps": len(times[timed]),
            "step_s": seconds / max(1, len(times[timed])),
            "samples_s": batch * len(times[timed]) / seconds,
            "tokens_s": tokens / seconds,
            "answer_tokens_s": answers / seconds,
            "tokens_step": tokens / max(1, len(times[timed])),
            "peak_mib": meter.peak_mib,
            "wall_s": wall,
        }
    )
    print_table(f"train_llava stage 2 LoRA on {device}", rows)
    notes = [
        f"trainable parameters: {trainable / 1e6:,.2f} M of {n_params / 1e6:,.1f} M "
        "(LoRA adapters and the projector)",
        f"padded sequence length per step: {int(np.median(clock.lengths[timed]))} tokens "
        "(median); tokens_s counts non-padding input tokens, image tokens included; "
        "answer_tokens_s the tokens the loss is computed on",
        f"first {warmup} steps untimed: {float(times[:warmup].sum()):.2f} s",
        "wall_s includes data loading start-up, the LoRA wrapping and the final save",
    ]
    if not is_cuda:
        notes.append("peak_mib on a CPU is the resident set size of the whole process")
    finish("llava_train", args, env, {"llava_train": rows}, notes)


if __name__ == "__main__":
    main()
