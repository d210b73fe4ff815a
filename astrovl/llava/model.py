"""AstroLLaVA: describe and answer questions about astronomical images with a LLaVA model."""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import CheckpointError, ModelNotFoundError
from ..utils.devices import resolve_device
from ..utils.imports import optional_import
from ..utils.progress import progress_bar
from .chat import close_assistant_turns
from .checkpoints import detect_layout, fetch_weights, is_original_config, read_json
from .hub import ResolvedCheckpoint, resolve_checkpoint, resolve_reference
from .template import (
    DEFAULT_CAPTION_PROMPT,
    LLAVA_CHAT_TEMPLATE,
    STOP_STRINGS,
    VICUNA_V1_CHAT_TEMPLATE,
)

__all__ = ["AstroLLaVA", "is_original_llava_layout", "expand2square"]

log = logging.getLogger(__name__)


def is_original_llava_layout(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a checkpoint in the original LLaVA repository layout.

    Such checkpoints have ``model_type`` ``"llava_llama"`` (or its siblings, or
    ``mm_vision_tower`` keys) in ``config.json`` and store the projector under
    ``mm_projector``; transformers cannot load them directly, so
    :meth:`AstroLLaVA.from_pretrained` converts them (see
    :func:`~astrovl.llava.convert_llava_checkpoint`).
    """
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file() or (Path(path) / "adapter_config.json").is_file():
        return False
    try:
        return is_original_config(read_json(cfg_path))
    except Exception:
        return False


def expand2square(img, background: tuple[int, int, int]):
    """Pad a PIL image to a square with ``background``, centred (LLaVA-1.5's ``expand2square``).

    LLaVA-1.5 pads with the image processor's mean colour
    (``tuple(int(255 * m) for m in image_processor.image_mean)``, rounded down), so
    the padding is close to zero after normalisation (within 0.012 for the CLIP
    ViT-L/14-336 processor, whose mean gives ``(122, 116, 104)``).
    """
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), tuple(background) if img.mode == "RGB" else background[0])
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def pad_colour(processor) -> tuple[int, int, int]:
    """The padding colour of LLaVA-1.5 for ``processor``: its image mean, in 0-255."""
    mean = getattr(getattr(processor, "image_processor", None), "image_mean", None) or (0.5, 0.5, 0.5)
    if np.isscalar(mean):
        mean = (mean,) * 3
    return tuple(int(float(m) * 255) for m in mean)


class AstroLLaVA:
    """A LLaVA vision-language model for astronomical images.

    Images can be anything :func:`~astrovl.load_image` accepts (FITS files, HDUs,
    NDData, arrays, pictures); they are scaled for display with astropy, padded to
    a square with the image processor's mean colour (LLaVA-1.5 style, so the
    whole field is seen) and handed to the model's own processor.

    Create with :meth:`from_pretrained`.

    Attributes
    ----------
    model : transformers.LlavaForConditionalGeneration (or a peft wrapper)
    processor : transformers.LlavaProcessor
    device : torch.device
    source : str
        Where the model came from (hub id and revision, or directory).
    """

    def __init__(self, model, processor, *, device=None, pad_to_square: bool = True,
                 source: str = "<in memory>"):
        self.device = resolve_device(device)
        self.model = model
        self.processor = processor
        self.pad_to_square = pad_to_square
        self.source = source
        tok = processor.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if getattr(processor, "chat_template", None) is None:
            processor.chat_template = LLAVA_CHAT_TEMPLATE
        self.pad_colour = pad_colour(processor)
        self.model.eval()

    def __repr__(self) -> str:
        return f"<AstroLLaVA {self.source} device={self.device}>"

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, *, revision: str | None = None,
                        device=None, dtype=None, load_in_4bit: bool = False,
                        adapter: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
                        merge: bool = False, vision_tower: str | os.PathLike | None = None,
                        trust_remote_code: bool = False, pad_to_square: bool = True) -> AstroLLaVA:
        """Load a LLaVA model by hub id or directory, in any released layout.

        Parameters
        ----------
        name_or_path : str or path-like, optional
            A hub id or a local directory. Default ``astrovl.conf.llava_model``
            (``"UniverseTBD/AstroLLaVA_v3"``, the released AstroLLaVA). Hub ids
            are resolved through the Hugging Face cache (``HF_HOME`` /
            ``HF_HUB_CACHE``; offline with ``HF_HUB_OFFLINE=1``). The layout is
            detected:

            - transformers layout (``llava-hf/llava-1.5-7b-hf``, directories
              written by :meth:`save_pretrained`): loaded as it is, with its own
              chat template;
            - original LLaVA layout (``model_type`` ``llava_llama``:
              ``liuhaotian/llava-v1.5-7b``, ``UniverseTBD/AstroLLaVA_v3``):
              converted once into the astrovl cache (keyed by hub id and
              revision) with the vision tower named by ``mm_vision_tower`` and the
              Vicuna-v1 chat template, then reused;
            - LoRA release (``adapter_config.json``, e.g. AstroLLaVA v1/v2): its
              base (``base_model_name_or_path``, resolved the same way) is
              loaded, the projector from ``non_lora_trainables.bin`` put in and
              the adapter applied with peft.
        revision : str, optional
            Branch, tag or commit of a hub id.
        device : str, optional
            ``"auto"`` (default), ``"cpu"``, ``"cuda"``...
        dtype : str or torch.dtype, optional
            Default bfloat16 on CUDA, float32 on CPU.
        load_in_4bit : bool
            4-bit quantisation with bitsandbytes (CUDA).
        adapter : str or path-like, optional
            A LoRA adapter directory (peft, e.g. written by
            :func:`~astrovl.training.train_llava`) to apply on top.
        base : str or path-like, optional
            For a LoRA release: the base model to use instead of the one its
            ``adapter_config.json`` names (needed when that is a path on the
            machine that trained it and not a known release).
        merge : bool
            Merge LoRA weights (of a release or of ``adapter``) into the model.
        vision_tower : str or path-like, optional
            For an original-layout checkpoint: the CLIP vision tower to use instead
            of its ``mm_vision_tower``.
        trust_remote_code : bool
            Passed to transformers; off by default.
        pad_to_square : bool
            Pad images to a square before the processor (LLaVA-1.5 behaviour).

        Raises
        ------
        ModelNotFoundError
            When the name is neither a directory nor a cached or downloadable hub
            id (the message names the cache and the download command).
        CheckpointError
            For checkpoints that cannot be loaded (unknown layouts, unsupported
            projectors, weights of the wrong shape, unsafe pickles).
        """
        from ..config import conf

        optional_import("transformers", purpose="LLaVA models")  # before looking for the weights
        name = name_or_path if name_or_path is not None else conf.llava_model
        dev = resolve_device(device)
        source = resolve_checkpoint(name, revision=revision)
        layout = detect_layout(source.path)
        options = dict(dtype=dtype, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code,
                       vision_tower=vision_tower)
        if layout == "lora":
            from .lora import LoRARelease, apply_lora_release, release_base

            release = LoRARelease.read(source)
            base_source = resolve_reference(release_base(release, base), what="base model") if base is None \
                else resolve_checkpoint(base)
            if detect_layout(base_source.path) == "lora":
                raise CheckpointError(f"the base of {source.name!r}, {base_source.name!r}, is itself an adapter; "
                                      "pass base= a full model")
            model, processor = _load_full(base_source, dev, **options)
            model = apply_lora_release(model, release, merge=merge)
            if release.trained_with_llava_code:
                processor.chat_template = VICUNA_V1_CHAT_TEMPLATE
            label = f"{source.name} (LoRA on {base_source.name})"
        else:
            model, processor = _load_full(source, dev, **options)
            label = source.name
        if adapter is not None:
            optional_import("peft", purpose="LoRA adapters")
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
            if merge:
                model = model.merge_and_unload()
            label += f" + adapter {adapter}"
        return cls(model, processor, device=dev, pad_to_square=pad_to_square, source=label)

    def save_pretrained(self, directory: str | os.PathLike, *, merge_adapter: bool = False) -> Path:
        """Save model (safetensors) and processor to ``directory`` atomically.

        A LoRA-wrapped model saves only its adapter unless ``merge_adapter`` is true.
        The folder is written under a temporary name and renamed into place once
        complete; an existing ``directory`` is replaced only when it is empty or
        a model saved earlier by astrovl. A folder holding anything else is
        refused (:class:`~astrovl.exceptions.OutputDirectoryError`) and left
        untouched.
        """
        from ..utils.files import atomic_directory

        model = self.model
        if merge_adapter and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        directory = Path(directory)
        with atomic_directory(directory, kind="llava-model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            self.processor.save_pretrained(tmp)
        return directory

    # ------------------------------------------------------------------ inputs
    def _pil(self, image):
        from ..imaging import AstroImage, load_image

        img = image if isinstance(image, AstroImage) else load_image(image)
        pil = img.to_pil()
        if max(pil.size) > 4096:
            warnings.warn(f"image {img.source!r} is {pil.size[0]}x{pil.size[1]} pixels; it is resized "
                          "by the processor to the model's input size", stacklevel=3)
        return expand2square(pil, self.pad_colour) if self.pad_to_square else pil

    def _prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    @staticmethod
    def _user(text: str, with_image: bool = True) -> dict:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        return {"role": "user", "content": content}

    @staticmethod
    def _check_text(text, what: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"{what} must be a string, not {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{what} is empty; write a question or instruction")
        return text

    def _stop_ids(self) -> list[int]:
        tok = self.processor.tokenizer
        ids = {tok.eos_token_id}
        for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tok.unk_token_id and i is not None and i >= 0:
                ids.add(i)
        return [i for i in ids if i is not None]

    @staticmethod
    def _cut(text: str) -> str:
        cut = len(text)
        for s in STOP_STRINGS:
            j = text.find(s)
            if j >= 0:
                cut = min(cut, j)
        return text[:cut].strip()

    # ------------------------------------------------------------------ generation
    def _generate(self, pils: list, prompts: list[str], max_new_tokens: int, **gen_kwargs) -> list[str]:
        import torch

        inputs = self.processor(images=pils, text=prompts, padding=True, return_tensors="pt")
        # LLaVA takes no token type ids (generate of transformers 4.x rejects them)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k != "token_type_ids"}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        tok = self.processor.tokenizer
        gen = dict(max_new_tokens=int(max_new_tokens), do_sample=False, eos_token_id=self._stop_ids(),
                   pad_token_id=tok.pad_token_id)
        gen.update(gen_kwargs)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **gen)
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        return [self._cut(t) for t in texts]

    def caption(self, images, prompt: str | None = None, *, max_new_tokens: int = 200, batch_size: int = 8,
                progress: bool = True, **gen_kwargs) -> str | list[str]:
        """Describe one image (returns a string) or several (returns a list).

        Parameters
        ----------
        images : image input or sequence of image inputs
        prompt : str, optional
            Instruction; default ``"Describe this astronomical image in detail."``
        max_new_tokens : int
        batch_size : int
            Images per batched ``generate`` call (left padding).
        **gen_kwargs
            Extra arguments for ``generate`` (greedy decoding by default).
        """
        from ..imaging.inputs import as_image_list

        prompt = self._check_text(prompt if prompt is not None else DEFAULT_CAPTION_PROMPT, "prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        items, single = as_image_list(images)
        if not items:
            raise ValueError("no images to caption: the input is empty")
        text = self._prompt([self._user(prompt)])
        out: list[str] = []
        for start in progress_bar(range(0, len(items), batch_size), enabled=progress and len(items) > batch_size,
                                  desc="captioning", unit="batch"):
            chunk = items[start:start + batch_size]
            out.extend(self._generate([self._pil(x) for x in chunk], [text] * len(chunk), max_new_tokens,
                                      **gen_kwargs))
        return out[0] if single else out

    def ask(self, image, question: str, *, max_new_tokens: int = 200, **gen_kwargs) -> str:
        """Answer a free question about one image."""
        self._check_text(question, "question")
        return self.caption(image, question, max_new_tokens=max_new_tokens, **gen_kwargs)

    def chat(self, image, history: Sequence, *, max_new_tokens: int = 200, **gen_kwargs) -> str:
        """Continue a conversation about one image.

        Parameters
        ----------
        image : image input
        history : sequence
            Turns as ``{"role": "user"|"assistant", "content": str}`` dicts or
            ``(role, text)`` pairs, starting and ending with a user turn.
        """
        turns = []
        for t in history:
            role, text = (t["role"], t["content"]) if isinstance(t, dict) else (t[0], t[1])
            if role not in ("user", "assistant"):
                raise ValueError(f"role {role!r} must be 'user' or 'assistant'")
            turns.append((role, self._check_text(text, f"{role} turn")))
        if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
            raise ValueError("history must start and end with a user turn")
        messages = []
        for i, (role, text) in enumerate(turns):
            if role == "user":
                messages.append(self._user(text, with_image=i == 0))
            else:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        # answers in the history end with the end-of-sequence token, as in training
        prompt = self._prompt(close_assistant_turns(self.processor, messages))
        return self._generate([self._pil(image)], [prompt], max_new_tokens, **gen_kwargs)[0]

    def score(self, image, texts: Sequence[str], prompt: str | None = None, *, batch_size: int = 8) -> np.ndarray:
        """Mean log-likelihood per token of each text as the answer about ``image``.

        Higher is better; use it to rank candidate descriptions or classes
        zero-shot with the generative model. The image is processed and encoded
        once, with the prompt (its keys and values are cached); the candidate
        texts then run ``batch_size`` at a time.

        Parameters
        ----------
        image : image input
        texts : str or sequence of str
            Candidate answers.
        prompt : str, optional
            The question; default ``"Describe this astronomical image in detail."``
        batch_size : int
            Candidates per forward pass.

        Returns
        -------
        numpy.ndarray
            One value per text.
        """
        import torch

        prompt, texts = self._score_inputs(texts, prompt)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        pil = self._pil(image)
        prefix = self._prompt([self._user(prompt)])
        inputs = self._to_device(self.processor(images=[pil], text=[prefix], return_tensors="pt"))
        prefix_ids = inputs["input_ids"][0]
        full_ids = self._candidate_ids(prefix, prefix_ids, texts)
        scores = np.full(len(texts), np.nan)
        with torch.inference_mode():
            cache_name = _cache_argument(self.model)
            out = self.model(**inputs, use_cache=True)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            cache = out.get("cache") if cache_name == "cache" else out.past_key_values
            n_prefix = prefix_ids.numel()
            cont, fallback = {}, []
            for i, ids in enumerate(full_ids):
                if ids.numel() > n_prefix and torch.equal(ids[:n_prefix], prefix_ids.cpu()):
                    cont[i] = ids[n_prefix:]
                else:  # the tokenizer merged prompt and answer at their boundary: score it whole
                    fallback.append(i)
            order = sorted(cont)
            pad = self.processor.tokenizer.pad_token_id or 0
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                length = max(cont[i].numel() for i in chunk)
                ids = torch.full((len(chunk), length), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), n_prefix + length), dtype=torch.long)
                mask[:, :n_prefix] = 1
                for row, i in enumerate(chunk):
                    m = cont[i].numel()
                    ids[row, :m] = cont[i]
                    mask[row, n_prefix:n_prefix + m] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                # the cache grows with each forward: the last chunk may use (and spend) the original
                past = cache if start + batch_size >= len(order) else copy.deepcopy(cache)
                past.batch_repeat_interleave(len(chunk))
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=True,
                                    **{cache_name: past}).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                for row, i in enumerate(chunk):
                    m = cont[i].numel()
                    target = ids[row, :m]
                    token_lp = torch.cat([first[target[:1]],
                                          logp[row, :m - 1].gather(1, target[1:, None])[:, 0]])
                    scores[i] = float(token_lp.mean())
        if fallback:
            scores[fallback] = self._score_unbatched(pil, [texts[i] for i in fallback], prompt)
        return scores

    def rerank_scores(self, query: str, images, *, prompt: str | None = None, batch_size: int = 8,
                      progress: bool = False) -> np.ndarray:
        """How well ``query`` describes each image: its mean log-likelihood per token as the answer.

        The re-ranking score of :meth:`EmbeddingIndex.search(..., rerank=model)
        <astrovl.EmbeddingIndex.search>`: for every image, the model reads the
        image and the prompt and scores ``query`` as its answer (the
        :meth:`score` of one text, seen from the other side: one text, many
        images). Each image goes through the vision tower once; the images run
        ``batch_size`` at a time.

        Parameters
        ----------
        query : str
            A description, such as a search query ("barred spiral galaxy").
        images : image input or sequence of image inputs
        prompt : str, optional
            The instruction; default ``"Describe this astronomical image in detail."``
        batch_size : int
            Images per forward pass.
        progress : bool

        Returns
        -------
        numpy.ndarray
            One value per image (higher: the query fits the image better).
        """
        import torch

        from ..imaging.inputs import as_image_list

        prompt, (query,) = self._score_inputs([query], prompt)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        items, _ = as_image_list(images)
        if not items:
            raise ValueError("no images to score: the input is empty")
        prefix = self._prompt([self._user(prompt)])
        full = prefix + " " + query + (self.processor.tokenizer.eos_token or "")
        scores = np.empty(len(items), dtype=np.float64)
        n_answer = None
        for start in progress_bar(range(0, len(items), batch_size), enabled=progress and len(items) > batch_size,
                                  desc="re-ranking", unit="batch"):
            pils = [self._pil(x) for x in items[start:start + batch_size]]
            inputs = self._to_device(self.processor(images=pils, text=[full] * len(pils), return_tensors="pt"))
            ids = inputs["input_ids"]
            if n_answer is None:  # the same text for every image: the answer is the same last tokens
                n_prefix = self.processor(images=pils[:1], text=[prefix], return_tensors="pt")["input_ids"].shape[1]
                n_answer = ids.shape[1] - n_prefix
                if n_answer < 1:
                    raise ValueError(f"the query {query!r} adds no tokens to the prompt")
            with torch.inference_mode():
                logits = self.model(**inputs).logits[:, -n_answer - 1:-1].float()
            token_lp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, -n_answer:, None])[..., 0]
            scores[start:start + len(pils)] = token_lp.mean(dim=1).cpu().numpy()
        return scores

    def _score_inputs(self, texts, prompt) -> tuple[str, list[str]]:
        prompt = self._check_text(prompt if prompt is not None else DEFAULT_CAPTION_PROMPT, "prompt")
        texts = [self._check_text(t, "text") for t in ([texts] if isinstance(texts, str) else texts)]
        if not texts:
            raise ValueError("texts is empty")
        return prompt, texts

    def _to_device(self, inputs) -> dict:
        # LLaVA takes no token type ids (generate of transformers 4.x rejects them)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k != "token_type_ids"}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _candidate_ids(self, prefix: str, prefix_ids, texts: list[str]) -> list:
        """Token ids of ``prefix + " " + text + eos`` for every text, as the processor makes them.

        The processor expands each image placeholder into the model's image tokens
        before it tokenizes; the same is done here without processing the image again.
        """
        import torch

        proc = self.processor
        tok = proc.tokenizer
        image_token = getattr(proc, "image_token", "<image>")
        image_id = self.model.config.image_token_index
        n_image = int((prefix_ids == image_id).sum())
        n_slots = max(1, prefix.count(image_token))
        expanded = prefix.replace(image_token, image_token * (n_image // n_slots))
        eos = tok.eos_token or ""
        enc = tok([expanded + " " + t + eos for t in texts], add_special_tokens=True)["input_ids"]
        return [torch.as_tensor(ids, dtype=torch.long) for ids in enc]

    def _score_unbatched(self, image, texts: Sequence[str], prompt: str | None = None) -> np.ndarray:
        """Reference of :meth:`score`: the processor and a full forward pass for every text.

        The way :meth:`score` worked before it was batched: for every text the
        processor runs on the prompt and on the prompt with the text, and the whole
        model on the latter. Slower (the image is processed and encoded twice per
        text); kept to check the batched path (and to time it, see
        ``benchmarks/bench_llava_score.py``), and to score texts whose tokens merge
        with the prompt's.
        """
        import torch

        prompt, texts = self._score_inputs(texts, prompt)
        pil = image if hasattr(image, "size") and hasattr(image, "mode") else self._pil(image)
        prefix = self._prompt([self._user(prompt)])
        tok = self.processor.tokenizer
        scores = []
        for t in texts:
            n_prefix = self.processor(images=[pil], text=[prefix], return_tensors="pt")["input_ids"].shape[1]
            full = prefix + " " + t + (tok.eos_token or "")
            inputs = self._to_device(self.processor(images=[pil], text=[full], return_tensors="pt"))
            with torch.inference_mode():
                logits = self.model(**inputs).logits.float()
            ids = inputs["input_ids"][0]
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            token_lp = logp.gather(1, ids[1:, None])[:, 0]
            answer = token_lp[n_prefix - 1:]
            scores.append(float(answer.mean()) if answer.numel() else float("nan"))
        return np.asarray(scores, dtype=np.float64)


def _cache_argument(model) -> str:
    """Name of the key/value cache argument of the model's forward (``cache`` in newer transformers)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _load_full(source: ResolvedCheckpoint, dev, *, dtype=None, load_in_4bit: bool = False,
               trust_remote_code: bool = False, vision_tower=None):
    """Model and processor of a full (non-adapter) checkpoint, converting an original layout once."""
    import torch
    optional_import("transformers", purpose="LLaVA models")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    layout = detect_layout(source.path)
    if layout == "original":
        from .convert import converted_checkpoint

        directory = converted_checkpoint(source, vision_tower=vision_tower)
    else:
        if source.repo_id is not None:
            fetch_weights(source)
        directory = source.path
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        if dev.type != "cuda":
            raise ValueError("load_in_4bit needs a CUDA device; pass device='cuda' or drop load_in_4bit")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise ImportError("load_in_4bit needs bitsandbytes: pip install bitsandbytes") from exc
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": dev.index or 0}
    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(directory), **kwargs)
        processor = AutoProcessor.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not load a LLaVA model from {source.name!r} ({directory}): {exc}") from exc
    if not load_in_4bit:
        model = model.to(dev)
    return model, processor
