"""Training commands: ``train-clip``, ``train-llava``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..training.choices import BEST_METRICS, CAPTION_MODES, IMAGE_CACHES, LLAVA_STAGES, MODES
from ._common import add_command, conf, emit, load_clip
from .llava import add_llava_args

__all__ = ["register"]


def register(sub) -> None:
    """Add this family's subcommands to ``sub``."""
    p = add_command(sub, "train-clip", "fine-tune or train CLIP on an image-text dataset",
                    """
                    astrovl train-clip ./hst --model openai/clip-vit-base-patch16 --steps 20 --eval-every 10 --batch-size 4 --output ./runs/clip
                    astrovl train-clip ./hst --model openai/clip-vit-base-patch16 --caption-mode abstract --grad-accum 2 --batch-size 4 --steps 20 --eval-every 10 --output ./runs/abstracts
                    astrovl train-clip ./sky --mode scratch --model tiny --steps 40 --batch-size 16 --eval-every 20 --best-metric val_top10 --max-val 40 --output ./runs/tiny
                    """, _cmd_train_clip)
    p.add_argument("dataset", help="dataset directory with a manifest (train and val splits)")
    p.add_argument("--output", required=True, help="output directory (checkpoint/, best/, final/, metrics.csv)")
    p.add_argument("--mode", default="finetune", choices=MODES,
                   help="finetune all weights; head: frozen towers + MLP heads; scratch: random "
                   "initialisation of the architecture; shuffled: the shuffled-caption control "
                   "(default finetune)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20000)")
    p.add_argument("--batch-size", type=int, default=None, help="contrastive batch (default 32)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per step, for memory; the loss stays over the whole batch (default 1)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-5)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 2000)")
    p.add_argument("--eval-every", type=int, default=None, help="validation and checkpoint interval (default 200)")
    p.add_argument("--best-metric", default=None, choices=BEST_METRICS,
                   help="validation metric that picks best/ (default val_loss)")
    p.add_argument("--max-val", type=int, default=None,
                   help="validate on a random subset (seeded with --seed) of this many pairs")
    p.add_argument("--caption-mode", default=None, choices=CAPTION_MODES,
                   help="train on the captions, or on runs of sentences of the raw abstracts (default caption)")
    p.add_argument("--image-cache", default=None, choices=IMAGE_CACHES,
                   help="how decoded images are kept (default auto: memory without DataLoader workers, "
                   "a shared file with them)")
    p.add_argument("--seed", type=int, default=0, help="seed of batches, augmentation and validation order")
    _add_start_args(p)
    p.add_argument("--model", default=None,
                   help="starting model: hub id, directory or open_clip name (default astrovl.conf.clip_model); "
                   "with --mode scratch only its architecture is used, and 'tiny' is a 4M-parameter CLIP")
    p.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (e.g. 'openai') when --model is an open_clip name; "
                   "refused with --mode scratch")
    p.add_argument("--device", default=None, help="torch device: auto, cpu, cuda, cuda:N")

    p = add_command(sub, "train-llava",
                    "train AstroLLaVA (stage 1: projector; stage 2: end to end or LoRA)",
                    """
                    astrovl train-llava --model llava-hf/llava-1.5-7b-hf --stage 1 --data ./outreach --output ./runs/s1
                    astrovl train-llava --model ./runs/s1/model --stage 2 --data conv.json --image-root ./outreach --lora --output ./runs/s2
                    """, _cmd_train_llava)
    p.add_argument("--stage", type=int, choices=LLAVA_STAGES, required=True,
                   help="1: projector on captions (plain format); 2: conversations, end to end or --lora")
    p.add_argument("--data", required=True,
                   help="dataset directory (its train split is trained on, its val split gives the validation "
                        "loss) or LLaVA conversation JSON")
    p.add_argument("--image-root", default=None,
                   help="image directory of a conversation JSON (default: the JSON's directory); when it holds "
                        "a dataset manifest, conversations of its val/test records are left out")
    p.add_argument("--output", required=True, help="output directory (model, checkpoint, metrics)")
    p.add_argument("--lora", action="store_true", help="stage 2: train LoRA adapters instead of the whole model")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="records per micro-batch (default 16)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 1e-3 stage 1, 2e-5 stage 2, 2e-4 LoRA)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--mix-data", default=None, help="general instruction data (LLaVA JSON) to mix in")
    p.add_argument("--mix-image-root", default=None, help="image directory of --mix-data")
    p.add_argument("--mix-ratio", type=float, default=0.0,
                   help="fraction of records from --mix-data (required with it, e.g. 0.1)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps")
    p.add_argument("--eval-every", type=int, default=None,
                   help="validation loss every N steps (default: --save-every and at the end)")
    p.add_argument("--num-workers", type=int, default=2,
                   help="DataLoader worker processes preparing batches (default 2; 0: in the training process)")
    p.add_argument("--seed", type=int, default=0)
    _add_start_args(p)
    add_llava_args(p)


