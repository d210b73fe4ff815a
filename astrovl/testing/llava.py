"""Tiny, randomly initialised LLaVA checkpoints in every released layout, and a hub cache to hold them.

The models have the real architecture (a CLIP vision tower, a two-layer GELU
projector and a Llama or Mistral language model) at toy size. They exist to run
the real loading, conversion, generation and training code without a download;
their words are meaningless. They are written by today's libraries; the
releases' exact files (old weight names, buffers, dtypes, tokenizer files) are
written by :mod:`astrovl.testing.releases`.

- :func:`make_tiny_llava`: transformers layout (``LlavaForConditionalGeneration``
  with a processor), as ``llava-hf`` publishes or astrovl writes.
- :func:`make_tiny_original_llava`: the original LLaVA repository's layout
  (``llava_llama`` config, ``model.mm_projector.*``, sharded safetensors or
  ``.bin`` with an index json, a SentencePiece ``tokenizer.model``, the vision
  tower named by ``mm_vision_tower``), as ``liuhaotian/llava-v1.5-7b`` and
  ``UniverseTBD/AstroLLaVA_v3``.
- :func:`make_tiny_lora_release`: a peft LoRA adapter with
  ``non_lora_trainables.bin``, as AstroLLaVA v1/v2.
- :func:`make_tiny_hub`: all of them in a hub cache under the released hub ids
  (with the vision tower of :func:`astrovl.testing.clip.make_tiny_clip_tower`,
  written by :func:`astrovl.testing.write_hub_snapshot`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..llava.build import SMALL_LLAMA
from ..llava.template import LLAVA_CHAT_TEMPLATE
from ..utils.files import atomic_directory
from .clip import TINY_CLIP_WIDTH, make_tiny_clip_tower, tiny_clip_config
from .hub import write_hub_snapshot

__all__ = ["make_tiny_llava", "make_tiny_original_llava", "make_tiny_lora_release", "make_sentencepiece_tokenizer",
           "make_tiny_hub", "TINY_CORPUS"]

TINY_CORPUS = [
    "USER: ASSISTANT: Describe this astronomical image in detail.",
    "This image shows a spiral galaxy with bright arms and a central bulge.",
    "A globular cluster of old stars, densely packed toward the centre.",
    "An elliptical galaxy with a smooth light profile.",
    "A barred spiral galaxy; the bar connects the spiral arms.",
    "Merging galaxies with a long tidal tail.",
    "A gravitational lens: an arc around a massive foreground galaxy.",
    "An emission nebula with dark dust lanes and glowing filaments of gas.",
    "What kind of object is this? How many stars are visible? Is there a bar?",
    "The galaxy is edge-on, with a thin disk and a small bulge.",
    "Disturbed, Merging, Round Smooth, In-between Round Smooth, Cigar Shaped Smooth, Barred Spiral,",
    "Unbarred Tight Spiral, Unbarred Loose Spiral, Edge-on without Bulge, Edge-on with Bulge.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
]

_TEXT = dict(SMALL_LLAMA)


def _bpe_tokenizer(vocab_size: int):
    from ..llava.build import train_bpe_tokenizer

    return train_bpe_tokenizer(TINY_CORPUS * 4, vocab_size)


def make_sentencepiece_tokenizer(directory: str | os.PathLike, *, vocab_size: int = 400) -> Path:
    """Write a Llama-style SentencePiece tokenizer (``tokenizer.model`` and its configs) to ``directory``.

    A BPE SentencePiece model with byte fallback, ``<unk>``/``<s>``/``</s>`` at
    ids 0/1/2 and a dummy prefix space, trained on a few astronomy sentences: the
    files the original LLaVA checkpoints ship (no ``tokenizer.json``).
    """
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(TINY_CORPUS * 4), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
        shutil.copy(Path(tmp) / "tokenizer.model", directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "model_max_length": 2048, "padding_side": "right", "clean_up_tokenization_spaces": False}, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
    return directory


def _sentencepiece_llava_tokenizer(vocab_size: int):
    """A SentencePiece Llama tokenizer with ``<image>`` and ``<pad>`` added, as llava-hf's."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(make_sentencepiece_tokenizer(tmp, vocab_size=vocab_size)))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    return tok


