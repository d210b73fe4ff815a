"""Two-stage LLaVA training (the AstroLLaVA recipe), resumable, multi-GPU through accelerate.

Stage 1 trains only the projector (vision tower and language model frozen) on
image-caption records in LLaVA-1.5's plain format (image tokens, caption); stage 2 trains the language model and projector end to end
(vision tower frozen, as LLaVA-1.5), or LoRA adapters, on conversations in the
model's chat format. The loss covers only what the model must say: the captions,
or the assistant's answers with their end-of-sequence tokens.

Several GPUs or nodes: launch the same script with ``accelerate launch``
(``--config_file`` for DeepSpeed ZeRO-3 with 7B models: the package ships
``astrovl/data/deepspeed_zero3.json``; see the training documentation).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from astropy.table import Table

from ..exceptions import CheckpointError
from ..utils.files import (
    LLAVA_TRAINING_OUTPUT,
    atomic_directory,
    atomic_write,
    atomic_write_text,
    prepare_output_dir,
)
from ..utils.imports import optional_import
from ..utils.progress import progress_bar
from .batches import EpochBatches
from .choices import LLAVA_STAGES, SCHEDULES
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
    rng_state,
    save_checkpoint,
    seed_everything,
    warmup_schedule,
    write_history,
)
from .llava_data import LLaVATorchDataset, collate_fn, load_conversation_records
from .llava_validation import validation_loss
from .loop import RunState, log_resume, run_steps

__all__ = ["LLaVATrainingConfig", "LLaVATrainingResult", "LLaVATask", "train_llava", "plot_loss", "DEEPSPEED_ZERO3_CONFIG",
           "LORA_TARGET_MODULES", "RUN_OUTPUTS"]

log = logging.getLogger(__name__)

#: DeepSpeed ZeRO-3 configuration shipped with the package (for ``accelerate launch``).
DEEPSPEED_ZERO3_CONFIG = Path(__file__).resolve().parents[1] / "data" / "deepspeed_zero3.json"

#: Linear layers of the language model that LoRA adapts (attention and MLP).
LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

_DEFAULT_LR = {1: 1e-3, 2: 2e-5, "lora": 2e-4}


@dataclass
class LLaVATrainingConfig:
    """Settings of :func:`train_llava` (defaults: the LLaVA-1.5 / AstroLLaVA recipe).

    Parameters
    ----------
    stage : {1, 2}
        1: projector only, on captions (lr 1e-3). 2: language model + projector
        end to end (lr 2e-5), or LoRA adapters with ``lora=True`` (lr 2e-4).
    output_dir : str
        Where the checkpoint, the trained model, metrics and plots go: a new or
        empty folder, or the folder of an earlier run (to resume or replace it);
        a folder holding other files is refused.
    epochs : float
        Passes over the data (1 in the recipe); ``max_steps`` overrides it.
    max_steps : int, optional
        Optimizer steps to run.
    batch_size : int
        Records per device per micro-batch.
    gradient_accumulation_steps : int
    lr : float, optional
        Default by stage (see above).
    weight_decay, warmup_ratio, schedule, max_grad_norm : float, float, str, float
        AdamW weight decay; linear warm-up from 0 over this fraction of steps,
        then ``"cosine"`` down to 0 at the last step (recipe) or ``"constant"``
        (:func:`~astrovl.training.common.warmup_schedule` with ``warmup_from_zero``:
        the rates of transformers' ``get_cosine_schedule_with_warmup`` /
        ``get_constant_schedule_with_warmup``); gradient clipping.
    lora, lora_r, lora_alpha, lora_dropout
        LoRA on the language model's attention and MLP layers (peft); the
        projector is trained fully alongside.
    max_length : int
        Tokens per record (longer conversations are truncated).
    system_prompt : str, optional
        System text put before each conversation.
    mix_data : str, optional
        General instruction data (LLaVA JSON) mixed in to limit forgetting;
        needs ``mix_ratio``.
    mix_ratio : float
        Fraction of each epoch's records drawn from ``mix_data`` (0 to < 1);
        0 (the default) mixes nothing, so ``mix_data`` with ``mix_ratio=0`` is
        refused rather than ignored.
    mix_image_root : str, optional
        Image root of ``mix_data``.
    bf16 : bool, optional
        bf16 mixed precision; default on CUDA.
    gradient_checkpointing : bool, optional
        Default on CUDA for stage 2.
    device : str, optional
        ``"cpu"`` forces the CPU; otherwise accelerate chooses (CUDA when present).
    num_workers : int
        DataLoader worker processes preparing batches (images, chat template,
        tokenization) off the training process; 0 prepares them in it.
    save_every : int
        Write a resumable checkpoint every N optimizer steps (and at the end).
    eval_every : int, optional
        Validation loss every N optimizer steps (and at the end) when the data has
        a ``val`` split; default ``save_every``.
    max_eval_records : int
        At most this many validation records.
    log_every : int
        The mean training loss reaches the host (one synchronisation) every N steps.
    seed : int
    resume : bool
        Continue from ``output_dir/checkpoint`` at the same step, data position
        and random state. The settings must be the checkpoint's, except those of
        :attr:`RESUME_MAY_CHANGE`; a finished run is reported and left as it is.
    overwrite : bool
        Start again in a folder that holds the checkpoint of an earlier run,
        removing that run's outputs (and nothing else). Without ``resume`` or
        ``overwrite``, such a folder is refused.
    progress : bool
    """

    stage: int = 1
    output_dir: str = "astrollava-training"
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    max_length: int = 2048
    system_prompt: str | None = None
    mix_data: str | None = None
    mix_ratio: float = 0.0
    mix_image_root: str | None = None
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None
    device: str | None = None
    num_workers: int = 2
    save_every: int = 500
    eval_every: int | None = None
    max_eval_records: int = 256
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    #: settings a resumed run may change, with what the change does; every other
    #: setting must equal the checkpoint's
    RESUME_MAY_CHANGE: ClassVar[dict[str, str]] = {
        "max_steps": "where the run ends; the rate of the remaining steps follows the schedule of the new "
                     "length (warm-up and cosine are fractions of the whole run)",
        "epochs": "where the run ends, as max_steps",
        "save_every": "how often a checkpoint is written",
        "eval_every": "how often the validation loss is computed",
        "max_eval_records": "how many validation records are used",
        "log_every": "how often the training loss is logged",
        "num_workers": "DataLoader worker processes",
        "device": "where the run computes (another machine)",
        "bf16": "the arithmetic of the forward pass",
        "gradient_checkpointing": "whether activations are recomputed in the backward pass",
        "progress": "the progress bar",
    }
    #: settings that say where and how a run starts, not how it trains (never compared)
    RESUME_NOT_COMPARED: ClassVar[tuple[str, ...]] = ("output_dir", "resume", "overwrite", "extra")

    def __post_init__(self):
        self.validate()
        if self.lr is None:
            self.lr = _DEFAULT_LR["lora"] if self.lora else _DEFAULT_LR[self.stage]

    def validate(self) -> None:
        """Raise ValueError with the fix for inconsistent settings (also when the configuration is made)."""
        if self.stage not in LLAVA_STAGES:
            raise ValueError(f"stage={self.stage!r}; use 1 (projector) or 2 (end to end)")
        if self.lora and self.stage != 2:
            raise ValueError("lora=True applies to stage 2; stage 1 trains the projector only")
        if not 0.0 <= self.mix_ratio < 1.0:
            raise ValueError(f"mix_ratio={self.mix_ratio} must be in [0, 1)")
        if self.mix_ratio > 0 and not self.mix_data:
            raise ValueError("mix_ratio > 0 needs mix_data (a LLaVA conversation JSON file)")
        if self.mix_data and self.mix_ratio == 0:
            raise ValueError(f"mix_data={self.mix_data!r} needs mix_ratio (--mix-ratio), the fraction of the "
                             "records drawn from it, e.g. 0.1; with the default 0 nothing would be mixed in")
        if self.resume and self.overwrite:
            raise ValueError("resume=True and overwrite=True exclude each other; choose one")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be 'constant' or 'cosine'")
        for name in ("batch_size", "gradient_accumulation_steps", "save_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every={self.eval_every} must be >= 1")
        if int(self.num_workers) < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0")


@dataclass
class LLaVATrainingResult:
    """What :func:`train_llava` returns.

    Attributes
    ----------
    model : AstroLLaVA
        The trained model, ready for captioning.
    model_dir : pathlib.Path or None
        A directory :meth:`AstroLLaVA.from_pretrained` loads (None for LoRA without merging).
    adapter_dir : pathlib.Path or None
        The LoRA adapter (load with ``AstroLLaVA.from_pretrained(base, adapter=adapter_dir)``).
    output_dir : pathlib.Path
    history : astropy.table.Table
        ``step``, ``epoch``, ``train_loss``, ``lr`` (and ``val_loss``).
    start_step : int
        The step this call started from (the checkpoint's when it resumed).
    finished_before : bool
        The run had already finished: nothing was trained or written.
    """

    model: Any
    model_dir: Path | None
    adapter_dir: Path | None
    output_dir: Path
    history: Table
    start_step: int = 0
    finished_before: bool = False


def _freeze_for_stage(model, config: LLaVATrainingConfig):
    """Set ``requires_grad`` per stage; wrap with LoRA when asked. Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector
    if config.stage == 1:
        for p in projector.parameters():
            p.requires_grad_(True)
        return model
    if config.lora:
        optional_import("peft", purpose="LoRA training")
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=LORA_TARGET_MODULES, modules_to_save=["multi_modal_projector"],
                          bias="none")
        return get_peft_model(model, lcfg)
    for p in model.model.language_model.parameters():
        p.requires_grad_(True)
    for p in model.lm_head.parameters():
        p.requires_grad_(True)
    for p in projector.parameters():
        p.requires_grad_(True)
    return model


