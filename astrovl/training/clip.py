"""Contrastive training of CLIP on image-text manifests (the HubbleCLIP recipe).

Defaults follow the paper: batch 32, AdamW (lr 1e-5, weight decay 1e-3), 2,000
linear warm-up steps then a constant rate, 20,000 steps, random 90-degree
rotations, flips and random crops, validation every 200 steps and the best
checkpoint kept by validation loss.

Multi-GPU and multi-node: launch the same script with ``torchrun``; when
``torch.distributed`` is initialised, each process trains on its share of the
batch, features are gathered across processes for the contrastive loss
(open_clip's ``ClipLoss`` with ``gather_with_grad``), and gradients are
averaged by ``DistributedDataParallel``.
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

import numpy as np
from astropy.table import Table

from ..exceptions import DatasetError
from .common import (
    CHECKPOINT_DIR,
    load_checkpoint,
    lr_lambda,
    plot_history,
    save_checkpoint,
    seed_everything,
    write_history,
)

__all__ = ["CLIPTrainingConfig", "CLIPTrainingResult", "train_clip", "interpolate_weights", "MODES"]

log = logging.getLogger(__name__)

MODES = ("finetune", "head", "scratch", "shuffled")


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
        Optimisation (``schedule`` is ``"constant"`` or ``"cosine"`` after warm-up).
    eval_every : int
        Validation interval in steps (also the checkpoint interval).
    best_metric : {"val_loss", "val_top10"}
        Which validation metric selects the best checkpoint.
    loss : {"clip", "siglip"}
        open_clip ``ClipLoss`` (InfoNCE, learnable temperature) or ``SigLipLoss``.
    caption_mode : {"caption", "abstract"}
        ``abstract`` trains on random runs of sentences of the ``abstract`` column.
    augment : bool
        Random 90-degree rotations, flips and crops.
    grad_accum : int
        Gradient accumulation steps (the batch per optimizer step stays ``batch_size``).
    precision : {"auto", "fp32", "bf16"}
        ``auto``: bf16 autocast on CUDA, fp32 on CPU.
    compile : bool
        ``torch.compile`` the model (CUDA).
    num_workers : int, optional
        DataLoader workers (default: 0 on CPU, 8 on CUDA).
    output_dir : str
        Where checkpoints, ``best/``, ``metrics.csv`` and ``training_curves.png`` go.
    resume : bool
        Continue from ``output_dir/checkpoint`` if it exists.
    max_val : int, optional
        Use at most this many validation pairs.
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
    output_dir: str = "astrovl-clip-run"
    device: str | None = None
    seed: int = 0
    resume: bool = False
    max_val: int | None = None
    progress: bool = True
    tensorboard: bool = True

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
        if self.best_metric not in ("val_loss", "val_top10"):
            raise ValueError(f"best_metric={self.best_metric!r} must be 'val_loss' or 'val_top10'")
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"loss={self.loss!r} must be 'clip' or 'siglip'")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must be >= 1 and divide batch_size={self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r} must be 'auto', 'fp32' or 'bf16'")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r} must be 'constant' or 'cosine'")


@dataclass
class CLIPTrainingResult:
    """What :func:`train_clip` returns."""

    history: Table
    best_path: Path
    embedder: object
    output_dir: Path
    final_path: Path | None = None
    extras: dict = field(default_factory=dict)


def _dist_info():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _prepare_embedder(embedder, config: CLIPTrainingConfig):
    from ..clip import CLIPEmbedder

    if config.mode == "scratch":
        cfg = dict(embedder.model_cfg)
        cfg["model_name"] = embedder.model_name
        return CLIPEmbedder.from_config(cfg, device=config.device or embedder.device, seed=config.seed)
    if config.mode == "head":
        if "projection_head" in embedder.model_cfg:
            raise ValueError("the embedder already has projection heads; pass the base model for mode='head'")
        from ..clip.heads import HeadCLIP

        model = HeadCLIP(copy.deepcopy(embedder.model).cpu(), embedder.embed_dim, config.head_hidden)
        cfg = dict(embedder.model_cfg)
        cfg["projection_head"] = {"hidden": config.head_hidden}
        return CLIPEmbedder(model, embedder.tokenizer, embedder.preprocess, model_name=embedder.model_name,
                            model_cfg=cfg, preprocess_cfg=embedder.preprocess_cfg,
                            device=config.device or embedder.device)
    new = CLIPEmbedder(copy.deepcopy(embedder.model).cpu(), embedder.tokenizer, embedder.preprocess,
                       model_name=embedder.model_name, model_cfg=embedder.model_cfg,
                       preprocess_cfg=embedder.preprocess_cfg, device=config.device or embedder.device,
                       model_id=embedder.model_id)
    return new


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
    """Batch sampler: the batch of global step ``s`` is a pure function of (seed, s)."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, steps: int,
                 rank: int = 0, world: int = 1):
        self.n, self.bs, self.seed = n, batch_size, seed
        self.start, self.steps, self.rank, self.world = start_step, steps, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def batch(self, step: int) -> list[tuple[int, int]]:
        out = []
        for j in range(self.bs):
            g = step * self.bs + j
            epoch, pos = divmod(g, self.n)
            out.append((int(self._perm(epoch)[pos]), int(hash((self.seed, step, j)) % (2**31))))
        per = self.bs // self.world
        return out[self.rank * per:(self.rank + 1) * per]

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


