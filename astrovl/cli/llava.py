"""AstroLLaVA commands: ``caption``, ``ask``, ``convert-llava``."""

from __future__ import annotations

from ._common import (
    FileFailures,
    add_command,
    add_image_args,
    add_on_error_arg,
    add_output_args,
    check_images,
    check_output_name,
    check_positive,
    check_text,
    emit,
    expand_images,
    image_items,
    load_llava,
    run_per_file,
)

__all__ = ["register", "add_llava_args"]


def add_llava_args(p) -> None:
    """``--model``, ``--revision`` and ``--device`` of the commands that load an AstroLLaVA model."""
    p.add_argument("--model", default=None,
                   help="hub id or directory of a LLaVA checkpoint in any released layout (transformers, "
                        "original LLaVA, LoRA release); default: astrovl.conf.llava_model, the released "
                        "AstroLLaVA (UniverseTBD/AstroLLaVA_v3)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub id (default: main)")
    p.add_argument("--device", default=None, help="torch device: auto, cpu, cuda, cuda:N")


def register(sub) -> None:
    """Add this family's subcommands to ``sub``."""
    p = add_command(sub, "caption", "describe images with an AstroLLaVA model",
                    """
                    astrovl caption m13.fits
                    astrovl caption *.fits --model llava-hf/llava-1.5-7b-hf --batch-size 4 -o captions.csv
                    astrovl caption ngc1316.fits --model ./astrollava-hf --prompt "List the structures you see." --max-new-tokens 64
                    astrovl caption acs/j94f05bgq_flt.fits --hdu SCI,2
                    """, _cmd_caption)
    p.add_argument("images", nargs="+", help="image files (FITS, JPEG, PNG, TIFF) or directories of them")
    p.add_argument("--prompt", default=None,
                   help='instruction (default: "Describe this astronomical image in detail.")')
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens generated per caption (default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    add_image_args(p)
    add_on_error_arg(p)
    add_llava_args(p)
    add_output_args(p)

    p = add_command(sub, "ask", "ask a question about an image",
                    """
                    astrovl ask m13.fits "What kind of object is this?"
                    astrovl ask ngc1316.fits "Is there a dust lane?" --model UniverseTBD/AstroLLaVA_v1 --max-new-tokens 50
                    """, _cmd_ask)
    p.add_argument("image", help="image file")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens generated at most (default 200)")
    add_image_args(p, "the FITS file")
    add_llava_args(p)

    p = add_command(sub, "convert-llava",
                    "convert an original-layout LLaVA checkpoint to the transformers layout",
                    """
                    astrovl convert-llava UniverseTBD/AstroLLaVA_v3 ./astrollava-hf
                    astrovl convert-llava liuhaotian/llava-v1.5-7b ./llava-v1.5-hf --dtype float16
                    """, _cmd_convert)
    p.add_argument("src", help="hub id or directory of the original-layout checkpoint (model_type llava_llama)")
    p.add_argument("dst", help="output directory (transformers layout)")
    p.add_argument("--vision-tower", default=None,
                   help="CLIP vision tower (hub id or directory) instead of the checkpoint's mm_vision_tower")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="store the weights in this dtype (default: as in the checkpoint)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub id (default: main)")


def _cmd_caption(args):
    from astropy.table import Table

    check_output_name(args.output)  # every input is checked before the model loads
    check_text(args.prompt, "--prompt")
    check_positive(args, "max_new_tokens", "batch_size")
    failures = FileFailures(args.on_error)
    images = check_images(args, expand_images(args.images), failures)
    model = load_llava(args)

    def caption(items):
        return model.caption(items, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                             batch_size=len(items), progress=False)

    done, caps = run_per_file(args, images, caption, chunk_size=args.batch_size, failures=failures,
                              progress="captioning")
    if not done:
        raise ValueError(f"none of the {len(failures.failed)} image files could be read")
    emit(Table({"image": done, "caption": caps}), args)
    return failures.finish(len(done))


def _cmd_ask(args):
    check_text(args.question, "the question")
    check_positive(args, "max_new_tokens")
    check_images(args, [args.image])
    model = load_llava(args)
    print(model.ask(image_items(args, [args.image])[0], args.question, max_new_tokens=args.max_new_tokens))
    return 0


def _cmd_convert(args):
    from pathlib import Path

    from ..llava import convert_llava_checkpoint

    if Path(args.dst).is_file():
        raise ValueError(f"{args.dst!r} is a file; the converted checkpoint is written to a directory")

    out = convert_llava_checkpoint(args.src, args.dst, vision_tower=args.vision_tower, dtype=args.dtype,
                                   revision=args.revision)
    print(f"converted checkpoint written to {out}")
    return 0
