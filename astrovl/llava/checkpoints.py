"""What a LLaVA checkpoint directory holds: its layout, its weight files, its weights.

Three layouts are recognised (:func:`detect_layout`):

``"transformers"``
    ``LlavaForConditionalGeneration`` with an ``AutoProcessor`` (``llava-hf``
    conversions, directories written by astrovl).
``"original"``
    the original LLaVA repository's ``LlavaLlamaForCausalLM`` (config
    ``model_type`` ``llava_llama``; ``llava_mistral`` and ``llava_mpt`` are its
    siblings): projector under ``model.mm_projector``, vision tower named by
    ``mm_vision_tower``.
``"lora"``
    a peft LoRA adapter (``adapter_config.json`` naming its base), usually with
    ``non_lora_trainables.bin`` holding the projector trained alongside.

Weights are read from safetensors, or from ``.bin`` files with
``torch.load(weights_only=True)`` only: a pickle that needs code to load is refused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..exceptions import CheckpointError, ModelNotFoundError
from .hub import ResolvedCheckpoint, download_command, fetch_files

__all__ = ["detect_layout", "read_json", "load_weights", "weight_files", "fetch_weights", "is_original_config",
           "ORIGINAL_MODEL_TYPES", "normalize_llava_key", "tower_key", "drop_stale_buffers", "non_persistent_buffers",
           "KEY_RENAMES", "TOWER_RENAMES", "STALE_BUFFERS"]

log = logging.getLogger(__name__)

#: ``model_type`` values of the original LLaVA repository's checkpoints.
ORIGINAL_MODEL_TYPES = ("llava_llama", "llava_mistral", "llava_mpt")

# weight files of each kind, in order of preference (safetensors before pickles)
_WEIGHT_FORMATS = {
    "model": (("model.safetensors.index.json", "model.safetensors", "model-*.safetensors"),
              ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model-*.bin")),
    "adapter": (("adapter_model.safetensors",), ("adapter_model.bin",)),
}


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file of a checkpoint, with a clear error when it is broken."""
    path = Path(path)
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{str(path)!r} is missing") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not readable JSON ({exc}); download the checkpoint again") \
            from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object")
    return data


def is_original_config(cfg: dict) -> bool:
    """True for the ``config.json`` of an original-layout LLaVA checkpoint."""
    if cfg.get("model_type") in ORIGINAL_MODEL_TYPES:
        return True
    archs = cfg.get("architectures") or []
    if any(a.startswith("Llava") and a.endswith("ForCausalLM") for a in archs):
        return True
    return "mm_vision_tower" in cfg and "vision_config" not in cfg


def detect_layout(path: str | os.PathLike) -> str:
    """``"lora"``, ``"original"`` or ``"transformers"`` for the checkpoint directory ``path``.

    Raises
    ------
    CheckpointError
        If the directory holds no LLaVA checkpoint (no ``config.json`` or
        ``adapter_config.json``, or a configuration of another kind of model).
    """
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return "lora"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} has neither config.json nor adapter_config.json; pass a LLaVA "
                              "checkpoint directory or hub id")
    cfg = read_json(path / "config.json")
    if is_original_config(cfg):
        return "original"
    if cfg.get("model_type") == "llava":
        return "transformers"
    raise CheckpointError(
        f"{str(path)!r} holds a {cfg.get('model_type')!r} model ({', '.join(cfg.get('architectures') or [])}), "
        "not a LLaVA-1.5 checkpoint; AstroLLaVA loads LlavaForConditionalGeneration checkpoints (model_type "
        "'llava'), original LLaVA checkpoints (model_type 'llava_llama') and LoRA releases of either")


def _listed(directory: Path, names) -> list[Path] | None:
    """The weight files one format describes in ``directory`` (None: that format is absent)."""
    for name in names:
        if name.endswith(".index.json"):
            index = directory / name
            if index.is_file():
                shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                if not shards:
                    raise CheckpointError(f"{str(index)!r} lists no weight files")
                return [directory / s for s in shards]
        elif "*" in name:
            found = sorted(directory.glob(name))
            if found:
                return found
        elif (directory / name).is_file():
            return [directory / name]
    return None


def weight_files(directory: str | os.PathLike, kind: str = "model") -> list[Path]:
    """The weight files of a local checkpoint directory (safetensors preferred).

    Raises
    ------
    CheckpointError
        If none are present or shards listed in an index are missing.
    """
    directory = Path(directory)
    for names in _WEIGHT_FORMATS[kind]:
        files = _listed(directory, names)
        if files is not None:
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{str(directory)!r} lacks the weight shard(s) {missing} listed in its "
                                      "index; the download is incomplete")
            return files
    wanted = " or ".join(n for names in _WEIGHT_FORMATS[kind] for n in names if "*" not in n)
    raise CheckpointError(f"no weights ({wanted}) in {str(directory)!r}")


def fetch_weights(source: ResolvedCheckpoint, kind: str = "model") -> list[Path]:
    """Weight files of ``source``, downloading (or finding in the hub cache) one format for a hub id."""
    if source.repo_id is None:
        return weight_files(source.path, kind)
    for names in _WEIGHT_FORMATS[kind]:
        directory = fetch_files(source.repo_id, names, revision=source.revision)
        if _listed(directory, names) is not None:
            return weight_files(directory, kind)
    raise ModelNotFoundError(
        f"the weights of {source.repo_id!r} (revision {source.revision}) are not in the Hugging Face cache "
        f"{str(source.path.parent.parent)!r} and could not be downloaded; download them with "
        f"`{download_command(source.repo_id, source.revision)}`")


