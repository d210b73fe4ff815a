"""Finding CLIP weights by name: open_clip names, hub repositories, local directories.

:meth:`CLIPEmbedder.from_pretrained <astrovl.CLIPEmbedder.from_pretrained>`
resolves a name to an open_clip module, its architecture config, its
preprocessing settings and a *source*: a small JSON-serialisable record of how to
load the same weights again, which an :class:`~astrovl.EmbeddingIndex` stores so
that it can reload its model later. Sources are one of

``{"kind": "directory", "path": ...}``
    a local directory (astrovl, open_clip or transformers layout);
``{"kind": "open_clip", "name": ..., "pretrained": ...}``
    an open_clip model name with a pretrained tag or a local checkpoint file;
``{"kind": "hub", "repo_id": ..., "revision": ...}``
    a Hugging Face hub repository at a commit, in the open_clip layout
    (``open_clip_config.json`` + ``open_clip_model.safetensors``) or the
    transformers layout (``config.json`` of a ``CLIPModel`` + ``model.safetensors``).

Hub repositories are read through :func:`astrovl.utils.hub.fetch_file` (the hub's
cache), so they load offline (``HF_HUB_OFFLINE=1``) once cached. Transformers
``CLIPModel`` checkpoints are converted to the open_clip architecture with the
same numbers (:func:`convert_transformers_clip`).

An open_clip model name without a pretrained tag builds a randomly initialised
model: this warns (``UserWarning``), records no source (random weights cannot
be loaded again) and marks the weights as random
(:attr:`CLIPEmbedder.random_weights <astrovl.CLIPEmbedder.random_weights>`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..exceptions import CheckpointError, ModelNotFoundError
from ..utils.imports import optional_import

__all__ = [
    "ResolvedModel",
    "resolve_pretrained",
    "build_model",
    "convert_transformers_clip",
    "transformers_clip_config",
    "describe_source",
    "HUB_PREFIX",
    "ASTROVL_CONFIG",
    "ASTROVL_WEIGHTS",
    "OPEN_CLIP_CONFIG",
]

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
ASTROVL_CONFIG = "astrovl_clip.json"
ASTROVL_WEIGHTS = "model.safetensors"
ASTROVL_FORMAT = "astrovl-clip"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin")
TRANSFORMERS_CONFIG = "config.json"
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TRANSFORMERS_EXTRA = ("preprocessor_config.json",)
#: the CLIP byte-pair vocabulary (open_clip's SimpleTokenizer, the openai and laion CLIP models)
CLIP_BPE_VOCAB_SIZE = 49408
CLIP_BPE_SOT, CLIP_BPE_EOT = 49406, 49407


@dataclass
class ResolvedModel:
    """An open_clip module with what describes it (what :func:`resolve_pretrained` returns)."""

    model: Any
    model_name: str
    model_cfg: dict
    preprocess_cfg: dict | None
    source: dict | None
    digest: str | None = None
    #: the weights are a random initialisation (an open_clip name without a pretrained tag)
    random: bool = False


# ---------------------------------------------------------------------- building
def build_model(model_cfg: dict):
    """An open_clip module for ``model_cfg`` (astrovl's projection heads included)."""
    import open_clip

    cfg = {k: copy.deepcopy(v) for k, v in model_cfg.items() if k not in ("model_name",)}
    head = cfg.pop("projection_head", None)
    text_cfg = cfg.get("text_cfg", {})
    if "hf_model_name" in text_cfg or cfg.pop("custom_text", False):
        model = open_clip.CustomTextCLIP(**cfg)
    else:
        model = open_clip.CLIP(**cfg)
    if head:
        from .heads import HeadCLIP

        model = HeadCLIP(model, int(cfg["embed_dim"]), int(head.get("hidden", 1024)))
    return model


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from exc


def _read_state_dict(file: Path) -> dict:
    """Tensors of a safetensors file, a sharded safetensors index, or a plain tensor pickle."""
    import torch

    file = Path(file)
    try:
        if file.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(file))
        if file.name.endswith(".safetensors.index.json"):
            from safetensors.torch import load_file

            shards = sorted(set(_read_json(file)["weight_map"].values()))
            state: dict = {}
            for shard in shards:
                state.update(load_file(str(file.parent / shard)))
            return state
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(file)!r} could not be read safely ({exc}); astrovl only loads "
            "safetensors files or plain tensor checkpoints (weights_only=True)"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(file)!r} does not hold a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _load_into(model, state: dict, what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights of {what} do not match its architecture: {exc}") from exc


# ---------------------------------------------------------------------- directories
def _from_astrovl_directory(path: Path) -> ResolvedModel:
    from safetensors.torch import load_model

    from .identity import digest_from_model_id

    cfg = _read_json(path / ASTROVL_CONFIG)
    if cfg.get("format") != ASTROVL_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an astrovl CLIP directory (format={cfg.get('format')!r})")
    weights = path / ASTROVL_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{str(path)!r} has no {ASTROVL_WEIGHTS}; the save is incomplete")
    model = build_model(cfg["model_cfg"])
    try:
        load_model(model, str(weights), strict=True, device="cpu")
    except Exception as exc:
        raise CheckpointError(f"weights in {str(weights)!r} could not be loaded: {exc}") from exc
    digest = cfg.get("weights_digest") or digest_from_model_id(cfg.get("model_id"))
    return ResolvedModel(model, cfg["model_name"], cfg["model_cfg"], cfg.get("preprocess_cfg"),
                         {"kind": "directory", "path": str(path.resolve())}, digest,
                         random=bool(cfg.get("random_weights", False)))


def _from_open_clip_directory(path: Path, name: str) -> ResolvedModel:
    cfg = _read_json(path / OPEN_CLIP_CONFIG)
    model_cfg = cfg.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{str(path / OPEN_CLIP_CONFIG)!r} has no 'model_cfg'; it is not an open_clip config")
    weights = next((path / w for w in OPEN_CLIP_WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{str(path)!r} has {OPEN_CLIP_CONFIG} but no weights ({', '.join(OPEN_CLIP_WEIGHTS)})")
    model = build_model(model_cfg)
    _load_into(model, _read_state_dict(weights), repr(name))
    return ResolvedModel(model, name, copy.deepcopy(model_cfg), cfg.get("preprocess_cfg"),
                         {"kind": "directory", "path": str(path.resolve())})


def _from_transformers_directory(path: Path, name: str) -> ResolvedModel:
    weights = next((path / w for w in TRANSFORMERS_WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{str(path)!r} has a transformers config but no weights "
                              f"({', '.join(TRANSFORMERS_WEIGHTS)})")
    model_cfg, pp = transformers_clip_config(path)
    model = build_model(model_cfg)
    _load_into(model, convert_transformers_clip(_read_state_dict(weights)), repr(name))
    return ResolvedModel(model, name, model_cfg, pp, {"kind": "directory", "path": str(path.resolve())})


def _from_directory(path: Path, name: str | None = None) -> ResolvedModel:
    name = name or path.name
    if (path / ASTROVL_CONFIG).is_file():
        return _from_astrovl_directory(path)
    if (path / OPEN_CLIP_CONFIG).is_file():
        return _from_open_clip_directory(path, name)
    if (path / TRANSFORMERS_CONFIG).is_file():
        return _from_transformers_directory(path, name)
    raise ModelNotFoundError(
        f"directory {str(path)!r} holds no CLIP model: expected {ASTROVL_CONFIG} (written by "
        f"CLIPEmbedder.save_pretrained), {OPEN_CLIP_CONFIG} (open_clip layout) or {TRANSFORMERS_CONFIG} "
        "of a transformers CLIPModel"
    )


# ---------------------------------------------------------------------- transformers CLIP
def transformers_clip_config(path: str | os.PathLike) -> tuple[dict, dict]:
    """open_clip ``model_cfg`` and ``preprocess_cfg`` for a transformers ``CLIPModel`` directory.

    Raises
    ------
    CheckpointError
        If the config is not a CLIP model, or describes something the open_clip
        architecture cannot reproduce exactly.
    """
    path = Path(path)
    raw = _read_json(path / TRANSFORMERS_CONFIG)
    if raw.get("model_type") != "clip":
        raise CheckpointError(
            f"{str(path / TRANSFORMERS_CONFIG)!r} describes model_type={raw.get('model_type')!r}; "
            "astrovl converts transformers checkpoints of model_type 'clip' (CLIPModel) only"
        )
    optional_import("transformers", purpose="converting a transformers-layout CLIP checkpoint")
    from transformers import CLIPConfig

    cfg = CLIPConfig.from_dict(raw)
    t, v = cfg.text_config, cfg.vision_config
    what = str(path)
    if t.hidden_act != v.hidden_act or t.hidden_act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{what}: activations {t.hidden_act!r}/{v.hidden_act!r} have no open_clip equivalent")
    if t.vocab_size != CLIP_BPE_VOCAB_SIZE:
        raise CheckpointError(
            f"{what}: the text vocabulary has {t.vocab_size} tokens; astrovl converts CLIP checkpoints "
            f"that use the CLIP byte-pair vocabulary ({CLIP_BPE_VOCAB_SIZE} tokens)"
        )

    def tower(c, extra: dict) -> dict:
        if c.hidden_size % c.num_attention_heads:
            raise CheckpointError(f"{what}: hidden_size {c.hidden_size} is not a multiple of the heads")
        ratio = c.intermediate_size / c.hidden_size
        if int(c.hidden_size * ratio) != c.intermediate_size:
            raise CheckpointError(f"{what}: intermediate_size {c.intermediate_size} cannot be expressed as a ratio")
        out = {"width": c.hidden_size, "layers": c.num_hidden_layers, "mlp_ratio": ratio, **extra}
        if abs(float(c.layer_norm_eps) - 1e-5) > 1e-12:
            out["norm_kwargs"] = {"eps": float(c.layer_norm_eps)}
        return out

    eos = t.eos_token_id
    if eos == 2:  # the legacy configs: the end-of-text token is the largest id (transformers' rule)
        pool = {"pool_type": "argmax"}
    elif eos == CLIP_BPE_EOT:
        pool = {"pool_type": "eos", "eos_id": CLIP_BPE_EOT}
    else:
        raise CheckpointError(f"{what}: eos_token_id={eos!r} is not the CLIP end-of-text token")
    model_cfg = {
        "embed_dim": int(cfg.projection_dim),
        "quick_gelu": t.hidden_act == "quick_gelu",
        "vision_cfg": tower(v, {"image_size": v.image_size, "patch_size": v.patch_size,
                                "head_width": v.hidden_size // v.num_attention_heads}),
        "text_cfg": tower(t, {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size,
                              "heads": t.num_attention_heads, **pool}),
    }
    pp: dict = {"size": int(v.image_size), "resize_mode": "shortest", "interpolation": "bicubic"}
    proc = path / "preprocessor_config.json"
    if proc.is_file():
        p = _read_json(proc)
        if p.get("image_mean") and p.get("image_std"):
            pp["mean"], pp["std"] = list(p["image_mean"]), list(p["image_std"])
        resample = p.get("resample")
        if resample is not None:
            pp["interpolation"] = {2: "bilinear", 3: "bicubic"}.get(int(resample), "bicubic")
    return model_cfg, pp


def convert_transformers_clip(state: dict) -> dict:
    """Rename and reshape a transformers ``CLIPModel`` state dict into open_clip's ``CLIP`` keys.

    Query, key and value projections are concatenated into ``in_proj_weight`` /
    ``in_proj_bias``; the projection matrices are transposed.
    """
    import torch

    def blocks(src: str, dst: str) -> None:
        layers = sorted({int(k[len(src):].split(".")[0]) for k in state if k.startswith(src)})
        for i in layers:
            s, d = f"{src}{i}.", f"{dst}{i}."
            for part in ("weight", "bias"):
                out[d + f"attn.in_proj_{part}"] = torch.cat(
                    [state[s + f"self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")])
                out[d + f"attn.out_proj.{part}"] = state[s + f"self_attn.out_proj.{part}"]
                out[d + f"ln_1.{part}"] = state[s + f"layer_norm1.{part}"]
                out[d + f"ln_2.{part}"] = state[s + f"layer_norm2.{part}"]
                out[d + f"mlp.c_fc.{part}"] = state[s + f"mlp.fc1.{part}"]
                out[d + f"mlp.c_proj.{part}"] = state[s + f"mlp.fc2.{part}"]

    try:
        out = {
            "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
            "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
            "ln_final.weight": state["text_model.final_layer_norm.weight"],
            "ln_final.bias": state["text_model.final_layer_norm.bias"],
            "text_projection": state["text_projection.weight"].T.contiguous(),
            "logit_scale": state["logit_scale"],
            "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
            "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
            "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
            "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
            "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
            "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
            "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
            "visual.proj": state["visual_projection.weight"].T.contiguous(),
        }
        blocks("text_model.encoder.layers.", "transformer.resblocks.")
        blocks("vision_model.encoder.layers.", "visual.transformer.resblocks.")
    except KeyError as exc:
        raise CheckpointError(
            f"the checkpoint is not a transformers CLIPModel: tensor {exc.args[0]!r} is missing"
        ) from exc
    return out


# ---------------------------------------------------------------------- the hub
def _looks_like_hub_id(name: str) -> bool:
    from ..utils.hub import looks_like_repo_id

    return looks_like_repo_id(name)


def _hub_download(repo_id: str, filename: str, revision: str | None, cache_dir) -> Path:
    from ..utils.hub import fetch_file

    return fetch_file(repo_id, filename, revision=revision, cache_dir=cache_dir)


def _from_hub(repo_id: str, revision: str | None, cache_dir) -> ResolvedModel:
    """Download (or find in the cache) the files of ``repo_id`` and load its snapshot directory."""
    errors = []
    for config, weights, extras, fmt in (
            (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, (), "open_clip"),
            (TRANSFORMERS_CONFIG, TRANSFORMERS_WEIGHTS, TRANSFORMERS_EXTRA, "transformers")):
        try:
            cfg_path = _hub_download(repo_id, config, revision, cache_dir)
        except Exception as exc:  # missing file, unknown repository, offline without cache
            errors.append(f"{config}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        snapshot = cfg_path.parent
        commit = snapshot.name
        for w in weights:
            try:
                path = _hub_download(repo_id, w, commit, cache_dir)
            except Exception as exc:
                errors.append(f"{w}: {type(exc).__name__}")
                continue
            if w.endswith(".index.json"):
                for shard in sorted(set(_read_json(path)["weight_map"].values())):
                    _hub_download(repo_id, shard, commit, cache_dir)
            break
        else:
            raise ModelNotFoundError(
                f"hub repository {repo_id!r} has {config} but none of the weight files "
                f"{', '.join(weights)} could be found ({'; '.join(errors)})"
            )
        for extra in extras:
            try:
                _hub_download(repo_id, extra, commit, cache_dir)
            except Exception:  # optional files
                log.debug("%s has no %s", repo_id, extra)
        resolved = (_from_open_clip_directory(snapshot, f"{HUB_PREFIX}{repo_id}") if fmt == "open_clip"
                    else _from_transformers_directory(snapshot, repo_id))
        resolved.source = {"kind": "hub", "repo_id": repo_id, "revision": commit, "format": fmt}
        return resolved
    raise ModelNotFoundError(
        f"{repo_id!r} could not be loaded from the Hugging Face hub (revision={revision!r}): "
        f"{'; '.join(errors)}. Offline (HF_HUB_OFFLINE=1) a repository loads only when its files "
        "are in the hub cache; otherwise pass a local directory or an open_clip name with a "
        "pretrained tag"
    )


# ---------------------------------------------------------------------- open_clip names
def _from_open_clip_name(name: str, pretrained: str | None, cache_dir) -> ResolvedModel:
    import open_clip

    try:
        model = open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir,
                                       require_pretrained=pretrained is not None)
    except Exception as exc:  # network errors, missing tags, hub errors
        raise ModelNotFoundError(
            f"could not load CLIP weights {name!r} (pretrained={pretrained!r}): {exc}. Offline, "
            "pass a directory written by CLIPEmbedder.save_pretrained, a local open_clip "
            "checkpoint file as pretrained='/path/to/weights.safetensors', or use "
            "CLIPEmbedder.from_config for an untrained model"
        ) from exc
    model_cfg = copy.deepcopy(open_clip.get_model_config(name))
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    if not pretrained:
        _warn_random_weights(name)
        return ResolvedModel(model, name, model_cfg, pp, None, random=True)
    return ResolvedModel(model, name, model_cfg, pp, {"kind": "open_clip", "name": name, "pretrained": pretrained})


def _warn_random_weights(name: str) -> None:
    """Warn (``UserWarning``) that the open_clip model ``name`` was built without pretrained weights."""
    import warnings

    tags = _pretrained_tags(name)
    hint = f" (its tags: {', '.join(repr(t) for t in tags[:6])}{', ...' if len(tags) > 6 else ''})" if tags else ""
    warnings.warn(
        f"CLIP model {name!r} has no pretrained weights: without pretrained= it is randomly initialised, "
        f"and its embeddings carry no meaning. Pass a pretrained tag{hint} or a checkpoint file as "
        f"pretrained=, or build an untrained model on purpose with CLIPEmbedder.from_config({name!r})",
        UserWarning, stacklevel=5)  # the caller of CLIPEmbedder.from_pretrained


def _pretrained_tags(name: str) -> list[str]:
    import open_clip

    try:
        return list(open_clip.list_pretrained_tags_by_model(name))
    except Exception:  # an older open_clip without the listing: the message goes without tags
        return []


def _from_checkpoint_file(name: str, file: Path) -> ResolvedModel:
    import open_clip

    model_cfg = copy.deepcopy(open_clip.get_model_config(name))
    if model_cfg is None:
        raise ModelNotFoundError(f"{name!r} is not an open_clip model name (see open_clip.list_models())")
    model = build_model(model_cfg)
    _load_into(model, _read_state_dict(file), f"checkpoint {str(file)!r} for {name!r}")
    return ResolvedModel(model, name, model_cfg, None,
                         {"kind": "open_clip", "name": name, "pretrained": str(file.resolve())})


# ---------------------------------------------------------------------- entry point
def resolve_pretrained(name: str | os.PathLike, pretrained: str | None = None, *,
                       revision: str | None = None, cache_dir: str | None = None) -> ResolvedModel:
    """Resolve ``name`` to an open_clip module (see :meth:`CLIPEmbedder.from_pretrained`).

    Order: an existing local directory; an open_clip model name (with a pretrained
    tag or checkpoint file); ``hf-hub:ORG/NAME`` or ``ORG/NAME`` on the hub.
    """
    import open_clip

    from ..utils.hub import directory_not_found, is_local_name

    path = Path(os.path.expanduser(str(name)))
    if path.is_dir():
        return _from_directory(path)
    if str(name).startswith(HUB_PREFIX):
        repo_id = str(name)[len(HUB_PREFIX):]
        if not _looks_like_hub_id(repo_id):
            raise ModelNotFoundError(f"{name!r}: write hub repositories as 'hf-hub:ORG/NAME'")
        return _from_hub(repo_id, revision, cache_dir)
    if is_local_name(name):
        raise directory_not_found(name, "CLIP model")
    name = str(name)
    if open_clip.get_model_config(name) is not None:
        if pretrained is not None and Path(pretrained).is_file():
            return _from_checkpoint_file(name, Path(pretrained))
        return _from_open_clip_name(name, pretrained, cache_dir)
    if _looks_like_hub_id(name):
        return _from_hub(name, revision, cache_dir)
    raise ModelNotFoundError(
        f"{name!r} is neither a saved astrovl model directory, an open_clip model name nor a "
        "hub repository; pass a directory written by save_pretrained, an open_clip name such as "
        "'ViT-B-16' with pretrained='openai', 'hf-hub:ORG/NAME', or a transformers CLIP hub id "
        "such as 'openai/clip-vit-base-patch16'"
    )


def describe_source(source: dict | None) -> str:
    """How to load the model of ``source`` again, as a Python call (for messages)."""
    if not source:
        return "a model that was never saved"
    kind = source.get("kind")
    if kind == "directory":
        return f"CLIPEmbedder.from_pretrained({source['path']!r})"
    if kind == "open_clip":
        return f"CLIPEmbedder.from_pretrained({source['name']!r}, {source.get('pretrained')!r})"
    if kind == "hub":
        return f"CLIPEmbedder.from_pretrained({source['repo_id']!r}, revision={source.get('revision')!r})"
    return repr(source)
