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

__all__ = ["CLIPTrainingConfig", "CLIPTrainingResult", "train_clip", "interpolate_weights", "MODES"]

log = logging.getLogger(__name__)

MODES = ("finetune", "head", "scratch", "shuffled")
BEST_METRICS = ("val_loss", "val_top10", "val_top10_batch100")
CAPTION_MODES = ("caption", "abstract")
HISTORY_COLUMNS = ("step", "train_loss", "val_loss", "val_top10", "val_top10_batch100", "lr", "samples_per_s")
#: independent random streams of one seed
_TRAIN_ITEMS, _VAL_ITEMS, _VAL_ORDER, _VAL_SUBSET, _SHUFFLED = 0, 1, 2, 3, 4


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

    def validate(self) -> None:
        """Raise ValueError with the fix for inconsistent settings."""
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
        if self.image_cache not in ("auto", "memory", "disk", "none"):
            raise ValueError(f"image_cache={self.image_cache!r} must be 'auto', 'memory', 'disk' or 'none'")
        if self.max_val is not None and self.max_val < 2:
            raise ValueError(f"max_val={self.max_val} must be >= 2 (validation needs pairs)")
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"loss={self.loss!r} must be 'clip' or 'siglip'")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must be >= 1 and divide batch_size={self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r} must be 'auto', 'fp32' or 'bf16'")
        if self.schedule not in ("constant", "cosine"):
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


class _StepBatches:
    """Batch sampler: the batch of global step ``s`` is a pure function of (seed, s).

    Each epoch is a seeded permutation of the records cut into ``n // batch_size``
    whole batches (the remainder of the permutation is left out of that epoch),
    so a batch never spans two epochs and never holds a record twice. Every item
    comes with its own augmentation seed. Each process takes its slice of the
    global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, steps: int,
                 rank: int = 0, world: int = 1):
        from ..datasets.torch_datasets import item_seed

        self._item_seed = item_seed
        self.n, self.bs, self.seed = n, batch_size, seed
        self.start, self.steps, self.rank, self.world = start_step, steps, rank, world
        self.per_epoch = n // batch_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        epoch, k = divmod(step, self.per_epoch)
        rows = self._perm(epoch)[k * self.bs:(k + 1) * self.bs]
        return [(int(i), self._item_seed(self.seed, _TRAIN_ITEMS, step, j)) for j, i in enumerate(rows)]

    def batch(self, step: int) -> list[tuple[int, int]]:
        per = self.bs // self.world
        return self.global_batch(step)[self.rank * per:(self.rank + 1) * per]

    def __iter__(self):
        for s in range(self.start, self.steps):
            yield self.batch(s)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


def _collate(batch):
    import torch

    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]


def _make_loss(config: CLIPTrainingConfig, rank: int, world: int):
    from open_clip.loss import ClipLoss, SigLipLoss

    if config.loss == "siglip":
        return SigLipLoss(rank=rank, world_size=world)
    return ClipLoss(local_loss=False, gather_with_grad=world > 1, cache_labels=True, rank=rank,
                    world_size=world)


def _features(out):
    """``(image_features, text_features, logit_scale, logit_bias)`` of a CLIP forward."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
    return out[0], out[1], out[2], (out[3] if len(out) > 3 else None)


