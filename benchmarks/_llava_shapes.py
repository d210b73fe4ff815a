"""LLaVA models for the LLaVA benchmarks: the tiny test model, or a 7B-shaped one with random weights.

``--shape tiny`` writes :func:`astrovl.testing.llava.make_tiny_llava` and loads it
with :meth:`~astrovl.AstroLLaVA.from_pretrained` (the real architecture at toy
sizes: it measures the code path, not a real model's speed).

``--shape 7b`` builds a model with the shapes of LLaVA-1.5-7B (CLIP ViT-L/14 at
336 pixels, 576 image tokens, a Llama-2-7B language model with a 32,064-token
vocabulary) with random weights, directly on the GPU in bfloat16: the module is
created under a ``torch.device`` context, so no weight is allocated on the CPU
first. Random weights cost the same as trained ones. The processor and tokenizer
are those of the tiny model, rebuilt for 336-pixel images and 14-pixel patches;
the tokenizer's ids (a few hundred) all lie inside the model's vocabulary, and
generated ids above the tokenizer's vocabulary decode to nothing, which changes
no timing.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SHAPES", "LLAVA_7B_SHAPE", "build_llava", "build_shaped_llava", "shape_processor"]

#: Sizes of LLaVA-1.5-7B (``llava-hf/llava-1.5-7b-hf``): vision tower and language model.
LLAVA_7B_SHAPE: dict = {
    "vision": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    "text": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    },
}

#: Model shapes the benchmarks accept with ``--shape``.
SHAPES = ("tiny", "7b")


def shape_processor(directory: str | os.PathLike, image_size: int, patch_size: int):
    """The tiny model's processor and tokenizer, for images of ``image_size`` and ``patch_size``.

    The tiny checkpoint is written to ``directory`` (a few hundred kilobytes) and
    its processor is loaded back, so that it expands ``<image>`` into
    ``(image_size / patch_size) ** 2`` image tokens.
    """
    from transformers import AutoProcessor

    from astrovl.testing.llava import make_tiny_llava

    path = make_tiny_llava(directory, seed=0, image_size=image_size, patch_size=patch_size)
    return AutoProcessor.from_pretrained(str(path))


def build_shaped_llava(
    shape: dict, device, workdir: str | os.PathLike, *, dtype=None, seed: int = 0
):
    """Build a LLaVA model with random weights of ``shape`` directly on ``device``.

    Parameters
    ----------
    shape : dict
        ``{"vision": CLIPVisionConfig arguments, "text": LlamaConfig arguments}``
        (see :data:`LLAVA_7B_SHAPE`).
    device : torch.device
        Where the weights are created (they are never allocated elsewhere first).
    workdir : path
        Folder for the processor files.
    dtype : torch.dtype, optional
        Weight dtype (default bfloat16).
    seed : int
        Seed of the random weights.

    Returns
    -------
    astrovl.AstroLLaVA
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from astrovl import AstroLLaVA

    dtype = torch.bfloat16 if dtype is None else dtype
    vision_kw = dict(shape["vision"])
    text_kw = dict(shape["text"])
    image_size, patch_size = int(vision_kw["image_size"]), int(vision_kw["patch_size"])
    processor = shape_processor(Path(workdir) / "processor", image_size, patch_size)
    tok = processor.tokenizer
    if len(tok) > int(text_kw["vocab_size"]):
        raise ValueError(
            f"the tokenizer has {len(tok)} tokens, more than the model's vocabulary "
            f"({text_kw['vocab_size']}); raise vocab_size in the shape"
        )
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(**vision_kw)
    text = LlamaConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **text_kw,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = (
        tok.pad_token_id,
        tok.eos_token_id,
        tok.bos_token_id,
    )
    return AstroLLaVA(model, processor, device=device, source="random LLaVA-1.5-7B shape")


def build_llava(shape: str, device, workdir: str | os.PathLike, *, dtype=None):
    """The model of ``--shape``: ``"tiny"`` (any device) or ``"7b"`` (CUDA only).

    Returns
    -------
    (astrovl.AstroLLaVA, str)
        The model and a label for the printed tables.
    """
    if shape == "7b":
        if device.type != "cuda":
            raise SystemExit(
                f"--shape 7b needs a CUDA GPU (about 14 GB of bfloat16 weights, plus the KV cache "
                f"or the training state); this run's device is {device}. Pass --device cuda on a "
                "GPU machine, or leave --shape at 'tiny' on a CPU"
            )
        return build_shaped_llava(
            LLAVA_7B_SHAPE, device, workdir, dtype=dtype
        ), "LLaVA-1.5-7B shape"
    if shape != "tiny":
        raise SystemExit(f"--shape {shape!r} is not known; use one of {', '.join(SHAPES)}")
    from astrovl import AstroLLaVA
    from astrovl.testing.llava import make_tiny_llava

    path = make_tiny_llava(Path(workdir) / "tiny-llava", seed=0)
    return AstroLLaVA.from_pretrained(path, device=device, dtype=dtype), "tiny random LLaVA"
