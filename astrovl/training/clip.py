"""Contrastive training of CLIP on image-text manifests (the HubbleCLIP recipe).

Defaults follow the paper: batch 32, AdamW (lr 1e-5, weight decay 1e-3), 2,000
linear warm-up steps then a constant rate, 20,000 steps, random 90-degree
rotations, flips and random crops, validation every 200 steps and the best
checkpoint kept by validation loss.

The contrastive batch is always ``batch_size`` pairs: with gradient
accumulation (``grad_accum``), the features of all micro-batches are first
computed without gradients, then each micro-batch is recomputed with gradients
and the loss over the *whole* batch is back-propagated through it (open_clip's
``accum_freq`` scheme), so every image still has ``batch_size - 1`` negatives
and the gradient equals the one of a single full batch.

Multi-GPU and multi-node: launch the same script with ``torchrun``; when
``torch.distributed`` is initialised, each process trains on its share of the
batch on the GPU of its ``LOCAL_RANK``, features are gathered across processes
for the contrastive loss (open_clip's ``ClipLoss`` with ``gather_with_grad``),
gradients are averaged by ``DistributedDataParallel`` (synchronised once per
optimizer step, on the last micro-batch), and validation runs on process 0
while the others wait.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from astropy.table import Table

from ..exceptions import CheckpointError, DatasetError
from ..utils.files import CLIP_TRAINING_OUTPUT, atomic_write_text, prepare_output_dir
from .batches import StepBatches
from .choices import (
    BEST_METRICS,
    CAPTION_MODES,
    CLIP_LOSSES,
    IMAGE_CACHES,
    MODES,
    PRECISIONS,
    SCHEDULES,
)
from .common import (
    CHECKPOINT_DIR,
    check_record_images,
    check_resume_settings,
    checkpoint_errors,
    choose_start,
    load_checkpoint,
    named_data_errors,
    plot_history,
    read_rng_state,
    records_digest,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    warmup_schedule,
    write_history,
)
from .loop import RunState, log_resume, run_steps

__all__ = ["CLIPTrainingConfig", "CLIPTrainingResult", "train_clip", "interpolate_weights", "MODES", "BEST_METRICS",
           "CAPTION_MODES", "ContrastiveLoss", "clip_features", "CLIPTask", "scratch_model"]

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("step", "train_loss", "val_loss", "val_top10", "val_top10_batch100", "lr", "samples_per_s")
#: independent random streams of one seed
#: (the training items use :data:`astrovl.training.batches.TRAIN_ITEMS`, 0)
_VAL_ITEMS, _VAL_ORDER, _VAL_SUBSET, _SHUFFLED = 1, 2, 3, 4


@dataclass
class CLIPTrainingConfig:
    """Settings of :func:`train_clip` (defaults: the HubbleCLIP paper).

    Parameters
    ----------
    mode : {"finetune", "head", "scratch", "shuffled"}
        ``finetune``: all weights; ``head``: both towers frozen, a 2-layer MLP head
        (``head_hidden`` units, GELU) trained on each side; ``scratch``: random
        initialisation of the same architecture; ``shuffled``: captions permuted
        across the training set (a control that must stay at chance).
    steps, batch_size, lr, weight_decay, warmup_steps, schedule
        Optimisation (``schedule`` is ``"constant"`` or ``"cosine"`` after warm-up;
        see :func:`astrovl.training.common.warmup_schedule` for the rate at each step).
    eval_every : int
        Validation interval in steps (also the checkpoint interval).
    best_metric : {"val_loss", "val_top10", "val_top10_batch100"}
        Which validation metric selects the best checkpoint (see :func:`train_clip`).
    loss : {"clip", "siglip"}
        open_clip ``ClipLoss`` (InfoNCE, learnable temperature) or ``SigLipLoss``.
    caption_mode : {"caption", "abstract"}
        ``abstract`` trains on the raw abstracts (``"Category: <category>.
        <abstract>"`` from the ``abstract`` and ``category`` columns), as random
        runs of whole sentences that fit the text context; validation and the
        shuffled control use the same texts.
    augment : bool
        Random 90-degree rotations, flips and crops.
    grad_accum : int
        Micro-batches per optimizer step, for memory; the contrastive loss is still
        computed over all ``batch_size`` pairs (features of the other micro-batches
        are cached), so the result equals ``grad_accum=1``.
    precision : {"auto", "fp32", "bf16"}
        ``auto``: bf16 autocast on CUDA, fp32 on CPU.
    compile : bool
        ``torch.compile`` the model (CUDA).
    num_workers : int, optional
        DataLoader workers (default: 0 on CPU, 8 on CUDA).
    image_cache : {"auto", "memory", "disk", "none"}
        How decoded training images are kept (:mod:`astrovl.datasets.imagecache`):
        ``"memory"`` in the training process up to ``cache_max_bytes`` (only
        without DataLoader workers); ``"disk"`` a memory-mapped file in
        ``output_dir/image-cache`` shared by all workers (removed at the end of
        the run); ``"none"`` decodes every time. ``"auto"``: memory without
        workers, disk with them. Validation images use the memory cache (they are
        read in the training process) unless ``"none"``.
    cache_max_bytes : int
        Bound of each in-process image cache (default 4 GiB).
    output_dir : str
        Where checkpoints, ``best/``, ``metrics.csv`` and ``training_curves.png`` go:
        a new or empty folder, or the folder of an earlier run (to resume or
        replace it); a folder holding other files is refused.
    resume : bool
        Continue from ``output_dir/checkpoint`` if it exists, exactly where the
        interrupted run was. The settings must be the checkpoint's, except those
        of :attr:`RESUME_MAY_CHANGE`; a finished run is reported and left as it is.
    overwrite : bool
        Start again in a folder that holds the checkpoint of an earlier run,
        removing that run's outputs (and nothing else). Without ``resume`` or
        ``overwrite``, such a folder is refused.
    max_val : int, optional
        Use at most this many validation pairs: a random subset drawn with ``seed``.
    """

    mode: str = "finetune"
    steps: int = 20_000
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 1e-3
    warmup_steps: int = 2_000
    schedule: str = "constant"
    eval_every: int = 200
    best_metric: str = "val_loss"
    loss: str = "clip"
    caption_mode: str = "caption"
    augment: bool = True
    head_hidden: int = 1024
    grad_accum: int = 1
    precision: str = "auto"
    compile: bool = False
    num_workers: int | None = None
    image_cache: str = "auto"
    cache_max_bytes: int = 4 << 30
    output_dir: str = "astrovl-clip-run"
    device: str | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    max_val: int | None = None
    progress: bool = True
    tensorboard: bool = True

    #: settings a resumed run may change, with what the change does; every other
    #: setting must equal the checkpoint's (:meth:`may_change_on_resume`)
    RESUME_MAY_CHANGE: ClassVar[dict[str, str]] = {
        "steps": "where the run ends (schedule='constant' only: a cosine schedule reaches 0 at the last step, "
                 "so with it the number of steps is part of the schedule)",
        "eval_every": "how often the run validates and writes its checkpoint",
        "num_workers": "DataLoader worker processes",
        "image_cache": "how decoded images are kept",
        "cache_max_bytes": "the bound of the in-process image cache",
        "device": "where the run computes (another machine)",
        "precision": "the arithmetic of the forward pass",
        "compile": "whether the model is compiled",
        "progress": "the progress bar",
        "tensorboard": "the TensorBoard log",
    }
    #: settings that say where and how a run starts, not how it trains (never compared)
    RESUME_NOT_COMPARED: ClassVar[tuple[str, ...]] = ("output_dir", "resume", "overwrite")

    def may_change_on_resume(self) -> frozenset[str]:
        """The names of :attr:`RESUME_MAY_CHANGE` that may change with these settings."""
        names = set(self.RESUME_MAY_CHANGE)
        if self.schedule != "constant":
            names.discard("steps")
        return frozenset(names)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with the fix for inconsistent settings (also when the configuration is made)."""
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not known; use one of {MODES}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size}: contrastive training needs at least 2 pairs per batch")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.eval_every < 1:
            raise ValueError(f"eval_every={self.eval_every} must be >= 1")
        if self.best_metric not in BEST_METRICS:
            raise ValueError(f"best_metric={self.best_metric!r} must be one of {BEST_METRICS}")
        if self.caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode={self.caption_mode!r} must be one of {CAPTION_MODES}")
        if self.image_cache not in IMAGE_CACHES:
            raise ValueError(f"image_cache={self.image_cache!r} must be 'auto', 'memory', 'disk' or 'none'")
        if self.max_val is not None and self.max_val < 2:
            raise ValueError(f"max_val={self.max_val} must be >= 2 (validation needs pairs)")
        if self.loss not in CLIP_LOSSES:
            raise ValueError(f"loss={self.loss!r} must be 'clip' or 'siglip'")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must be >= 1 and divide batch_size={self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be 'auto', 'fp32' or 'bf16'")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be 'constant' or 'cosine'")
        if self.resume and self.overwrite:
            raise ValueError("resume=True and overwrite=True exclude each other; choose one")