def _enable_checkpointing(net) -> None:
    """Recompute activations in the backward pass (newer transformers call it activation checkpointing)."""
    kwargs = {"use_reentrant": False}
    if hasattr(net, "activation_checkpointing_enable"):
        net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5.2x
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(net, "enable_input_require_grads"):
        net.enable_input_require_grads()


#: kind of a LLaVA training output folder (see :func:`astrovl.utils.files.check_output_dir`)
OUTPUT_KIND = LLAVA_TRAINING_OUTPUT

#: what a LLaVA run writes in its folder (what ``overwrite=True`` removes)
RUN_OUTPUTS = (CHECKPOINT_DIR, "model", "adapter", "metrics.csv", "loss.png", "training.json")


def _choose_start(out: Path, config: LLaVATrainingConfig, accelerator) -> int | None:
    """:func:`~astrovl.training.common.choose_start` on the main process first (it may remove the earlier run)."""
    step = None
    if accelerator.is_main_process:
        step = choose_start(out, resume=config.resume, overwrite=config.overwrite, outputs=RUN_OUTPUTS)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        step = choose_start(out, resume=config.resume, overwrite=False, outputs=RUN_OUTPUTS)
    return step


def _training_records(data, config: LLaVATrainingConfig, image_root) -> tuple[list[dict], list[dict]]:
    """The training records (with the mixed-in general ones) and all validation records."""
    records = load_conversation_records(data, stage=config.stage, image_root=image_root, split="train")
    if not records:
        raise ValueError("no training records: the data has no records of the 'train' split")
    val_records = load_conversation_records(data, stage=config.stage, image_root=image_root, split="val")
    if config.mix_ratio > 0:
        general = load_conversation_records(config.mix_data, stage=2, image_root=config.mix_image_root,
                                            split="train")
        n_mix = int(round(config.mix_ratio / (1 - config.mix_ratio) * len(records)))
        pick = np.random.default_rng(config.seed).choice(len(general), size=n_mix,
                                                         replace=n_mix > len(general))
        records = records + [general[i] for i in pick]
    return records, val_records


