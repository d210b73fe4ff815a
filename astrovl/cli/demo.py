"""The ``demo`` command: the offline end-to-end run with its HTML report."""

from __future__ import annotations

from ._common import add_command

__all__ = ["register"]


def register(sub) -> None:
    """Add the ``demo`` subcommand to ``sub``."""
    p = add_command(sub, "demo", "run the offline end-to-end demonstration and write an HTML report",
                    """
                    astrovl demo --output ./astrovl-demo --quick
                    astrovl search ./astrovl-demo/index "two merging galaxies" --rerank ./astrovl-demo/llava --rerank-top 20
                    astrovl demo --output ./demo --steps 1000 --device cuda
                    """, _cmd_demo)
    p.add_argument("--output", default="astrovl-demo", help="output directory (default ./astrovl-demo)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per model (default 400; 60 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sky, the models and the training (default 0)")
    p.add_argument("--n-images", type=int, default=None,
                   help="synthetic images (default 1100; 330 with --quick)")
    p.add_argument("--quick", action="store_true", help="a reduced run (a minute or two on a laptop CPU)")
    p.add_argument("--model", default=None,
                   help="CLIP model to fine-tune instead of training a small model from scratch: an "
                   "open_clip name (with --pretrained), a hub id or a local directory")
    p.add_argument("--pretrained", default=None,
                   help="pretrained tag of the open_clip --model (needs the weights: a network or the "
                   "hub cache); refused without --model")
    p.add_argument("--device", default=None, help="torch device: auto, cpu, cuda, cuda:N")
    p.add_argument("--skip-llava", action="store_true",
                   help="the CLIP part only: no AstroLLaVA training, scoring or re-ranking")


def _cmd_demo(args):
    from ..demo import run_demo

    result = run_demo(args.output, steps=args.steps, seed=args.seed, device=args.device,
                      model=args.model, pretrained=args.pretrained, n_images=args.n_images,
                      quick=args.quick, llava=not args.skip_llava)
    result.summary.pprint_all()
    llava = result.llava
    if llava is not None:
        s = llava.scores
        if "class_accuracy" in s:
            print(f"AstroLLaVA class accuracy {s['class_accuracy']:.3f} (untrained {s['control_class_accuracy']:.3f}, "
                  f"chance {s['chance']:.3f}); semantic score {s['semantic_score']:.3f} "
                  f"(untrained {s['control_semantic_score']:.3f})")
        else:
            print(llava.score_note)
        r = llava.rerank
        print(f"precision at 10 of the demo queries: CLIP {r['precision_at_10_clip']:.2f}, re-ranked by "
              f"AstroLLaVA {r['precision_at_10_reranked']:.2f}")
    elif not args.skip_llava:
        print(f"AstroLLaVA part skipped: {result.llava_note}")
    print(f"report: {result.report_path}")
    print(f"results: {result.results_path}")
    print(f"search the index again: {result.search_command}")
    print(f"search it on a web page: {result.serve_command}")
    if llava is not None:
        print(f"re-rank a search with AstroLLaVA: {result.search_command} --rerank {llava.model_dir}")
        print(f"ask AstroLLaVA about a FITS file: {llava.ask_command}")
    return 0
