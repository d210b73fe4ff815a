"""Commands on images and CLIP search: ``embed``, ``index``, ``search``, ``classify``."""

from __future__ import annotations

import contextlib
import sys

from ._common import (
    FileFailures,
    add_command,
    add_image_args,
    add_model_args,
    add_on_error_arg,
    add_output_args,
    add_search_settings_args,
    check_images,
    check_output_name,
    check_positive,
    emit,
    expand_images,
    image_items,
    load_clip,
    load_clip_if_named,
    read_lines,
    run_per_file,
)

__all__ = ["register"]


def register(sub) -> None:
    """Add this family's subcommands to ``sub``."""
    p = add_command(sub, "embed", "embed images (and optionally texts) with a CLIP model",
                    """
                    astrovl embed m13.fits ngc1316.fits --model ./my-clip --save embeddings.npy
                    astrovl embed *.fits --model openai/clip-vit-base-patch16 --batch-size 128 -o norms.csv
                    astrovl embed acs/j94f05bgq_flt.fits --hdu SCI,1 --model ./my-clip
                    """, _cmd_embed)
    p.add_argument("images", nargs="+", help="image files (FITS, JPEG, PNG, TIFF) or directories of them")
    add_image_args(p)
    add_on_error_arg(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    p.add_argument("--save", default=None,
                   help="save the embedding matrix as .npy (one row per image of the output table)")
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
    b.add_argument("--approximate", default=None, choices=("ivf", "ivfpq", "hnsw"),
                   help="approximate search structure for large archives (default: exact)")
    b.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    b.add_argument("--scheduler", default=None,
                   help="embed on a dask cluster: a scheduler address (tcp://host:8786) or local:N for N "
                   "local worker processes; workers write shards into --index (a shared folder) and "
                   "re-running resumes")
    b.add_argument("--shard-size", type=int, default=1024,
                   help="images per cluster task and shard file (default 1024)")
    _add_structure_args(b)
    add_image_args(b)
    add_model_args(b, pretrained=True)
    v = add_command(actions, "build-vectors", "write an index from .npy embedding files, out of core",
                    """
                    astrovl index build-vectors part-*.npy --index ./archive --approximate ivfpq --model ./my-clip
                    astrovl index build-vectors emb.npy --index ./small --vector-dtype float16
                    """, _cmd_index_build_vectors)
    v.add_argument("shards", nargs="+", help=".npy files of (N, dim) float32 or float16 vectors, in order; "
                   "a sibling NAME.ecsv or NAME.parquet holds N metadata rows")
    v.add_argument("--index", required=True,
                   help="index directory to write: a new or empty folder, or an earlier index (replaced)")
    v.add_argument("--approximate", default=None, choices=("ivf", "ivfpq", "hnsw"),
                   help="approximate search structure (default: exact); ivfpq builds and serves out of core, "
                        "ivf and hnsw hold every vector in memory while building (N x dim x 4 bytes)")
    _add_structure_args(v)
    add_model_args(v, pretrained=True)
    a = add_command(actions, "add", "embed more images into an existing index with the index's own model",
                    """
                    astrovl index add ./more-previews --index ./hst-index
                    """, _cmd_index_add)
    a.add_argument("inputs", nargs="+", help="image files or directories of images")
    a.add_argument("--index", required=True, help="index directory to extend")
    a.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    add_image_args(a)
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
    add_image_args(p, "the --image file")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    add_search_settings_args(p, "for this query")
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
    p.add_argument("images", nargs="+", help="image files (FITS, JPEG, PNG, TIFF) or directories of them")
    p.add_argument("--categories", default=None,
                   help="text file with one category per line (default: the 77 Hubble categories)")
    p.add_argument("--top-k", type=int, default=3, help="categories listed per image (default 3)")
    add_image_args(p)
    add_model_args(p, pretrained=True)
    add_output_args(p)


def _add_structure_args(p) -> None:
    """Storage and structure options of the commands that write an index."""
    p.add_argument("--vector-dtype", default="float32", choices=("float32", "float16"),
                   help="how the stored vectors are kept (float16 halves their disk size; default float32)")
    p.add_argument("--nlist", type=int, default=None,
                   help="cells of an 'ivf' or 'ivfpq' index (default: about 4 sqrt(N), or sqrt(N) for ivfpq)")
    p.add_argument("--nprobe", type=int, default=32,
                   help="cells an 'ivf' or 'ivfpq' index searches per query (default 32)")
    p.add_argument("--pq-m", type=int, default=None,
                   help="bytes per vector of an 'ivfpq' code; must divide the dimension (default dim/8)")
    p.add_argument("--opq", action="store_true", help="rotate vectors (OPQ) before 'ivfpq' quantization")
    p.add_argument("--rerank-depth", type=int, default=None,
                   help="candidates an 'ivfpq' index re-scores exactly per query (default 512, "
                        "or one per 6,000 vectors in larger indexes)")


def _structure_params(args) -> dict:
    params = {"nlist": args.nlist, "nprobe": args.nprobe}
    if args.approximate == "ivfpq":
        params.update(pq_m=args.pq_m, opq=args.opq)
        if args.rerank_depth is not None:  # else the library's default
            params["rerank_depth"] = args.rerank_depth
    elif args.pq_m is not None or args.opq:
        raise ValueError("--pq-m and --opq are options of --approximate ivfpq")
    return params


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

    check_output_name(args.output)  # every input is checked before the model loads
    if args.save and not args.save.lower().endswith(".npy"):
        raise ValueError(f"--save {args.save!r}: give a .npy file name")
    check_positive(args, "batch_size")
    failures = FileFailures(args.on_error)
    images = check_images(args, expand_images(args.images), failures)
    emb = load_clip(args)

    def embed(items):
        return list(emb.embed_images(items, batch_size=args.batch_size, progress=False))

    done, rows = run_per_file(args, images, embed, chunk_size=args.batch_size, failures=failures,
                              progress="embedding images")
    if not done:
        raise ValueError(f"none of the {len(failures.failed)} image files could be read")
    vectors = np.stack(rows)
    if args.save:
        from ..utils.files import atomic_write

        with atomic_write(args.save, "wb") as fh:
            np.save(fh, vectors)
    table = Table({"image": done, "norm": np.linalg.norm(vectors, axis=1),
                   "dim": [vectors.shape[1]] * len(done)})
    emit(table, args)
    return failures.finish(len(done))


def _cmd_index(args):  # pragma: no cover - argparse requires an action
    raise ValueError("give an action: index build or index add")


def _cmd_index_build(args):
    from ..clip import EmbeddingIndex
    from ..clip.index_files import OUTPUT_KIND, common_image_root
    from ..utils.files import check_output_dir

    check_output_dir(args.index, OUTPUT_KIND)  # before the long embedding
    check_positive(args, "batch_size")
    files = check_images(args, expand_images(args.inputs))
    items, metadata = image_items(args, files), _metadata(args, files)
    params = dict(_structure_params(args), vector_dtype=args.vector_dtype, image_root=common_image_root(files))
    if args.scheduler:
        from ..clip.archive import build_on_cluster

        with _dask_client(args.scheduler) as client:
            build_on_cluster(client, load_clip(args), items, args.index, metadata=metadata,
                             kind=args.approximate or "exact", batch_size=args.batch_size,
                             shard_size=args.shard_size, device=args.device, **params)
        index = EmbeddingIndex.load(args.index)
    else:
        index = EmbeddingIndex.build(load_clip(args), items, metadata=metadata,
                                     batch_size=args.batch_size, approximate=args.approximate, **params)
        index.save(args.index)
    print(f"index {args.index}: {len(index)} images, model {_model_text(index)}")
    return 0


@contextlib.contextmanager
def _dask_client(scheduler: str):
    """A dask client of the scheduler ``ADDRESS``, or of a new ``LocalCluster`` for ``local:N``."""
    from ..utils.imports import optional_import

    distributed = optional_import("distributed", purpose="astrovl index build --scheduler")
    if not scheduler.startswith("local:"):
        with distributed.Client(scheduler) as client:
            yield client
        return
    n = scheduler.split(":", 1)[1]
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"--scheduler {scheduler!r}: give local:N with N >= 1 worker processes, or the "
                         "address of a running dask scheduler")
    from ..clip.sharded import local_cluster

    with local_cluster(int(n)) as cluster, distributed.Client(cluster) as client:
        yield client


