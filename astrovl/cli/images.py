"""Commands on images and CLIP search: ``embed``, ``index``, ``search``, ``classify``."""

from __future__ import annotations

from ._common import (
    add_command,
    add_model_args,
    add_output_args,
    emit,
    expand_images,
    load_clip,
    load_clip_if_named,
    parse_hdu,
    read_lines,
)

__all__ = ["register"]


def register(sub) -> None:
    """Add this family's subcommands to ``sub``."""
    p = add_command(sub, "embed", "embed images (and optionally texts) with a CLIP model",
                    """
                    astrovl embed m13.fits ngc1316.fits --model ./my-clip --save embeddings.npy
                    astrovl embed *.fits --model openai/clip-vit-base-patch16 --batch-size 128 -o norms.csv
                    """, _cmd_embed)
    p.add_argument("images", nargs="+", help="image files (FITS, JPEG, PNG, TIFF)")
    p.add_argument("--hdu", default=None, help="HDU index or EXTNAME read from every FITS file "
                   "(default: the first HDU with an image)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    p.add_argument("--save", default=None, help="save the embedding matrix as .npy")
    add_model_args(p, pretrained=True)
    add_output_args(p)

    p = add_command(sub, "index", "build or extend a searchable embedding index",
                    """
                    astrovl index build ./previews --index ./hst-index --model ./my-clip
                    astrovl index add ./more-previews --index ./hst-index
                    astrovl index build ./previews --index ./big --approximate hnsw --model ./my-clip
                    """, _cmd_index)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = add_command(actions, "build", "embed images and write a new index (it records its model)",
                    """
                    astrovl index build ./previews --index ./hst-index --model ./my-clip
                    astrovl index build ./previews --index ./big --approximate hnsw --model ./my-clip
                    """, _cmd_index_build)
    b.add_argument("inputs", nargs="+", help="image files or directories of images")
    b.add_argument("--index", required=True,
                   help="index directory to write: a new or empty folder, or an earlier index (replaced)")
    b.add_argument("--approximate", default=None, choices=("ivf", "hnsw"),
                   help="approximate search structure for large archives (default: exact)")
    b.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    add_model_args(b, pretrained=True)
    a = add_command(actions, "add", "embed more images into an existing index with the index's own model",
                    """
                    astrovl index add ./more-previews --index ./hst-index
                    """, _cmd_index_add)
    a.add_argument("inputs", nargs="+", help="image files or directories of images")
    a.add_argument("--index", required=True, help="index directory to extend")
    a.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    _add_index_model_args(a)

    p = add_command(sub, "search", "search an index with a text or an image",
                    """
                    astrovl search ./hst-index "barred spiral galaxy" -k 5
                    astrovl search ./hst-index --image m13.fits -k 10 -o hits.ecsv
                    astrovl search ./big "edge-on disk galaxy" --ef-search 256
                    """, _cmd_search)
    p.add_argument("index", help="index directory")
    p.add_argument("query", nargs="?", default=None, help="text query")
    p.add_argument("--image", default=None, help="query by this image instead of text")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--nprobe", type=int, default=None,
                   help="cells searched by an 'ivf' index for this query (default: the index's)")
    p.add_argument("--ef-search", type=int, default=None,
                   help="search breadth of an 'hnsw' index for this query (default: the index's)")
    p.add_argument("--rerank", default=None, metavar="MODEL",
                   help="re-order CLIP's best --rerank-top images by this AstroLLaVA model (hub id or "
                   "directory): the likelihood of the text query as its description of each image")
    p.add_argument("--rerank-top", type=int, default=None, metavar="N",
                   help="CLIP candidates the --rerank model scores (default max(k, 50))")
    _add_index_model_args(p)
    add_output_args(p)

    p = add_command(sub, "classify", "zero-shot classification against a category list",
                    """
                    astrovl classify m13.fits --model ./my-clip --top-k 3
                    astrovl classify *.fits --categories my_categories.txt
                    """, _cmd_classify)
    p.add_argument("images", nargs="+", help="image files (FITS, JPEG, PNG, TIFF)")
    p.add_argument("--categories", default=None,
                   help="text file with one category per line (default: the 77 Hubble categories)")
    p.add_argument("--top-k", type=int, default=3, help="categories listed per image (default 3)")
    add_model_args(p, pretrained=True)
    add_output_args(p)


