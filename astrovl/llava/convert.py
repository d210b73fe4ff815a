"""Convert original-layout LLaVA checkpoints to the transformers layout.

Checkpoints written by the original LLaVA repository (``LlavaLlamaForCausalLM``,
config ``model_type`` ``"llava_llama"``; ``liuhaotian/llava-v1.5-7b`` and the
released AstroLLaVA weights among them) keep the projector under
``model.mm_projector`` and usually leave the vision tower out (it is named by
``mm_vision_tower``, itself a hub id such as ``openai/clip-vit-large-patch14-336``).
transformers' ``LlavaForConditionalGeneration`` cannot read them.
:func:`convert_llava_checkpoint` renames the weights, adds the vision tower and
the ``<image>`` token, builds a ``LlavaConfig`` (a Llama text model for
``llava_llama``, Mistral for ``llava_mistral``) and a processor whose chat
template is the conversation format the checkpoint was trained with (Vicuna-v1
for LLaVA-1.5), and writes a directory :meth:`AstroLLaVA.from_pretrained` loads.

:func:`converted_checkpoint` does this once per checkpoint into the astrovl cache,
keyed by the hub id and its revision (or the directory and its files), and
reuses the result afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..exceptions import CheckpointError
from ..utils.files import atomic_directory, check_output_dir
from ..utils.imports import optional_import
from .checkpoints import fetch_weights, load_weights, normalize_llava_key, read_json
from .hub import ResolvedCheckpoint, resolve_checkpoint, resolve_reference
from .template import MISTRAL_INSTRUCT_CHAT_TEMPLATE, VICUNA_V1_CHAT_TEMPLATE

__all__ = ["convert_llava_checkpoint", "converted_checkpoint", "converted_cache_path", "rename_llava_key",
           "CONVERSION_RECORD"]

log = logging.getLogger(__name__)

#: File written into every converted directory: where it came from and how.
CONVERSION_RECORD = "astrovl_conversion.json"

# version of the conversion itself: bump when converted directories change, so caches convert again
_CONVERSION_VERSION = 2

# text-model settings copied from an original config into the transformers text config
_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
              "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling",
              "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "head_dim",
              "sliding_window", "tie_word_embeddings", "mlp_bias")

# vision-tower weights and the transformers module path they must have
_TOWER = "model.vision_tower."


def rename_llava_key(key: str) -> str | None:
    """Map one original-layout weight name to the transformers LLaVA name (None: drop it).

    See :func:`~astrovl.llava.checkpoints.normalize_llava_key`.
    """
    return normalize_llava_key(key)


def _match_vision_prefix(state: dict, expected: set) -> dict:
    """Add or drop the ``vision_model.`` level of vision-tower keys to match ``expected``.

    Older transformers nest the CLIP vision tower under ``vision_model``; newer
    versions do not. Checkpoints from either are accepted.
    """
    nested = any(k.startswith(_TOWER + "vision_model.") for k in expected)
    out = {}
    for k, v in state.items():
        if k.startswith(_TOWER):
            rest = k[len(_TOWER):]
            if nested and not rest.startswith("vision_model."):
                rest = "vision_model." + rest
            elif not nested and rest.startswith("vision_model."):
                rest = rest[len("vision_model."):]
            k = _TOWER + rest
        out[k] = v
    return out


def _cache_root() -> Path:
    from ..config import cache_path

    return cache_path("converted-llava")


def _local_fingerprint(directory: Path) -> str:
    """Identity of a local checkpoint: its path and the size and time of its files."""
    parts = [str(directory.resolve())]
    for f in sorted(directory.iterdir()):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def converted_cache_path(source: ResolvedCheckpoint | str | os.PathLike) -> Path:
    """Directory of the cached conversion of ``source``.

    Hub checkpoints are keyed by repository id and revision (commit hash), so a
    new revision converts again; local directories by their path and the size
    and modification time of their files.
    """
    if not isinstance(source, ResolvedCheckpoint):
        source = ResolvedCheckpoint(Path(source).resolve())
    if source.repo_id is not None:
        org, _, name = source.repo_id.partition("/")
        return _cache_root() / f"{org}--{name}" / str(source.revision)
    return _cache_root() / "local" / f"{source.path.name}-{_local_fingerprint(source.path)}"


def _is_conversion(path: Path) -> bool:
    """True for a conversion written before output folders were marked."""
    return (path / CONVERSION_RECORD).is_file()


def _is_complete(path: Path) -> bool:
    rec = path / CONVERSION_RECORD
    if not (rec.is_file() and (path / "config.json").is_file()):
        return False
    try:
        return json.loads(rec.read_text("utf-8")).get("conversion_version") == _CONVERSION_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def converted_checkpoint(source: ResolvedCheckpoint, *, vision_tower: str | os.PathLike | None = None) -> Path:
    """The transformers-layout conversion of ``source``, converting it the first time only."""
    target = converted_cache_path(source)
    if _is_complete(target):
        log.info("reusing the conversion of %s in %s", source.name, target)
        return target
    log.info("converting %s to the transformers layout into %s (once)", source.name, target)
    return _convert(source, target, vision_tower=vision_tower)


def _family(orig: dict, where: str) -> str:
    """``"llama"`` or ``"mistral"``: the text model of an original config, or a clear refusal."""
    mt = str(orig.get("model_type", ""))
    archs = " ".join(orig.get("architectures") or [])
    if mt == "llava_mpt" or "Mpt" in archs:
        raise CheckpointError(
            f"{where} is a LLaVA-MPT checkpoint (model_type {mt!r}); transformers has no LLaVA class for an MPT "
            "language model, so it cannot be converted. Use a LLaVA-1.5 (Llama/Vicuna) checkpoint")
    merge = str(orig.get("mm_patch_merge_type", "flat"))
    if orig.get("image_aspect_ratio") == "anyres" or merge.startswith("spatial"):
        raise CheckpointError(
            f"{where} is a LLaVA-NeXT checkpoint (image_aspect_ratio {orig.get('image_aspect_ratio')!r}, "
            f"mm_patch_merge_type {merge!r}): its any-resolution image tiling is not LLaVA-1.5's. Use its "
            "transformers conversion (e.g. llava-hf/llava-v1.6-mistral-7b-hf) with transformers' "
            "LlavaNextForConditionalGeneration instead")
    if mt == "llava_mistral" or "Mistral" in archs:
        return "mistral"
    if mt in ("llava_llama", "llava") or "Llama" in archs or not mt:
        return "llama"
    raise CheckpointError(f"{where} has model_type {mt!r}; only llava_llama and llava_mistral checkpoints "
                          "can be converted")


def _text_config(family: str, orig: dict, vocab: int):
    optional_import("transformers", purpose="converting LLaVA checkpoints")
    from transformers import LlamaConfig, MistralConfig

    cls = MistralConfig if family == "mistral" else LlamaConfig
    kwargs = {k: orig[k] for k in _TEXT_KEYS if k in orig and orig[k] is not None}
    if family == "llama":
        kwargs.pop("sliding_window", None)
    return cls(**kwargs, vocab_size=vocab)


def _vision_tower(orig: dict, state: dict, vision_tower, where: str):
    """The CLIP vision config, tower weights (if not in the checkpoint) and the tower directory."""
    optional_import("transformers", purpose="converting LLaVA checkpoints")
    from transformers import CLIPVisionConfig

    name = str(vision_tower) if vision_tower is not None else orig.get("mm_vision_tower")
    has_weights = any(k.startswith(_TOWER) for k in state)
    if name is None:
        if has_weights and orig.get("vision_config"):
            return CLIPVisionConfig(**orig["vision_config"]), {}, None
        raise CheckpointError(f"{where} names no vision tower (mm_vision_tower); pass vision_tower= a CLIP "
                              "vision model directory or hub id")
    if str(name).startswith("hf-hub:") or "siglip" in str(name).lower():
        raise CheckpointError(f"{where} uses the vision tower {name!r}, which is not an OpenAI-CLIP vision model "
                              "that LlavaForConditionalGeneration can hold")
    tower = resolve_reference(str(name), what="vision tower")
    config = CLIPVisionConfig.from_pretrained(str(tower.path))
    if has_weights:
        return config, {}, tower.path
    # a full CLIP checkpoint (vision and text towers) or a CLIPVisionModel: keep the vision weights
    weights = {}
    for key, value in load_weights(fetch_weights(tower)).items():
        if key.startswith("vision_model."):
            weights[_TOWER + key] = value
    if not weights:
        raise CheckpointError(f"the vision tower {tower.name!r} holds no CLIP vision weights (vision_model.*)")
    return config, weights, tower.path


def _check_against(model, state: dict, where: str) -> None:
    """Every expected weight present with the expected shape, nothing unexpected."""
    expected = model.state_dict()
    for k, v in state.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where}: weight {k!r} has shape {tuple(v.shape)}, but the architecture "
                                  f"built from its config.json expects {tuple(expected[k].shape)}")
    missing = sorted(k for k in expected if k not in state and not k.endswith("position_ids"))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise CheckpointError(f"{where}: the weights do not match the converted architecture: missing "
                              f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def _convert(source: ResolvedCheckpoint, dst: Path, *, vision_tower=None, dtype: str | None = None) -> Path:
    import torch
    optional_import("transformers", purpose="converting LLaVA checkpoints")
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    where = repr(source.name)
    src = source.path
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{where} has no config.json; pass an original LLaVA checkpoint directory")
    orig = read_json(cfg_path)
    if "mm_vision_tower" not in orig and orig.get("model_type") not in ("llava_llama", "llava_mistral",
                                                                          "llava_mpt"):
        raise CheckpointError(
            f"{where} does not look like an original-layout LLaVA checkpoint (no mm_vision_tower, "
            f"model_type={orig.get('model_type')!r})")
    family = _family(orig, where)
    projector = orig.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise CheckpointError(
            f"{where}: projector type {projector!r} (config mm_projector_type) is not supported; "
            "LlavaForConditionalGeneration holds LLaVA-1.5's 'mlp2x_gelu' projector (model.mm_projector.0 and .2)")
    state = {}
    for k, v in load_weights(fetch_weights(source)).items():
        nk = normalize_llava_key(k)
        if nk is not None:
            state[nk] = v
    if "model.multi_modal_projector.linear_1.weight" not in state:
        raise CheckpointError(f"{where} holds no projector weights (model.mm_projector.0.weight)")
    lm_dtype = state["model.multi_modal_projector.linear_1.weight"].dtype
    vision_config, tower_state, tower_dir = _vision_tower(orig, state, vision_tower, where)
    state.update({k: v.to(lm_dtype) for k, v in tower_state.items()})
    hidden = int(orig.get("mm_hidden_size", vision_config.hidden_size))
    if hidden != vision_config.hidden_size:
        raise CheckpointError(f"{where}: mm_hidden_size={hidden} but the vision tower has hidden_size "
                              f"{vision_config.hidden_size}; pass the vision tower it was trained with")

    # the tokenizer class comes from tokenizer_config.json (else Llama's): config.json is no transformers config
    tokenizer = AutoTokenizer.from_pretrained(str(src), config=LlamaConfig())
    added = tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}) \
        if "<image>" not in tokenizer.get_vocab() else 0
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab = max(len(tokenizer), int(orig.get("vocab_size", 0)))
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        w = state.get(name)
        if w is not None and w.shape[0] < vocab:
            extra = w.float().mean(dim=0, keepdim=True).repeat(vocab - w.shape[0], 1).to(w.dtype)
            state[name] = torch.cat([w, extra], dim=0)
    text_config = _text_config(family, orig, vocab)
    select = orig.get("mm_vision_select_feature", "patch")
    patch = vision_config.patch_size
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                         image_seq_length=(vision_config.image_size // patch) ** 2, projector_hidden_act="gelu",
                         vision_feature_layer=int(orig.get("mm_vision_select_layer", -2)),
                         vision_feature_select_strategy="default" if select == "patch" else "full",
                         multimodal_projector_bias=True)
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    state = _match_vision_prefix(state, set(model.state_dict()))
    _check_against(model, state, where)
    model.load_state_dict(state, strict=False, assign=True)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    if tower_dir is not None and (tower_dir / "preprocessor_config.json").is_file():
        image_processor = CLIPImageProcessor.from_pretrained(str(tower_dir))
    else:
        size = vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    template, conversation = (MISTRAL_INSTRUCT_CHAT_TEMPLATE, "mistral_instruct") if family == "mistral" else \
        (VICUNA_V1_CHAT_TEMPLATE, "vicuna_v1")
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=1, chat_template=template)
    for gen_key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, gen_key, None)
        if value is not None:
            setattr(model.generation_config, gen_key, value)
    with atomic_directory(dst, kind="llava-model", recognize=_is_conversion) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / CONVERSION_RECORD).write_text(json.dumps({
            "conversion_version": _CONVERSION_VERSION, "source": str(source.path), "repo_id": source.repo_id,
            "revision": source.revision, "vision_tower": str(tower_dir) if tower_dir else None,
            "image_aspect_ratio": orig.get("image_aspect_ratio", "pad"), "conversation": conversation,
            "text_model": family, "added_tokens": int(added)}, indent=2), encoding="utf-8")
    log.info("converted %s -> %s", source.name, dst)
    return dst


def convert_llava_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *,
                             vision_tower: str | os.PathLike | None = None, dtype: str | None = None,
                             revision: str | None = None) -> Path:
    """Convert an original-layout LLaVA checkpoint to the transformers layout.

    Parameters
    ----------
    src : str or path-like
        A directory or hub id (e.g. ``"UniverseTBD/AstroLLaVA_v3"``,
        ``"liuhaotian/llava-v1.5-7b"``) with ``config.json`` (``model_type``
        ``llava_llama`` or ``llava_mistral``), weights (safetensors, single or
        sharded with an index json; ``.bin`` files are read with
        ``weights_only=True``) and the tokenizer files.
    dst : path
        Output directory (written atomically). An existing folder is replaced
        only when it is empty or an earlier astrovl model or conversion; a
        folder holding anything else is refused
        (:class:`~astrovl.exceptions.OutputDirectoryError`).
    vision_tower : str or path-like, optional
        CLIP vision tower (directory or hub id) when it is not the one named by
        ``mm_vision_tower`` (which is itself resolved through the hub cache).
    dtype : str, optional
        Store weights in this dtype (e.g. ``"float16"``); default: as in ``src``.
    revision : str, optional
        Revision of a hub id.

    Returns
    -------
    pathlib.Path
        ``dst``.

    Raises
    ------
    CheckpointError
        For configurations that cannot be converted (LLaVA-MPT, LLaVA-NeXT,
        projectors other than ``mlp2x_gelu``), weights whose names or shapes do
        not fit (the message names the weight and what was expected).
    ModelNotFoundError
        When ``src`` or its vision tower is neither local nor in the hub cache.
    """
    check_output_dir(dst, "llava-model", recognize=_is_conversion)  # before the long conversion
    source = resolve_checkpoint(src, revision=revision)
    return _convert(source, Path(dst), vision_tower=vision_tower, dtype=dtype)