def _add_start_args(p) -> None:
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from OUTPUT/checkpoint exactly where the run stopped (settings that "
                            "shape the training must be the checkpoint's; see docs/training)")
    start.add_argument("--overwrite", action="store_true",
                       help="start again in an OUTPUT that holds an earlier run, removing that run's outputs "
                            "(and nothing else)")


def _check_start(args, kind: str) -> None:
    """Refuse, before any model loads, an output folder this run may not write or would replace silently."""
    from ..training.common import choose_start
    from ..utils.files import check_output_dir

    if check_output_dir(args.output, kind) and not args.overwrite:
        choose_start(args.output, resume=args.resume, overwrite=False, outputs=())


def _cmd_train_clip(args):
    from ..datasets import ManifestDataset
    from ..training import CLIPTrainingConfig, train_clip

    if args.mode == "scratch" and args.pretrained is not None:
        raise ValueError(f"--pretrained {args.pretrained!r} has no effect with --mode scratch, which "
                         "starts from random weights; drop --pretrained, or use --mode finetune")
    from ..training.clip import OUTPUT_KIND, scratch_model

    names = ("steps", "batch_size", "grad_accum", "lr", "warmup_steps", "eval_every", "best_metric",
             "max_val", "caption_mode", "image_cache")
    options = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    config = CLIPTrainingConfig(mode=args.mode, output_dir=args.output, device=args.device,
                                seed=args.seed, resume=args.resume, overwrite=args.overwrite, **options)
    _check_start(args, OUTPUT_KIND)  # before any model loads
    ds = ManifestDataset(args.dataset)
    embedder = scratch_model(args.model, args.mode)  # an architecture to build from random weights
    if embedder is None:
        embedder = load_clip(args)
    result = train_clip(embedder, ds.split("train"), ds.split("val"), config)
    if getattr(result, "finished_before", False):
        print(f"the run in {result.output_dir} had already finished at step {result.start_step}; "
              "nothing was trained (raise --steps to continue it, or pass --overwrite to start again)")
    emit(result.history, argparse.Namespace(output=None, format="table"))
    print(f"best model: {result.best_path}")
    return 0


def _cmd_train_llava(args):
    from ..training import LLaVATrainingConfig, train_llava
    from ..training.llava import OUTPUT_KIND

    options = {k: getattr(args, k) for k in ("epochs", "max_steps", "batch_size", "lr", "eval_every")
               if getattr(args, k) is not None}
    config = LLaVATrainingConfig(stage=args.stage, output_dir=args.output, lora=args.lora,
                                 resume=args.resume, overwrite=args.overwrite, device=args.device,
                                 gradient_accumulation_steps=args.grad_accum, mix_data=args.mix_data,
                                 mix_image_root=args.mix_image_root, mix_ratio=args.mix_ratio,
                                 save_every=args.save_every, num_workers=args.num_workers, seed=args.seed,
                                 **options)
    _check_start(args, OUTPUT_KIND)  # before any model loads
    # a name, not a loaded model: train_llava loads on the CPU and accelerate places it on
    # each process's device (also under `accelerate launch` with several GPUs)
    model = args.model or conf().llava_model
    if args.revision is not None:
        from ..llava import AstroLLaVA

        model = AstroLLaVA.from_pretrained(model, revision=args.revision, device="cpu", dtype="float32")
    data = args.data
    if Path(data).is_dir():
        from ..datasets import ManifestDataset

        data = ManifestDataset(data)
    result = train_llava(model, data, config, image_root=args.image_root)
    if getattr(result, "finished_before", False):
        print(f"the run in {result.output_dir} had already finished at step {result.start_step}; "
              "nothing was trained (raise --max-steps to continue it, or pass --overwrite to start again)")
    emit(result.history, argparse.Namespace(output=None, format="table"))
    if result.adapter_dir is not None:
        print(f"LoRA adapter written to {result.adapter_dir} "
              f"(load with AstroLLaVA.from_pretrained(BASE, adapter=...))")
    else:
        print(f"model written to {result.model_dir}")
    return 0