def make_tiny_llava(directory: str | os.PathLike, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                    vocab_size: int = 400, chat_template: str = LLAVA_CHAT_TEMPLATE,
                    tokenizer: str = "bpe", dropout: float = 0.0) -> Path:
    """Write a tiny LLaVA checkpoint in the transformers layout (model, tokenizer, processor).

    Parameters
    ----------
    directory : path
    seed : int
        Seed of the random weights.
    image_size, patch_size : int
        Vision tower input and patch size: ``(image_size / patch_size) ** 2`` image tokens.
    vocab_size : int
        Size of the locally trained vocabulary.
    chat_template : str
        The processor's chat template (e.g.
        :data:`~astrovl.llava.LLAVA_HF_CHAT_TEMPLATE` for the llava-hf layout).
    tokenizer : {"bpe", "sentencepiece"}
        A byte-level BPE tokenizer, or a Llama-style SentencePiece one with
        ``<image>`` and ``<pad>`` added (as llava-hf's).
    dropout : float
        Attention dropout of the vision tower and the language model (active in
        training), for tests whose results depend on the random state.

    Returns
    -------
    pathlib.Path
        The directory, loadable with :meth:`AstroLLaVA.from_pretrained`.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if tokenizer == "bpe":
        tok = _bpe_tokenizer(vocab_size)
    elif tokenizer == "sentencepiece":
        tok = _sentencepiece_llava_tokenizer(vocab_size)
    else:
        raise ValueError(f"tokenizer={tokenizer!r}; use 'bpe' or 'sentencepiece'")
    tok.padding_side = "left"
    tok.chat_template = chat_template
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = tiny_clip_config(image_size=image_size, patch_size=patch_size, projection_dim=32,
                              sub_projection_dim=True).vision_config
    vision.attention_dropout = dropout
    text = LlamaConfig(vocab_size=len(tok), **_TEXT, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, attention_dropout=dropout)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_template)
    directory = Path(directory)
    with atomic_directory(directory, kind="llava-model") as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return directory


def make_tiny_original_llava(directory: str | os.PathLike, *, vision_tower: str | os.PathLike, seed: int = 1,
                             shards: int = 2, weight_format: str = "safetensors", text_model: str = "llama",
                             mm_hidden_size: int | None = None, vocab_size: int = 400) -> Path:
    """Write a tiny checkpoint in the original LLaVA repository's layout.

    ``config.json`` with ``model_type`` ``llava_llama`` (``llava_mistral`` for
    ``text_model="mistral"``), the language model under ``model.*`` and
    ``lm_head``, the projector under ``model.mm_projector.0/2``, no vision tower
    weights (``mm_vision_tower`` names it), ``shards`` weight files with an index
    json (``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``)
    and a SentencePiece ``tokenizer.model``.

    Parameters
    ----------
    directory : path
    vision_tower : str or path-like
        Written into ``mm_vision_tower`` (a hub id such as
        ``"openai/clip-vit-large-patch14-336"``, or a directory).
    seed : int
    shards : int
        Number of weight files.
    weight_format : {"safetensors", "bin"}
    text_model : {"llama", "mistral"}
    mm_hidden_size : int, optional
        Width of the vision features (default: the tiny tower's, 32).
    vocab_size : int
    """
    import torch
    from safetensors.torch import save_file
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    directory = Path(directory)
    if weight_format not in ("safetensors", "bin"):
        raise ValueError(f"weight_format={weight_format!r}; use 'safetensors' or 'bin'")
    with atomic_directory(directory, kind="original-llava") as tmp:
        make_sentencepiece_tokenizer(tmp, vocab_size=vocab_size)
        tok = AutoTokenizer.from_pretrained(str(tmp))
        cls, cfg_cls = (MistralForCausalLM, MistralConfig) if text_model == "mistral" else \
            (LlamaForCausalLM, LlamaConfig)
        text = cfg_cls(vocab_size=len(tok), **_TEXT, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       tie_word_embeddings=False)
        torch.manual_seed(seed)
        lm = cls(text).eval()
        hidden = mm_hidden_size or TINY_CLIP_WIDTH
        state = {k: v.contiguous() for k, v in lm.state_dict().items()}
        state["model.mm_projector.0.weight"] = torch.randn(text.hidden_size, hidden) * 0.05
        state["model.mm_projector.0.bias"] = torch.randn(text.hidden_size) * 0.01
        state["model.mm_projector.2.weight"] = torch.randn(text.hidden_size, text.hidden_size) * 0.05
        state["model.mm_projector.2.bias"] = torch.randn(text.hidden_size) * 0.01
        keys = sorted(state)
        per = -(-len(keys) // shards)
        weight_map = {}
        stem, ext = ("model", "safetensors") if weight_format == "safetensors" else ("pytorch_model", "bin")
        for i in range(shards):
            name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" if shards > 1 else f"{stem}.{ext}"
            part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
            if weight_format == "safetensors":
                save_file(part, str(tmp / name), metadata={"format": "pt"})
            else:
                torch.save(part, tmp / name)
            weight_map.update({k: name for k in part})
        if shards > 1:
            (tmp / f"{stem}.{ext}.index.json").write_text(json.dumps(
                {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": weight_map}, indent=2))
        cfg = {k: getattr(text, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_hidden_layers", "num_key_value_heads", "rms_norm_eps",
                                             "max_position_embeddings", "vocab_size", "rope_theta",
                                             "hidden_act", "tie_word_embeddings")
               if hasattr(text, k)}
        cfg["rope_theta"] = 10000.0
        if text_model == "mistral":
            cfg["sliding_window"] = text.sliding_window
        cfg.update({
            "_name_or_path": "./checkpoints/llava-tiny", "model_type": f"llava_{text_model}",
            "architectures": [f"Llava{'Mistral' if text_model == 'mistral' else 'Llama'}ForCausalLM"],
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
            "mm_vision_tower": str(vision_tower), "mm_hidden_size": hidden, "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu", "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False, "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
            "tune_mm_mlp_adapter": False, "use_mm_proj": True})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                                "pad_token_id": 0}))
    return directory


def make_tiny_lora_release(directory: str | os.PathLike, *, base_model_name_or_path: str, base_dir,
                           seed: int = 2, weight_format: str = "bin", r: int = 4, alpha: int = 8) -> Path:
    """Write a LoRA release as the original LLaVA code saves one (AstroLLaVA v1/v2 style).

    ``adapter_config.json`` (naming ``base_model_name_or_path``), the adapter in
    ``adapter_model.bin`` (bf16 pickle) or ``adapter_model.safetensors`` with the
    original repository's module names
    (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``),
    ``non_lora_trainables.bin`` with a new projector
    (``base_model.model.model.mm_projector.0.weight``...), and a ``llava_llama``
    ``config.json``.

    Parameters
    ----------
    directory : path
    base_model_name_or_path : str
        Written into ``adapter_config.json``.
    base_dir : path
        A transformers-layout copy of the base (shapes of the layers to adapt).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(str(base_dir))
    text = config.text_config
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    dims = {"q_proj": (text.hidden_size, text.num_attention_heads * (text.hidden_size // text.num_attention_heads)),
            "k_proj": (text.hidden_size, text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)),
            "v_proj": (text.hidden_size, text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)),
            "o_proj": (text.hidden_size, text.hidden_size),
            "gate_proj": (text.hidden_size, text.intermediate_size),
            "up_proj": (text.hidden_size, text.intermediate_size),
            "down_proj": (text.intermediate_size, text.hidden_size)}
    gen = torch.Generator().manual_seed(seed)
    adapter = {}
    for layer in range(text.num_hidden_layers):
        for t in targets:
            block = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            fan_in, fan_out = dims[t]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{t}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * 0.1
            adapter[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.1
    vision = config.vision_config.hidden_size
    projector = {
        "base_model.model.model.mm_projector.0.weight": torch.randn(text.hidden_size, vision, generator=gen) * 0.05,
        "base_model.model.model.mm_projector.0.bias": torch.randn(text.hidden_size, generator=gen) * 0.01,
        "base_model.model.model.mm_projector.2.weight":
            torch.randn(text.hidden_size, text.hidden_size, generator=gen) * 0.05,
        "base_model.model.model.mm_projector.2.bias": torch.randn(text.hidden_size, generator=gen) * 0.01,
    }
    directory = Path(directory)
    with atomic_directory(directory, kind="lora-release") as tmp:
        if weight_format == "bin":
            torch.save({k: v.to(torch.bfloat16) for k, v in adapter.items()}, tmp / "adapter_model.bin")
        else:
            save_file(adapter, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        torch.save({k: v.to(torch.bfloat16) for k, v in projector.items()}, tmp / "non_lora_trainables.bin")
        (tmp / "adapter_config.json").write_text(json.dumps({
            "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
            "layers_to_transform": None, "lora_alpha": alpha, "lora_dropout": 0.05, "modules_to_save": None,
            "peft_type": "LORA", "r": r, "revision": None, "target_modules": targets, "task_type": "CAUSAL_LM"},
            indent=2))
        (tmp / "config.json").write_text(json.dumps({
            "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
            "hidden_size": text.hidden_size, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
            "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad"}, indent=2))
    return directory


def make_tiny_hub(cache_dir: str | os.PathLike, work_dir: str | os.PathLike) -> dict[str, Path]:
    """Fill a hub cache with tiny models in every released layout, under the released hub ids.

    ``openai/clip-vit-large-patch14-336``
        a full CLIP model with its image processor (the vision tower)
    ``UniverseTBD/AstroLLaVA_v3``
        original LLaVA layout, 2 safetensors shards and an index json
    ``liuhaotian/llava-v1.5-7b``
        original LLaVA layout, 2 ``.bin`` shards and an index json
    ``llava-hf/llava-1.5-7b-hf``
        transformers layout, SentencePiece tokenizer, llava-hf chat template
    ``UniverseTBD/AstroLLaVA_v1``
        LoRA release (``adapter_model.safetensors``) on ``llava-hf/llava-1.5-7b-hf``
    ``UniverseTBD/AstroLLaVA_v2``
        LoRA release (``adapter_model.bin``) whose base is a path of the training
        machine (``.../llava-v1.5-7b``)

    Parameters
    ----------
    cache_dir : path
        The hub cache to fill (what ``HF_HUB_CACHE`` points at).
    work_dir : path
        Where the source directories are built.

    Returns
    -------
    dict
        Hub id -> source directory.
    """
    from ..llava.convert import convert_llava_checkpoint

    work = Path(work_dir)
    tower = "openai/clip-vit-large-patch14-336"
    sources = {
        tower: make_tiny_clip_tower(work / "tower"),
        "UniverseTBD/AstroLLaVA_v3": make_tiny_original_llava(work / "v3", vision_tower=tower, seed=1),
        "liuhaotian/llava-v1.5-7b": make_tiny_original_llava(work / "v15", vision_tower=tower, seed=3,
                                                             weight_format="bin"),
        "llava-hf/llava-1.5-7b-hf": make_tiny_llava(work / "hf", tokenizer="sentencepiece", seed=4,
                                                    chat_template=_llava_hf_template()),
    }
    for repo_id, src in sources.items():
        write_hub_snapshot(cache_dir, repo_id, src)
    # the shapes of the LoRA layers come from the transformers layout of each base
    base15 = convert_llava_checkpoint(sources["liuhaotian/llava-v1.5-7b"], work / "v15-converted",
                                      vision_tower=sources[tower])
    sources["UniverseTBD/AstroLLaVA_v2"] = make_tiny_lora_release(
        work / "v2", base_model_name_or_path="/data/szaman/llava-finetuning/llava-v1.5-7b", base_dir=base15,
        weight_format="bin")
    sources["UniverseTBD/AstroLLaVA_v1"] = make_tiny_lora_release(
        work / "v1", base_model_name_or_path="llava-hf/llava-1.5-7b-hf", base_dir=sources["llava-hf/llava-1.5-7b-hf"],
        weight_format="safetensors", seed=5)
    for repo_id in ("UniverseTBD/AstroLLaVA_v2", "UniverseTBD/AstroLLaVA_v1"):
        write_hub_snapshot(cache_dir, repo_id, sources[repo_id])
    return sources


def _llava_hf_template() -> str:
    from ..llava.template import LLAVA_HF_CHAT_TEMPLATE

    return LLAVA_HF_CHAT_TEMPLATE