def _cmd_index_build_vectors(args):
    from ..clip import EmbeddingIndex
    from ..clip.archive import build_from_vector_files

    model = load_clip(args) if args.model else None
    if model is None and args.pretrained is not None:
        raise ValueError(f"--pretrained {args.pretrained!r} needs --model (the open_clip model name)")
    build_from_vector_files(args.shards, args.index, kind=args.approximate or "exact", model=model,
                            vector_dtype=args.vector_dtype, **_structure_params(args))
    index = EmbeddingIndex.load(args.index)
    print(f"index {args.index}: {len(index)} vectors, kind {index.kind}, model {index.model_id}")
    return 0


def _cmd_index_add(args):
    import os

    from ..clip import EmbeddingIndex
    from ..clip.index import common_image_root

    check_positive(args, "batch_size")
    files = check_images(args, expand_images(args.inputs))
    index = EmbeddingIndex.load(args.index, embedder=load_clip_if_named(args),
                                device=args.device)
    if index.image_root is not None:  # the recorded root now covers the new images too
        index.image_root = common_image_root([*files, os.path.join(index.image_root, "x")])
    vectors = _index_embedder(index, "index add").embed_images(image_items(args, files),
                                                                batch_size=args.batch_size)
    index.add(vectors, _metadata(args, files))
    index.save(args.index)
    print(f"index {args.index}: {len(index)} images, model {_model_text(index)}")
    return 0


