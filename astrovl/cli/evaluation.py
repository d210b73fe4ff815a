"""Evaluation commands: ``evaluate retrieval`` and ``evaluate galaxy10``."""

from __future__ import annotations

from ._common import add_command, add_model_args, add_output_args, emit, load_clip, load_llava

__all__ = ["register"]


def register(sub) -> None:
    """Add this family's subcommands to ``sub``."""
    p = add_command(sub, "evaluate", "evaluate retrieval (CLIP) or Galaxy10 descriptions (AstroLLaVA)",
                    """
                    astrovl evaluate retrieval ./sky --model ./runs/tiny/best
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
                   help="evaluate at most this many images (galaxy10: a stratified random subset)")
    p.add_argument("--seed", type=int, default=0, help="galaxy10: seed of the stratified subset (default 0)")
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
    from astropy.table import Table

    from ..datasets import ManifestDataset
    from ..evaluation import top_k_percent_accuracy

    ds = ManifestDataset(args.data).split(args.split)
    if args.limit:
        ds = ds.subset(list(range(min(args.limit, len(ds)))))
    emb = load_clip(args)
    img = emb.embed_images(ds)
    txt = emb.embed_text(ds.captions)
    rows = []
    for direction in ("image_to_text", "text_to_image"):
        rows.append({"direction": direction, "k_percent": args.k_percent,
                     "accuracy": top_k_percent_accuracy(img, txt, args.k_percent, direction=direction),
                     "random": args.k_percent / 100.0, "n": len(ds)})
    table = Table(rows=rows)
    if args.plot:
        from ..evaluation import plot_retrieval_curve

        plot_retrieval_curve({"model": (img, txt)}).savefig(args.plot)
    return table


def _galaxy10(args):
    from pathlib import Path

    from ..evaluation import DescriptionEvaluator
    from ..evaluation.descriptions import GALAXY10_DATASET, load_galaxy10
    from ..utils.files import atomic_write

    for flag, value in (("--k-percent", args.k_percent), ("--pretrained", args.pretrained)):
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
