"""AstroLLaVA commands: ``caption``, ``ask``, ``convert-llava``."""

from __future__ import annotations

from ._common import add_command, add_model_args, add_output_args, emit, load_llava

__all__ = ["register"]


def register(sub) -> None:
    """Add this family's subcommands to ``sub``."""
    p = add_command(sub, "caption", "describe images with an AstroLLaVA model",
                    """
                    astrovl caption m13.fits --model ./astrollava-hf
                    astrovl caption *.fits --model llava-hf/llava-1.5-7b-hf --device cuda -o captions.csv
                    """, _cmd_caption)
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    add_model_args(p)
    add_output_args(p)

    p = add_command(sub, "ask", "ask a question about an image",
                    """
                    astrovl ask m13.fits "What kind of object is this?" --model ./astrollava-hf
                    """, _cmd_ask)
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=200)
    add_model_args(p)

    p = add_command(sub, "convert-llava",
                    "convert an original-layout LLaVA checkpoint to the transformers layout",
                    """
                    astrovl convert-llava ./AstroLLaVA_v2 ./astrollava-hf
                    """, _cmd_convert)
    p.add_argument("src")
    p.add_argument("dst")


def _cmd_caption(args):
    from astropy.table import Table

    model = load_llava(args)
    caps = model.caption(list(args.images), prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size)
    emit(Table({"image": list(args.images), "caption": caps}), args)
    return 0


def _cmd_ask(args):
    model = load_llava(args)
    print(model.ask(args.image, args.question, max_new_tokens=args.max_new_tokens))
    return 0


def _cmd_convert(args):
    from ..llava import convert_llava_checkpoint

    out = convert_llava_checkpoint(args.src, args.dst)
    print(f"converted checkpoint written to {out}")
    return 0