def _records_identity(records: list[dict]) -> str:
    items = ([r["id"], Path(r["image"]).name, r["turns"]] for r in records)
    return f"{len(records)} records {records_digest(items)}"


def _run_identity(llava, records: list[dict], val_records: list[dict]) -> dict:
    """What a checkpoint must have been trained from: the starting model and the data."""
    shapes = ([name, list(t.shape)] for name, t in llava.model.state_dict().items())
    return {"model": llava.source, "architecture": records_digest(shapes),
            "train_data": _records_identity(records), "val_data": _records_identity(val_records)}


def _resumed_state(ckpt: Path, config: LLaVATrainingConfig, identity: dict, total: int) -> dict:
    """The checkpoint's state, after checking that this run may continue it (adds ``"changed"``)."""
    with checkpoint_errors(ckpt):
        state = json.loads((ckpt / "state.json").read_text("utf-8"))
    saved = {**state.get("config", {}), **state.get("run", {})}
    current = {**{k: v for k, v in asdict(config).items() if k != "extra"}, **identity}
    state["changed"] = check_resume_settings(ckpt, saved, current, set(config.RESUME_MAY_CHANGE),
                                             config.RESUME_NOT_COMPARED)
    n_records = int(identity["train_data"].split()[0])
    if state.get("n_records") != n_records:  # checkpoints of earlier versions record only this
        raise CheckpointError(f"checkpoint {str(ckpt)!r} was written for {state.get('n_records')} records, "
                              f"the data now has {n_records}; resume with the same data")
    step = int(state["step"])
    if step > total and not state.get("finished"):
        raise CheckpointError(f"the checkpoint {str(ckpt)!r} is at step {step}, past the {total} steps of this "
                              f"run; resume with max_steps >= {step}")
    return state