@dataclass
class CLIPTrainingResult:
    """What :func:`train_clip` returns.

    ``start_step`` is the step the call started from (the checkpoint's when it
    resumed); ``finished_before`` is True when the run had already finished and
    nothing was trained or written.
    """

    history: Table
    best_path: Path
    embedder: object
    output_dir: Path
    final_path: Path | None = None
    extras: dict = field(default_factory=dict)
    start_step: int = 0
    finished_before: bool = False


def _dist_info():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _training_device(config: CLIPTrainingConfig, embedder, world: int):
    """The device of this process: under torchrun, CUDA means the GPU of ``LOCAL_RANK``."""
    import os

    import torch

    from ..utils.devices import resolve_device

    device = resolve_device(config.device if config.device is not None else embedder.device)
    explicit_index = config.device is not None and ":" in str(config.device)
    if world > 1 and device.type == "cuda" and not explicit_index and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def _prepare_embedder(embedder, config: CLIPTrainingConfig, device):
    from ..clip import CLIPEmbedder

    if config.mode == "scratch":
        cfg = dict(embedder.model_cfg)
        cfg["model_name"] = embedder.model_name
        return CLIPEmbedder.from_config(cfg, device=device, seed=config.seed)
    if config.mode == "head":
        if "projection_head" in embedder.model_cfg:
            raise ValueError("the embedder already has projection heads; pass the base model for mode='head'")
        from ..clip.heads import HeadCLIP

        model = HeadCLIP(copy.deepcopy(embedder.model).cpu(), embedder.embed_dim, config.head_hidden)
        cfg = dict(embedder.model_cfg)
        cfg["projection_head"] = {"hidden": config.head_hidden}
        return CLIPEmbedder(model, embedder.tokenizer, embedder.preprocess, model_name=embedder.model_name,
                            model_cfg=cfg, preprocess_cfg=embedder.preprocess_cfg, device=device)
    return CLIPEmbedder(copy.deepcopy(embedder.model).cpu(), embedder.tokenizer, embedder.preprocess,
                        model_name=embedder.model_name, model_cfg=embedder.model_cfg,
                        preprocess_cfg=embedder.preprocess_cfg, device=device)


