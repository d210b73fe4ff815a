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
from ..utils.files import LLAVA_MODEL_OUTPUT, atomic_directory, check_output_dir
from ..utils.imports import optional_import
from .checkpoints import (
    drop_stale_buffers,
    fetch_weights,
    load_weights,
    normalize_llava_key,
    read_json,
    tower_key,
)
from .hub import ResolvedCheckpoint, resolve_checkpoint, resolve_reference
from .template import MISTRAL_INSTRUCT_CHAT_TEMPLATE, VICUNA_V1_CHAT_TEMPLATE

__all__ = ["convert_llava_checkpoint", "converted_checkpoint", "converted_cache_path", "rename_llava_key",
           "resolve_vision_tower", "source_identity", "prompt_tokenization", "CONVERSION_RECORD", "LLAVA_CHUNKS"]

log = logging.getLogger(__name__)

#: File written into every converted directory: where it came from and how.
CONVERSION_RECORD = "astrovl_conversion.json"

# version of the conversion itself: bump when converted directories change, so caches convert again
_CONVERSION_VERSION = 3

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
    """Digest of a local checkpoint: its path, the content of its small files (configurations,
    tokenizer) and the name, size and modification time of the others (weights)."""
    h = hashlib.sha256(str(directory.resolve()).encode())
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"\n{f.relative_to(directory)}:{st.st_size}".encode())
        if st.st_size <= _SMALL_FILE:
            h.update(f.read_bytes())
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


# files up to this size are digested by content, larger ones (weights) by size and time
_SMALL_FILE = 1 << 20


def source_identity(source: ResolvedCheckpoint | None) -> str:
    """What identifies a checkpoint's content: ``repo_id@revision``, or its path and digest."""
    if source is None:
        return "none"
    if source.repo_id is not None:
        return f"{source.repo_id}@{source.revision}"
    return f"{source.path}#{_local_fingerprint(source.path)}"


def _source_dir(source: ResolvedCheckpoint) -> Path:
    if source.repo_id is not None:
        org, _, name = source.repo_id.partition("/")
        return Path(f"{org}--{name}") / str(source.revision)
    return Path("local") / f"{source.path.name}-{_local_fingerprint(source.path)}"


def resolve_vision_tower(config: dict, vision_tower: str | os.PathLike | None = None) -> ResolvedCheckpoint | None:
    """The CLIP vision tower a conversion uses: ``vision_tower`` when given, else ``mm_vision_tower``.

    Returns None when neither names one. Hub towers are resolved through the hub
    cache (configurations only); a training-machine path that names a known
    release is replaced by its hub id (with a warning).
    """
    name = str(vision_tower) if vision_tower is not None else config.get("mm_vision_tower")
    if name is None:
        return None
    if str(name).startswith("hf-hub:") or "siglip" in str(name).lower():
        raise CheckpointError(f"the vision tower {name!r} is not an OpenAI-CLIP vision model that "
                              "LlavaForConditionalGeneration can hold")
    if vision_tower is not None:
        return resolve_checkpoint(vision_tower)
    return resolve_reference(str(name), what="vision tower")


def converted_cache_path(source: ResolvedCheckpoint | str | os.PathLike, *,
                         vision_tower: ResolvedCheckpoint | str | os.PathLike | None = None,
                         base: ResolvedCheckpoint | None = None, replace_tower: bool | None = None) -> Path:
    """Directory of the cached conversion of ``source`` with its vision tower (and base).

    The key holds everything that changes the result: the checkpoint (hub id and
    revision, or local path and digest), the resolved vision tower (the same)
    and, for a LoRA release of a plain language model, that base model.
    ``vision_tower`` defaults to the tower the checkpoint names
    (``mm_vision_tower``); ``replace_tower`` (default: whether ``vision_tower``
    is given) says that the tower replaces tower weights the checkpoint holds.
    """
    if not isinstance(source, ResolvedCheckpoint):
        source = ResolvedCheckpoint(Path(source).resolve())
    if replace_tower is None:
        replace_tower = vision_tower is not None
    tower = vision_tower
    if not isinstance(tower, ResolvedCheckpoint):
        cfg = read_json(source.path / "config.json") if (source.path / "config.json").is_file() else {}
        tower = resolve_vision_tower(cfg, tower)
    parts = [f"tower={source_identity(tower)}", f"replace_tower={bool(replace_tower)}"]
    if base is not None:
        parts.append(f"base={source_identity(base)}")
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    label = "tower" if base is None else "base-tower"
    return _cache_root() / _source_dir(source) / f"{label}-{key}"