def _as_llava(model):
    """An AstroLLaVA from an instance or a path; paths load on the CPU (accelerate places them)."""
    from ..llava import AstroLLaVA

    if isinstance(model, AstroLLaVA):
        return model
    return AstroLLaVA.from_pretrained(model, device="cpu", dtype="float32")


def _datasets(records: list[dict], val_records: list[dict], llava, config: LLaVATrainingConfig):
    """The training and validation datasets (None without validation records); images checked first.

    Validation indexes its records directly: it draws nothing from the training's random stream.
    """
    check_record_images(((r["id"], r["image"]) for r in records), what="training")
    check_record_images(((r["id"], r["image"]) for r in val_records), what="validation")
    options = dict(max_length=config.max_length, pad_to_square=llava.pad_to_square, system=config.system_prompt,
                   stage=config.stage)
    val_set = LLaVATorchDataset(val_records, llava.processor, **options) if val_records else None
    return LLaVATorchDataset(records, llava.processor, **options), val_set


def _metrics_row(accelerator, net, mean_loss, step: int, epoch: float, scheduler, val_set, evaluate: bool,
                 batch_size: int, collate) -> dict:
    """The history row of a logging step: training loss (mean over processes), lr, validation loss."""
    row = {"step": step, "epoch": round(epoch, 4), "train_loss": float(accelerator.reduce(mean_loss, "mean")),
           "lr": float(scheduler.get_last_lr()[0])}
    if val_set is not None:
        # answer-token mean over all processes; every process runs as many batches
        row["val_loss"] = validation_loss(net, val_set, batch_size=batch_size, collate_fn=collate,
                                          device=accelerator.device, accelerator=accelerator) \
            if evaluate else float("nan")
    return row


def _write_run_record(out: Path, config: LLaVATrainingConfig, run: dict, model_dir, adapter_dir) -> None:
    """``training.json``: what the run used and what it wrote."""
    atomic_write_text(out / "training.json", json.dumps(
        {"config": _config_record(config), **run, "model_dir": str(model_dir) if model_dir else None,
         "adapter_dir": str(adapter_dir) if adapter_dir else None}, indent=2))


def _step_counts(n_records: int, config: LLaVATrainingConfig, world: int) -> tuple[int, int]:
    """Micro-batches per epoch (on one process) and the optimiser steps of the run."""
    per_step = config.batch_size * config.gradient_accumulation_steps * world
    micro_per_epoch = math.ceil(n_records / (config.batch_size * world))
    return micro_per_epoch, config.max_steps or max(1, math.ceil(n_records * config.epochs / per_step))


def _prepare(accelerator, net, optimizer, scheduler, ckpt: Path | None, deepspeed):
    """``accelerator.prepare`` the model and optimiser, loading the checkpoint in ``ckpt`` when resuming.

    The random states come back later, after the DataLoader's iterator is made (it draws a seed).
    """
    import torch

    if ckpt is not None and deepspeed is None:
        load_checkpoint(ckpt, model=net, optimizer=optimizer, scheduler=scheduler, trainable_only=True,
                        restore_rng=False)
    net, optimizer = accelerator.prepare(net, optimizer)
    if ckpt is not None and deepspeed is not None:
        # partitioned weights and optimizer state: DeepSpeed's own checkpoint format
        with checkpoint_errors(ckpt):
            accelerator.load_state(str(ckpt / "deepspeed"))
            scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    return net, optimizer