def _contrastive_loss(loss_fn, img, txt, scale, bias):
    if loss_fn.__class__.__name__ == "SigLipLoss":
        if bias is None:
            import torch

            bias = torch.zeros((), device=img.device)
        return loss_fn(img, txt, scale, bias)
    return loss_fn(img, txt, scale)


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
            loss = _contrastive_loss(loss_fn, *_features(fwd_model(images, tokens)))
        loss.backward()
        return loss.detach()
    chunks = list(zip(images.chunk(grad_accum), tokens.chunk(grad_accum)))
    with torch.no_grad(), autocast():
        cached = [_features(model(im, tk))[:2] for im, tk in chunks]
    loss = None
    for j, (im, tk) in enumerate(chunks):
        last = j == grad_accum - 1
        sync = contextlib.nullcontext() if (last or not distributed) else train_model.no_sync()
        with sync:
            with autocast():
                img_j, txt_j, scale, bias = _features(fwd_model(im, tk))
                if not last:
                    scale = scale.detach()
                    bias = bias.detach() if bias is not None else None
                img = torch.cat([c[0] for c in cached[:j]] + [img_j] + [c[0] for c in cached[j + 1:]])
                txt = torch.cat([c[1] for c in cached[:j]] + [txt_j] + [c[1] for c in cached[j + 1:]])
                loss = _contrastive_loss(loss_fn, img, txt, scale, bias)
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
                logits = model.logit_scale.exp().float() * img @ txt.T
                labels = torch.arange(len(rows), device=images.device)
                loss = (torch.nn.functional.cross_entropy(logits, labels)
                        + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
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


def _restore(ckpt_dir: Path, state: dict, model, optimizer, scheduler):
    """Weights, optimiser and schedule of a checkpoint; its step, history, resumes and best value.

    The random states come back later, after the DataLoader's iterator is made (it draws a seed).
    """
    load_checkpoint(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=False)
    start_step = int(state["step"])
    rows = [dict(r) for r in state.get("history", [])]
    resumes = list(state.get("resumes", [])) + [
        {"step": start_step, "changed": {k: list(v) for k, v in state["changed"].items()}}]
    return start_step, rows, resumes, state.get("best_value")


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
    """The training batches from ``start_step`` on (the seeded plan of :class:`_StepBatches`)."""
    from torch.utils.data import DataLoader

    sampler = _StepBatches(len(train_ds), config.batch_size, config.seed, start_step, config.steps, rank, world)
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
    import torch

    from ..utils.progress import progress_bar

    config = dataclasses.replace(config or CLIPTrainingConfig(), **overrides)
    config.validate()
    rank, world = _dist_info()
    _check_sizes(train, val, config, world)
    out, val_sub, identity, state = _prepare_run(embedder, train, val, config, rank, world)
    ckpt_dir = out / CHECKPOINT_DIR
    seed_everything(config.seed)

    device = _training_device(config, embedder, world)
    emb = _prepare_embedder(embedder, config, device)
    model = emb.model
    params = _trainable_parameters(model, config.mode)
    autocast = _autocast(config, device)
    num_workers = config.num_workers if config.num_workers is not None else (8 if device.type == "cuda" else 0)
    train_ds, val_ds = _torch_datasets(emb, config, train, _training_captions(train, config), val_sub,
                                       num_workers, out, rank, _context_check(emb, config))

    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = _optimizer(model, params, config, device)
    loss_fn = _make_loss(config, rank, world)

    start_step, rows, resumes, best_value = 0, [], [], None
    if state is not None:
        start_step, rows, resumes, best_value = _restore(ckpt_dir, state, model, optimizer, scheduler)
        if state.get("finished") and config.steps <= start_step:
            return _finished_result(out, rows, config, emb, device, start_step, train_ds)
        _log_resume(start_step, config.steps, state["changed"])

    train_model, fwd_model = _wrapped_models(model, config, device, world)

    loader = _train_loader(train_ds, config, start_step, rank, world, num_workers, device)
    writer = _tensorboard_writer(out) if config.tensorboard and rank == 0 else None

    running, running_n, t_last, samples = None, 0, time.perf_counter(), 0
    bar = progress_bar(total=config.steps, initial=start_step, enabled=config.progress and rank == 0,
                       desc=f"train-clip ({config.mode})", unit="step")
    step = start_step
    tok = emb.tokenizer
    batches = named_data_errors(iter(loader))
    if state is not None:
        restore_rng_state(read_rng_state(ckpt_dir))
    for images, caps in batches:
        model.train()
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        tokens = tok(caps).to(device, non_blocking=True)
        loss = _optimizer_step(model, fwd_model, train_model, loss_fn, images, tokens, optimizer, scheduler,
                               config.grad_accum, autocast, world > 1)
        step += 1
        running = loss if running is None else running + loss  # stays on the device
        running_n += 1
        samples += config.batch_size
        bar.update(1)
        if step % config.eval_every == 0 or step == config.steps:
            train_loss = float(running) / running_n  # the only read-back of the loop
            elapsed = time.perf_counter() - t_last
            rate = samples / elapsed if elapsed > 0 else float("nan")
            if rank == 0:
                rows.append({"step": step, "train_loss": train_loss, **_evaluate(emb, val_ds, config, autocast),
                             "lr": float(scheduler.get_last_lr()[0]), "samples_per_s": rate})
                bar.set_postfix(loss=f"{train_loss:.3f}", val_top10=f"{rows[-1]['val_top10']:.3f}",
                                sps=f"{rate:.0f}")
                _log_scalars(writer, rows[-1])
                best_value = _keep_best(emb, rows[-1], config, best_value, out)
                _save_progress(out, rows, model, optimizer, scheduler, config, best_value, identity, resumes)
            _barrier(world)  # the other processes wait while process 0 validates
            running, running_n, samples, t_last = None, 0, 0, time.perf_counter()
    bar.close()
    del batches, loader  # the worker processes end before their image cache goes
    _close(writer, train_ds)

    history = _result_history(rows, config)
    final_path = None
    if rank == 0:
        final_path = _write_outputs(out, emb, history, config, step, device, identity, resumes)
    _barrier(world)  # rank 0 has finished writing best/ and final/
    return CLIPTrainingResult(history=history, best_path=out / "best", embedder=_best_model(out, emb, device),
                              output_dir=out, final_path=final_path, start_step=start_step)


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


def _log_resume(step: int, total: int, changed: dict) -> None:
    log.warning("resumed from step %d (of %d)%s", step, total,
                "; changed since the checkpoint: " + ", ".join(f"{k} {old!r} -> {new!r}"
                                                             for k, (old, new) in changed.items())
                if changed else "")


def _finished_result(out: Path, rows: list[dict], config: CLIPTrainingConfig, emb, device, step: int,
                     train_ds):
    """The result of a run that had already finished (nothing trained, nothing written)."""
    log.warning("the run in %s finished at step %d; nothing to train, its outputs are left as they are",
                out, step)
    if hasattr(train_ds.cache, "remove"):
        train_ds.cache.remove()
    final = out / "final"
    return CLIPTrainingResult(history=_result_history(rows, config), best_path=out / "best",
                              embedder=_best_model(out, emb, device), output_dir=out,
                              final_path=final if final.is_dir() else None, start_step=step, finished_before=True)


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