def _is_complete(path: Path) -> bool:
    rec = path / CONVERSION_RECORD
    if not (rec.is_file() and (path / "config.json").is_file()):
        return False
    try:
        return json.loads(rec.read_text("utf-8")).get("conversion_version") == _CONVERSION_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def converted_checkpoint(source: ResolvedCheckpoint, *, vision_tower: str | os.PathLike | None = None,
                         base: ResolvedCheckpoint | None = None, extra_state: dict | None = None) -> Path:
    """The transformers-layout conversion of ``source``, converting it the first time only.

    Parameters
    ----------
    source : ResolvedCheckpoint
        An original-layout checkpoint, or (with ``base``) the LoRA release whose
        LLaVA ``config.json`` describes the model.
    vision_tower : str or path-like, optional
        Replaces the tower the checkpoint names (and any tower weights it holds).
    base : ResolvedCheckpoint, optional
        A plain language model (``model_type`` ``llama``) whose weights and
        tokenizer make the language model, for a LoRA release of one.
    extra_state : dict, optional
        Weights (transformers names) added to the base's, e.g. the release's projector.
    """
    config = read_json(source.path / "config.json")
    tower = resolve_vision_tower(config, vision_tower)
    target = converted_cache_path(source, vision_tower=tower, base=base, replace_tower=vision_tower is not None)
    if _is_complete(target):
        log.info("reusing the conversion of %s in %s", source.name, target)
        return target
    log.info("converting %s to the transformers layout into %s (once)", source.name, target)
    return _convert(source, target, tower=tower, base=base, extra_state=extra_state,
                    explicit_tower=vision_tower is not None)


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


def _vision_tower(orig: dict, state: dict, tower: ResolvedCheckpoint | None, explicit: bool, where: str):
    """The CLIP vision config and the tower weights to add (none when the checkpoint holds its own).

    An explicit ``vision_tower=`` replaces tower weights the checkpoint holds.
    Both layouts of CLIP vision weights are read (:data:`~astrovl.llava.checkpoints.TOWER_RENAMES`).
    """
    optional_import("transformers", purpose="converting LLaVA checkpoints")
    from transformers import CLIPVisionConfig

    has_weights = any(k.startswith(_TOWER) for k in state)
    if tower is None:
        if has_weights and orig.get("vision_config"):
            return CLIPVisionConfig(**orig["vision_config"]), {}
        raise CheckpointError(f"{where} names no vision tower (mm_vision_tower); pass vision_tower= a CLIP "
                              "vision model directory or hub id")
    config = CLIPVisionConfig.from_pretrained(str(tower.path))
    if has_weights and not explicit:
        return config, {}
    if has_weights:
        log.info("%s: replacing the vision tower weights it holds with those of %s", where, tower.name)
        for k in [k for k in state if k.startswith(_TOWER)]:
            del state[k]
    # a full CLIP checkpoint (vision and text towers) or a CLIPVisionModel of either layout
    weights = {}
    for key, value in load_weights(fetch_weights(tower)).items():
        name = tower_key(key)
        if name is not None:
            weights[name] = value
    if not weights:
        raise CheckpointError(f"the vision tower {tower.name!r} holds no CLIP vision weights (vision_model.*, "
                              "or embeddings.* and encoder.* of a CLIPVisionModel)")
    return config, weights


def _check_against(model, state: dict, where: str) -> dict:
    """``state`` without stale buffers; every expected weight present with its shape, nothing unexpected."""
    state = drop_stale_buffers(state, model, where)
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
    return state


def _read_original_config(source: ResolvedCheckpoint, where: str) -> dict:
    cfg_path = source.path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{where} has no config.json; pass an original LLaVA checkpoint directory")
    orig = read_json(cfg_path)
    if "mm_vision_tower" not in orig and orig.get("model_type") not in ("llava_llama", "llava_mistral",
                                                                          "llava_mpt"):
        raise CheckpointError(
            f"{where} does not look like an original-layout LLaVA checkpoint (no mm_vision_tower, "
            f"model_type={orig.get('model_type')!r})")
    projector = orig.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise CheckpointError(
            f"{where}: projector type {projector!r} (config mm_projector_type) is not supported; "
            "LlavaForConditionalGeneration holds LLaVA-1.5's 'mlp2x_gelu' projector (model.mm_projector.0 and .2)")
    return orig


def _renamed_state(weights_source: ResolvedCheckpoint, extra_state: dict | None, where: str) -> dict:
    """The weights of ``weights_source`` under transformers names, with ``extra_state`` added."""
    state = {}
    for k, v in load_weights(fetch_weights(weights_source)).items():
        nk = normalize_llava_key(k)
        if nk is not None:
            state[nk] = v
    state.update(extra_state or {})
    if "model.multi_modal_projector.linear_1.weight" not in state:
        raise CheckpointError(f"{where} holds no projector weights (model.mm_projector.0.weight)")
    return state