def _trainable_parameters(model, mode: str):
    if mode == "head":
        for p in model.parameters():
            p.requires_grad_(False)
        params = model.head_parameters()
        for p in params:
            p.requires_grad_(True)
        return params
    for p in model.parameters():
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _param_groups(model, params, weight_decay: float):
    ids = {id(p) for p in params}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) not in ids:
            continue
        if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
                or "positional_embedding" in name or "class_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _collate(batch):
    import torch

    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]


class ContrastiveLoss:
    """open_clip's contrastive loss of a run, called one way: ``loss(**features)``.

    ``features`` are those of a CLIP forward (:func:`clip_features`):
    ``image_features``, ``text_features``, ``logit_scale`` and, for models that
    have one, ``logit_bias``. ``"clip"`` is ``ClipLoss`` (symmetric InfoNCE over
    the whole batch, gathered across processes with gradients; a model's logit
    bias is not used), ``"siglip"`` is ``SigLipLoss`` (a bias of 0 for models
    without one).

    Parameters
    ----------
    kind : {"clip", "siglip"}
    rank, world : int
        This process and the number of processes (features are gathered across them).
    """

    def __init__(self, kind: str = "clip", rank: int = 0, world: int = 1):
        from open_clip.loss import ClipLoss, SigLipLoss

        if kind not in CLIP_LOSSES:
            raise ValueError(f"loss={kind!r} must be 'clip' or 'siglip'")
        self.kind = kind
        if kind == "siglip":
            self._call = functools.partial(_with_bias, SigLipLoss(rank=rank, world_size=world))
        else:
            self._call = functools.partial(_without_bias, ClipLoss(
                local_loss=False, gather_with_grad=world > 1, cache_labels=True, rank=rank, world_size=world))

    def __call__(self, image_features, text_features, logit_scale, logit_bias=None):
        """The loss over the batch of these features (a scalar tensor)."""
        return self._call(image_features, text_features, logit_scale, logit_bias)


def _with_bias(loss, image_features, text_features, logit_scale, logit_bias):
    if logit_bias is None:
        import torch

        logit_bias = torch.zeros((), device=image_features.device)
    return loss(image_features, text_features, logit_scale, logit_bias)


def _without_bias(loss, image_features, text_features, logit_scale, logit_bias):
    """InfoNCE adds no bias to the logits (older open_clip's ``ClipLoss`` takes none)."""
    return loss(image_features, text_features, logit_scale)


def clip_features(out) -> dict:
    """The features of a CLIP forward (dict or tuple output), as the keywords of :class:`ContrastiveLoss`."""
    if isinstance(out, dict):
        features = {k: out[k] for k in ("image_features", "text_features", "logit_scale")}
        bias = out.get("logit_bias")
    else:
        features = dict(zip(("image_features", "text_features", "logit_scale"), out[:3]))
        bias = out[3] if len(out) > 3 else None
    if bias is not None:
        features["logit_bias"] = bias
    return features


def _train_step(model, fwd_model, train_model, loss_fn, images, tokens, grad_accum: int, autocast,
                distributed: bool):
    """Forward and backward of one optimizer step; returns the loss over the whole batch (a tensor).

    With ``grad_accum > 1`` the features of every micro-batch are computed
    first without gradients; then each micro-batch is recomputed with gradients
    and the full-batch loss, with the cached features standing in for the other
    micro-batches, is back-propagated. The temperature gets its gradient once
    (from the last micro-batch), and DistributedDataParallel synchronises
    gradients only on the last micro-batch.
    """
    import torch

    if grad_accum == 1:
        with autocast():
            loss = loss_fn(**clip_features(fwd_model(images, tokens)))
        loss.backward()
        return loss.detach()
    chunks = list(zip(images.chunk(grad_accum), tokens.chunk(grad_accum)))
    with torch.no_grad(), autocast():
        cached = [clip_features(model(im, tk)) for im, tk in chunks]
    loss = None
    for j, (im, tk) in enumerate(chunks):
        last = j == grad_accum - 1
        sync = contextlib.nullcontext() if (last or not distributed) else train_model.no_sync()
        with sync:
            with autocast():
                features = clip_features(fwd_model(im, tk))
                if not last:  # the temperature (and bias) get their gradient once, from the last micro-batch
                    features.update({k: features[k].detach() for k in ("logit_scale", "logit_bias")
                                     if k in features})
                for k in ("image_features", "text_features"):
                    features[k] = torch.cat([c[k] for c in cached[:j]] + [features[k]]
                                            + [c[k] for c in cached[j + 1:]])
                loss = loss_fn(**features)
            loss.backward()
    return loss.detach()


def _caption_texts(ds, caption_mode: str) -> list[str]:
    """The texts of ``ds`` for ``caption_mode`` (the same for training, validation and the control)."""
    if caption_mode == "caption":
        return [str(c) for c in ds.manifest["caption"]]
    from ..datasets.abstracts import raw_abstract_caption

    cols = ds.manifest.colnames
    if "abstract" not in cols:
        raise DatasetError(
            "caption_mode='abstract' needs an 'abstract' column in the manifest (datasets built by "
            "HubblePreviewDatasetBuilder have one); use caption_mode='caption' otherwise"
        )
    cats = [str(c) for c in ds.manifest["category"]] if "category" in cols else [""] * len(ds)
    out = []
    for cat, abstract, caption in zip(cats, ds.manifest["abstract"], ds.manifest["caption"]):
        text = str(abstract or "").strip()
        out.append(raw_abstract_caption(cat, text) if text else str(caption))
    return out


