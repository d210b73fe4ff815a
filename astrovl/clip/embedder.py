"""CLIP image and text embeddings for astronomical images (open_clip models)."""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import ModelNotFoundError
from ..utils.devices import resolve_device
from ..utils.files import CLIP_MODEL_OUTPUT, atomic_directory
from ..utils.progress import progress_bar
from .categories import DEFAULT_TEMPLATES, HUBBLE_CATEGORIES
from .identity import DigestCache, digest_from_model_id
from .loading import (
    ASTROVL_CONFIG,
    ASTROVL_FORMAT,
    ASTROVL_WEIGHTS,
    build_model,
    resolve_pretrained,
)

__all__ = ["CLIPEmbedder", "TINY_CLIP_CONFIG", "CONFIG_NAME", "WEIGHTS_NAME"]

log = logging.getLogger(__name__)

CONFIG_NAME = ASTROVL_CONFIG
WEIGHTS_NAME = ASTROVL_WEIGHTS
FORMAT = ASTROVL_FORMAT
#: kind of the output folder a model is saved in (see :func:`astrovl.utils.files.check_output_dir`)
OUTPUT_KIND = CLIP_MODEL_OUTPUT


#: A small CLIP (about 4 M parameters) that trains from scratch in minutes on a CPU;
#: used by the demo, the tests and quick experiments.
TINY_CLIP_CONFIG: dict = {
    "model_name": "astrovl-tiny",
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 32,
                   "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "mlp_ratio": 2.0},
}


