"""Convert original-layout LLaVA checkpoints to the transformers layout.

Checkpoints written by the original LLaVA repository (``LlavaLlamaForCausalLM``,
config ``model_type`` ``"llava_llama"``; the released AstroLLaVA weights among
them) keep the projector under ``model.mm_projector`` and usually leave the
vision tower out (it is loaded from ``mm_vision_tower``). transformers'
``LlavaForConditionalGeneration`` cannot read them. :func:`convert_llava_checkpoint`
renames the weights, adds the ``<image>`` token, builds a ``LlavaConfig`` and a
processor with the LLaVA-1.5 chat template, and writes a directory that
:meth:`AstroLLaVA.from_pretrained` loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..exceptions import CheckpointError
from ..utils.files import atomic_directory
from .template import LLAVA_CHAT_TEMPLATE

__all__ = ["convert_llava_checkpoint", "rename_llava_key", "converted_cache_path"]

log = logging.getLogger(__name__)


def rename_llava_key(key: str) -> str | None:
    """Map one original-layout weight name to the transformers LLaVA name (None: drop it)."""
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        idx, _, param = rest.partition(".")
        layer = {"0": "linear_1", "2": "linear_2"}.get(idx)
        if layer is None:
            raise CheckpointError(f"unexpected projector weight {key!r}; only the mlp2x_gelu projector is supported")
        return f"model.multi_modal_projector.{layer}.{param}"
    if key.startswith("model.vision_tower.vision_tower."):
        return "model.vision_tower." + key[len("model.vision_tower.vision_tower."):]
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("lm_head."):
        return key
    return None


def _match_vision_prefix(state: dict, expected: set) -> dict:
    """Add or drop the ``vision_model.`` level of vision-tower keys to match ``expected``.

    Older transformers nest the CLIP vision tower under ``vision_model``; newer
    versions do not. Checkpoints from either are accepted.
    """
    tower = "model.vision_tower."
    nested = any(k.startswith(tower + "vision_model.") for k in expected)
    out = {}
    for k, v in state.items():
        if k.startswith(tower):
            rest = k[len(tower):]
            if nested and not rest.startswith("vision_model."):
                rest = "vision_model." + rest
            elif not nested and rest.startswith("vision_model."):
                rest = rest[len("vision_model."):]
            k = tower + rest
        out[k] = v
    return out


def _load_state_dict(src: Path) -> dict:
    import torch

    files = sorted(src.glob("*.safetensors"))
    state: dict = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"no weights (*.safetensors or pytorch_model*.bin) in {str(src)!r}")
    for f in bins:
        try:
            state.update(torch.load(str(f), map_location="cpu", weights_only=True))
        except Exception as exc:
            raise CheckpointError(f"{str(f)!r} could not be read safely (weights_only=True): {exc}") from exc
    return state


def converted_cache_path(src: str | os.PathLike) -> Path:
    """Cache directory used by ``AstroLLaVA.from_pretrained(..., convert=True)``."""
    from ..config import conf

    src = Path(src).resolve()
    base = Path(conf.cache_dir) if conf.cache_dir else _default_cache()
    digest = hashlib.sha256(str(src).encode()).hexdigest()[:16]
    return base / "converted-llava" / f"{src.name}-{digest}"


def _default_cache() -> Path:
    from astropy.config import get_cache_dir_path

    return Path(get_cache_dir_path("astrovl"))


def convert_llava_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *,
                             vision_tower: str | os.PathLike | None = None, dtype: str | None = None) -> Path:
    """Convert an original-layout LLaVA checkpoint directory to the transformers layout.

    Parameters
    ----------
    src : path
        Directory with ``config.json`` (``model_type`` ``llava_llama``), weights
        (safetensors, single or sharded; ``.bin`` files are read with
        ``weights_only=True``) and the tokenizer files.
    dst : path
        Output directory (written atomically).
    vision_tower : path, optional
        Local directory of the CLIP vision tower (``CLIPVisionModel``), when its
        weights are not inside ``src``. Defaults to ``mm_vision_tower`` from the
        config if that is a local directory.
    dtype : str, optional
        Store weights in this dtype (e.g. ``"float16"``); default: as in ``src``.

    Returns
    -------
    pathlib.Path
        ``dst``.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(src)!r} has no config.json; pass an original LLaVA checkpoint directory")
    orig = json.loads(cfg_path.read_text("utf-8"))
    if "mm_vision_tower" not in orig and orig.get("model_type") not in ("llava_llama",):
        raise CheckpointError(
            f"{str(src)!r} does not look like an original-layout LLaVA checkpoint (no mm_vision_tower, "
            f"model_type={orig.get('model_type')!r})"
        )
    projector = orig.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise CheckpointError(f"projector type {projector!r} is not supported; LLaVA-1.5 uses 'mlp2x_gelu'")
    state = _load_state_dict(src)
    new_state = {}
    for k, v in state.items():
        nk = rename_llava_key(k)
        if nk is not None:
            new_state[nk] = v
    if "model.multi_modal_projector.linear_1.weight" not in new_state:
        raise CheckpointError(f"no mm_projector weights found in {str(src)!r}")

    has_vision = any(k.startswith("model.vision_tower.") for k in new_state)
    vt_path = Path(vision_tower) if vision_tower is not None else Path(str(orig.get("mm_vision_tower", "")))
    if has_vision:
        vcfg_dict = orig.get("vision_config")
        if vcfg_dict is None:
            if not (vt_path / "config.json").is_file():
                raise CheckpointError("the vision tower weights are present but its configuration is not; "
                                      "pass vision_tower= a directory with the CLIP vision config")
            vision_config = CLIPVisionConfig.from_pretrained(str(vt_path))
        else:
            vision_config = CLIPVisionConfig(**vcfg_dict)
    else:
        if not vt_path.is_dir():
            raise CheckpointError(
                f"the checkpoint has no vision tower weights and mm_vision_tower={str(vt_path)!r} is not a "
                "local directory; download the CLIP vision tower (e.g. openai/clip-vit-large-patch14-336) and "
                "pass vision_tower=PATH"
            )
        vt = CLIPVisionModel.from_pretrained(str(vt_path))
        vision_config = vt.config
        for k, v in vt.state_dict().items():
            new_state["model.vision_tower." + k] = v

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    added = tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}) if \
        "<image>" not in tokenizer.get_vocab() else 0
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab = max(len(tokenizer), int(orig.get("vocab_size", 0)))
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        w = new_state[name]
        if w.shape[0] < vocab:
            extra = w.float().mean(dim=0, keepdim=True).repeat(vocab - w.shape[0], 1).to(w.dtype)
            new_state[name] = torch.cat([w, extra], dim=0)
    text_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "rope_theta",
                 "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias")
    text_config = LlamaConfig(**{k: orig[k] for k in text_keys if k in orig}, vocab_size=vocab)
    select = orig.get("mm_vision_select_feature", "patch")
    patch = vision_config.patch_size
    n_tokens = (vision_config.image_size // patch) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                         image_seq_length=n_tokens, projector_hidden_act="gelu",
                         vision_feature_layer=int(orig.get("mm_vision_select_layer", -2)),
                         vision_feature_select_strategy="default" if select == "patch" else "full",
                         multimodal_projector_bias=True)
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    new_state = _match_vision_prefix(new_state, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(new_state, strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the converted architecture: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    if (vt_path / "preprocessor_config.json").is_file():
        image_processor = CLIPImageProcessor.from_pretrained(str(vt_path))
    else:
        size = vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    dst = Path(dst)
    with atomic_directory(dst) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "astrovl_conversion.json").write_text(json.dumps({
            "source": str(src), "image_aspect_ratio": orig.get("image_aspect_ratio", "pad"),
            "added_tokens": int(added)}, indent=2), encoding="utf-8")
    log.info("converted %s -> %s", src, dst)
    return dst