def _token_counter(tokenizer):
    """``count(text)``: tokens ``text`` takes in the context, start and end tokens included."""
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):  # open_clip SimpleTokenizer: ids without the start/end tokens
        return lambda text: len(encode(text)) + 2
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip HFTokenizer
    if inner is not None:
        return lambda text: len(inner(text)["input_ids"])
    raise ValueError(f"cannot count the tokens of the tokenizer {type(tokenizer).__name__}; "
                     "caption_mode='abstract' needs an open_clip tokenizer")


#: kind of a CLIP training output folder (see :func:`astrovl.utils.files.check_output_dir`)
OUTPUT_KIND = CLIP_TRAINING_OUTPUT


#: what a CLIP run writes in its folder (what ``overwrite=True`` removes)
RUN_OUTPUTS = (CHECKPOINT_DIR, "best", "final", "metrics.csv", "training_curves.png", "config.json",
               "training.json", "tensorboard", "image-cache")


def _data_identity(ds) -> str:
    """``"N records <digest>"`` of the ids, image file names and captions of ``ds``."""
    ids, captions = ds.manifest["id"], ds.manifest["caption"]
    items = ([str(i), Path(p).name, str(c)] for i, p, c in zip(ids, ds.image_paths, captions))
    return f"{len(ds)} records {records_digest(items)}"


def _run_identity(embedder, config: CLIPTrainingConfig, train, val) -> dict:
    """What a checkpoint must have been trained from: the starting model and the data."""
    if config.mode == "scratch":
        model = f"{embedder.model_name} (architecture {records_digest([embedder.model_cfg])})"
    else:
        model = embedder.model_id
    return {"model": model, "train_data": _data_identity(train), "val_data": _data_identity(val)}


def _resumed_state(ckpt_dir: Path, config: CLIPTrainingConfig, identity: dict) -> dict:
    """The checkpoint's state, after checking that this run may continue it.

    Adds ``"changed"``: the settings that differ from the checkpoint's and may.
    """
    with checkpoint_errors(ckpt_dir):
        state = json.loads((ckpt_dir / "state.json").read_text("utf-8"))
    saved = {**state.get("config", {}), **state.get("run", {})}
    current = {**_jsonable(dataclasses.asdict(config)), **identity}
    state["changed"] = check_resume_settings(ckpt_dir, saved, current, config.may_change_on_resume(),
                                             config.RESUME_NOT_COMPARED)
    step = int(state["step"])
    if step > config.steps and not state.get("finished"):
        raise CheckpointError(f"the checkpoint {str(ckpt_dir)!r} is at step {step}, past steps={config.steps}; "
                              f"resume with steps >= {step}")
    return state


def _image_caches(config: CLIPTrainingConfig, num_workers: int, out: Path, rank: int):
    """(train cache kind, train cache dir, validation cache kind)."""
    kind = config.image_cache
    if kind == "auto":
        kind = "memory" if num_workers == 0 else "disk"
    if kind == "memory" and num_workers > 0:
        raise ValueError(
            "image_cache='memory' would be filled again in each of the DataLoader workers; use "
            "'disk' (shared by the workers), 'none', or num_workers=0"
        )
    cache_dir = out / "image-cache" / f"rank{rank}" if kind == "disk" else None
    return kind, cache_dir, ("none" if kind == "none" else "memory")


def _validation_subset(val, config: CLIPTrainingConfig):
    if config.max_val is None or len(val) <= config.max_val:
        return val
    rng = np.random.default_rng([config.seed & 0xFFFFFFFF, _VAL_SUBSET])
    return val.subset(np.sort(rng.choice(len(val), config.max_val, replace=False)))


def _evaluate(embedder, val_ds, config, autocast):
    """Validation loss, top-10% accuracy over the whole set and PAPERCLIP's top-10 of 100.

    The pairs are put in a seeded random order (so that records of one proposal
    do not fill a batch); the loss is averaged over consecutive batches of
    ``batch_size`` in that order (a last batch of one pair is left out), the
    batch-of-100 accuracy over consecutive batches of 100 in the same order.
    """
    import torch

    from ..datasets.torch_datasets import item_seed
    from ..evaluation.retrieval import top_k_percent_accuracy

    model = embedder.model
    model.eval()
    loss_fn = ContrastiveLoss("clip")  # the training loss (InfoNCE) on this process's validation batches
    n = len(val_ds)
    order = np.random.default_rng([config.seed & 0xFFFFFFFF, _VAL_ORDER]).permutation(n)
    total, count, img_feats, txt_feats = None, 0, [], []
    bs = config.batch_size
    with torch.no_grad():
        for start in range(0, n, bs):
            rows = order[start:start + bs]
            images, caps = _collate([val_ds[(int(i), item_seed(config.seed, _VAL_ITEMS, int(i)))] for i in rows])
            images = images.to(embedder.device)
            tokens = embedder.tokenizer(caps).to(embedder.device)
            with autocast():
                img = model.encode_image(images, normalize=True).float()
                txt = model.encode_text(tokens, normalize=True).float()
            if len(rows) >= 2:
                loss = loss_fn(image_features=img, text_features=txt, logit_scale=model.logit_scale.exp().float())
                total = loss * len(rows) if total is None else total + loss * len(rows)
                count += len(rows)
            img_feats.append(img.cpu().numpy())
            txt_feats.append(txt.cpu().numpy())
    img_all, txt_all = np.concatenate(img_feats), np.concatenate(txt_feats)
    val_loss = float(total) / count if count else float("nan")
    top10 = top_k_percent_accuracy(img_all, txt_all, 10.0)
    batch100 = top_k_percent_accuracy(img_all, txt_all, 10.0, direction="text_to_image", batch_size=100) \
        if n >= 100 else float("nan")
    return {"val_loss": val_loss, "val_top10": float(top10), "val_top10_batch100": float(batch100)}