def load_weights(files) -> dict:
    """Read weight files into one state dict (safetensors, or ``.bin`` with ``weights_only=True``)."""
    import torch

    state: dict = {}
    for f in files:
        f = Path(f)
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                state.update(load_file(str(f)))
            except Exception as exc:
                raise CheckpointError(f"{str(f)!r} is not a readable safetensors file ({exc}); download it "
                                      "again") from exc
            continue
        try:
            data = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{str(f)!r} was refused: it is not a plain tensor pickle that torch.load(weights_only=True) "
                f"can read safely ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                "astrovl never unpickles code; use a safetensors copy of these weights") from exc
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{str(f)!r} does not hold a dict of tensors (a state dict)")
        state.update(data)
    return state


#: Weight names of every known LLaVA layout and their ``LlavaForConditionalGeneration`` names, as
#: (old prefix, new prefix), first match wins: the original repository's (``model.layers.*``,
#: ``model.mm_projector.{0,2}.*``, ``model.vision_tower.vision_tower.*``, ``lm_head.*``), those of
#: transformers before 4.52 (``language_model.model.*``, ``multi_modal_projector.*``, ``vision_tower.*``,
#: the layout of ``llava-hf/llava-1.5-7b-hf``) and the current ones.
KEY_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.language_model.", "model.language_model."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ("model.vision_tower.", "model.vision_tower."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("vision_tower.", "model.vision_tower."),
    ("lm_head.", "lm_head."),
    ("model.", "model.language_model."),
)

#: Weight names of a CLIP checkpoint that belong to the vision tower, and their names in
#: ``LlavaForConditionalGeneration`` (before the ``vision_model.`` level is matched to the
#: transformers version): a full ``CLIPModel`` or a ``CLIPVisionModel`` of older transformers
#: (``vision_model.*``), or a ``CLIPVisionModel`` saved by current transformers (no
#: ``vision_model.`` level). Other names (the text tower, projections, ``logit_scale``) are not
#: part of the vision tower.
TOWER_RENAMES: tuple[tuple[str, str], ...] = (
    ("vision_model.", "model.vision_tower.vision_model."),
    ("embeddings.", "model.vision_tower.vision_model.embeddings."),
    ("encoder.", "model.vision_tower.vision_model.encoder."),
    ("pre_layrnorm.", "model.vision_tower.vision_model.pre_layrnorm."),
    ("post_layernorm.", "model.vision_tower.vision_model.post_layernorm."),
)

#: Names of buffers that older transformers saved with the weights and current ones compute
#: (``LlamaRotaryEmbedding.inv_freq`` before 4.32, ``CLIPVisionEmbeddings.position_ids`` before
#: 4.31): released checkpoints hold them; they are dropped on loading.
STALE_BUFFERS: tuple[str, ...] = (r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)position_ids$")


def _renamed(key: str, table) -> str | None:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def normalize_llava_key(key: str) -> str | None:
    """Map a LLaVA weight name of any known layout to the transformers ``LlavaForConditionalGeneration`` name.

    The names are looked up in :data:`KEY_RENAMES`. Returns None for entries
    that are not weights of the model (e.g. ``optimizer_step``).

    Raises
    ------
    CheckpointError
        For projector weights of a type other than LLaVA-1.5's two-layer MLP.
    """
    if key.startswith("model.mm_projector.") and not key.startswith(("model.mm_projector.0.",
                                                                        "model.mm_projector.2.")):
        raise CheckpointError(
            f"projector weight {key!r} does not belong to the 'mlp2x_gelu' projector of LLaVA-1.5 "
            "(expected model.mm_projector.0.* and model.mm_projector.2.*); other projector types are not "
            "supported")
    return _renamed(key, KEY_RENAMES)


def tower_key(key: str) -> str | None:
    """The ``LlavaForConditionalGeneration`` name of a CLIP vision weight (None: not the vision tower).

    See :data:`TOWER_RENAMES`.
    """
    return _renamed(key, TOWER_RENAMES)


def non_persistent_buffers(model) -> set[str]:
    """Full names of the buffers of ``model`` that are not saved with its weights."""
    names = set()
    for prefix, module in model.named_modules():
        for b in getattr(module, "_non_persistent_buffers_set", ()):
            names.add(f"{prefix}.{b}" if prefix else b)
    return names


def drop_stale_buffers(state: dict, model, where: str) -> dict:
    """``state`` without the buffers a release holds that ``model`` does not load.

    A key is dropped (with a debug log) when it names a non-persistent buffer of
    ``model`` or matches :data:`STALE_BUFFERS` and is not a weight of ``model``;
    every other key is kept, so that unexpected weights are still reported.
    """
    import re

    expected = set(model.state_dict())
    buffers = non_persistent_buffers(model)
    out = {}
    for key, value in state.items():
        if key not in expected and (key in buffers or any(re.search(p, key) for p in STALE_BUFFERS)):
            log.debug("%s: dropping %r, a buffer the model computes itself", where, key)
            continue
        out[key] = value
    return out
