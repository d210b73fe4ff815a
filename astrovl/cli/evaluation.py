"""Evaluation commands: ``evaluate retrieval`` and ``evaluate galaxy10``."""

from __future__ import annotations

from ._common import (
    add_command,
    add_model_args,
    add_output_args,
    check_output_name,
    check_positive,
    emit,
    load_clip,
    load_llava,
)

__all__ = ["register"]


def register(sub) -> None:
    """Add this family's subcommands to ``sub``."""
    p = add_command(sub, "evaluate", "evaluate retrieval (CLIP) or Galaxy10 descriptions (AstroLLaVA)",
                    """
                    astrovl evaluate retrieval ./sky --model ./runs/tiny/best --control ./runs/shuffled/best
                    astrovl evaluate retrieval ./hst --model ./runs/clip/best --base-model openai/clip-vit-base-patch16 --limit 200 --plot curves.png
                    astrovl evaluate galaxy10 --limit 20 --seed 1 -o galaxy10.ecsv
                    astrovl evaluate galaxy10 Galaxy10_DECals.h5 --model llava-hf/llava-1.5-7b-hf --limit 20 --plot g10.png
                    """, _cmd_evaluate)
    p.add_argument("kind", choices=("retrieval", "galaxy10"))
    p.add_argument("data", nargs="?", default=None,
                   help="retrieval: dataset directory. galaxy10: the hub dataset (default "
                        "matthieulel/galaxy10_decals, as the published evaluation), its local copy, "
                        "Galaxy10_DECals.h5 or a class folder")
    p.add_argument("--split", default=None,
                   help="split evaluated (retrieval: train/val/test, default val; galaxy10: test/train/all, "
                        "default test)")
    p.add_argument("--k-percent", type=float, default=None, help="retrieval: top-k%% accuracy (default 10)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate at most this many images (retrieval: a random subset drawn with --seed; "
                        "galaxy10: a stratified random subset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--base-model", default=None,
                   help="retrieval: the model the evaluated one was fine-tuned from, reported beside it")
    p.add_argument("--base-pretrained", default=None,
                   help="retrieval: open_clip pretrained tag of --base-model")
    p.add_argument("--control", default=None,
                   help="retrieval: the shuffled-caption control model, reported beside it")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="galaxy10: tokens generated per description (default: the protocol's 200)")
    p.add_argument("--batch-size", type=int, default=8, help="galaxy10: images per generate call (default 8)")
    p.add_argument("--references", default="astrollava", choices=("astrollava", "astrovl"),
                   help="galaxy10: references and scoring rules: the published AstroLLaVA protocol "
                        "(default) or astrovl's own")
    p.add_argument("--plot", default=None,
                   help="write a PNG plot here (galaxy10: default next to --output, as its .png)")
    add_model_args(p, pretrained=True)
    p.add_argument("--revision", default=None, help="galaxy10: branch, tag or commit of the model's hub id")
    add_output_args(p)


def _cmd_evaluate(args):
    check_output_name(args.output)  # before any data or model loads
    if args.plot and not args.plot.lower().endswith(".png"):
        raise ValueError(f"--plot {args.plot!r}: give a .png file name")
    check_positive(args, "limit", "batch_size", "max_new_tokens")
    if args.kind == "retrieval":
        if args.data is None:
            raise ValueError("evaluate retrieval needs the dataset directory: astrovl evaluate retrieval DIR")
        args.split = args.split or "val"
        args.k_percent = 10.0 if args.k_percent is None else args.k_percent
        table = _retrieval(args)
    else:
        table = _galaxy10(args)
    emit(table, args)
    return 0


def _retrieval(args):
    import numpy as np
    from astropy.table import Table

    from ..clip import CLIPEmbedder
    from ..datasets import ManifestDataset
    from ..evaluation import top_k_percent_accuracy

    for flag, value, default in (("--max-new-tokens", args.max_new_tokens, None),
                                 ("--references", args.references, "astrollava"),
                                 ("--batch-size", args.batch_size, 8), ("--revision", args.revision, None)):
        if value != default:
            raise ValueError(f"{flag} applies to 'evaluate galaxy10', not to retrieval")
    if args.base_pretrained is not None and args.base_model is None:
        raise ValueError(f"--base-pretrained {args.base_pretrained!r} needs --base-model")
    ds = ManifestDataset(args.data).split(args.split)
    if len(ds) == 0:
        raise ValueError(f"{args.data}: the split {args.split!r} is empty")
    if args.limit and args.limit < len(ds):
        rng = np.random.default_rng(args.seed)
        ds = ds.subset(np.sort(rng.choice(len(ds), args.limit, replace=False)))
    models = [("model", args.model or "(default)", load_clip(args))]
    if args.base_model:
        models.append(("base", args.base_model, CLIPEmbedder.from_pretrained(
            args.base_model, args.base_pretrained, device=args.device)))
    if args.control:
        models.append(("shuffled control", args.control, CLIPEmbedder.from_pretrained(args.control,
                                                                                     device=args.device)))
    rows, curves = [], {}
    for role, name, emb in models:
        img = emb.embed_images(ds, progress=False)
        txt = emb.embed_text(ds.captions)
        batch100 = (top_k_percent_accuracy(img, txt, args.k_percent, direction="text_to_image",
                                           batch_size=100) if len(ds) >= 100 else float("nan"))
        rows.append({"role": role, "model": str(name), "k_percent": args.k_percent,
                     "image_to_text": top_k_percent_accuracy(img, txt, args.k_percent),
                     "text_to_image": top_k_percent_accuracy(img, txt, args.k_percent,
                                                             direction="text_to_image"),
                     "text_to_image_batch100": batch100,
                     "random": args.k_percent / 100.0, "n": len(ds)})
        curves[f"{role}: {name}"] = (img, txt)
    if args.plot:
        from ..evaluation import plot_retrieval_curve
        from ..utils.files import atomic_write

        with atomic_write(args.plot, "wb") as fh:
            plot_retrieval_curve(curves).savefig(fh, format="png")
    return Table(rows=rows)


def _galaxy10(args):
    from pathlib import Path

    from ..evaluation import DescriptionEvaluator
    from ..evaluation.descriptions import GALAXY10_DATASET, load_galaxy10
    from ..utils.files import atomic_write

    for flag, value in (("--k-percent", args.k_percent), ("--pretrained", args.pretrained),
                        ("--base-model", args.base_model), ("--base-pretrained", args.base_pretrained),
                        ("--control", args.control)):
        if value is not None:
            raise ValueError(f"{flag} applies to 'evaluate retrieval' (CLIP), not to galaxy10")
    split = args.split or "test"
    images, labels = load_galaxy10(args.data or GALAXY10_DATASET, split=split, limit=args.limit, seed=args.seed)
    evaluator = DescriptionEvaluator(references=args.references)
    table = evaluator.evaluate_model(load_llava(args), images, labels, max_new_tokens=args.max_new_tokens,
                                     batch_size=args.batch_size)
    table.meta.update({"data": str(args.data or GALAXY10_DATASET), "split": split, "seed": args.seed,
                       "limit": args.limit})
    summary = evaluator.summarize(table)
    plot = args.plot
    if args.output:
        out = Path(args.output)
        with atomic_write(out.with_name(out.stem + "_descriptions.ecsv"), "w") as fh:
            table.write(fh, format="ascii.ecsv")
        plot = plot or str(out.with_suffix(".png"))
    if plot:
        fig = evaluator.plot_summary(table)
        with atomic_write(plot, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
    return summary