def _llava_tokenizer(directory: Path):
    """The checkpoint's tokenizer with ``<image>`` added (and a pad token), and how many tokens were added."""
    from transformers import AutoTokenizer, LlamaConfig

    # the tokenizer class comes from tokenizer_config.json (else Llama's): config.json is no transformers config
    tokenizer = AutoTokenizer.from_pretrained(str(directory), config=LlamaConfig())
    added = tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}) \
        if "<image>" not in tokenizer.get_vocab() else 0
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer, int(added)


def _grow_vocabulary(state: dict, vocab: int) -> None:
    """Rows for added tokens (their mean) in the embeddings and the output layer."""
    import torch

    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        w = state.get(name)
        if w is not None and w.shape[0] < vocab:
            extra = w.float().mean(dim=0, keepdim=True).repeat(vocab - w.shape[0], 1).to(w.dtype)
            state[name] = torch.cat([w, extra], dim=0)


def _convert(source: ResolvedCheckpoint, dst: Path, *, tower: ResolvedCheckpoint | None,
             explicit_tower: bool = False, base: ResolvedCheckpoint | None = None,
             extra_state: dict | None = None, dtype: str | None = None) -> Path:
    """Convert ``source`` (its config; weights and tokenizer from ``base`` when given) into ``dst``."""
    import torch
    optional_import("transformers", purpose="converting LLaVA checkpoints")
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    where = repr(source.name)
    orig = _read_original_config(source, where)
    family = _family(orig, where)
    weights_source = base if base is not None else source
    state = _renamed_state(weights_source, extra_state, where)
    lm_dtype = state["model.multi_modal_projector.linear_1.weight"].dtype
    if base is not None:  # the language model's own dtype, not the release projector's
        lm_dtype = state.get("lm_head.weight", state["model.multi_modal_projector.linear_1.weight"]).dtype
    vision_config, tower_state = _vision_tower(orig, state, tower, explicit_tower, where)
    state.update({k: v.to(lm_dtype) for k, v in tower_state.items()})
    hidden = int(orig.get("mm_hidden_size", vision_config.hidden_size))
    if hidden != vision_config.hidden_size:
        raise CheckpointError(f"{where}: mm_hidden_size={hidden} but the vision tower has hidden_size "
                              f"{vision_config.hidden_size}; pass the vision tower it was trained with")
    tokenizer, added = _llava_tokenizer(weights_source.path)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab = max(len(tokenizer), int(orig.get("vocab_size", 0)))
    _grow_vocabulary(state, vocab)
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
    state = _check_against(model, state, where)
    state = {k: v.to(lm_dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    if tower is not None and (tower.path / "preprocessor_config.json").is_file():
        image_processor = CLIPImageProcessor.from_pretrained(str(tower.path))
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
    record = {"conversion_version": _CONVERSION_VERSION, "source": str(source.path), "repo_id": source.repo_id,
              "revision": source.revision, "source_identity": source_identity(source),
              "vision_tower": str(tower.path) if tower else None, "vision_tower_identity": source_identity(tower),
              "base": source_identity(base) if base is not None else None,
              "image_aspect_ratio": orig.get("image_aspect_ratio", "pad"), "conversation": conversation,
              "prompt_tokenization": LLAVA_CHUNKS, "text_model": family, "added_tokens": added}
    with atomic_directory(dst, kind=LLAVA_MODEL_OUTPUT) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    log.info("converted %s -> %s", source.name, dst)
    return dst


#: ``prompt_tokenization`` of a converted original checkpoint: the text around each ``<image>``
#: is tokenized chunk by chunk, as the original LLaVA code does (``tokenizer_image_token``).
LLAVA_CHUNKS = "llava_chunks"


def prompt_tokenization(directory: str | os.PathLike) -> str | None:
    """How prompts of the model in ``directory`` are tokenized: :data:`LLAVA_CHUNKS` or None (its processor's way).

    Read from the record of a conversion (or of :meth:`AstroLLaVA.save_pretrained`).
    """
    rec = Path(directory) / CONVERSION_RECORD
    if not rec.is_file():
        return None
    try:
        return json.loads(rec.read_text("utf-8")).get("prompt_tokenization")
    except (OSError, json.JSONDecodeError):
        return None


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
    check_output_dir(dst, LLAVA_MODEL_OUTPUT)  # before the long conversion
    source = resolve_checkpoint(src, revision=revision)
    tower = resolve_vision_tower(_read_original_config(source, repr(source.name)), vision_tower)
    return _convert(source, Path(dst), tower=tower, explicit_tower=vision_tower is not None, dtype=dtype)
