"""Dataset commands: ``synth``, ``build-hubble``, ``build-outreach``, ``summarize``,
``conversations``."""

from __future__ import annotations

import sys

from ._common import (
    add_command,
    add_image_args,
    add_model_args,
    add_output_args,
    check_output_name,
    check_positive,
    conf,
    emit,
    with_flags,
)

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
                    astrovl build-outreach ./acs-outreach acs.csv --image-root ./raw --hdu SCI,1
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
    add_image_args(p, "every FITS image")

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
                    astrovl conversations ./outreach --model ./llm --max-new-tokens 256 --limit 2 -o ./outreach/trial.json
                    """, _cmd_conversations)
    p.add_argument("dataset", help="dataset directory with a manifest")
    p.add_argument("--output", "-o", required=True, help="LLaVA conversation JSON file to write")
    p.add_argument("--gguf-file", default=None, help="GGUF file of --model (e.g. a quantised model)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="token budget of one conversation; the questions and answers are bounded so that "
                   "the JSON always closes within it (default: the budget of the full-size conversation, "
                   "3 to 6 turns of up to 200/400 characters; 256 makes short ones, fast on a CPU)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N records of the manifest (a quick trial run)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="attempts after the first for a record whose output does not validate (default 3)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="captions per batched first attempt (default 1: on a CPU batching gains little, "
                   "and the progress bar moves after every conversation)")
    add_model_args(p)


def _cmd_synth(args):
    from ..datasets import SyntheticSkyDataset

    ds = SyntheticSkyDataset.generate(args.output, n_images=args.n_images, image_size=args.image_size,
                                      seed=args.seed, val_fraction=args.val_fraction)
    print(ds)
    return 0


def _cmd_build_hubble(args):
    from pathlib import Path

    from astropy.table import Table

    from ..datasets import HubblePreviewDatasetBuilder
    from ..datasets.hubble import OUTPUT_KIND
    from ..utils.files import check_output_dir

    check_output_dir(args.output, OUTPUT_KIND)  # before any query
    observations = Table.read(args.observations) if args.observations else None  # before the model loads
    if args.abstracts and "://" not in args.abstracts and "\n" not in args.abstracts \
            and not Path(args.abstracts).is_file():
        raise ValueError(f"--abstracts {args.abstracts!r}: no such file (give a catalog file or URL)")
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
    if observations is not None:
        builder = HubblePreviewDatasetBuilder(observations, args.output, **common)
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
                                     val_fraction=args.val_fraction, hdu=args.hdu, plane=args.plane)
    ds = builder.build()
    print(ds)
    print(with_flags(str(builder.report)))
    return 0


def _cmd_summarize(args):
    from astropy.table import Table

    from ..datasets.abstracts import read_abstracts
    from ..generation import AbstractSummarizer

    check_output_name(args.output)
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

    if not args.output.lower().endswith(".json"):
        raise ValueError(f"--output {args.output!r}: give a .json file name (a LLaVA conversation file)")
    check_positive(args, "max_new_tokens", "limit", "batch_size")
    if args.max_retries < 0:
        raise ValueError(f"--max-retries {args.max_retries}: give 0 or more")
    ds = ManifestDataset(args.dataset)  # before the model loads
    if args.max_new_tokens is not None:  # too small a budget is refused before the model loads
        from ..generation.conversations import fit_conversation_to_budget

        fit_conversation_to_budget(args.max_new_tokens)
    gen = ConversationGenerator.from_pretrained(args.model or conf().summarizer_model,
                                                gguf_file=args.gguf_file, device=args.device,
                                                max_new_tokens=args.max_new_tokens, max_retries=args.max_retries)
    path = gen.generate_for_dataset(ds, args.output, limit=args.limit, batch_size=args.batch_size)
    print(f"{gen.report.generated + gen.report.cached} conversations written to {path}")
    if gen.report.failed:
        print(f"{gen.report.failed} records gave no valid conversation:", file=sys.stderr)
        for label, error in gen.report.failures[:10]:
            print(f"  {label}: {error}", file=sys.stderr)
        return 2
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