class CLIPEmbedder:
    """Embed astronomical images and text into one space with a CLIP model.

    Create one with :meth:`from_pretrained` (open_clip names with pretrained tags,
    ``hf-hub:`` ids, directories written by :meth:`save_pretrained`, or local
    open_clip checkpoint files) or :meth:`from_config` (untrained).

    Attributes
    ----------
    model : open_clip.CLIP
        The underlying module.
    tokenizer : callable
        ``tokenizer(list_of_str) -> LongTensor`` of shape ``(N, context_length)``.
    preprocess : callable
        The model's own evaluation transform (PIL image -> tensor).
    device : torch.device
    model_name : str
    config : dict
        JSON-serialisable description of the architecture and preprocessing.
    model_id : str
        Identity of the weights, ``"model_name@weights_digest"``.
    weights_digest : str
        Digest of the weights (:mod:`astrovl.clip.identity`), the same for the same
        weights however they were loaded; used by :class:`~astrovl.EmbeddingIndex`
        to recognise the model that built it.
    source : dict or None
        How to load these weights again (see :mod:`astrovl.clip.loading`); None
        for a model that exists only in memory (built from a config and never saved).
    random_weights : bool
        True while the weights are still a random initialisation (from
        :meth:`from_config`, or an open_clip name without a pretrained tag); an
        index built with such a model records it.
    """

    def __init__(self, model, tokenizer, preprocess, *, model_name: str, model_cfg: dict,
                 preprocess_cfg: dict, device=None, precision: str | None = None,
                 model_id: str | None = None, source: dict | None = None, random_weights: bool = False):
        import torch

        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.model_name = model_name
        self.model_cfg = dict(model_cfg)
        self.preprocess_cfg = dict(preprocess_cfg)
        if precision is None:
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision={precision!r} must be 'fp32', 'bf16' or 'fp16'")
        self.precision = precision
        self._autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.source = dict(source) if source else None
        self._digest = DigestCache()
        known = digest_from_model_id(model_id)
        if known is not None:  # a digest recorded with the weights (saved config, a copy's id)
            self._digest.prime(self.model, known)
        # the digest of the random initialisation: the weights are random as long as they keep it
        self._random_digest = self._digest.get(self.model) if random_weights else None

    # ------------------------------------------------------------------ identity
    @property
    def weights_digest(self) -> str:
        """Digest of the current weights (recomputed only after they change)."""
        return self._digest.get(self.model)

    @property
    def model_id(self) -> str:
        """``"model_name@weights_digest"``: the identity of the weights."""
        return f"{self.model_name}@{self.weights_digest}"

    @property
    def random_weights(self) -> bool:
        """True while the weights are the random initialisation they were built with (untrained)."""
        return self._random_digest is not None and self.weights_digest == self._random_digest

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> dict:
        """Architecture and preprocessing, enough to rebuild the model."""
        return {"model_name": self.model_name, "model_cfg": self.model_cfg,
                "preprocess_cfg": self.preprocess_cfg, "embed_dim": self.embed_dim}

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint embedding space."""
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        size = self.preprocess_cfg.get("size", self.model_cfg["vision_cfg"].get("image_size", 224))
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def context_length(self) -> int:
        """Maximum number of text tokens."""
        return int(self.model_cfg.get("text_cfg", {}).get("context_length", 77))

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))

    def __repr__(self) -> str:
        return (f"<CLIPEmbedder {self.model_name} dim={self.embed_dim} image_size={self.image_size} "
                f"device={self.device} id={self.model_id}>")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, name_or_dict: str | dict, *, device=None, precision=None,
                    seed: int | None = None) -> CLIPEmbedder:
        """Build an untrained (randomly initialised) model.

        Parameters
        ----------
        name_or_dict : str or dict
            An open_clip model name (``"ViT-B-16"``, ``"ViT-B-32"``...) or a dict with
            ``embed_dim``, ``vision_cfg`` and ``text_cfg`` (and optionally
            ``model_name``), such as :data:`TINY_CLIP_CONFIG`.
        seed : int, optional
            Seed for the random initialisation.
        """
        import open_clip
        import torch

        if isinstance(name_or_dict, str):
            cfg = open_clip.get_model_config(name_or_dict)
            if cfg is None:
                raise ModelNotFoundError(
                    f"{name_or_dict!r} is not an open_clip model name; choose one of "
                    f"open_clip.list_models() (e.g. 'ViT-B-16') or pass a config dict"
                )
            name, model_cfg = name_or_dict, copy.deepcopy(cfg)
        elif isinstance(name_or_dict, dict):
            missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in name_or_dict]
            if missing:
                raise ValueError(f"a CLIP config dict needs the keys {missing}")
            model_cfg = copy.deepcopy(name_or_dict)
            name = str(model_cfg.pop("model_name", "custom-clip"))
        else:
            raise TypeError(f"from_config takes a model name or a dict, not {type(name_or_dict).__name__}")
        if seed is not None:
            torch.manual_seed(seed)
        model = build_model(model_cfg)
        pp = cls._preprocess_cfg_for(model_cfg)
        return cls(model, *cls._tokenizer_and_transform(model_cfg, pp), model_name=name,
                   model_cfg=model_cfg, preprocess_cfg=pp, device=device, precision=precision,
                   random_weights=True)

    @staticmethod
    def _preprocess_cfg_for(model_cfg: dict, base: dict | None = None) -> dict:
        pp = {"size": int(model_cfg["vision_cfg"].get("image_size", 224)),
              "mean": [0.48145466, 0.4578275, 0.40821073],
              "std": [0.26862954, 0.26130258, 0.27577711],
              "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
        if base:
            for k in pp:
                if k in base and base[k] is not None:
                    v = base[k]
                    pp[k] = list(v) if isinstance(v, tuple) else v
        if isinstance(pp["size"], (list, tuple)):
            pp["size"] = int(pp["size"][0])
        return pp

    @staticmethod
    def _tokenizer_and_transform(model_cfg: dict, pp: dict):
        import open_clip

        text_cfg = model_cfg.get("text_cfg", {})
        ctx = int(text_cfg.get("context_length", 77))
        if text_cfg.get("hf_tokenizer_name"):
            tokenizer = open_clip.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=ctx,
                                              tokenizer_mode=text_cfg.get("tokenizer_mode"),
                                              **(text_cfg.get("tokenizer_kwargs") or {}))
        else:
            tokenizer = open_clip.SimpleTokenizer(context_length=ctx)
        transform = open_clip.image_transform(
            pp["size"], is_train=False, mean=tuple(pp["mean"]), std=tuple(pp["std"]),
            resize_mode=pp.get("resize_mode"), interpolation=pp.get("interpolation"),
            fill_color=pp.get("fill_color", 0))
        return tokenizer, transform

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike, pretrained: str | None = None, *,
                        device=None, precision: str | None = None, revision: str | None = None,
                        cache_dir: str | None = None) -> CLIPEmbedder:
        """Load a model.

        Parameters
        ----------
        name : str or path-like
            * a local directory: one written by :meth:`save_pretrained`, an open_clip
              directory (``open_clip_config.json`` with ``open_clip_model.safetensors``)
              or a transformers ``CLIPModel`` directory (``config.json`` with
              ``model.safetensors``), converted to the open_clip architecture;
            * an open_clip model name (``"ViT-B-16"``) with ``pretrained`` a tag
              (``"openai"``, ``"laion2b_s34b_b88k"``...) or a local checkpoint file;
            * a Hugging Face hub repository, ``"hf-hub:ORG/NAME"`` or ``"ORG/NAME"``,
              in the open_clip layout or the transformers layout (for example
              ``"openai/clip-vit-base-patch16"``, the base model of HubbleCLIP).

            Hub files are read through ``huggingface_hub`` and its cache: offline
            (``HF_HUB_OFFLINE=1``) a repository loads when its files are cached.
        pretrained : str, optional
            Pretrained tag or checkpoint file path for open_clip model names.
            Without it an open_clip name builds a randomly initialised model (see
            Warns).
        device : str or torch.device, optional
        precision : {"fp32", "bf16", "fp16"}, optional
            Inference precision (autocast); default bf16 on CUDA, fp32 on CPU.
        revision : str, optional
            Branch, tag or commit of a hub repository (default: ``main``).
        cache_dir : str, optional
            Download cache (default: the Hugging Face hub cache).

        Warns
        -----
        UserWarning
            For an open_clip model name without ``pretrained``: the model has
            random weights (:attr:`random_weights` is True, and an index built with
            it records so). Use :meth:`from_config` to build an untrained model on
            purpose, without the warning.

        Raises
        ------
        ModelNotFoundError
            If the model cannot be found or downloaded (for example offline).
        CheckpointError
            If the files are incomplete, unsafe to read or do not fit the architecture.
        """
        resolved = resolve_pretrained(name, pretrained, revision=revision, cache_dir=cache_dir)
        pp = cls._preprocess_cfg_for(resolved.model_cfg, resolved.preprocess_cfg)
        tokenizer, transform = cls._tokenizer_and_transform(resolved.model_cfg, pp)
        model_id = f"{resolved.model_name}@{resolved.digest}" if resolved.digest else None
        return cls(resolved.model, tokenizer, transform, model_name=resolved.model_name,
                   model_cfg=resolved.model_cfg, preprocess_cfg=pp, device=device, precision=precision,
                   model_id=model_id, source=resolved.source, random_weights=resolved.random)

    def save_pretrained(self, directory: str | os.PathLike, *, update_source: bool = True) -> Path:
        """Write safetensors weights and a JSON config to ``directory`` (atomically).

        The directory reloads with :meth:`from_pretrained`; nothing is pickled.
        Afterwards :attr:`source` names this directory (unless ``update_source``
        is False), so an index built with this embedder can load it again.

        The folder is written under a temporary name and renamed into place once
        complete. An existing ``directory`` is replaced only when it is empty or
        a model saved earlier by astrovl; a folder holding anything else is
        refused (:class:`~astrovl.exceptions.OutputDirectoryError`) and left
        untouched.

        Parameters
        ----------
        directory : path-like
        update_source : bool
            Make :attr:`source` name ``directory``. False leaves it as it is (a
            copy written for other processes, such as the workers of a dask
            cluster, while indexes keep recording where the model came from).

        Returns
        -------
        pathlib.Path
            ``directory``.
        """
        from safetensors.torch import save_model

        from .. import __version__

        directory = Path(directory)
        digest = self.weights_digest
        with atomic_directory(directory, kind=OUTPUT_KIND) as tmp:
            save_model(self.model, str(tmp / WEIGHTS_NAME))
            cfg = {"format": FORMAT, "format_version": 1, "astrovl_version": __version__,
                   "model_id": self.model_id, "weights_digest": digest, **self.config}
            if self.random_weights:
                cfg["random_weights"] = True
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        if update_source:
            self.source = {"kind": "directory", "path": str(directory.resolve())}
        return directory

    def to(self, device) -> CLIPEmbedder:
        """Move the model to ``device``; returns self."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        return self

    # ------------------------------------------------------------------ embedding
    def _autocast(self):
        import contextlib

        import torch

        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def image_tensor(self, image) -> Any:
        """Load one image input and make the model's input from it (a normalised CHW tensor).

        The same host preprocessing as :meth:`embed_images` (see
        :mod:`astrovl.clip.preprocess`).
        """
        from .preprocess import InputSpec, host_model_input, read_unit_image

        return host_model_input(read_unit_image(image), InputSpec.from_embedder(self), self.preprocess)

    def embed_images(self, images, *, batch_size: int = 64, progress: bool = True,
                     num_workers: int | None = None, preprocess: str = "auto") -> np.ndarray:
        """Embed images.

        Parameters
        ----------
        images : image input, sequence of inputs, or ManifestDataset
            Anything :func:`~astrovl.load_image` accepts, a list of such inputs, or a
            dataset from the dataset builders.
        batch_size : int
        progress : bool
            Show a progress bar.
        num_workers : int, optional
            DataLoader worker processes that read (and on the ``"cpu"`` path
            scale and resize) images. Default: none for calls of fewer than 256
            images and on a CPU device, where the model needs the cores; on
            CUDA up to 8. Never more than the number of batches.
        preprocess : {"auto", "cpu", "gpu"}
            Where the display scaling, resizing and normalisation run:
            ``"cpu"`` on the host, image by image; ``"gpu"`` on the model's
            device, batch by batch, with only reading on the host (raw pixels
            go to the device from pinned memory). ``"auto"``: ``"gpu"`` on
            CUDA, else ``"cpu"``. See :mod:`astrovl.clip.preprocess` for the
            numerics and tolerances.

        Returns
        -------
        numpy.ndarray
            float32 ``(N, D)``, rows of unit length.
        """
        import torch

        from ..imaging.inputs import as_image_list
        from .preprocess import (
            FeedDataset,
            InputSpec,
            assemble_batch,
            auto_num_workers,
            collate_feed,
            resolve_preprocess,
        )

        items, _ = as_image_list(images)
        if not items:
            raise ValueError("no images to embed: the input is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        mode = resolve_preprocess(preprocess, self.device)
        spec = InputSpec.from_embedder(self)
        dataset = FeedDataset(items, spec, device_scaling=mode == "gpu",
                              transform=self.preprocess)
        n_batches = -(-len(items) // batch_size)
        if num_workers is None:
            num_workers = auto_num_workers(len(items), batch_size, self.device)
        num_workers = max(0, min(int(num_workers), n_batches))
        if num_workers == 0:
            batches = (collate_feed([dataset[i] for i in range(s, min(s + batch_size, len(items)))])
                       for s in range(0, len(items), batch_size))
        else:
            from torch.utils.data import DataLoader

            batches = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_feed,
                                 num_workers=num_workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=False)
        out = np.empty((len(items), self.embed_dim), dtype=np.float32)
        done = 0
        self.model.eval()
        with torch.inference_mode():
            bar = progress_bar(total=len(items), enabled=progress and len(items) > batch_size,
                               desc="embedding images", unit="img")
            for batch in batches:
                pixels = assemble_batch(batch, spec, self.device, dataset.stretch, dataset.interval)
                with self._autocast():
                    feats = self.model.encode_image(pixels)
                feats = torch.nn.functional.normalize(feats.float(), dim=-1)
                out[done:done + len(pixels)] = feats.cpu().numpy()
                done += len(pixels)
                bar.update(len(pixels))
            bar.close()
        return out

    def embed_text(self, texts: str | Sequence[str], *, batch_size: int = 256,
                   progress: bool = False, cache: bool = True) -> np.ndarray:
        """Embed texts; returns float32 ``(N, D)`` unit rows (a single string gives N=1).

        With ``cache`` (the default), texts this model has embedded before come from
        :data:`~astrovl.clip.textcache.TEXT_CACHE` (keyed by the model's identity,
        precision and device type) and only the others run through the text tower.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = [str(t) for t in texts]
        if not texts:
            raise ValueError("no texts to embed: the input is empty")
        if not cache:
            return self._encode_texts(texts, batch_size, progress)
        from .textcache import TEXT_CACHE

        key = (self.model_id, self.precision, self.device.type)
        found = TEXT_CACHE.get_many(key, texts)
        missing = list(dict.fromkeys(t for t, v in zip(texts, found) if v is None))
        fresh = {}
        if missing:
            vectors = self._encode_texts(missing, batch_size, progress)
            TEXT_CACHE.put_many(key, missing, vectors)
            fresh = dict(zip(missing, vectors))
        rows = [v if v is not None else fresh[t] for t, v in zip(texts, found)]
        return np.ascontiguousarray(np.stack(rows).astype(np.float32, copy=False))

    def _encode_texts(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for start in progress_bar(range(0, len(texts), batch_size), enabled=progress,
                                      desc="embedding texts"):
                tokens = self.tokenizer(texts[start:start + batch_size]).to(self.device)
                with self._autocast():
                    feats = _encode_text_trimmed(self.model, tokens)
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.ascontiguousarray(np.concatenate(out).astype(np.float32))

    def category_embeddings(self, categories: Sequence[str],
                            templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
        """Unit ``(len(categories), D)`` rows: each category's template embeddings, averaged.

        All prompts go through :meth:`embed_text` in one call, so a category list
        is embedded once per model and taken from the text cache afterwards.
        """
        cats = list(categories)
        if not cats:
            raise ValueError("categories is empty; pass at least one category")
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("every template must contain '{}' where the category goes")
        prompts = [t.format(c) for c in cats for t in templates]
        txt = self.embed_text(prompts).reshape(len(cats), len(templates), -1).mean(axis=1)
        return txt / np.linalg.norm(txt, axis=1, keepdims=True)

    def similarity(self, images, texts) -> np.ndarray:
        """Cosine similarity matrix ``(N_images, N_texts)``."""
        return self.embed_images(images, progress=False) @ self.embed_text(texts).T

    def zero_shot(self, images, categories: Sequence[str] | None = None, top_k: int = 3, *,
                  templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 64):
        """Rank categories for each image.

        Parameters
        ----------
        images : image input(s) or dataset
        categories : sequence of str, optional
            Default: the 77 Hubble categories (:data:`~astrovl.clip.HUBBLE_CATEGORIES`).
        top_k : int
            Categories kept per image.
        templates : sequence of str
            Prompt templates with ``{}`` for the category; embeddings of all templates
            are averaged per category.

        Returns
        -------
        astropy.table.Table
            Columns ``image`` (index), ``source``, ``rank`` (1 = best), ``category``,
            ``score`` (cosine similarity) and ``probability`` (softmax over all
            categories with the model's temperature).
        """
        import torch
        from astropy.table import Table

        cats = list(HUBBLE_CATEGORIES if categories is None else categories)
        txt = self.category_embeddings(cats, templates)
        top_k = max(1, min(int(top_k), len(cats)))
        from ..imaging.inputs import as_image_list, describe_input

        items, _ = as_image_list(images)
        img = self.embed_images(items, batch_size=batch_size, progress=False)
        sims = img @ txt.T
        scale = float(self.model.logit_scale.detach().exp().cpu()) if hasattr(self.model, "logit_scale") else 100.0
        probs = torch.softmax(torch.from_numpy(sims * scale), dim=1).numpy()
        rows = []
        for i in range(len(items)):
            order = np.argsort(-sims[i], kind="stable")[:top_k]
            for r, j in enumerate(order, start=1):
                rows.append((i, describe_input(items[i]), r, cats[j], float(sims[i, j]), float(probs[i, j])))
        return Table(rows=rows, names=("image", "source", "rank", "category", "score", "probability"),
                     dtype=(int, str, int, str, float, float)) if rows else Table()


def _encode_text_trimmed(model, tokens):
    """``model.encode_text(tokens)``, computed only up to the batch's last end-of-text token.

    An open_clip ``CLIP`` whose text tower is causal and pools at the end-of-text
    token (``text_pool_type="argmax"``, the OpenAI CLIP design) gives the same
    embedding whatever follows that token, so the padding after it is not
    computed: a short query costs a fraction of the 77 positions. Other models
    run ``encode_text`` unchanged.
    """
    import open_clip
    import torch

    if type(model) is not open_clip.CLIP or model.text_pool_type != "argmax" or model.attn_mask is None:
        return model.encode_text(tokens)
    n = int(tokens.argmax(dim=-1).max()) + 1
    if n >= tokens.shape[1]:
        return model.encode_text(tokens)
    tokens = tokens[:, :n]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if model.text_projection is None:
        return x
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection

