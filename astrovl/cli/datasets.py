"""Dataset commands: ``synth``, ``build-hubble``, ``build-outreach``, ``summarize``,
``conversations``."""

from __future__ import annotations

from ._common import add_command, add_model_args, add_output_args, conf, emit

__all__ = ["register"]


def register(sub) -> None:
    """Add this family's subcommands to ``sub``."""
    p = add_command(sub, "synth", "generate a procedural, labelled synthetic sky dataset",
                    """
                    astrovl synth ./sky --n-images 300 --image-size 64 --seed 0 --val-fraction 0.2
                    """, _cmd_synth)
    p.add_argument("output", help="dataset directory to write (resumes an interrupted run)")
    p.add_argument("--n-images", type=int, default=5000, help="number of images (default 5000)")
    p.add_argument("--image-size", type=int, default=128, help="side of the square images in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sky and the split (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of images in the val split (default 0.1)")

    p = add_command(sub, "build-hubble", "build a Hubble preview dataset from MAST",
                    """
                    astrovl build-hubble ./hst --proposal-id 5371 5092 --abstracts abstracts.txt
                    astrovl build-hubble ./hst --observations obs.ecsv --abstracts abstracts.txt --caption-source abstract --val-fraction 0.5
                    """, _cmd_build_hubble)
    p.add_argument("output", help="dataset directory to write (resumes an interrupted build)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--proposal-id", nargs="+", default=None, help="HST proposal IDs to query")
    src.add_argument("--cycle", nargs="+", type=int, default=None, help="HST cycles to query")
    src.add_argument("--observations", default=None,
                     help="a saved MAST observation table (ECSV/VOTable) from Observations.query_criteria")
    p.add_argument("--abstracts", default=None, help="proposal abstracts catalog file or URL")
    p.add_argument("--caption-source", "--caption-mode", dest="caption_source",
                   choices=("summary", "abstract", "title"), default="abstract",
                   help="captions: 'summary' (a language model summarises each abstract), 'abstract' "
                   "('Category: X. <abstract>'), 'title' (observation titles); default abstract "
                   "(--caption-mode is its former name)")
    p.add_argument("--summarizer-model", default=None,
                   help="language model for summaries (default astrovl.conf.summarizer_model with "
                   "--caption-source summary; in the other modes, given, it fills the summary columns)")
    p.add_argument("--gguf-file", default=None, help="GGUF file of --summarizer-model")
    p.add_argument("--max-images-per-proposal", type=int, default=20,
                   help="previews kept per proposal, drawn at random with --seed (default 20)")
    p.add_argument("--image-size", type=int, default=512, help="side of the padded square previews (default 512)")
    p.add_argument("--keep-color", action="store_true", help="keep colour previews")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-proposal draws and the split (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of proposals in the val split; a proposal's split is a hash of its id "
                   "and --seed (default 0.1)")
    p.add_argument("--device", default=None, help="torch device of the summarizer")

    p = add_command(sub, "build-outreach",
                    "build an outreach image-caption dataset from APOD/ESO/ESA records",
                    """
                    astrovl build-outreach ./outreach apod.json eso.jsonl --image-root ./pictures --image-size 256
                    """, _cmd_build_outreach)
    p.add_argument("output", help="dataset directory to write (resumes an interrupted build)")
    p.add_argument("records", nargs="+", help="JSON/JSONL/CSV record files")
    p.add_argument("--image-root", default=None,
                   help="the only directory local image files named by the records may come from "
                   "(default: none; records may then name only http(s) URLs)")
    p.add_argument("--image-size", type=int, default=512, help="side of the padded square images (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of records in the val split, by a hash of each record id (default 0.1)")

    p = add_command(sub, "summarize", "summarize proposal abstracts into objects and science use cases",
                    """
                    astrovl summarize abstracts.txt --model mistralai/Mixtral-8x7B-Instruct-v0.1 -o summaries.ecsv
                    """, _cmd_summarize)
    p.add_argument("abstracts", help="proposal abstracts catalog file, or a text file with one abstract")
    p.add_argument("--gguf-file", default=None, help="GGUF file of --model (e.g. a quantised model)")
    add_model_args(p)
    add_output_args(p)

    p = add_command(sub, "conversations", "generate synthetic visual QA conversations from captions",
                    """
                    astrovl conversations ./outreach --model ./llm -o ./outreach/conversations.json
                    """, _cmd_conversations)
    p.add_argument("dataset", help="dataset directory with a manifest")
    p.add_argument("--output", "-o", required=True, help="LLaVA conversation JSON file to write")
    p.add_argument("--gguf-file", default=None, help="GGUF file of --model (e.g. a quantised model)")
    add_model_args(p)


