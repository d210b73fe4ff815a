"""A CLIPEmbedder's image tower as a transformers ``CLIPVisionModel``, for LLaVA models.

LLaVA models see images through a CLIP vision tower in the transformers layout
(``CLIPVisionModel`` with a ``CLIPImageProcessor``). :func:`transformers_vision_tower`
writes the image tower of an open_clip Vision Transformer held by a
:class:`~astrovl.CLIPEmbedder` (a model trained with
:func:`~astrovl.training.train_clip`, say) in that layout: the same weights
renamed (the inverse of :func:`~astrovl.clip.loading.convert_transformers_clip`),
the same input size, mean and standard deviation. The tower's image embedding
(``CLIPVisionModelWithProjection``) equals the embedder's.
"""

from __future__ import annotations

from ..exceptions import CheckpointError
from ..utils.imports import optional_import

__all__ = ["vision_tower_config", "vision_tower_state", "transformers_vision_tower"]


def vision_tower_config(embedder) -> dict:
    """The ``CLIPVisionConfig`` arguments of the embedder's image tower.

    Raises
    ------
    CheckpointError
        For image towers without a transformers equivalent (ResNets, towers with
        layer scale, attention pooling or without a class token).
    """
    cfg = embedder.model_cfg
    v = dict(cfg.get("vision_cfg", {}))
    if isinstance(v.get("layers"), (list, tuple)) or "timm_model_name" in v and v["timm_model_name"]:
        raise CheckpointError(f"the image tower of {embedder.model_name!r} is not an open_clip Vision "
                              "Transformer; only those have a transformers CLIPVisionModel equivalent")
    unsupported = [k for k in ("ls_init_value", "attentional_pool", "no_ln_pre", "final_ln_after_pool")
                   if v.get(k)]
    if v.get("pool_type", "tok") != "tok" or unsupported:
        raise CheckpointError(f"the image tower of {embedder.model_name!r} uses {unsupported or v['pool_type']!r}, "
                              "which transformers' CLIPVisionModel does not have")
    width = int(v.get("width", 768))
    head_width = int(v.get("head_width", 64))
    return {"hidden_size": width, "intermediate_size": int(width * float(v.get("mlp_ratio", 4.0))),
            "num_hidden_layers": int(v.get("layers", 12)), "num_attention_heads": width // head_width,
            "image_size": int(v.get("image_size", 224)), "patch_size": int(v.get("patch_size", 16)),
            "projection_dim": int(cfg.get("embed_dim", 512)),
            "hidden_act": "quick_gelu" if cfg.get("quick_gelu") else "gelu", "layer_norm_eps": 1e-5}


def vision_tower_state(embedder) -> dict:
    """The image tower's weights under ``CLIPVisionModelWithProjection`` names (tensors on the CPU)."""
    state = {k[len("visual."):]: t.detach().cpu() for k, t in embedder.model.state_dict().items()
             if k.startswith("visual.")}
    try:
        out = {
            "vision_model.embeddings.class_embedding": state["class_embedding"],
            "vision_model.embeddings.patch_embedding.weight": state["conv1.weight"],
            "vision_model.embeddings.position_embedding.weight": state["positional_embedding"],
            "vision_model.pre_layrnorm.weight": state["ln_pre.weight"],
            "vision_model.pre_layrnorm.bias": state["ln_pre.bias"],
            "vision_model.post_layernorm.weight": state["ln_post.weight"],
            "vision_model.post_layernorm.bias": state["ln_post.bias"],
            "visual_projection.weight": state["proj"].T.contiguous(),
        }
        layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")})
        for i in layers:
            s, d = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
            for part in ("weight", "bias"):
                for name, chunk in zip("qkv", state[s + f"attn.in_proj_{part}"].chunk(3)):
                    out[d + f"self_attn.{name}_proj.{part}"] = chunk.contiguous()
                out[d + f"self_attn.out_proj.{part}"] = state[s + f"attn.out_proj.{part}"]
                out[d + f"layer_norm1.{part}"] = state[s + f"ln_1.{part}"]
                out[d + f"layer_norm2.{part}"] = state[s + f"ln_2.{part}"]
                out[d + f"mlp.fc1.{part}"] = state[s + f"mlp.c_fc.{part}"]
                out[d + f"mlp.fc2.{part}"] = state[s + f"mlp.c_proj.{part}"]
    except KeyError as exc:
        raise CheckpointError(f"the image tower of {embedder.model_name!r} lacks the open_clip Vision "
                              f"Transformer weight {exc.args[0]!r}") from exc
    return out


def transformers_vision_tower(embedder):
    """The embedder's image tower as ``(CLIPVisionModelWithProjection, CLIPImageProcessor)``.

    The processor resizes the shortest side to the tower's input size, crops the
    centre and normalises with the embedder's mean and standard deviation, as the
    embedder's own preprocessing does for square images.

    Parameters
    ----------
    embedder : CLIPEmbedder
        With an open_clip Vision Transformer image tower.

    Returns
    -------
    model : transformers.CLIPVisionModelWithProjection
        In evaluation mode, float32, on the CPU.
    processor : transformers.CLIPImageProcessor
    """
    optional_import("transformers", purpose="exporting a CLIP image tower for LLaVA")
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**vision_tower_config(embedder))
    model = CLIPVisionModelWithProjection(config)
    missing, unexpected = model.load_state_dict(vision_tower_state(embedder), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"the image tower of {embedder.model_name!r} does not map onto a CLIPVisionModel "
                              f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
    size = int(config.image_size)
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=list(embedder.image_mean), image_std=list(embedder.image_std))
    return model.eval(), processor