def _train_loader(dataset, config: LLaVATrainingConfig, collate, use_cpu: bool, *, world: int, rank: int,
                  epoch: int, micro: int):
    """The training batches from (``epoch``, ``micro``) on, in the seeded plan of :class:`~astrovl.training.batches.EpochBatches`.

    Chat template, tokenization and image decoding run in the DataLoader's worker processes.
    """
    import torch

    options = dict(num_workers=config.num_workers, pin_memory=not use_cpu, collate_fn=collate)
    if config.num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    plan = EpochBatches(n=len(dataset), seed=config.seed, world=world, rank=rank, batch_size=config.batch_size,
                 epoch=epoch, micro=micro)
    return torch.utils.data.DataLoader(dataset, batch_sampler=plan, **options)


def _micro_step(accelerator, net, batch: dict, optimizer, params, max_grad_norm: float):
    """Forward and backward of one micro-batch (the optimiser steps when gradients are synchronised).

    Returns the micro-batch loss, detached, on the device.
    """
    with accelerator.accumulate(net):
        loss = net(**batch).loss
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach().float()


def _accelerator(config: LLaVATrainingConfig):
    """The accelerate ``Accelerator`` of a run, its DeepSpeed plugin (or None) and whether it runs on the CPU."""
    import torch
    optional_import("accelerate", purpose="LLaVA training")
    from accelerate import Accelerator

    from ..utils.devices import resolve_device

    device = resolve_device(config.device) if config.device is not None else None  # no CUDA: an error
    use_cpu = (device is not None and device.type == "cpu") or not torch.cuda.is_available()
    bf16 = config.bf16 if config.bf16 is not None else not use_cpu
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="bf16" if bf16 else "no",
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None:
        # no DataLoader goes through prepare(): give DeepSpeed the batch geometry itself
        ds = deepspeed.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = config.batch_size
        ds["gradient_accumulation_steps"] = config.gradient_accumulation_steps
        ds["train_batch_size"] = (config.batch_size * config.gradient_accumulation_steps
                                  * accelerator.num_processes)
    return accelerator, deepspeed, use_cpu


def _trainable_model(llava, config: LLaVATrainingConfig, use_cpu: bool):
    """The network in training mode with the stage's parameters trainable, and those parameters."""
    net = llava.model
    net.train()
    net = _freeze_for_stage(net, config)
    gc = config.gradient_checkpointing if config.gradient_checkpointing is not None else \
        (config.stage == 2 and not use_cpu)
    if gc:
        _enable_checkpointing(net)
    return net, [p for p in net.parameters() if p.requires_grad]


