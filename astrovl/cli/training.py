"""Training commands: ``train-clip``, ``train-llava``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_command, add_model_args, conf, emit, load_clip
from .llava import add_llava_args

__all__ = ["register"]


def register(sub) -> None:
    """Add this family's subcommands to ``sub``."""
    p = add_command(sub, "train-clip", "fine-tune or train CLIP on an image-text dataset",
                    """
                    astrovl train-clip ./hst --model ViT-B-16 --pretrained openai --output ./runs/clip
                    astrovl train-clip ./sky --mode scratch --model tiny --steps 500 --output ./runs/tiny
                    """, _cmd_train_clip)
    p.add_argument("dataset", help="dataset directory with a manifest (train and val splits)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--mode", default="finetune", choices=("finetune", "head", "scratch", "shuffled"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    add_model_args(p, pretrained=True)

    p = add_command(sub, "train-llava",
                    "train AstroLLaVA (stage 1: projector; stage 2: end to end or LoRA)",
                    """
                    astrovl train-llava --model llava-hf/llava-1.5-7b-hf --stage 1 --data ./outreach --output ./runs/s1
                    astrovl train-llava --model ./runs/s1/model --stage 2 --data conv.json --image-root ./outreach --lora --output ./runs/s2
                    """, _cmd_train_llava)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True,
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
    p.add_argument("--mix-ratio", type=float, default=0.0, help="fraction of records from --mix-data")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps")
    p.add_argument("--eval-every", type=int, default=None,
                   help="validation loss every N steps (default: --save-every and at the end)")
    p.add_argument("--num-workers", type=int, default=2,
                   help="DataLoader worker processes preparing batches (default 2; 0: in the training process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    add_llava_args(p)


def _cmd_train_clip(args):
    from ..clip import CLIPEmbedder
    from ..datasets import ManifestDataset
    from ..training import CLIPTrainingConfig, train_clip

    ds = ManifestDataset(args.dataset)
    options = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "warmup_steps", "eval_every")
               if getattr(args, k) is not None}
    config = CLIPTrainingConfig(mode=args.mode, output_dir=args.output, device=args.device,
                                seed=args.seed, resume=args.resume, **options)
    if args.mode == "scratch":
        from ..clip import TINY_CLIP_CONFIG

        name = args.model or conf().clip_model
        embedder = CLIPEmbedder.from_config(TINY_CLIP_CONFIG if name == "tiny" else name)
    else:
        embedder = load_clip(args)
    result = train_clip(embedder, ds.split("train"), ds.split("val"), config)
    emit(result.history, argparse.Namespace(output=None, format="table"))
    print(f"best model: {result.best_path}")
    return 0


def _cmd_train_llava(args):
    from ..training import LLaVATrainingConfig, train_llava

    # a name, not a loaded model: train_llava loads on the CPU and accelerate places it on
    # each process's device (also under `accelerate launch` with several GPUs)
    model = args.model or conf().llava_model
    if args.revision is not None:
        from ..llava import AstroLLaVA

        model = AstroLLaVA.from_pretrained(model, revision=args.revision, device="cpu", dtype="float32")
    options = {k: getattr(args, k) for k in ("epochs", "max_steps", "batch_size", "lr", "eval_every")
               if getattr(args, k) is not None}
    config = LLaVATrainingConfig(stage=args.stage, output_dir=args.output, lora=args.lora,
                                 resume=args.resume, device=args.device,
                                 gradient_accumulation_steps=args.grad_accum, mix_data=args.mix_data,
                                 mix_image_root=args.mix_image_root, mix_ratio=args.mix_ratio,
                                 save_every=args.save_every, num_workers=args.num_workers, seed=args.seed,
                                 **options)
    data = args.data
    if Path(data).is_dir():
        from ..datasets import ManifestDataset

        data = ManifestDataset(data)
    result = train_llava(model, data, config, image_root=args.image_root)
    emit(result.history, argparse.Namespace(output=None, format="table"))
    if result.adapter_dir is not None:
        print(f"LoRA adapter written to {result.adapter_dir} "
              f"(load with AstroLLaVA.from_pretrained(BASE, adapter=...))")
    else:
        print(f"model written to {result.model_dir}")
    return 0
