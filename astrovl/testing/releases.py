"""Tiny models in the exact layouts of the released LLaVA checkpoints, under their hub ids.

Each writer produces the files a real release holds — the same file names, the
same weight names (modulo the number of layers), the same dtypes, the
``config.json``, tokenizer and processor files as released with only the sizes
made tiny (hidden size 32, two language-model layers, three vision layers, a
SentencePiece vocabulary of 400 pieces, 28-pixel images in 14-pixel patches) —
so that loading code meets what users download, not what today's libraries
would write. The facts come from the releases' own files (``config.json``,
weight index files, tokenizer files; see ``tests/data/release_manifests``).

:func:`make_release_hub` writes them all into a Hugging Face hub cache:

======================================================  ==============================================
hub id                                                  layout
======================================================  ==============================================
``liuhaotian/llava-v1.5-7b``                            original LLaVA, fp16 ``.bin`` shards + index,
                                                        ``rotary_emb.inv_freq`` buffers, no vision tower
``openai/clip-vit-large-patch14-336``                   full ``CLIPModel`` in ``pytorch_model.bin`` with
                                                        ``position_ids`` buffers
``lmsys/vicuna-7b-v1.5``                                plain ``LlamaForCausalLM``, fp16 ``.bin`` shards
``liuhaotian/llava-v1.5-7b-lora``                       LoRA of the LLaVA code on Vicuna (base named by a
                                                        training-machine path), bf16 pickles
``UniverseTBD/AstroLLaVA_v1``                           LoRA on ``llava-hf/llava-1.5-7b-hf``
``UniverseTBD/AstroLLaVA_v2``                           LoRA on a training-machine ``llava-v1.5-7b`` path
``UniverseTBD/AstroLLaVA_v3``                           original LLaVA, three bf16 safetensors shards,
                                                        vision tower inside
``llava-hf/llava-1.5-7b-hf``                            transformers layout with the pre-4.52 weight names
:data:`CURRENT_TOWER_ID`                                ``CLIPVisionModel.save_pretrained`` of today's
                                                        transformers (the same vision weights)
======================================================  ==============================================

The weights are random; the files are the real ones.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

from ..llava.template import LLAVA_HF_CHAT_TEMPLATE
from ..utils.files import atomic_directory
from .clip import make_tiny_transformers_clip
from .hub import write_hub_snapshot
from .llava import make_sentencepiece_tokenizer

__all__ = ["make_release_hub", "write_llava_v15", "write_clip_vit_l_336", "write_vicuna_v15",
           "write_llava_v15_lora", "write_astrollava_v1", "write_astrollava_v2", "write_astrollava_v3",
           "write_llava_hf", "write_current_clip_vision_tower", "RELEASES", "CURRENT_TOWER_ID", "TINY_SIZES",
           "NOT_WRITTEN"]

#: Sizes of the tiny models (the real 7B models: 4096, 11008, 32 heads, 32 layers; CLIP ViT-L/14-336:
#: 1024 wide, 24 layers, 336-pixel images).
TINY_SIZES = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                  num_hidden_layers=2, vision_hidden_size=32, vision_intermediate_size=64, vision_layers=3,
                  vision_heads=2, image_size=28, patch_size=14, vocab_size=400)

#: Hub id of the vision tower saved by today's transformers (``CLIPVisionModel.save_pretrained``).
CURRENT_TOWER_ID = "astro-tests/clip-vit-large-patch14-336-vision"

#: Files of the releases that the writers leave out, and why.
NOT_WRITTEN = {
    "openai/clip-vit-large-patch14-336": {"tf_model.h5": "TensorFlow weights, read by no loader here",
                                          "tokenizer.json": "the text tower's fast tokenizer, unused"},
    "llava-hf/llava-1.5-7b-hf": {},
    "UniverseTBD/AstroLLaVA_v1": {"tokenizer.json": "fast tokenizer of the base, unused (the base's is used)"},
}

_GITATTRIBUTES = "".join(f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
                         for ext in ("bin", "model", "safetensors", "h5", "pt", "pth"))

_SPECIAL = {"content": "", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _token(content: str, typed: bool = False) -> dict:
    return ({"__type": "AddedToken"} if typed else {}) | {**_SPECIAL, "content": content}


#: tokenizer_config.json of liuhaotian/llava-v1.5-7b (and lmsys/vicuna-7b-v1.5), verbatim.
LLAVA_V15_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": _token("<s>", True),
    "clean_up_tokenization_spaces": False, "eos_token": _token("</s>", True), "legacy": False,
    "model_max_length": 2048, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer", "unk_token": _token("<unk>", True)}

#: special_tokens_map.json of liuhaotian/llava-v1.5-7b, verbatim.
LLAVA_V15_SPECIAL_TOKENS = {"bos_token": _token("<s>"), "eos_token": _token("</s>"), "pad_token": "<unk>",
                            "unk_token": _token("<unk>")}


def _llava_v15_config(name_or_path: str = "llava-v1.5-7b") -> dict:
    """config.json of liuhaotian/llava-v1.5-7b, verbatim but for the sizes."""
    t = TINY_SIZES
    return {
        "_name_or_path": name_or_path, "architectures": ["LlavaLlamaForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "freeze_mm_vision_resampler": False,
        "hidden_act": "silu", "hidden_size": t["hidden_size"], "image_aspect_ratio": "pad",
        "initializer_range": 0.02, "intermediate_size": t["intermediate_size"], "max_length": 4096,
        "max_position_embeddings": 4096, "mm_hidden_size": t["vision_hidden_size"], "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None, "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava",
        "num_attention_heads": t["num_attention_heads"], "num_hidden_layers": t["num_hidden_layers"],
        "num_key_value_heads": t["num_key_value_heads"], "pad_token_id": 0, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.31.0", "tune_mm_mlp_adapter": False, "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False, "use_cache": True, "use_mm_proj": True, "vocab_size": t["vocab_size"]}


def _vicuna_config() -> dict:
    """config.json of lmsys/vicuna-7b-v1.5, verbatim but for the sizes."""
    t = TINY_SIZES
    return {
        "_name_or_path": "vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": t["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": t["intermediate_size"], "max_position_embeddings": 4096, "model_type": "llama",
        "num_attention_heads": t["num_attention_heads"], "num_hidden_layers": t["num_hidden_layers"],
        "num_key_value_heads": t["num_key_value_heads"], "pad_token_id": 0, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.31.0", "use_cache": True, "vocab_size": t["vocab_size"]}


def _adapter_config(base: str, targets: list[str], *, peft_06: bool) -> dict:
    """adapter_config.json of the LLaVA-code LoRA releases (r 128 / alpha 256 made 4 / 8)."""
    cfg = {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base, "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
           "layers_to_transform": None, "lora_alpha": 8, "lora_dropout": 0.05, "modules_to_save": None,
           "peft_type": "LORA", "r": 4, "rank_pattern": {}, "revision": None, "target_modules": targets,
           "task_type": "CAUSAL_LM"}
    if not peft_06:  # written by peft 0.5 (AstroLLaVA v1/v2): no alpha_pattern / rank_pattern
        del cfg["alpha_pattern"], cfg["rank_pattern"]
    return cfg


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _common_files(directory: Path, title: str, readme: bool = True) -> None:
    (directory / ".gitattributes").write_text(_GITATTRIBUTES, encoding="utf-8")
    if readme:
        (directory / "README.md").write_text(f"# {title}\n\nA tiny stand-in with random weights, in the "
                                             "release's exact layout, for tests.\n", encoding="utf-8")


_SP_MODEL: dict[int, bytes] = {}


def _sentencepiece_model(directory: Path) -> None:
    """A Llama-style SentencePiece ``tokenizer.model`` (byte fallback, ``<unk>``/``<s>``/``</s>`` at 0/1/2).

    Trained once per process (the same model for every release, as they share Llama's).
    """
    vocab = TINY_SIZES["vocab_size"]
    if vocab not in _SP_MODEL:
        with tempfile.TemporaryDirectory() as tmp:
            make_sentencepiece_tokenizer(tmp, vocab_size=vocab)
            _SP_MODEL[vocab] = (Path(tmp) / "tokenizer.model").read_bytes()
    (directory / "tokenizer.model").write_bytes(_SP_MODEL[vocab])


def _llama_state(seed: int, vocab: int | None = None) -> dict:
    """fp16 weights of a tiny Llama in the names of transformers 4.31, with its fp32 ``inv_freq`` buffers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t = TINY_SIZES
    config = LlamaConfig(vocab_size=vocab or t["vocab_size"], hidden_size=t["hidden_size"],
                         intermediate_size=t["intermediate_size"], num_attention_heads=t["num_attention_heads"],
                         num_key_value_heads=t["num_key_value_heads"], num_hidden_layers=t["num_hidden_layers"],
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in lm.state_dict().items():
        if "rotary_emb" in k:
            continue
        if "norm" in k:  # break the symmetry of freshly initialised norms
            v = v + 0.1 * torch.randn(v.shape, generator=gen)
        elif k.endswith(("embed_tokens.weight", "lm_head.weight")):
            v = torch.randn(v.shape, generator=gen) * 0.5
        state[k] = v.to(torch.float16).contiguous()
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for i in range(t["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return state


def _projector_state(seed: int, prefix: str, dtype, names=("0", "2")) -> dict:
    import torch

    t = TINY_SIZES
    gen = torch.Generator().manual_seed(seed)
    h, v = t["hidden_size"], t["vision_hidden_size"]
    a, b = names
    return {f"{prefix}{a}.weight": (torch.randn(h, v, generator=gen) * 0.3).to(dtype),
            f"{prefix}{a}.bias": (torch.randn(h, generator=gen) * 0.1).to(dtype),
            f"{prefix}{b}.weight": (torch.randn(h, h, generator=gen) * 0.3).to(dtype),
            f"{prefix}{b}.bias": (torch.randn(h, generator=gen) * 0.1).to(dtype)}


def _shard_of_llm_key(key: str, shards: int) -> int:
    """1-based shard of a weight, split as the released 7B shards are (early layers first, the head last)."""
    import re

    layers = TINY_SIZES["num_hidden_layers"]
    m = re.search(r"\.layers\.(\d+)\.", key)
    if "embed_tokens" in key:
        return 1
    if m is not None:
        return min(shards, 1 + int(m.group(1)) * shards // (layers + 1)) if shards > 2 else \
            (1 if int(m.group(1)) < layers - 1 else 2)
    if "vision_tower" in key or "mm_projector" in key or "multi_modal_projector" in key:
        return 1 if shards > 2 else shards
    return shards


def _write_shards(directory: Path, state: dict, shards: int, fmt: str, shard_of=_shard_of_llm_key) -> None:
    """Weights in ``shards`` files plus the index json, as ``save_pretrained`` of the release's era wrote them."""
    import torch

    stem, ext, index = ("pytorch_model", "bin", "pytorch_model.bin.index.json") if fmt == "bin" else \
        ("model", "safetensors", "model.safetensors.index.json")
    parts: dict[int, dict] = {i: {} for i in range(1, shards + 1)}
    for key in sorted(state):
        parts[shard_of(key, shards)][key] = state[key]
    weight_map = {}
    for i, part in parts.items():
        name = f"{stem}-{i:05d}-of-{shards:05d}.{ext}"
        if fmt == "bin":
            torch.save(part, directory / name)
        else:
            from safetensors.torch import save_file

            save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    _write_json(directory / index, {"metadata": {"total_size": total},
                                    "weight_map": {k: weight_map[k] for k in sorted(weight_map)}})


def _llm_tokenizer_files(directory: Path) -> None:
    _sentencepiece_model(directory)
    _write_json(directory / "tokenizer_config.json", LLAVA_V15_TOKENIZER_CONFIG)
    _write_json(directory / "special_tokens_map.json", LLAVA_V15_SPECIAL_TOKENS)


def write_llava_v15(directory: str | os.PathLike, *, seed: int = 3) -> Path:
    """``liuhaotian/llava-v1.5-7b``: original LLaVA layout of 2023 (model_type ``llava``).

    ``config.json`` (``LlavaLlamaForCausalLM``), fp16 weights in
    ``pytorch_model-0000{1,2}-of-00002.bin`` with ``pytorch_model.bin.index.json``,
    fp32 ``model.layers.N.self_attn.rotary_emb.inv_freq`` buffers in the files,
    the projector as ``model.mm_projector.{0,2}``, no vision tower; SentencePiece
    ``tokenizer.model`` with ``LlamaTokenizer`` (``legacy: false``, pad ``<unk>``).
    """
    import torch

    directory = Path(directory)
    with atomic_directory(directory, kind="release-fixture") as tmp:
        _common_files(tmp, "llava-v1.5-7b")
        state = _llama_state(seed)
        state.update(_projector_state(seed + 100, "model.mm_projector.", torch.float16))
        _write_shards(tmp, state, 2, "bin")
        _write_json(tmp / "config.json", _llava_v15_config())
        _write_json(tmp / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096,
                                                     "pad_token_id": 0, "transformers_version": "4.31.0"})
        _llm_tokenizer_files(tmp)
    return directory


def write_vicuna_v15(directory: str | os.PathLike, *, seed: int = 6) -> Path:
    """``lmsys/vicuna-7b-v1.5``: a plain ``LlamaForCausalLM``, fp16 ``.bin`` shards with ``inv_freq`` buffers."""
    directory = Path(directory)
    with atomic_directory(directory, kind="release-fixture") as tmp:
        _common_files(tmp, "vicuna-7b-v1.5")
        _write_shards(tmp, _llama_state(seed), 2, "bin")
        _write_json(tmp / "config.json", _vicuna_config())
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": 1, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0, "temperature": 0.9,
            "top_p": 0.6, "transformers_version": "4.31.0"})
        _llm_tokenizer_files(tmp)
    return directory


def write_clip_vit_l_336(directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """``openai/clip-vit-large-patch14-336``: a full ``CLIPModel`` in ``pytorch_model.bin`` only.

    The file holds the int64 buffers ``vision_model.embeddings.position_ids`` and
    ``text_model.embeddings.position_ids``, as the 2021 conversion saved them;
    ``preprocessor_config.json`` has the CLIP mean and standard deviation.
    """
    import torch
    from safetensors.torch import load_file

    t = TINY_SIZES
    directory = Path(directory)
    with atomic_directory(directory, kind="release-fixture") as tmp:
        make_tiny_transformers_clip(tmp, seed=seed, image_size=t["image_size"], patch_size=t["patch_size"],
                                    width=t["vision_hidden_size"], layers=t["vision_layers"])
        state = load_file(str(tmp / "model.safetensors"))
        (tmp / "model.safetensors").unlink()
        cfg = json.loads((tmp / "config.json").read_text("utf-8"))
        n_text = int(cfg.get("text_config", {}).get("max_position_embeddings", 77))
        n_vision = (t["image_size"] // t["patch_size"]) ** 2 + 1
        state["text_model.embeddings.position_ids"] = torch.arange(n_text, dtype=torch.int64)[None]
        state["vision_model.embeddings.position_ids"] = torch.arange(n_vision, dtype=torch.int64)[None]
        torch.save(dict(sorted(state.items())), tmp / "pytorch_model.bin")
        _common_files(tmp, "clip-vit-large-patch14-336")
    return directory


def _clip_vision_state(tower_dir: Path) -> dict:
    """The ``vision_model.*`` weights of a full CLIP checkpoint, without the ``position_ids`` buffer."""
    import torch

    state = torch.load(str(Path(tower_dir) / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if k.startswith("vision_model.") and not k.endswith("position_ids")}


def write_current_clip_vision_tower(directory: str | os.PathLike, tower_dir: str | os.PathLike) -> Path:
    """The vision tower of ``tower_dir`` saved by today's transformers (``CLIPVisionModel.save_pretrained``)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig.from_pretrained(str(tower_dir))).eval()
    state = _clip_vision_state(Path(tower_dir))
    names = set(model.state_dict())
    model.load_state_dict({(k if k in names else k[len("vision_model."):]): v for k, v in state.items()},
                          strict=False)
    directory = Path(directory)
    with atomic_directory(directory, kind="release-fixture") as tmp:
        model.save_pretrained(tmp)
        CLIPImageProcessor.from_pretrained(str(tower_dir)).save_pretrained(tmp)
    return directory


_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_state(seed: int, prefix: str = "base_model.model.model.layers.") -> dict:
    """LoRA A/B matrices (r=4) for every target of every layer, in the LLaVA code's peft names."""
    import torch

    t = TINY_SIZES
    h, m = t["hidden_size"], t["intermediate_size"]
    dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h), "gate_proj": (h, m),
            "up_proj": (h, m), "down_proj": (m, h)}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(t["num_hidden_layers"]):
        for target in _TARGETS:
            block = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            fan_in, fan_out = dims[target]
            key = f"{prefix}{layer}.{block}.{target}"
            state[f"{key}.lora_A.weight"] = torch.randn(4, fan_in, generator=gen) * 0.2
            state[f"{key}.lora_B.weight"] = torch.randn(fan_out, 4, generator=gen) * 0.2
    return state


def _bf16(state: dict) -> dict:
    import torch

    return {k: v.to(torch.bfloat16) for k, v in state.items()}


def _write_llava_code_lora(tmp: Path, *, base: str, seed: int, targets: list[str], peft_06: bool,
                           config: dict) -> None:
    import torch

    _write_json(tmp / "adapter_config.json", _adapter_config(base, targets, peft_06=peft_06))
    torch.save(_bf16(_lora_state(seed)), tmp / "adapter_model.bin")
    torch.save(_projector_state(seed + 100, "base_model.model.model.mm_projector.", torch.bfloat16),
               tmp / "non_lora_trainables.bin")
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "trainer_state.json", {"epoch": 1.0, "global_step": 1, "log_history": [
        {"epoch": 1.0, "learning_rate": 2e-4, "loss": 1.0, "step": 1}], "max_steps": 1})


def write_llava_v15_lora(directory: str | os.PathLike, *, seed: int = 7) -> Path:
    """``liuhaotian/llava-v1.5-7b-lora``: LoRA of the LLaVA code on Vicuna, named by a training path.

    ``adapter_config.json`` with ``base_model_name_or_path``
    ``"./checkpoints/vicuna-7b-v1-5"``, ``adapter_model.bin`` (bf16,
    ``base_model.model.model.layers.N....lora_{A,B}.weight``),
    ``non_lora_trainables.bin`` (bf16, ``base_model.model.model.mm_projector.{0,2}.*``),
    the LLaVA ``config.json`` (model_type ``llava``) and ``trainer_state.json``.
    """
    directory = Path(directory)
    with atomic_directory(directory, kind="release-fixture") as tmp:
        _common_files(tmp, "llava-v1.5-7b-lora")
        _write_llava_code_lora(tmp, base="./checkpoints/vicuna-7b-v1-5", seed=seed, peft_06=True,
                               targets=["o_proj", "gate_proj", "down_proj", "v_proj", "q_proj", "up_proj", "k_proj"],
                               config=_llava_v15_config("./checkpoints/vicuna-7b-v1-5"))
    return directory


def _astrollava_config(vocab: int) -> dict:
    """config.json of the AstroLLaVA releases (not published verbatim; a ``llava_llama`` LlavaConfig)."""
    cfg = _llava_v15_config("./checkpoints/llava-v1.5-7b")
    cfg.update(model_type="llava_llama", vocab_size=vocab, transformers_version="4.37.2", torch_dtype="bfloat16",
               mm_patch_merge_type="flat", mm_projector_lr=None, tokenizer_model_max_length=2048,
               tokenizer_padding_side="right")
    return cfg


def write_astrollava_v2(directory: str | os.PathLike, *, seed: int = 8) -> Path:
    """``UniverseTBD/AstroLLaVA_v2``: LoRA on ``/data/szaman/llava-finetuning/llava-v1.5-7b``.

    The layout of ``liuhaotian/llava-v1.5-7b-lora`` (peft 0.5): bf16
    ``adapter_model.bin``, ``non_lora_trainables.bin``, ``config.json``,
    ``trainer_state.json``; no tokenizer.
    """
    directory = Path(directory)
    with atomic_directory(directory, kind="release-fixture") as tmp:
        _common_files(tmp, "AstroLLaVA_v2")
        _write_llava_code_lora(tmp, base="/data/szaman/llava-finetuning/llava-v1.5-7b", seed=seed, peft_06=False,
                               targets=["k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "q_proj", "gate_proj"],
                               config=_astrollava_config(TINY_SIZES["vocab_size"]))
    return directory


def _llava_hf_vocab() -> int:
    """The embedding rows of llava-hf: the vocabulary, ``<image>`` and ``<pad>``, padded to a multiple of 64."""
    n = TINY_SIZES["vocab_size"] + 2
    return -(-n // 64) * 64


def write_astrollava_v1(directory: str | os.PathLike, *, seed: int = 5) -> Path:
    """``UniverseTBD/AstroLLaVA_v1``: LoRA of the LLaVA code on ``llava-hf/llava-1.5-7b-hf``.

    ``adapter_model.safetensors`` (fp32) and ``adapter_model.bin`` (bf16) of the
    same adapter, ``non_lora_trainables.bin``, ``config.json`` (``llava_llama``,
    vocabulary of llava-hf), the tokenizer with ``<image>`` (first id after the
    vocabulary) and ``<pad>`` added.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    vocab = TINY_SIZES["vocab_size"]
    with atomic_directory(directory, kind="release-fixture") as tmp:
        _common_files(tmp, "AstroLLaVA_v1")
        _write_llava_code_lora(tmp, base="llava-hf/llava-1.5-7b-hf", seed=seed, peft_06=False, targets=[
            "v_proj", "up_proj", "gate_proj", "o_proj", "k_proj", "q_proj", "down_proj"],
            config=_astrollava_config(_llava_hf_vocab()))
        save_file(_lora_state(seed), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "added_tokens.json", {"<image>": vocab, "<pad>": vocab + 1})
        _write_json(tmp / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                                     "transformers_version": "4.37.2"})
        _sentencepiece_model(tmp)
        special = dict(LLAVA_V15_SPECIAL_TOKENS, pad_token=_token("<pad>"))
        _write_json(tmp / "special_tokens_map.json", special)
        _write_json(tmp / "tokenizer_config.json", dict(LLAVA_V15_TOKENIZER_CONFIG, pad_token="<pad>"))
    return directory


def write_astrollava_v3(directory: str | os.PathLike, tower_dir: str | os.PathLike, *, seed: int = 1) -> Path:
    """``UniverseTBD/AstroLLaVA_v3``: original layout (``llava_llama``), bf16 safetensors in three shards.

    The vision tower is inside (``model.vision_tower.vision_tower.vision_model.*``,
    the weights of ``tower_dir`` slightly changed, so a test can tell which tower
    was used), no ``inv_freq`` buffers; ``training_args.bin`` is a pickle that
    needs code to load (never read).
    """
    import torch

    directory = Path(directory)
    gen = torch.Generator().manual_seed(seed + 200)
    with atomic_directory(directory, kind="release-fixture") as tmp:
        _common_files(tmp, "AstroLLaVA_v3", readme=False)  # v3 has no README.md
        state = {k: v for k, v in _llama_state(seed).items() if "inv_freq" not in k}
        state.update(_projector_state(seed + 100, "model.mm_projector.", torch.float16))
        for k, v in _clip_vision_state(Path(tower_dir)).items():
            state["model.vision_tower.vision_tower." + k] = v + 0.05 * torch.randn(v.shape, generator=gen)
        _write_shards(tmp, {k: v.to(torch.bfloat16) for k, v in state.items()}, 3, "safetensors")
        _write_json(tmp / "config.json", _astrollava_config(TINY_SIZES["vocab_size"]))
        _write_json(tmp / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096,
                                                     "pad_token_id": 0, "transformers_version": "4.37.2"})
        _llm_tokenizer_files(tmp)
        _write_json(tmp / "trainer_state.json", {"epoch": 1.0, "global_step": 1, "max_steps": 1})
        (tmp / "training_args.bin").write_bytes(pickle.dumps(_TrainingArguments()))
    return directory


class _TrainingArguments:
    """Stands for the ``transformers.TrainingArguments`` pickled in ``training_args.bin``."""

    output_dir = "./checkpoints/astrollava"


def _llava_hf_config() -> dict:
    """config.json of llava-hf/llava-1.5-7b-hf, verbatim but for the sizes."""
    t = TINY_SIZES
    vocab = _llava_hf_vocab()
    return {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
        "image_token_index": t["vocab_size"], "model_type": "llava", "pad_token_id": t["vocab_size"] + 1,
        "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                        "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
                        "num_attention_heads": t["num_attention_heads"],
                        "num_hidden_layers": t["num_hidden_layers"],
                        "num_key_value_heads": t["num_key_value_heads"], "max_position_embeddings": 4096,
                        "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                        "vocab_size": vocab},
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": {"hidden_size": t["vision_hidden_size"], "image_size": t["image_size"],
                          "intermediate_size": t["vision_intermediate_size"], "model_type": "clip_vision_model",
                          "num_attention_heads": t["vision_heads"], "num_hidden_layers": t["vision_layers"],
                          "patch_size": t["patch_size"], "projection_dim": 32, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": vocab}


def _llava_hf_tokenizer_files(tmp: Path) -> None:
    from transformers import AutoTokenizer

    t = TINY_SIZES
    _sentencepiece_model(tmp)
    decoder = {str(i): dict(_SPECIAL, content=c, special=True) for i, c in ((0, "<unk>"), (1, "<s>"), (2, "</s>"),
                                                                           (t["vocab_size"], "<image>"),
                                                                           (t["vocab_size"] + 1, "<pad>"))}
    _write_json(tmp / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": None, "added_tokens_decoder": decoder,
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
        "extra_special_tokens": {"image_token": "<image>"}, "image_token": "<image>", "legacy": False,
        "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>", "padding_side": "left",
        "processor_class": "LlavaProcessor", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False, "unk_token": "<unk>", "use_default_system_prompt": False})
    _write_json(tmp / "special_tokens_map.json", {"bos_token": _token("<s>"), "eos_token": _token("</s>"),
                                                  "pad_token": _token("<pad>"), "unk_token": _token("<unk>")})
    _write_json(tmp / "added_tokens.json", {"<image>": t["vocab_size"], "<pad>": t["vocab_size"] + 1})
    with tempfile.TemporaryDirectory() as other:  # the fast tokenizer's tokenizer.json, as the release has it
        AutoTokenizer.from_pretrained(str(tmp)).save_pretrained(other)
        if (Path(other) / "tokenizer.json").is_file():
            shutil.copy(Path(other) / "tokenizer.json", tmp / "tokenizer.json")


def write_llava_hf(directory: str | os.PathLike, tower_dir: str | os.PathLike, *, seed: int = 4) -> Path:
    """``llava-hf/llava-1.5-7b-hf``: transformers layout with the weight names of transformers < 4.52.

    ``language_model.model.*``, ``language_model.lm_head.weight``,
    ``vision_tower.vision_model.*`` and ``multi_modal_projector.linear_{1,2}.*``
    in three fp16 safetensors shards with ``model.safetensors.index.json``; the
    processor files (``preprocessor_config.json``, ``processor_config.json``,
    ``chat_template.json`` and ``.jinja``) and the tokenizer with ``<image>`` and
    ``<pad>`` added, as released.
    """
    import torch

    t = TINY_SIZES
    directory = Path(directory)
    state = {}
    for k, v in _llama_state(seed, vocab=_llava_hf_vocab()).items():
        if "inv_freq" in k:
            continue
        state["language_model." + k] = v  # language_model.model.* and language_model.lm_head.weight
    for k, v in _clip_vision_state(Path(tower_dir)).items():
        state["vision_tower." + k] = v.to(torch.float16)
    state.update(_projector_state(seed + 100, "multi_modal_projector.linear_", torch.float16, names=("1", "2")))

    def shard_of(key: str, shards: int) -> int:
        if key.startswith(("vision_tower.", "multi_modal_projector.")) or "embed_tokens" in key:
            return 1
        return 2 if ".layers.0." in key else 3

    with atomic_directory(directory, kind="release-fixture") as tmp:
        _common_files(tmp, "llava-1.5-7b-hf")
        _write_shards(tmp, state, 3, "safetensors", shard_of=shard_of)
        _write_json(tmp / "config.json", _llava_hf_config())
        _write_json(tmp / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1,
                                                     "eos_token_id": 2, "pad_token_id": t["vocab_size"] + 1,
                                                     "transformers_version": "4.36.0.dev0"})
        _write_json(tmp / "preprocessor_config.json", {
            "crop_size": {"height": t["image_size"], "width": t["image_size"]}, "do_center_crop": True,
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor", "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": t["image_size"]}})
        _write_json(tmp / "processor_config.json", {
            "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": t["patch_size"],
            "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"})
        _write_json(tmp / "chat_template.json", {"chat_template": LLAVA_HF_CHAT_TEMPLATE})
        (tmp / "chat_template.jinja").write_text(LLAVA_HF_CHAT_TEMPLATE + "\n", encoding="utf-8")
        _llava_hf_tokenizer_files(tmp)
    return directory


#: The hub ids :func:`make_release_hub` writes, in the order it writes them.
RELEASES = ("openai/clip-vit-large-patch14-336", CURRENT_TOWER_ID, "liuhaotian/llava-v1.5-7b",
            "lmsys/vicuna-7b-v1.5", "liuhaotian/llava-v1.5-7b-lora", "UniverseTBD/AstroLLaVA_v1",
            "UniverseTBD/AstroLLaVA_v2", "UniverseTBD/AstroLLaVA_v3", "llava-hf/llava-1.5-7b-hf")


def make_release_hub(cache_dir: str | os.PathLike, work_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every release of :data:`RELEASES` into the hub cache ``cache_dir`` under its hub id.

    Parameters
    ----------
    cache_dir : path
        The hub cache (what ``HF_HUB_CACHE`` points at).
    work_dir : path
        Where the release directories are built.

    Returns
    -------
    dict
        Hub id -> the directory its snapshot was made from.
    """
    work = Path(work_dir)
    tower = write_clip_vit_l_336(work / "clip-vit-large-patch14-336")
    sources = {
        "openai/clip-vit-large-patch14-336": tower,
        CURRENT_TOWER_ID: write_current_clip_vision_tower(work / "clip-vision-current", tower),
        "liuhaotian/llava-v1.5-7b": write_llava_v15(work / "llava-v1.5-7b"),
        "lmsys/vicuna-7b-v1.5": write_vicuna_v15(work / "vicuna-7b-v1.5"),
        "liuhaotian/llava-v1.5-7b-lora": write_llava_v15_lora(work / "llava-v1.5-7b-lora"),
        "UniverseTBD/AstroLLaVA_v1": write_astrollava_v1(work / "AstroLLaVA_v1"),
        "UniverseTBD/AstroLLaVA_v2": write_astrollava_v2(work / "AstroLLaVA_v2"),
        "UniverseTBD/AstroLLaVA_v3": write_astrollava_v3(work / "AstroLLaVA_v3", tower),
        "llava-hf/llava-1.5-7b-hf": write_llava_hf(work / "llava-1.5-7b-hf", tower),
    }
    for repo_id, src in sources.items():
        write_hub_snapshot(cache_dir, repo_id, src)
    return sources