def _optimizer(params, config: LLaVATrainingConfig, total: int, use_cpu: bool):
    """AdamW, its learning-rate schedule (cosine or constant after warm-up) and the warm-up steps."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=not use_cpu and torch.cuda.is_available())
    warmup = int(round(config.warmup_ratio * total))
    scheduler = warmup_schedule(optimizer, warmup, total, config.schedule, warmup_from_zero=True)
    return optimizer, scheduler, warmup


def _config_record(config: LLaVATrainingConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k != "extra"}


def _save(accelerator, net, optimizer, scheduler, ckpt: Path, deepspeed, *, state: dict) -> None:
    """A checkpoint to resume from (DeepSpeed's own format under DeepSpeed); every process calls it."""
    import torch

    accelerator.wait_for_everyone()
    if deepspeed is not None:
        accelerator.save_state(str(ckpt / "deepspeed"))  # collective
        if accelerator.is_main_process:
            with atomic_write(ckpt / "scheduler.pt", "wb") as fh:
                torch.save(scheduler.state_dict(), fh)
            with atomic_write(ckpt / "rng.pt", "wb") as fh:
                torch.save(rng_state(), fh)
            atomic_write_text(ckpt / "state.json", json.dumps(state, indent=2))
    elif accelerator.is_main_process:
        save_checkpoint(ckpt, model=accelerator.unwrap_model(net), optimizer=optimizer, scheduler=scheduler,
                        state=state, trainable_only=True)
    accelerator.wait_for_everyone()


def _history(rows: list[dict], with_validation: bool) -> Table:
    names = ("step", "epoch", "train_loss", "lr") + (("val_loss",) if with_validation else ())
    if rows:
        return Table(rows=rows, names=names)
    return Table(names=names, dtype=(int,) + (float,) * (len(names) - 1))


def _write_outputs(out: Path, history: Table, config: LLaVATrainingConfig, unwrapped, full_state, processor):
    """Metrics, the loss plot and the trained model (or LoRA adapter); the model and adapter folders."""
    out.mkdir(parents=True, exist_ok=True)
    write_history(history, out / "metrics.csv")
    if len(history):
        kind = "LoRA" if config.lora else ("projector" if config.stage == 1 else "end to end")
        plot_loss(history, out / "loss.png", title=f"LLaVA stage {config.stage} ({kind})")
    folder, kind = (out / "adapter", "llava-adapter") if config.lora else (out / "model", "llava-model")
    with atomic_directory(folder, kind=kind) as tmp:
        unwrapped.save_pretrained(tmp, state_dict=full_state, safe_serialization=True)
        processor.save_pretrained(tmp)
    return (None, folder) if config.lora else (folder, None)


def train_llava(model, data, config: LLaVATrainingConfig | None = None, *,
                image_root: str | os.PathLike | None = None) -> LLaVATrainingResult:
    """Train a LLaVA model (stage 1 or 2 of the AstroLLaVA recipe).

    Parameters
    ----------
    model : AstroLLaVA or str
        The model to train (for stage 2 usually the stage-1 output), or its name
        (hub id or directory, as :meth:`AstroLLaVA.from_pretrained` takes).
    data : ManifestDataset, path or list of dict
        Stage 1: image-caption records (e.g. an outreach dataset), trained in
        LLaVA-1.5's plain format. Stage 2: LLaVA conversation JSON, or a dataset
        whose manifest has a ``conversations`` column. Only the ``train`` split
        is trained on; the ``val`` split (of the manifest, or JSON records whose
        ``split`` or manifest entry says so) gives the validation loss. See
        :func:`astrovl.training.llava_data.load_conversation_records`.
    config : LLaVATrainingConfig
    image_root : path, optional
        Root of the image paths in a conversation JSON file.

    Returns
    -------
    LLaVATrainingResult
    """
    optional_import("transformers", purpose="LLaVA training")
    config = config or LLaVATrainingConfig()
    out = prepare_output_dir(config.output_dir, OUTPUT_KIND)
    accelerator, deepspeed, use_cpu = _accelerator(config)
    resume = _choose_start(out, config, accelerator) is not None
    records, all_val = _training_records(data, config, image_root)
    seed_everything(config.seed)
    task = LLaVATask.build(model, records, all_val, config, out, accelerator, deepspeed=deepspeed,
                           use_cpu=use_cpu, resume=resume)
    run = task.restore(task.checkpoint)
    try:
        run_steps(task.start(run), run, task.total, task.train_step, task.after_step, task.bar)
    finally:
        task.stop()  # shuts the DataLoader's worker processes down
    return task.export(run)


class LLaVATask:
    """One LLaVA training run under accelerate: model, data, optimiser; a micro-batch step, validation,
    checkpoint, export.

    :func:`train_llava` composes it with :func:`~astrovl.training.loop.run_steps`;
    build it with :meth:`build`.
    """

    def __init__(self, *, config: LLaVATrainingConfig, out: Path, accelerator, deepspeed, use_cpu: bool, world: int,
                 llava, identity: dict, checkpoint: dict | None, records: list[dict], val_records: list[dict],
                 dataset, val_set, net, params: list, optimizer, scheduler, warmup: int, total: int,
                 micro_per_epoch: int, collate):
        self.config, self.out, self.accelerator, self.deepspeed = config, out, accelerator, deepspeed
        self.use_cpu, self.world, self.llava, self.identity = use_cpu, world, llava, identity
        #: the checkpoint's state to resume from, checked against this run (None: a new run)
        self.checkpoint = checkpoint
        self.records, self.val_records, self.dataset, self.val_set = records, val_records, dataset, val_set
        self.net, self.params, self.n_trainable = net, params, sum(p.numel() for p in params)
        self.optimizer, self.scheduler, self.warmup = optimizer, scheduler, warmup
        self.total, self.micro_per_epoch, self.collate = total, micro_per_epoch, collate
        self.ckpt = self.out / CHECKPOINT_DIR
        self.eval_every = self.config.eval_every or self.config.save_every
        self.epoch = self.micro = 0
        self.bar = self._batches = None

    @classmethod
    def build(cls, model, records: list[dict], all_val: list[dict], config: LLaVATrainingConfig, out: Path,
              accelerator, *, deepspeed=None, use_cpu: bool = True, resume: bool = False) -> LLaVATask:
        """The model with the stage's trainable parameters, the datasets, the optimiser and its schedule.

        With ``resume``, the checkpoint's state is read and checked against this run
        (:attr:`checkpoint`) before any dataset or optimiser is made.
        """
        world = accelerator.num_processes
        val_records = all_val[:config.max_eval_records]
        micro_per_epoch, total = _step_counts(len(records), config, world)
        llava = _as_llava(model)
        identity = _run_identity(llava, records, all_val)
        checkpoint = _resumed_state(out / CHECKPOINT_DIR, config, identity, total) if resume else None
        dataset, val_set = _datasets(records, val_records, llava, config)
        net, params = _trainable_model(llava, config, use_cpu)
        optimizer, scheduler, warmup = _optimizer(params, config, total, use_cpu)
        return cls(config=config, out=out, accelerator=accelerator, deepspeed=deepspeed, use_cpu=use_cpu,
                   world=world, llava=llava, identity=identity, checkpoint=checkpoint, records=records,
                   val_records=val_records, dataset=dataset, val_set=val_set, net=net, params=params,
                   optimizer=optimizer, scheduler=scheduler,
                   warmup=warmup, total=total, micro_per_epoch=micro_per_epoch,
                   collate=collate_fn(llava.processor.tokenizer.pad_token_id))

    def restore(self, checkpoint: dict | None) -> RunState:
        """``accelerator.prepare`` the model and optimiser, loading ``checkpoint`` (if any); the run's state.

        The random states come back in :meth:`start`, after the DataLoader's iterator is made (it draws a seed).
        """
        self.net, self.optimizer = _prepare(self.accelerator, self.net, self.optimizer, self.scheduler,
                                            self.ckpt if checkpoint is not None else None, self.deepspeed)
        if checkpoint is None:
            return RunState()
        run = RunState.resumed(checkpoint, self.total)
        self.epoch, self.micro = int(checkpoint["epoch"]), int(checkpoint["micro"])
        log_resume(run.step, self.total, checkpoint["changed"], finished=run.finished, out=self.out, logger=log)
        return run

    def start(self, run: RunState):
        """The micro-batches from the run's data position on (then a resumed run's random states return)."""
        import torch

        config, accelerator = self.config, self.accelerator
        loader = _train_loader(self.dataset, config, self.collate, self.use_cpu, world=self.world,
                               rank=accelerator.process_index, epoch=self.epoch, micro=self.micro)
        self.bar = progress_bar(total=self.total, initial=run.step,
                                enabled=config.progress and accelerator.is_main_process,
                                desc=f"LLaVA stage {config.stage}", unit="step")
        # the loss is summed on the device; it reaches the host only at logging steps (no per-step sync)
        self._running, self._count = torch.zeros((), device=accelerator.device), 0
        self._batches = named_data_errors(iter(loader))  # errors of the workers name the record and its image
        if self.checkpoint is not None and (self.ckpt / "rng.pt").is_file():
            restore_rng_state(read_rng_state(self.ckpt))  # after every start-up draw: as if never stopped
        return self._batches

    def train_step(self, batch: dict) -> bool:
        """Forward and backward of one micro-batch; True when the optimiser stepped (gradients synchronised)."""
        self.epoch, self.micro = batch.pop("position")
        batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
        self._running += _micro_step(self.accelerator, self.net, batch, self.optimizer, self.params,
                                     self.config.max_grad_norm)
        self._count += 1
        if not self.accelerator.sync_gradients:
            return False
        self.scheduler.step()
        return True

    def after_step(self, run: RunState) -> None:
        """Log the training loss every ``log_every`` steps, validate every ``eval_every``, checkpoint every
        ``save_every`` (and all three at the last step)."""
        import torch

        config, step = self.config, run.step
        logging_step = step % config.log_every == 0 or step == self.total
        eval_step = self.val_set is not None and (step % self.eval_every == 0 or step == self.total)
        if logging_step or eval_step:
            run.rows.append(self.evaluate(step, eval_step))
            self.bar.set_postfix(loss=f"{run.rows[-1]['train_loss']:.4f}")
            self._running, self._count = torch.zeros_like(self._running), 0
        if step % config.save_every == 0 or step == self.total:
            self.save(run)

    def evaluate(self, step: int, validate: bool) -> dict:
        """The history row of a logging step: mean training loss since the last, lr, validation loss."""
        return _metrics_row(self.accelerator, self.net, self._running / self._count, step,
                            self.epoch + self.micro / self.micro_per_epoch, self.scheduler, self.val_set,
                            validate, self.config.batch_size, self.collate)

    def save(self, run: RunState) -> None:
        """A checkpoint to resume from: weights, optimiser, schedule, random states, data position, history."""
        _save(self.accelerator, self.net, self.optimizer, self.scheduler, self.ckpt, self.deepspeed, state={
            "step": run.step, "epoch": self.epoch, "micro": self.micro, "n_records": len(self.records),
            "config": _config_record(self.config), "history": run.rows, "trainable_parameters": self.n_trainable,
            "run": self.identity, "total_steps": self.total, "finished": run.step == self.total,
            "resumes": run.resumes})

    def stop(self) -> None:
        """End the DataLoader's worker processes and close the progress bar."""
        self._batches = None
        if self.bar is not None:
            self.bar.close()

    def export(self, run: RunState) -> LLaVATrainingResult:
        """Metrics, loss plot, the trained model or adapter and the run record (main process); the result.

        A run that had already finished writes nothing and returns the earlier run's folders.
        """
        from ..llava import AstroLLaVA

        config, accelerator, out = self.config, self.accelerator, self.out
        history = _history(run.rows, self.val_set is not None)
        history.meta.update({"stage": config.stage, "lora": config.lora, "trainable_parameters": self.n_trainable,
                             "records": len(self.records), "val_records": len(self.val_records)})
        unwrapped = accelerator.unwrap_model(self.net)
        unwrapped.eval()
        full_state = accelerator.get_state_dict(self.net)  # gathers partitioned weights (collective under ZeRO-3)
        model_dir = adapter_dir = None
        if run.finished:  # nothing trained: the earlier run's outputs stay as they are
            model_dir = out / "model" if (out / "model").is_dir() else None
            adapter_dir = out / "adapter" if (out / "adapter").is_dir() else None
        elif accelerator.is_main_process:
            model_dir, adapter_dir = _write_outputs(out, history, config, unwrapped, full_state,
                                                    self.llava.processor)
            _write_run_record(out, config, {"steps": run.step, "total_steps": self.total,
                                            "warmup_steps": self.warmup, "device": str(accelerator.device),
                                            "processes": self.world, **self.identity, "resumes": run.resumes},
                              model_dir, adapter_dir)
        accelerator.wait_for_everyone()
        trained = AstroLLaVA(unwrapped, self.llava.processor, device=accelerator.device,
                             pad_to_square=self.llava.pad_to_square, source=str(model_dir or adapter_dir or out))
        return LLaVATrainingResult(model=trained, model_dir=model_dir, adapter_dir=adapter_dir, output_dir=out,
                                   history=history, start_step=run.start_step, finished_before=run.finished)


def plot_loss(history: Table, path: str | os.PathLike | None = None, *, title: str = "LLaVA training"):
    """Plot the training loss, and the validation loss where it was computed; returns the Figure.

    :func:`astrovl.training.common.plot_history` with the axis labels of a LLaVA run.

    Parameters
    ----------
    history : astropy.table.Table
        ``step``, ``train_loss`` and optionally ``val_loss`` (NaN at steps
        without validation), as :func:`train_llava` returns it.
    path : path, optional
        Where to write the PNG.
    title : str
    """
    return plot_history(history, path, title=title, xlabel="optimizer step", loss_label="loss (answers only)")
