"""Tiny CLIP checkpoints in the released layouts, and synthetic embeddings.

They exercise the real loading paths of :meth:`CLIPEmbedder.from_pretrained
<astrovl.CLIPEmbedder.from_pretrained>` (and LLaVA's vision tower) without a download:

* :func:`tiny_clip_config` is the one tiny transformers ``CLIPConfig`` every
  tiny CLIP model (and the vision tower of the tiny LLaVA models) is built from;
* :func:`make_tiny_transformers_clip` writes a transformers ``CLIPModel``
  directory as the ``openai/clip-*`` repositories hold it (``config.json`` with
  the legacy text token ids, ``model.safetensors``, the CLIP byte-pair tokenizer
  as ``vocab.json`` + ``merges.txt``, ``preprocessor_config.json``);
* :func:`make_tiny_clip_tower` writes a full CLIP model with its image
  processor only, as the vision tower that original LLaVA checkpoints name;
* :func:`make_tiny_open_clip` writes an open_clip hub directory
  (``open_clip_config.json`` + ``open_clip_model.safetensors``);
* :func:`clustered_unit_vectors` and :func:`write_vector_shards` make synthetic
  embeddings (clustered unit vectors) for archive-scale tests and benchmarks.

Put any of them into a hub cache with :func:`astrovl.testing.write_hub_snapshot`.
The weights are random: the models mean nothing, the files are the real ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..clip.embedder import TINY_CLIP_CONFIG
from ..utils.files import atomic_directory

__all__ = ["tiny_clip_config", "make_tiny_transformers_clip", "make_tiny_clip_tower", "make_tiny_open_clip",
           "TINY_CLIP_WIDTH", "TINY_OPEN_CLIP_CONFIG", "clustered_unit_vectors", "write_vector_shards"]

#: width of both towers of :func:`tiny_clip_config` (the vision features LLaVA's projector reads)
TINY_CLIP_WIDTH = 32

#: architecture of :func:`make_tiny_open_clip` (an open_clip ``model_cfg``): the library's own
#: :data:`~astrovl.clip.TINY_CLIP_CONFIG` without its name
TINY_OPEN_CLIP_CONFIG: dict = {k: v for k, v in TINY_CLIP_CONFIG.items() if k != "model_name"}


def _clip_bpe_files(directory: Path) -> None:
    """``vocab.json`` and ``merges.txt`` of the CLIP byte-pair vocabulary (open_clip's copy)."""
    import open_clip

    tok = open_clip.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in tok.encoder.items()}
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}),
        encoding="utf-8")