def _add_index_model_args(p) -> None:
    """``--model``/``--pretrained``/``--device`` of commands that use an existing index."""
    p.add_argument("--model", default=None,
                   help="the index's model, for an index that cannot load it itself (default: the "
                   "model the index recorded when it was built); another model is refused")
    p.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (e.g. 'openai') when --model is an open_clip name")
    p.add_argument("--device", default=None, help="torch device for the model: auto, cpu, cuda, cuda:N")


def _cmd_embed(args):
    import numpy as np
    from astropy.table import Table

    from ..imaging import load_image

    emb = load_clip(args)
    images = [load_image(p, hdu=parse_hdu(args.hdu)) for p in args.images]
    vectors = emb.embed_images(images, batch_size=args.batch_size)
    if args.save:
        from ..utils.files import atomic_write

        with atomic_write(args.save, "wb") as fh:
            np.save(fh, vectors)
    table = Table({"image": list(args.images), "norm": np.linalg.norm(vectors, axis=1),
                   "dim": [vectors.shape[1]] * len(args.images)})
    emit(table, args)
    return 0


def _cmd_index(args):  # pragma: no cover - argparse requires an action
    raise ValueError("give an action: index build or index add")


def _cmd_index_build(args):
    from astropy.table import Table

    from ..clip import EmbeddingIndex
    from ..clip.index import OUTPUT_KIND, is_saved_index
    from ..utils.files import check_output_dir

    check_output_dir(args.index, OUTPUT_KIND, recognize=is_saved_index)  # before the long embedding
    files = expand_images(args.inputs)
    index = EmbeddingIndex.build(load_clip(args), files, metadata=Table({"path": files}),
                                 batch_size=args.batch_size, approximate=args.approximate,
                                 image_root=_common_folder(files))
    index.save(args.index)
    print(f"index {args.index}: {len(index)} images, model {index.model_id}")
    return 0


def _cmd_index_add(args):
    import os

    from astropy.table import Table

    from ..clip import EmbeddingIndex

    files = expand_images(args.inputs)
    index = EmbeddingIndex.load(args.index, embedder=load_clip_if_named(args),
                                device=args.device)
    if index.image_root is not None:  # the recorded root now covers the new images too
        index.image_root = _common_folder([*files, os.path.join(index.image_root, "x")])
    vectors = _index_embedder(index, "index add").embed_images(files, batch_size=args.batch_size)
    index.add(vectors, Table({"path": files}))
    index.save(args.index)
    print(f"index {args.index}: {len(index)} images, model {index.model_id}")
    return 0


def _common_folder(files) -> str:
    """The deepest folder holding every file (the image root an index records)."""
    import os
    from pathlib import Path

    return os.path.commonpath([str(Path(f).resolve().parent) for f in files])


def _index_embedder(index, command: str):
    embedder = index.embedder
    if embedder is None:
        raise ValueError(f"{command} needs the index's model, which the index does not record; "
                         "pass --model (the model that built the index)")
    return embedder


def _cmd_search(args):
    from ..clip import EmbeddingIndex
    from ..imaging import load_image

    if (args.query is None) == (args.image is None):
        raise ValueError("give either a text query or --image, not both or neither")
    if args.rerank_top is not None and args.rerank is None:
        raise ValueError("--rerank-top goes with --rerank MODEL (the AstroLLaVA model that re-scores CLIP's "
                         "candidates)")
    if args.rerank is not None and args.query is None:
        raise ValueError("--rerank scores a text query against the images; it does not work with --image")
    index = EmbeddingIndex.load(args.index, embedder=load_clip_if_named(args),
                                device=args.device)
    query = args.query if args.query is not None else load_image(args.image)
    reranker = None
    if args.rerank is not None:
        from ..llava import AstroLLaVA

        reranker = AstroLLaVA.from_pretrained(args.rerank, device=args.device)
    emit(index.search(query, k=args.k, nprobe=args.nprobe, ef_search=args.ef_search, rerank=reranker,
                      rerank_top=args.rerank_top), args)
    return 0


def _cmd_classify(args):
    emb = load_clip(args)
    cats = read_lines(args.categories) if args.categories else None
    table = emb.zero_shot(list(args.images), categories=cats, top_k=args.top_k)
    emit(table, args)
    return 0