def _history_table(rows: list[dict]) -> Table:
    if not rows:
        return Table(names=HISTORY_COLUMNS)
    return Table(rows=[[r.get(c, float("nan")) for c in HISTORY_COLUMNS] for r in rows], names=HISTORY_COLUMNS)


def _check_sizes(train, val, config: CLIPTrainingConfig, world: int) -> None:
    if len(train) < config.batch_size:
        raise DatasetError(f"the training set has {len(train)} records, fewer than batch_size={config.batch_size}")
    if len(val) == 0:
        raise DatasetError("the validation set is empty; validation needs held-out pairs (e.g. ds.split('val'))")
    if config.batch_size % (world * config.grad_accum):
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of processes "
                         f"({world}) times grad_accum ({config.grad_accum})")


def _autocast(config: CLIPTrainingConfig, device):
    """A function giving the mixed-precision context of a forward pass (bf16, or none)."""
    import torch

    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")

    def autocast():
        if use_bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    return autocast


def _training_captions(train, config: CLIPTrainingConfig) -> list[str]:
    """The training captions, in a seeded random order of records for ``mode="shuffled"``."""
    texts = _caption_texts(train, config.caption_mode)
    if config.mode == "shuffled":
        perm = np.random.default_rng([config.seed & 0xFFFFFFFF, _SHUFFLED]).permutation(len(texts))
        texts = [texts[i] for i in perm]
    return texts


def _context_check(emb, config: CLIPTrainingConfig):
    """For raw abstracts: a test of whether a text fits the model's context; else None."""
    if config.caption_mode != "abstract":
        return None
    count_tokens, ctx = _token_counter(emb.tokenizer), emb.context_length

    def fits_context(text: str) -> bool:
        return count_tokens(text) <= ctx

    return fits_context


def _wrapped_models(model, config: CLIPTrainingConfig, device, world: int):
    """The model trained (DDP with several processes) and the one called forward (compiled if asked)."""
    import torch

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return train_model, torch.compile(train_model) if config.compile else train_model


def _optimizer_step(model, fwd_model, train_model, loss_fn, images, tokens, optimizer, scheduler,
                    grad_accum: int, autocast, distributed: bool):
    """One optimiser step on a batch (with gradient accumulation); the batch loss, on the device."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss = _train_step(model, fwd_model, train_model, loss_fn, images, tokens, grad_accum, autocast,
                       distributed)
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss


def _save_progress(out: Path, rows: list[dict], model, optimizer, scheduler, config: CLIPTrainingConfig,
                   best_value, identity: dict, resumes: list) -> None:
    """The metrics so far and a checkpoint to resume from (after a validation step)."""
    step = rows[-1]["step"]
    write_history(_history_table(rows), out / "metrics.csv")
    save_checkpoint(out / CHECKPOINT_DIR, model=model, optimizer=optimizer, scheduler=scheduler,
                    state={"step": step, "history": rows, "best_value": best_value,
                           "config": _jsonable(dataclasses.asdict(config)), "run": identity,
                           "finished": step == config.steps, "resumes": resumes,
                           "data_position": step * config.batch_size})


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _prepare_run(embedder, train, val, config: CLIPTrainingConfig, rank: int, world: int):
    """Output folder, validation subset, run identity and the checkpoint state to resume (or None).

    Every record's image is checked here, before any model work.
    """
    out = prepare_output_dir(config.output_dir, OUTPUT_KIND)
    resume_step = _choose_start(out, config, rank, world)
    val_sub = _validation_subset(val, config)
    identity = _run_identity(embedder, config, train, val_sub)
    state = _resumed_state(out / CHECKPOINT_DIR, config, identity) if resume_step is not None else None
    check_record_images(_record_images(train), what="training")
    check_record_images(_record_images(val_sub), what="validation")
    return out, val_sub, identity, state


def _close(writer, train_ds) -> None:
    """Close the TensorBoard writer and remove the training run's temporary image cache."""
    if writer is not None:
        writer.close()
    if hasattr(train_ds.cache, "remove"):
        train_ds.cache.remove()


