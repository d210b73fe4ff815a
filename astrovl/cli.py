"""The ``astrovl`` command line.

Each subcommand parses its arguments and calls library functions; the logic
lives in the library. Errors are printed as one line with a non-zero exit code
(full tracebacks with ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

EPILOG = "Run 'astrovl COMMAND --help' for the options and examples of each command."


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None = None,
                    pretrained: bool = False) -> None:
    p.add_argument("--model", default=default_model,
                   help="model name, hub id or local directory" +
                   (f" (default: {default_model})" if default_model else ""))
    if pretrained:
        p.add_argument("--pretrained", default=None,
                       help="open_clip pretrained tag (e.g. 'openai') when --model is an open_clip name")
    p.add_argument("--device", default=None, help="torch device: auto, cpu, cuda, cuda:N")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", default=None,
                   help="write the result table to this file (format from the suffix: .ecsv, .csv, .json)")
    p.add_argument("--format", choices=("table", "ecsv", "csv", "json"), default="table",
                   help="format printed on standard output (default: a readable table)")


def _sub(subparsers, name: str, help_text: str, examples: str):
    return subparsers.add_parser(
        name, help=help_text, description=help_text,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``astrovl`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="astrovl",
        description="Astronomical images and natural language: CLIP search and LLaVA captions "
        "for FITS images.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"astrovl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # -- CLIP ---------------------------------------------------------------
    p = _sub(sub, "embed", "embed images (and optionally texts) with a CLIP model",
             """
             astrovl embed m13.fits ngc1316.fits --model ./my-clip --save embeddings.npy
             astrovl embed *.fits --model ViT-B-16 --pretrained openai --device cuda
             """)
    p.add_argument("images", nargs="+", help="image files (FITS, JPEG, PNG, TIFF)")
    p.add_argument("--hdu", default=None, help="HDU index or name for FITS files")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--save", default=None, help="save the embedding matrix as .npy")
    _add_model_args(p, pretrained=True)
    _add_output_args(p)
    p.set_defaults(func=_cmd_embed)

    p = _sub(sub, "index", "build or extend a searchable embedding index",
             """
             astrovl index build ./previews --index ./hst-index --model ./my-clip
             astrovl index add ./more-previews --index ./hst-index
             astrovl index build ./previews --index ./big --approximate hnsw
             """)
    p.add_argument("action", choices=("build", "add"))
    p.add_argument("inputs", nargs="+", help="image files or directories of images")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--approximate", default=None, choices=("ivf", "hnsw"),
                   help="approximate search structure for large archives (default: exact)")
    p.add_argument("--batch-size", type=int, default=64)
    _add_model_args(p, pretrained=True)
    p.set_defaults(func=_cmd_index)

    p = _sub(sub, "search", "search an index with a text or an image",
             """
             astrovl search ./hst-index "barred spiral galaxy" -k 5
             astrovl search ./hst-index --image m13.fits -k 10 -o hits.ecsv
             astrovl search ./big "edge-on disk galaxy" --nprobe 64
             """)
    p.add_argument("index", help="index directory")
    p.add_argument("query", nargs="?", default=None, help="text query")
    p.add_argument("--image", default=None, help="query by this image instead of text")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--nprobe", type=int, default=None,
                   help="cells searched by an 'ivf' index for this query (default: the index's)")
    p.add_argument("--ef-search", type=int, default=None,
                   help="search breadth of an 'hnsw' index for this query (default: the index's)")
    _add_model_args(p, pretrained=True)
    _add_output_args(p)
    p.set_defaults(func=_cmd_search)

    p = _sub(sub, "classify", "zero-shot classification against a category list",
             """
             astrovl classify m13.fits --model ./my-clip --top-k 3
             astrovl classify *.fits --categories my_categories.txt
             """)
    p.add_argument("images", nargs="+")
    p.add_argument("--categories", default=None,
                   help="text file with one category per line (default: the 77 Hubble categories)")
    p.add_argument("--top-k", type=int, default=3)
    _add_model_args(p, pretrained=True)
    _add_output_args(p)
    p.set_defaults(func=_cmd_classify)

    # -- LLaVA ----------------------------------------------------------------
    p = _sub(sub, "caption", "describe images with an AstroLLaVA model",
             """
             astrovl caption m13.fits --model ./astrollava-hf
             astrovl caption *.fits --model llava-hf/llava-1.5-7b-hf --device cuda -o captions.csv
             """)
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    _add_model_args(p)
    _add_output_args(p)
    p.set_defaults(func=_cmd_caption)

    p = _sub(sub, "ask", "ask a question about an image",
             """
             astrovl ask m13.fits "What kind of object is this?" --model ./astrollava-hf
             """)
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=200)
    _add_model_args(p)
    p.set_defaults(func=_cmd_ask)

    p = _sub(sub, "convert-llava", "convert an original-layout LLaVA checkpoint to the transformers layout",
             """
             astrovl convert-llava ./AstroLLaVA_v2 ./astrollava-hf
             """)
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=_cmd_convert)

    # -- datasets ---------------------------------------------------------------
    p = _sub(sub, "synth", "generate a procedural, labelled synthetic sky dataset",
             """
             astrovl synth ./sky --n-images 5000 --image-size 128 --seed 0
             """)
    p.add_argument("output")
    p.add_argument("--n-images", type=int, default=5000)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.set_defaults(func=_cmd_synth)

    p = _sub(sub, "build-hubble", "build a Hubble preview dataset from MAST",
             """
             astrovl build-hubble ./hst --proposal-id 12345 13000 --abstracts abstracts.txt
             astrovl build-hubble ./hst --observations obs.ecsv --abstracts abstracts.txt --caption-mode abstract
             """)
    p.add_argument("output")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--proposal-id", nargs="+", default=None, help="HST proposal IDs to query")
    src.add_argument("--cycle", nargs="+", type=int, default=None, help="HST cycles to query")
    src.add_argument("--observations", default=None,
                     help="a saved MAST observation table (ECSV/VOTable) from Observations.query_criteria")
    p.add_argument("--abstracts", default=None, help="proposal abstracts catalog file or URL")
    p.add_argument("--caption-mode", choices=("summary", "abstract"), default="abstract")
    p.add_argument("--summarizer-model", default=None, help="language model for summaries")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--max-images-per-proposal", type=int, default=20)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--keep-color", action="store_true", help="keep colour previews")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_build_hubble)

    p = _sub(sub, "build-outreach", "build an outreach image-caption dataset from APOD/ESO/ESA records",
             """
             astrovl build-outreach ./outreach apod.json eso.jsonl
             """)
    p.add_argument("output")
    p.add_argument("records", nargs="+", help="JSON/JSONL record files")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_build_outreach)

    p = _sub(sub, "summarize", "summarize proposal abstracts into objects and science use cases",
             """
             astrovl summarize abstracts.txt --model mistralai/Mixtral-8x7B-Instruct-v0.1 -o summaries.ecsv
             astrovl summarize abstracts.txt --model ./gemma --gguf-file gemma3-270m-q4_k_m.gguf
             """)
    p.add_argument("abstracts", help="proposal abstracts catalog file, or a text file with one abstract")
    p.add_argument("--gguf-file", default=None)
    _add_model_args(p)
    _add_output_args(p)
    p.set_defaults(func=_cmd_summarize)

    p = _sub(sub, "conversations", "generate synthetic visual QA conversations from captions",
             """
             astrovl conversations ./outreach --model ./llm -o ./outreach/conversations.json
             """)
    p.add_argument("dataset", help="dataset directory with a manifest")
    p.add_argument("--output", "-o", required=True, help="LLaVA conversation JSON file to write")
    p.add_argument("--gguf-file", default=None)
    _add_model_args(p)
    p.set_defaults(func=_cmd_conversations)

    # -- training / evaluation -----------------------------------------------------
    p = _sub(sub, "train-clip", "fine-tune or train CLIP on an image-text dataset",
             """
             astrovl train-clip ./hst --model ViT-B-16 --pretrained openai --output ./runs/clip
             astrovl train-clip ./sky --mode scratch --model tiny --steps 500 --output ./runs/tiny
             """)
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
    _add_model_args(p, pretrained=True)
    p.set_defaults(func=_cmd_train_clip)

    p = _sub(sub, "train-llava", "train AstroLLaVA (stage 1: projector; stage 2: end to end or LoRA)",
             """
             astrovl train-llava --model llava-hf/llava-1.5-7b-hf --stage 1 --data ./outreach --output ./runs/s1
             astrovl train-llava --model ./runs/s1 --stage 2 --data conv.json --image-root ./outreach --lora --output ./runs/s2
             """)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--data", required=True, help="dataset directory (stage 1) or conversation JSON (stage 2)")
    p.add_argument("--image-root", default=None, help="image directory for conversation JSON")
    p.add_argument("--output", required=True)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--mix-data", default=None, help="general instruction data (LLaVA JSON) to mix in")
    p.add_argument("--mix-ratio", type=float, default=0.0, help="fraction of records from --mix-data")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=_cmd_train_llava)

    p = _sub(sub, "evaluate", "evaluate retrieval (CLIP) or Galaxy10 descriptions (AstroLLaVA)",
             """
             astrovl evaluate retrieval ./sky --model ./runs/tiny/best
             astrovl evaluate galaxy10 Galaxy10_DECals.h5 --model ./astrollava-hf --limit 200
             """)
    p.add_argument("kind", choices=("retrieval", "galaxy10"))
    p.add_argument("data", help="dataset directory (retrieval) or Galaxy10 HDF5 file / class folder")
    p.add_argument("--split", default="val")
    p.add_argument("--k-percent", type=float, default=10.0)
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="galaxy10: tokens generated per description (protocol: 200)")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    _add_model_args(p, pretrained=True)
    _add_output_args(p)
    p.set_defaults(func=_cmd_evaluate)

    # -- demo ------------------------------------------------------------------
    p = _sub(sub, "demo", "run the offline end-to-end demonstration and write an HTML report",
             """
             astrovl demo --output ./astrovl-demo
             astrovl demo --output ./demo --steps 1000 --device cuda
             """)
    p.add_argument("--output", default="astrovl-demo", help="output directory (default ./astrovl-demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: a quick run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-images", type=int, default=None)
    p.add_argument("--model", default=None, help="open_clip model to fine-tune instead of a small model from scratch")
    p.add_argument("--pretrained", default=None, help="pretrained tag for --model (needs a network)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_demo)
    return parser


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _hdu(value):
    if value is None:
        return None
    return int(value) if str(value).lstrip("-").isdigit() else value


def _emit(table, args) -> None:
    """Print ``table`` in the requested format and write it if ``--output`` was given."""
    out = getattr(args, "output", None)
    if out:
        suffix = Path(out).suffix.lower()
        fmt = {".ecsv": "ascii.ecsv", ".csv": "ascii.csv", ".json": "json"}.get(suffix)
        if fmt is None:
            raise ValueError(f"--output {out!r}: use a .ecsv, .csv or .json file name")
        from .utils.files import atomic_write

        with atomic_write(out, "w") as fh:
            if fmt == "json":
                json.dump(_table_records(table), fh, indent=2)
            else:
                table.write(fh, format=fmt)
    fmt = getattr(args, "format", "table")
    if fmt == "table":
        table.pprint_all() if len(table) <= 200 else table.pprint(max_lines=60, max_width=200)
    elif fmt == "json":
        print(json.dumps(_table_records(table), indent=2))
    else:
        table.write(sys.stdout, format="ascii.ecsv" if fmt == "ecsv" else "ascii.csv")


def _table_records(table) -> list[dict]:
    recs = []
    for row in table:
        rec = {}
        for c in table.colnames:
            v = row[c]
            rec[c] = v.item() if hasattr(v, "item") else v
        recs.append(rec)
    return recs


def _expand_images(inputs: Sequence[str]) -> list[str]:
    from .imaging import FITS_SUFFIXES
    from .imaging.readers import PICTURE_SUFFIXES

    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                name = f.name.lower()
                if f.is_file() and (name.endswith(FITS_SUFFIXES) or name.endswith(PICTURE_SUFFIXES)):
                    out.append(str(f))
        else:
            out.append(str(path))
    if not out:
        raise ValueError(f"no image files found in {list(inputs)}")
    return out


def _clip(args):
    from .clip import CLIPEmbedder

    model = args.model
    if model is None:
        from .config import conf

        model, pretrained = conf.clip_model, conf.clip_pretrained
    else:
        pretrained = getattr(args, "pretrained", None)
    return CLIPEmbedder.from_pretrained(model, pretrained, device=args.device)


def _llava(args):
    from .config import conf
    from .llava import AstroLLaVA

    return AstroLLaVA.from_pretrained(args.model or conf.llava_model, device=args.device)


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------

def _cmd_embed(args):
    import numpy as np
    from astropy.table import Table

    from .imaging import load_image

    emb = _clip(args)
    images = [load_image(p, hdu=_hdu(args.hdu)) for p in args.images]
    vectors = emb.embed_images(images, batch_size=args.batch_size)
    if args.save:
        from .utils.files import atomic_write

        with atomic_write(args.save, "wb") as fh:
            np.save(fh, vectors)
    table = Table({"image": list(args.images), "norm": np.linalg.norm(vectors, axis=1),
                   "dim": [vectors.shape[1]] * len(args.images)})
    _emit(table, args)
    return 0


def _cmd_index(args):
    from astropy.table import Table

    from .clip import EmbeddingIndex

    files = _expand_images(args.inputs)
    meta = Table({"path": files})
    if args.action == "build":
        emb = _clip(args)
        index = EmbeddingIndex.build(emb, files, metadata=meta, batch_size=args.batch_size,
                                     approximate=args.approximate)
    else:
        index = EmbeddingIndex.load(args.index, embedder=_clip(args) if args.model else None)
        if index.embedder is None:
            raise ValueError("index add needs the index's model: pass --model")
        vectors = index.embedder.embed_images(files, batch_size=args.batch_size)
        index.add(vectors, meta)
    index.save(args.index)
    print(f"index {args.index}: {len(index)} images")
    return 0


def _cmd_search(args):
    from .clip import EmbeddingIndex

    if (args.query is None) == (args.image is None):
        raise ValueError("give either a text query or --image, not both or neither")
    embedder = _clip(args) if args.model else None
    index = EmbeddingIndex.load(args.index, embedder=embedder)
    query = args.query if args.query is not None else _load_query_image(args.image)
    _emit(index.search(query, k=args.k, nprobe=args.nprobe, ef_search=args.ef_search), args)
    return 0


def _load_query_image(path):
    from .imaging import load_image

    return load_image(path)


def _read_lines(path) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{path}: no categories found (one per line expected)")
    return lines


def _cmd_classify(args):
    emb = _clip(args)
    cats = _read_lines(args.categories) if args.categories else None
    table = emb.zero_shot(list(args.images), categories=cats, top_k=args.top_k)
    _emit(table, args)
    return 0


def _cmd_caption(args):
    from astropy.table import Table

    model = _llava(args)
    caps = model.caption(list(args.images), prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size)
    _emit(Table({"image": list(args.images), "caption": caps}), args)
    return 0


def _cmd_ask(args):
    model = _llava(args)
    print(model.ask(args.image, args.question, max_new_tokens=args.max_new_tokens))
    return 0


def _cmd_convert(args):
    from .llava import convert_llava_checkpoint

    out = convert_llava_checkpoint(args.src, args.dst)
    print(f"converted checkpoint written to {out}")
    return 0


def _cmd_synth(args):
    from .datasets import SyntheticSkyDataset

    ds = SyntheticSkyDataset.generate(args.output, n_images=args.n_images, image_size=args.image_size,
                                      seed=args.seed, val_fraction=args.val_fraction)
    print(ds)
    return 0


def _cmd_build_hubble(args):
    from astropy.table import Table

    from .datasets import HubblePreviewDatasetBuilder

    summarizer = None
    if args.caption_mode == "summary":
        from .generation import AbstractSummarizer

        summarizer = AbstractSummarizer.from_pretrained(
            args.summarizer_model or _conf().summarizer_model, gguf_file=args.gguf_file,
            device=args.device)
    common = dict(abstracts=args.abstracts, summarizer=summarizer, caption_mode=args.caption_mode,
                  max_images_per_proposal=args.max_images_per_proposal, image_size=args.image_size,
                  seed=args.seed, keep_color=args.keep_color)
    if args.observations:
        builder = HubblePreviewDatasetBuilder(Table.read(args.observations), args.output, **common)
    elif args.proposal_id:
        builder = HubblePreviewDatasetBuilder.from_proposals(args.proposal_id, args.output, **common)
    else:
        builder = HubblePreviewDatasetBuilder.from_cycles(args.cycle, args.output, **common)
    ds = builder.build()
    print(ds)
    print(builder.report)
    return 0


def _conf():
    from .config import conf

    return conf


def _cmd_build_outreach(args):
    from .datasets import OutreachDatasetBuilder

    builder = OutreachDatasetBuilder(list(args.records), args.output, image_size=args.image_size,
                                     seed=args.seed)
    ds = builder.build()
    print(ds)
    print(builder.report)
    return 0


def _cmd_summarize(args):
    from astropy.table import Table

    from .datasets.abstracts import read_abstracts
    from .generation import AbstractSummarizer

    catalog = read_abstracts(args.abstracts)
    summarizer = AbstractSummarizer.from_pretrained(args.model or _conf().summarizer_model,
                                                    gguf_file=args.gguf_file, device=args.device)
    texts = [str(t) for t in catalog["abstract"]]
    results = summarizer.summarize_many(texts)
    table = Table({
        "proposal_id": catalog["proposal_id"],
        "objects_and_phenomena": ["; ".join(r.objects_and_phenomena) if r else "" for r in results],
        "science_use_cases": ["; ".join(r.science_use_cases) if r else "" for r in results],
        "caption": [r.caption if r else "" for r in results],
    })
    _emit(table, args)
    return 0


def _cmd_conversations(args):
    from .datasets import ManifestDataset
    from .generation import ConversationGenerator

    ds = ManifestDataset(args.dataset)
    gen = ConversationGenerator.from_pretrained(args.model or _conf().summarizer_model,
                                                gguf_file=args.gguf_file, device=args.device)
    path = gen.generate_for_dataset(ds, args.output)
    print(f"conversations written to {path}")
    return 0


def _cmd_train_clip(args):
    from .clip import CLIPEmbedder
    from .datasets import ManifestDataset
    from .training import CLIPTrainingConfig, train_clip

    ds = ManifestDataset(args.dataset)
    options = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "warmup_steps", "eval_every")
               if getattr(args, k) is not None}
    config = CLIPTrainingConfig(mode=args.mode, output_dir=args.output, device=args.device,
                                seed=args.seed, resume=args.resume, **options)
    if args.mode == "scratch":
        from .clip import TINY_CLIP_CONFIG

        name = args.model or _conf().clip_model
        embedder = CLIPEmbedder.from_config(TINY_CLIP_CONFIG if name == "tiny" else name)
    else:
        embedder = _clip(args)
    result = train_clip(embedder, ds.split("train"), ds.split("val"), config)
    _emit(result.history, argparse.Namespace(output=None, format="table"))
    print(f"best model: {result.best_path}")
    return 0


def _cmd_train_llava(args):
    from .training import LLaVATrainingConfig, train_llava

    # a path, not a loaded model: train_llava loads on the CPU and accelerate places it on
    # each process's device (also under `accelerate launch` with several GPUs)
    model = args.model or _conf().llava_model
    options = {k: getattr(args, k) for k in ("epochs", "max_steps", "batch_size", "lr")
               if getattr(args, k) is not None}
    config = LLaVATrainingConfig(stage=args.stage, output_dir=args.output, lora=args.lora,
                                 resume=args.resume, device=args.device,
                                 gradient_accumulation_steps=args.grad_accum, mix_data=args.mix_data,
                                 mix_ratio=args.mix_ratio, save_every=args.save_every, seed=args.seed,
                                 **options)
    data = args.data
    if Path(data).is_dir():
        from .datasets import ManifestDataset

        data = ManifestDataset(data)
    result = train_llava(model, data, config, image_root=args.image_root)
    _emit(result.history, argparse.Namespace(output=None, format="table"))
    if result.adapter_dir is not None:
        print(f"LoRA adapter written to {result.adapter_dir} "
              f"(load with AstroLLaVA.from_pretrained(BASE, adapter=...))")
    else:
        print(f"model written to {result.model_dir}")
    return 0


def _cmd_evaluate(args):
    from astropy.table import Table

    if args.kind == "retrieval":
        from .datasets import ManifestDataset
        from .evaluation import top_k_percent_accuracy

        ds = ManifestDataset(args.data).split(args.split)
        if args.limit:
            ds = ds.subset(list(range(min(args.limit, len(ds)))))
        emb = _clip(args)
        img = emb.embed_images(ds)
        txt = emb.embed_text(ds.captions)
        rows = []
        for direction in ("image_to_text", "text_to_image"):
            rows.append({"direction": direction, "k_percent": args.k_percent,
                         "accuracy": top_k_percent_accuracy(img, txt, args.k_percent, direction=direction),
                         "random": args.k_percent / 100.0, "n": len(ds)})
        table = Table(rows=rows)
        if args.plot:
            from .evaluation import plot_retrieval_curve

            plot_retrieval_curve({"model": (img, txt)}).savefig(args.plot)
    else:
        from .evaluation import DescriptionEvaluator
        from .evaluation.descriptions import load_galaxy10

        images, labels = load_galaxy10(args.data, limit=args.limit)
        evaluator = DescriptionEvaluator()
        table = evaluator.evaluate_model(_llava(args), images, labels, max_new_tokens=args.max_new_tokens)
        if args.plot:
            evaluator.plot_summary(table).savefig(args.plot)
    _emit(table, args)
    return 0


def _cmd_demo(args):
    from .demo import run_demo

    result = run_demo(args.output, steps=args.steps, seed=args.seed, device=args.device,
                      model=args.model, pretrained=args.pretrained, n_images=args.n_images)
    result.summary.pprint_all()
    print(f"report: {result.report_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("astrovl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line unless --debug
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"astrovl {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