def tiny_clip_config(*, image_size: int = 32, patch_size: int = 8, width: int = TINY_CLIP_WIDTH,
                     layers: int = 2, projection_dim: int = 16, text_layers: int | None = None,
                     vocab_size: int = 49408, max_positions: int = 77, token_ids: dict | None = None,
                     sub_projection_dim: bool = False):
    """The tiny transformers ``CLIPConfig`` of every tiny CLIP model here.

    Both towers are ``width`` wide with ``2 * width`` wide MLPs, two attention
    heads and the ``quick_gelu`` activation of the released CLIP models.

    Parameters
    ----------
    image_size, patch_size : int
        Vision tower input and patch size.
    width, layers : int
        Width and depth of both towers.
    projection_dim : int
        Size of the joint embedding.
    text_layers : int, optional
        Depth of the text tower (default ``layers``).
    vocab_size, max_positions : int
        Text vocabulary and context length.
    token_ids : dict, optional
        ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` of the text tower.
    sub_projection_dim : bool
        Also write ``projection_dim`` into both towers' configs (as
        ``CLIPVisionConfig`` users such as LLaVA read it).

    Returns
    -------
    transformers.CLIPConfig
    """
    from transformers import CLIPConfig

    extra = {"projection_dim": projection_dim} if sub_projection_dim else {}
    text = {"vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 2 * width,
            "num_hidden_layers": layers if text_layers is None else text_layers, "num_attention_heads": 2,
            "max_position_embeddings": max_positions, "hidden_act": "quick_gelu", **(token_ids or {}), **extra}
    vision = {"image_size": image_size, "patch_size": patch_size, "hidden_size": width,
              "intermediate_size": 2 * width, "num_hidden_layers": layers, "num_attention_heads": 2,
              "hidden_act": "quick_gelu", **extra}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def make_tiny_transformers_clip(directory: str | os.PathLike, *, seed: int = 0, image_size: int = 32,
                                patch_size: int = 8, width: int = TINY_CLIP_WIDTH, layers: int = 2,
                                legacy_eos: bool = True) -> Path:
    """Write a tiny transformers ``CLIPModel`` checkpoint with its tokenizer and processor files.

    Parameters
    ----------
    directory : path
    seed : int
        Seed of the random weights.
    image_size, patch_size, width, layers : int
        Sizes of both towers.
    legacy_eos : bool
        Write the text token ids as the ``openai/clip-*`` configs do (``eos_token_id=2``,
        which makes transformers pool at the largest token id); otherwise the real
        end-of-text id.

    Returns
    -------
    pathlib.Path
    """
    import torch
    from transformers import CLIPModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_clip_config(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                              token_ids={"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
                              if legacy_eos else None)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with torch.no_grad():  # break the symmetry of freshly initialised norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    _clip_bpe_files(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": {"shortest_edge": image_size}}), encoding="utf-8")
    return directory


def make_tiny_clip_tower(directory: str | os.PathLike, *, seed: int = 0, image_size: int = 32,
                         patch_size: int = 8) -> Path:
    """Write a tiny full CLIP model (vision and text towers) with its image processor.

    The layout of ``openai/clip-vit-large-patch14-336``, which original LLaVA
    checkpoints name as their vision tower: :func:`tiny_clip_config` with a
    one-layer text tower over a 99-token vocabulary (no tokenizer files).

    Returns
    -------
    pathlib.Path
    """
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    config = tiny_clip_config(image_size=image_size, patch_size=patch_size, projection_dim=32, text_layers=1,
                              vocab_size=99, max_positions=16, sub_projection_dim=True,
                              token_ids={"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1})
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    directory = Path(directory)
    with atomic_directory(directory, kind="clip-tower") as tmp:
        model.save_pretrained(tmp)
        CLIPImageProcessor(size={"shortest_edge": image_size},
                           crop_size={"height": image_size, "width": image_size}).save_pretrained(tmp)
    return directory


def make_tiny_open_clip(directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a tiny open_clip checkpoint as open_clip's hub repositories hold them.

    Returns
    -------
    pathlib.Path
    """
    import torch
    from safetensors.torch import save_file

    from ..clip.loading import build_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(TINY_OPEN_CLIP_CONFIG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "open_clip_model.safetensors"))
    cfg = {"model_cfg": TINY_OPEN_CLIP_CONFIG,
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                              "interpolation": "bicubic", "resize_mode": "shortest"}}
    (directory / "open_clip_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return directory


def clustered_unit_vectors(n: int, dim: int, *, n_clusters: int = 256, spread: float = 0.6, seed: int = 0,
                           start: int = 0, centers_seed: int = 0) -> np.ndarray:
    """Synthetic embeddings: ``n`` unit vectors around ``n_clusters`` random unit centres (float32).

    Rows ``start .. start + n`` of one endless reproducible sequence (so that
    large sets are made shard by shard): row ``i`` depends only on ``seed`` and
    ``i``'s block of 65536 rows; the centres depend only on ``centers_seed`` (so
    queries drawn with another ``seed`` come from the same clusters).
    ``spread`` is the typical distance of a vector from its centre, before
    normalisation.
    """
    rng = np.random.default_rng([centers_seed, 2**31])
    centers = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    block = 65_536
    out = np.empty((n, dim), dtype=np.float32)
    first = start // block
    for b in range(first, -(-(start + n) // block) if n else first):
        brng = np.random.default_rng([seed, b])
        labels = brng.integers(0, n_clusters, size=block)
        noise = brng.standard_normal(size=(block, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        rows = centers[labels] + noise
        lo, hi = max(start, b * block), min(start + n, (b + 1) * block)
        out[lo - start:hi - start] = rows[lo - b * block:hi - b * block]
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def write_vector_shards(directory: str | os.PathLike, n: int, dim: int, *, shard_rows: int = 262_144,
                        dtype: str = "float32", seed: int = 0, **kwargs) -> list[Path]:
    """Write :func:`clustered_unit_vectors` as ``.npy`` shards of ``shard_rows`` rows; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, start in enumerate(range(0, n, shard_rows)):
        rows = clustered_unit_vectors(min(shard_rows, n - start), dim, seed=seed, start=start, **kwargs)
        path = directory / f"part-{i:05d}.npy"
        np.save(path, rows.astype(dtype))
        paths.append(path)
    return paths