def _forward_loss(model, loss_fn, images, tokens):
    """Loss through ``model.forward`` (so DistributedDataParallel synchronises gradients)."""
    out = model(images, tokens)
    if isinstance(out, dict):
        img, txt, scale, bias = out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
    else:
        img, txt, scale = out[0], out[1], out[2]
        bias = out[3] if len(out) > 3 else None
    if loss_fn.__class__.__name__ == "SigLipLoss":
        if bias is None:
            import torch

            bias = torch.zeros((), device=images.device)
        return loss_fn(img, txt, scale, bias)
    return loss_fn(img, txt, scale)


def _evaluate(embedder, val_ds, config, loss_fn, autocast, val_paths, val_captions):
    """Validation loss (batches of batch_size) and top-10% retrieval accuracy."""
    import torch

    from ..evaluation.retrieval import top_k_percent_accuracy

    model = embedder.model
    model.eval()
    losses, img_feats, txt_feats = [], [], []
    bs = config.batch_size
    with torch.no_grad():
        for start in range(0, len(val_ds), bs):
            items = [val_ds[(i, 0)] for i in range(start, min(len(val_ds), start + bs))]
            images, caps = _collate(items)
            images = images.to(embedder.device)
            tokens = embedder.tokenizer(caps).to(embedder.device)
            with autocast():
                img = model.encode_image(images, normalize=True).float()
                txt = model.encode_text(tokens, normalize=True).float()
                if len(items) >= 2:
                    scale = model.logit_scale.exp().float()
                    logits = scale * img @ txt.T
                    labels = torch.arange(len(items), device=images.device)
                    loss = (torch.nn.functional.cross_entropy(logits, labels)
                            + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
                    losses.append((float(loss), len(items)))
            img_feats.append(img.cpu().numpy())
            txt_feats.append(txt.cpu().numpy())
    img_all, txt_all = np.concatenate(img_feats), np.concatenate(txt_feats)
    val_loss = sum(v * n for v, n in losses) / max(1, sum(n for _, n in losses)) if losses else float("nan")
    top10 = top_k_percent_accuracy(img_all, txt_all, 10.0)
    return float(val_loss), float(top10)


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
        ``history`` (astropy Table: step, train_loss, val_loss, val_top10, lr,
        samples_per_s), ``best_path`` (loadable with
        :meth:`CLIPEmbedder.from_pretrained`), ``embedder`` (the best model).
    """
    import torch
    from torch.utils.data import DataLoader

    from ..clip import CLIPEmbedder
    from ..datasets.torchdata import ImageTextTorchDataset
    from ..utils.progress import progress_bar

    config = dataclasses.replace(config or CLIPTrainingConfig(), **overrides)
    config.validate()
    if len(train) < config.batch_size:
        raise DatasetError(f"the training set has {len(train)} records, fewer than batch_size={config.batch_size}")
    if len(val) == 0:
        raise DatasetError("the validation set is empty; validation needs held-out pairs (e.g. ds.split('val'))")
    rank, world = _dist_info()
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of processes ({world})")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)

    emb = _prepare_embedder(embedder, config)
    device = emb.device
    model = emb.model
    params = _trainable_parameters(model, config.mode)
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")

    def autocast():
        if use_bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    captions = [str(c) for c in train.manifest["caption"]]
    if config.mode == "shuffled":
        captions = [captions[i] for i in np.random.default_rng([config.seed, 99]).permutation(len(captions))]
    tok = emb.tokenizer
    ctx = emb.context_length

    def fits_context(text: str) -> bool:
        encode = getattr(tok, "encode", None)
        if encode is None:
            return True
        return len(encode(text)) + 2 <= ctx

    train_ds = ImageTextTorchDataset(train, emb.image_size, emb.image_mean, emb.image_std,
                                     augment=config.augment, captions=None if config.caption_mode == "abstract" and config.mode != "shuffled" else captions,
                                     caption_mode=config.caption_mode, fits_context=fits_context)
    val_sub = val if config.max_val is None or len(val) <= config.max_val else val.subset(np.arange(config.max_val))
    val_ds = ImageTextTorchDataset(val_sub, emb.image_size, emb.image_mean, emb.image_std, augment=False)
    train_ds._image(0)  # fail early on images smaller than the crop

    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(_param_groups(model, params, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.warmup_steps, config.steps, config.schedule))
    loss_fn = _make_loss(config, rank, world)

    start_step, rows = 0, []
    best_value = None
    ckpt_dir = out / CHECKPOINT_DIR
    if config.resume and (ckpt_dir / "state.json").is_file():
        state = load_checkpoint(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler)
        start_step = int(state["step"])
        rows = [dict(r) for r in state.get("history", [])]
        best_value = state.get("best_value")
        log.info("resuming from step %d", start_step)

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd_model = torch.compile(train_model) if config.compile else train_model

    num_workers = config.num_workers if config.num_workers is not None else (8 if device.type == "cuda" else 0)
    sampler = _StepBatches(len(train_ds), config.batch_size, config.seed, start_step, config.steps, rank, world)
    loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=_collate, num_workers=num_workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None,
                        persistent_workers=False)

    writer = None
    if config.tensorboard and rank == 0:
        with contextlib.suppress(ImportError, ModuleNotFoundError):
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    history_cols = ("step", "train_loss", "val_loss", "val_top10", "lr", "samples_per_s")
    running, running_n, t_last, samples = 0.0, 0, time.perf_counter(), 0
    micro = config.batch_size // world // config.grad_accum
    bar = progress_bar(total=config.steps, initial=start_step, enabled=config.progress and rank == 0,
                       desc=f"train-clip ({config.mode})", unit="step")
    step = start_step
    for images, caps in loader:
        model.train()
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        tokens = tok(caps).to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for a in range(config.grad_accum):
            sl = slice(a * micro, (a + 1) * micro)
            with autocast():
                loss = _forward_loss(fwd_model, loss_fn, images[sl], tokens[sl]) / config.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        running += step_loss
        running_n += 1
        samples += config.batch_size
        bar.update(1)
        if step % config.eval_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - t_last
            rate = samples / elapsed if elapsed > 0 else float("nan")
            val_loss, val_top10 = _evaluate(emb, val_ds, config, loss_fn, autocast, None, None)
            row = {"step": step, "train_loss": running / max(1, running_n), "val_loss": val_loss,
                   "val_top10": val_top10, "lr": float(scheduler.get_last_lr()[0]), "samples_per_s": rate}
            rows.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_top10=f"{val_top10:.3f}", sps=f"{rate:.0f}")
            if writer is not None:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(k, v, step)
            value = val_loss if config.best_metric == "val_loss" else -val_top10
            if rank == 0:
                if best_value is None or value < best_value:
                    best_value = value
                    emb.save_pretrained(out / "best")
                history = Table(rows=[[r[c] for c in history_cols] for r in rows], names=history_cols)
                write_history(history, out / "metrics.csv")
                save_checkpoint(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                state={"step": step, "history": rows, "best_value": best_value,
                                       "config": _jsonable(dataclasses.asdict(config)),
                                       "data_position": step * config.batch_size})
            running, running_n, samples, t_last = 0.0, 0, 0, time.perf_counter()
    bar.close()
    if writer is not None:
        writer.close()

    history = Table(rows=[[r[c] for c in history_cols] for r in rows], names=history_cols) if rows \
        else Table(names=history_cols)
    history.meta["mode"] = config.mode
    history.meta["random_top10"] = 0.10
    final_path = None
    if rank == 0:
        final_path = emb.save_pretrained(out / "final")
        write_history(history, out / "metrics.csv")
        if len(history):
            plot_history(history, out / "training_curves.png", title=f"CLIP {config.mode}")
        (out / "config.json").write_text(json.dumps(_jsonable(dataclasses.asdict(config)), indent=2), "utf-8")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has finished writing best/ and final/
    best_path = out / "best"
    best = CLIPEmbedder.from_pretrained(best_path, device=device) if (best_path / "astrovl_clip.json").is_file() else emb
    return CLIPTrainingResult(history=history, best_path=best_path, embedder=best, output_dir=out,
                              final_path=final_path)


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