def _cmd_synth(args):
    from ..datasets import SyntheticSkyDataset

    ds = SyntheticSkyDataset.generate(args.output, n_images=args.n_images, image_size=args.image_size,
                                      seed=args.seed, val_fraction=args.val_fraction)
    print(ds)
    return 0


def _cmd_build_hubble(args):
    from astropy.table import Table

    from ..datasets import HubblePreviewDatasetBuilder
    from ..datasets.hubble import OUTPUT_KIND, is_earlier_build
    from ..utils.files import check_output_dir

    check_output_dir(args.output, OUTPUT_KIND, recognize=is_earlier_build)  # before any query
    summarizer = None
    if args.caption_source == "summary" or args.summarizer_model:
        from ..generation import AbstractSummarizer

        summarizer = AbstractSummarizer.from_pretrained(
            args.summarizer_model or conf().summarizer_model, gguf_file=args.gguf_file,
            device=args.device)
    else:
        for flag, value in (("--gguf-file", args.gguf_file), ("--device", args.device)):
            if value is not None:
                raise ValueError(f"{flag} applies to the summarizer, which runs only with --caption-source "
                                 "summary or --summarizer-model")
    common = dict(abstracts=args.abstracts, summarizer=summarizer, caption_source=args.caption_source,
                  max_images_per_proposal=args.max_images_per_proposal, image_size=args.image_size,
                  seed=args.seed, keep_color=args.keep_color, val_fraction=args.val_fraction)
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


def _cmd_build_outreach(args):
    from ..datasets import OutreachDatasetBuilder

    builder = OutreachDatasetBuilder(list(args.records), args.output, image_root=args.image_root,
                                     image_size=args.image_size, seed=args.seed,
                                     val_fraction=args.val_fraction)
    ds = builder.build()
    print(ds)
    print(builder.report)
    return 0


def _cmd_summarize(args):
    from astropy.table import Table

    from ..datasets.abstracts import read_abstracts
    from ..generation import AbstractSummarizer

    catalog = _abstracts_or_one_text(args.abstracts, read_abstracts)
    summarizer = AbstractSummarizer.from_pretrained(args.model or conf().summarizer_model,
                                                    gguf_file=args.gguf_file, device=args.device)
    texts = [str(t) for t in catalog["abstract"]]
    results = summarizer.summarize_many(texts)
    table = Table({
        "proposal_id": catalog["proposal_id"],
        "objects_and_phenomena": ["; ".join(r.objects_and_phenomena) if r else "" for r in results],
        "science_use_cases": ["; ".join(r.science_use_cases) if r else "" for r in results],
        "caption": [r.caption if r else "" for r in results],
    })
    emit(table, args)
    return 0


def _cmd_conversations(args):
    from ..datasets import ManifestDataset
    from ..generation import ConversationGenerator

    ds = ManifestDataset(args.dataset)
    gen = ConversationGenerator.from_pretrained(args.model or conf().summarizer_model,
                                                gguf_file=args.gguf_file, device=args.device)
    path = gen.generate_for_dataset(ds, args.output)
    print(f"conversations written to {path}")
    return 0


def _abstracts_or_one_text(source: str, read_abstracts):
    """The abstracts catalog at ``source``, or a plain text file read as one abstract (proposal 0)."""
    from pathlib import Path

    from astropy.table import Table

    from ..exceptions import DatasetError

    try:
        return read_abstracts(source)
    except DatasetError:
        path = Path(source)
        if not path.is_file() or path.suffix.lower() in (".ecsv", ".csv"):
            raise
        text = " ".join(path.read_text(encoding="utf-8").split())
        if not text or "proposal id:" in text.lower():
            raise
        return Table({"proposal_id": [0], "abstract": [text]})