def _optimizer(model, params, config: CLIPTrainingConfig, device):
    """AdamW over the trainable parameters (no weight decay on gains and biases) and its schedule."""
    import torch

    optimizer = torch.optim.AdamW(_param_groups(model, params, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")
    return optimizer, warmup_schedule(optimizer, config.warmup_steps, config.steps, config.schedule)


def _train_loader(train_ds, config: CLIPTrainingConfig, start_step: int, rank: int, world: int,
                  num_workers: int, device):
    """The training batches from ``start_step`` on (the seeded plan of :class:`~astrovl.training.batches.StepBatches`)."""
    from torch.utils.data import DataLoader

    sampler = StepBatches(len(train_ds), config.batch_size, config.seed, start_step, config.steps, rank, world)
    return DataLoader(train_ds, batch_sampler=sampler, collate_fn=_collate, num_workers=num_workers,
                      pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None,
                      persistent_workers=False)


def _torch_datasets(emb, config: CLIPTrainingConfig, train, train_texts, val, num_workers: int, out: Path,
                    rank: int, fits_context):
    """The training and validation datasets of the model's inputs (with their image caches)."""
    from ..datasets.torch_datasets import ImageTextTorchDataset

    cache_kind, cache_dir, val_cache = _image_caches(config, num_workers, out, rank)
    common = dict(caption_mode=config.caption_mode, fits_context=fits_context,
                  cache_max_bytes=config.cache_max_bytes)
    train_ds = ImageTextTorchDataset(train, emb.image_size, emb.image_mean, emb.image_std,
                                     augment=config.augment, captions=train_texts, cache=cache_kind,
                                     cache_dir=cache_dir, **common)
    val_ds = ImageTextTorchDataset(val, emb.image_size, emb.image_mean, emb.image_std, augment=False,
                                   captions=_caption_texts(val, config.caption_mode), cache=val_cache,
                                   **common)
    train_ds.check_first_image()  # fail early on images smaller than the crop
    return train_ds, val_ds


def _tensorboard_writer(out: Path):
    """A TensorBoard writer into ``out/tensorboard``, or None without tensorboard."""
    with contextlib.suppress(ImportError, ModuleNotFoundError):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(out / "tensorboard"))
    return None


def _log_scalars(writer, row: dict) -> None:
    if writer is not None:
        for k, v in row.items():
            if k != "step":
                writer.add_scalar(k, v, row["step"])


def _keep_best(emb, row: dict, config: CLIPTrainingConfig, best_value, out: Path):
    """Save the model to ``out/best`` when ``row`` improves the best metric; the best value so far."""
    value = row["val_loss"] if config.best_metric == "val_loss" else -row[config.best_metric]
    improved = np.isfinite(value) and (best_value is None or not np.isfinite(best_value) or value < best_value)
    if best_value is None or improved:
        emb.save_pretrained(out / "best")
        return float(value)
    return best_value


def _write_outputs(out: Path, emb, history: Table, config: CLIPTrainingConfig, step: int, device,
                   identity: dict, resumes: list) -> Path:
    """The final model, metrics, curves, configuration and run record; the final model's path."""
    final_path = emb.save_pretrained(out / "final")
    write_history(history, out / "metrics.csv")
    if len(history):
        plot_history(history, out / "training_curves.png", title=f"CLIP {config.mode}")
    atomic_write_text(out / "config.json", json.dumps(_jsonable(dataclasses.asdict(config)), indent=2))
    atomic_write_text(out / "training.json", json.dumps(
        {"config": _jsonable(dataclasses.asdict(config)), "steps": step, "device": str(device),
         **identity, "resumes": resumes}, indent=2))
    return final_path


def train_clip(embedder, train, val, config: CLIPTrainingConfig | None = None, **overrides):
    """Train a CLIP model contrastively on image-text records.

    Parameters
    ----------
    embedder : CLIPEmbedder
        Starting model (for ``mode="scratch"`` only its architecture is used).
    train, val : ManifestDataset
        Training and validation records (for instance ``ds.split("train")`` and
        ``ds.split("val")``; validation proposals must not appear in training).
    config : CLIPTrainingConfig
    **overrides
        Fields of ``config`` to replace.

    Returns
    -------
    CLIPTrainingResult
        ``history`` (astropy Table: ``step``, ``train_loss``, ``val_loss``,
        ``val_top10``, ``val_top10_batch100``, ``lr``, ``samples_per_s``),
        ``best_path`` (loadable with :meth:`CLIPEmbedder.from_pretrained`),
        ``embedder`` (the best model).

    Notes
    -----
    Validation, every ``eval_every`` steps and at the end: ``val_loss`` is the
    symmetric InfoNCE loss over consecutive batches of ``batch_size`` pairs of
    the validation set in a seeded random order; ``val_top10`` is the top-10%
    image-to-text accuracy over the whole validation set
    (:func:`~astrovl.evaluation.top_k_percent_accuracy`); ``val_top10_batch100``
    is PAPERCLIP's during-training metric, text-to-image top-10 within
    consecutive batches of 100 pairs (NaN with fewer than 100 pairs).
    ``train_loss`` is the mean full-batch loss since the previous validation.
    The training loop reads values back from the device only at these
    validation steps.
    """
    config = dataclasses.replace(config or CLIPTrainingConfig(), **overrides)  # validated (__post_init__)
    rank, world = _dist_info()
    _check_sizes(train, val, config, world)
    out, val_sub, identity, checkpoint = _prepare_run(embedder, train, val, config, rank, world)
    seed_everything(config.seed)
    task = CLIPTask.build(embedder, train, val_sub, config, out, identity, rank=rank, world=world)
    run = task.restore(checkpoint)
    if run.finished:
        return task.finished_result(run)
    run_steps(task.start(run), run, config.steps, task.train_step, task.after_step, task.bar)
    task.stop()  # the DataLoader's workers end before their image cache goes
    return task.export(run)


class CLIPTask:
    """One CLIP training run: model, data, optimiser and loss; a training step, validation, checkpoint, export.

    :func:`train_clip` composes it with :func:`~astrovl.training.loop.run_steps`;
    build it with :meth:`build`.
    """

    def __init__(self, *, config: CLIPTrainingConfig, out: Path, identity: dict, rank: int, world: int,
                 device, emb, train_ds, val_ds, optimizer, scheduler, loss_fn, autocast, num_workers: int):
        self.config, self.out, self.identity, self.rank, self.world = config, out, identity, rank, world
        self.device, self.emb, self.model = device, emb, emb.model
        self.train_ds, self.val_ds, self.num_workers = train_ds, val_ds, num_workers
        self.optimizer, self.scheduler, self.loss_fn, self.autocast = optimizer, scheduler, loss_fn, autocast
        self.ckpt_dir = out / CHECKPOINT_DIR
        self.bar = self.writer = self._batches = None
        self._running, self._running_n, self._samples, self._t_last = None, 0, 0, time.perf_counter()

    @classmethod
    def build(cls, embedder, train, val, config: CLIPTrainingConfig, out: Path, identity: dict, *,
              rank: int = 0, world: int = 1) -> CLIPTask:
        """The model of ``config.mode`` on this process's device, its data, optimiser and loss."""
        import torch

        device = _training_device(config, embedder, world)
        emb = _prepare_embedder(embedder, config, device)
        params = _trainable_parameters(emb.model, config.mode)
        num_workers = config.num_workers if config.num_workers is not None else (8 if device.type == "cuda" else 0)
        train_ds, val_ds = _torch_datasets(emb, config, train, _training_captions(train, config), val,
                                           num_workers, out, rank, _context_check(emb, config))
        if device.type == "cuda":
            emb.model = emb.model.to(memory_format=torch.channels_last)
        optimizer, scheduler = _optimizer(emb.model, params, config, device)
        return cls(config=config, out=out, identity=identity, rank=rank, world=world, device=device, emb=emb,
                   train_ds=train_ds, val_ds=val_ds, optimizer=optimizer, scheduler=scheduler,
                   loss_fn=ContrastiveLoss(config.loss, rank, world), autocast=_autocast(config, device),
                   num_workers=num_workers)

    def restore(self, checkpoint: dict | None) -> RunState:
        """The run's state: a fresh one, or the checkpoint's with its weights, optimiser and schedule loaded.

        The random states come back in :meth:`start`, after the DataLoader's iterator is made (it draws a seed).
        """
        if checkpoint is None:
            return RunState()
        load_checkpoint(self.ckpt_dir, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                        restore_rng=False)
        run = RunState.resumed(checkpoint, self.config.steps)
        if not run.finished:
            log_resume(run.step, self.config.steps, checkpoint["changed"], logger=log)
        return run

    def start(self, run: RunState):
        """The training batches from ``run.step`` on (after which the random states of a resumed run return)."""
        from ..utils.progress import progress_bar

        config = self.config
        self.train_model, self.fwd_model = _wrapped_models(self.model, config, self.device, self.world)
        loader = _train_loader(self.train_ds, config, run.step, self.rank, self.world, self.num_workers,
                               self.device)
        self.writer = _tensorboard_writer(self.out) if config.tensorboard and self.rank == 0 else None
        self._t_last = time.perf_counter()
        self.bar = progress_bar(total=config.steps, initial=run.step, enabled=config.progress and self.rank == 0,
                                desc=f"train-clip ({config.mode})", unit="step")
        self._batches = named_data_errors(iter(loader))
        if run.resumes:  # a resumed run
            restore_rng_state(read_rng_state(self.ckpt_dir))
        return self._batches

    def train_step(self, batch) -> bool:
        """One optimiser step on ``(images, captions)``; the loss stays on the device. Always True."""
        import torch

        images, caps = batch
        self.model.train()
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        tokens = self.emb.tokenizer(caps).to(self.device, non_blocking=True)
        loss = _optimizer_step(self.model, self.fwd_model, self.train_model, self.loss_fn, images, tokens,
                               self.optimizer, self.scheduler, self.config.grad_accum, self.autocast,
                               self.world > 1)
        self._running = loss if self._running is None else self._running + loss
        self._running_n += 1
        self._samples += self.config.batch_size
        return True

    def after_step(self, run: RunState) -> None:
        """Every ``eval_every`` steps and at the end: validate, keep the best model, write the checkpoint."""
        config = self.config
        if run.step % config.eval_every and run.step != config.steps:
            return
        train_loss = float(self._running) / self._running_n  # the only read-back of the loop
        elapsed = time.perf_counter() - self._t_last
        rate = self._samples / elapsed if elapsed > 0 else float("nan")
        if self.rank == 0:
            row = {"step": run.step, "train_loss": train_loss, **self.evaluate(),
                   "lr": float(self.scheduler.get_last_lr()[0]), "samples_per_s": rate}
            run.rows.append(row)
            self.bar.set_postfix(loss=f"{train_loss:.3f}", val_top10=f"{row['val_top10']:.3f}", sps=f"{rate:.0f}")
            _log_scalars(self.writer, row)
            run.best = _keep_best(self.emb, row, config, run.best, self.out)
            self.save(run)
        _barrier(self.world)  # the other processes wait while process 0 validates
        self._running, self._running_n, self._samples, self._t_last = None, 0, 0, time.perf_counter()

    def evaluate(self) -> dict:
        """``val_loss``, ``val_top10`` and ``val_top10_batch100`` of the model now (see :func:`train_clip`)."""
        return _evaluate(self.emb, self.val_ds, self.config, self.autocast)

    def save(self, run: RunState) -> None:
        """The metrics so far and a checkpoint to resume from."""
        _save_progress(self.out, run.rows, self.model, self.optimizer, self.scheduler, self.config, run.best,
                       self.identity, run.resumes)

    def stop(self) -> None:
        """End the DataLoader's workers, close the progress bar and TensorBoard, remove the image cache."""
        self._batches = None
        if self.bar is not None:
            self.bar.close()
        _close(self.writer, self.train_ds)

    def export(self, run: RunState) -> CLIPTrainingResult:
        """Write the final model, metrics, curves and run record (process 0); the result of the run."""
        history = _result_history(run.rows, self.config)
        final_path = None
        if self.rank == 0:
            final_path = _write_outputs(self.out, self.emb, history, self.config, run.step, self.device,
                                        self.identity, run.resumes)
        _barrier(self.world)  # rank 0 has finished writing best/ and final/
        return CLIPTrainingResult(history=history, best_path=self.out / "best",
                                  embedder=_best_model(self.out, self.emb, self.device), output_dir=self.out,
                                  final_path=final_path, start_step=run.start_step)

    def finished_result(self, run: RunState) -> CLIPTrainingResult:
        """The result of a run that had already finished (nothing trained, nothing written)."""
        log_resume(run.step, self.config.steps, {}, finished=True, out=self.out, logger=log)
        if hasattr(self.train_ds.cache, "remove"):
            self.train_ds.cache.remove()
        final = self.out / "final"
        return CLIPTrainingResult(history=_result_history(run.rows, self.config), best_path=self.out / "best",
                                  embedder=_best_model(self.out, self.emb, self.device), output_dir=self.out,
                                  final_path=final if final.is_dir() else None, start_step=run.step,
                                  finished_before=True)


def _choose_start(out: Path, config: CLIPTrainingConfig, rank: int, world: int) -> int | None:
    """:func:`~astrovl.training.common.choose_start` on process 0 first (it may remove the earlier run)."""
    step = None
    if rank == 0:
        step = choose_start(out, resume=config.resume, overwrite=config.overwrite, outputs=RUN_OUTPUTS)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank > 0:
            step = choose_start(out, resume=config.resume, overwrite=False, outputs=RUN_OUTPUTS)
    return step


def _record_images(ds):
    return zip((str(i) for i in ds.manifest["id"]), ds.image_paths)


def _result_history(rows: list[dict], config: CLIPTrainingConfig) -> Table:
    history = _history_table(rows)
    history.meta["mode"] = config.mode
    history.meta["random_top10"] = 0.10
    return history


def _best_model(out: Path, emb, device):
    """The model saved in ``out/best`` (``emb`` when none was saved)."""
    from ..clip import CLIPEmbedder

    best_path = out / "best"
    return CLIPEmbedder.from_pretrained(best_path, device=device) if (best_path / "astrovl_clip.json").is_file() \
        else emb

def _jsonable(d: dict) -> dict:
    return {k: (str(v) if not isinstance(v, (int, float, str, bool, type(None))) else v) for k, v in d.items()}


def scratch_model(model: str | None, mode: str):
    """The randomly initialised model a ``mode="scratch"`` run starts from, when ``model`` names an architecture.

    Parameters
    ----------
    model : str or None
        ``"tiny"`` (:data:`~astrovl.clip.TINY_CLIP_CONFIG`, a 4M-parameter CLIP) or an
        open_clip model name: the architecture a scratch run builds. Anything else
        (a directory, a hub id) is a model to load, whose architecture the run uses.
    mode : str
        The run's :attr:`CLIPTrainingConfig.mode`.

    Returns
    -------
    CLIPEmbedder or None
        None when the run starts from a model to load (every mode but
        ``"scratch"``, or a ``model`` that names no architecture).
    """
    if mode != "scratch" or not model:
        return None
    from ..clip import TINY_CLIP_CONFIG, CLIPEmbedder

    if model == "tiny":
        return CLIPEmbedder.from_config(TINY_CLIP_CONFIG)
    import open_clip

    if open_clip.get_model_config(model) is not None:
        return CLIPEmbedder.from_config(model)
    return None


def interpolate_weights(base, finetuned, alpha: float):
    """Weight-space ensemble (WiSE-FT): ``(1 - alpha) * base + alpha * finetuned``.

    ``alpha = 0`` gives the base model, ``1`` the fine-tuned one; values between
    trade domain fit against forgetting of general knowledge.

    Parameters
    ----------
    base, finetuned : CLIPEmbedder
        Two models of the same architecture.
    alpha : float
        In ``[0, 1]``.

    Returns
    -------
    CLIPEmbedder
    """
    import torch

    from ..clip import CLIPEmbedder

    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    sa, sb = base.model.state_dict(), finetuned.model.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise ValueError("base and finetuned models have different architectures; WiSE-FT needs the same one")
    mixed = {}
    for k in sa:
        a, b = sa[k], sb[k].to(sa[k].device)
        mixed[k] = torch.lerp(a.float(), b.float(), float(alpha)).to(a.dtype) if a.is_floating_point() else b
    model = copy.deepcopy(finetuned.model).cpu()
    model.load_state_dict(mixed)
    return CLIPEmbedder(model, finetuned.tokenizer, finetuned.preprocess, model_name=finetuned.model_name,
                        model_cfg=finetuned.model_cfg, preprocess_cfg=finetuned.preprocess_cfg,
                        device=finetuned.device)