def _model_text(index) -> str:
    """The index's model id, marked when its weights were random."""
    random = " (random weights: the vectors carry no meaning)" if index.model_info.get("random") else ""
    return f"{index.model_id}{random}"


def _metadata(args, files):
    """The index rows of ``files``: their paths, and the HDU and plane read when given."""
    from astropy.table import Table

    from ..imaging.inputs import format_hdu

    columns = {"path": list(files)}
    if args.hdu is not None:
        columns["hdu"] = [format_hdu(args.hdu)] * len(files)
    if args.plane is not None:
        columns["plane"] = [args.plane] * len(files)
    return Table(columns)



def _index_embedder(index, command: str):
    embedder = index.embedder
    if embedder is None:
        raise ValueError(f"{command} needs the index's model, which the index does not record; "
                         "pass --model (the model that built the index)")
    return embedder


def _cmd_search(args):
    from ..clip import EmbeddingIndex

    if (args.query is None) == (args.image is None):
        raise ValueError("give either a text query or --image, not both or neither")
    if args.rerank_top is not None and args.rerank is None:
        raise ValueError("--rerank-top goes with --rerank MODEL (the AstroLLaVA model that re-scores CLIP's "
                         "candidates)")
    if args.rerank is not None and args.query is None:
        raise ValueError("--rerank scores a text query against the images; it does not work with --image")
    if args.image is None and (args.hdu is not None or args.plane is not None):
        raise ValueError("--hdu and --plane choose what is read from the --image file; give --image")
    if args.query is not None and not args.query.strip():
        raise ValueError("the text query is empty; write what to search for")
    check_output_name(args.output)
    check_positive(args, "k")
    if args.image is not None:
        check_images(args, [args.image])
    index = EmbeddingIndex.load(args.index, embedder=load_clip_if_named(args),
                                device=args.device)
    if index.model_info.get("random"):
        print(f"astrovl search: note: the index {args.index} was made by a model with random weights "
              f"({index.model_id}); its results carry no meaning", file=sys.stderr)
    query = args.query if args.query is not None else image_items(args, [args.image])[0]
    reranker = None
    if args.rerank is not None:
        from ..llava import AstroLLaVA

        reranker = AstroLLaVA.from_pretrained(args.rerank, device=args.device)
    emit(index.search(query, k=args.k, nprobe=args.nprobe, ef_search=args.ef_search,
                      rerank_depth=args.rerank_depth, rerank=reranker, rerank_top=args.rerank_top), args)
    return 0


def _cmd_classify(args):
    check_output_name(args.output)
    check_positive(args, "top_k")
    cats = read_lines(args.categories) if args.categories else None
    files = check_images(args, expand_images(args.images))
    emb = load_clip(args)
    table = emb.zero_shot(image_items(args, files), categories=cats, top_k=args.top_k)
    emit(table, args)
    return 0
