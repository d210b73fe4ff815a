"""Evaluation commands: ``evaluate retrieval`` and ``evaluate galaxy10``."""

from __future__ import annotations

from ._common import add_command, add_model_args, add_output_args, emit, load_clip, load_llava

__all__ = ["register"]


def register(sub) -> None:
    """Add this family's subcommands to ``sub``."""
    p = add_command(sub, "evaluate", "evaluate retrieval (CLIP) or Galaxy10 descriptions (AstroLLaVA)",
                    """
                    astrovl evaluate retrieval ./sky --model ./runs/tiny/best
                    astrovl evaluate galaxy10 Galaxy10_DECals.h5 --model ./astrollava-hf --limit 200
                    """, _cmd_evaluate)
    p.add_argument("kind", choices=("retrieval", "galaxy10"))
    p.add_argument("data", help="dataset directory (retrieval) or Galaxy10 HDF5 file / class folder")
    p.add_argument("--split", default="val")
    p.add_argument("--k-percent", type=float, default=10.0)
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="galaxy10: tokens generated per description (protocol: 200)")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    add_model_args(p, pretrained=True)
    add_output_args(p)


def _cmd_evaluate(args):
    if args.kind == "retrieval":
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
    from ..evaluation import DescriptionEvaluator
    from ..evaluation.descriptions import load_galaxy10

    images, labels = load_galaxy10(args.data, limit=args.limit)
    evaluator = DescriptionEvaluator()
    table = evaluator.evaluate_model(load_llava(args), images, labels, max_new_tokens=args.max_new_tokens)
    if args.plot:
        evaluator.plot_summary(table).savefig(args.plot)
    return table
