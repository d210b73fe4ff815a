"""AstroLLaVA: describe and answer questions about astronomical images with a LLaVA model."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import CheckpointError, ModelNotFoundError
from ..utils.devices import resolve_device
from ..utils.progress import progress_bar
from .template import DEFAULT_CAPTION_PROMPT, LLAVA_CHAT_TEMPLATE, STOP_STRINGS

__all__ = ["AstroLLaVA", "is_original_llava_layout"]

log = logging.getLogger(__name__)


def is_original_llava_layout(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a checkpoint in the original LLaVA repository layout.

    Such checkpoints have ``model_type`` ``"llava_llama"`` (or ``mm_vision_tower`` keys)
    in ``config.json`` and store the projector under ``mm_projector``; transformers
    cannot load them directly (see :func:`~astrovl.llava.convert_llava_checkpoint`).
    """
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return False
    try:
        cfg = json.loads(cfg_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return cfg.get("model_type") in ("llava_llama", "llava_mistral", "llava_mpt") or (
        "mm_vision_tower" in cfg and cfg.get("model_type") != "llava")


def _pad_to_square(img):
    """Pad a PIL image to a square with its mean colour (LLaVA-1.5 'pad' aspect ratio)."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    mean = tuple(int(round(v)) for v in np.asarray(img).reshape(-1, 3).mean(axis=0))
    out = Image.new("RGB", (side, side), mean)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


class AstroLLaVA:
    """A LLaVA vision-language model for astronomical images.

    Images can be anything :func:`~astrovl.load_image` accepts (FITS files, HDUs,
    NDData, arrays, pictures); they are scaled for display with astropy, padded to
    a square (LLaVA-1.5 style, so the whole field is seen) and handed to the
    model's own processor.

    Create with :meth:`from_pretrained`.

    Attributes
    ----------
    model : transformers.LlavaForConditionalGeneration (or a peft wrapper)
    processor : transformers.LlavaProcessor
    device : torch.device
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
        self.model.eval()

    def __repr__(self) -> str:
        return f"<AstroLLaVA {self.source} device={self.device}>"

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, device=None, dtype=None,
                        load_in_4bit: bool = False, adapter: str | os.PathLike | None = None,
                        trust_remote_code: bool = False, convert: bool = False,
                        pad_to_square: bool = True) -> AstroLLaVA:
        """Load a LLaVA model in the transformers layout.

        Parameters
        ----------
        name_or_path : str or path-like
            A hub id (e.g. ``"llava-hf/llava-1.5-7b-hf"``) or a local directory
            (a transformers LLaVA checkpoint, or one written by :meth:`save_pretrained`).
        device : str, optional
            ``"auto"`` (default), ``"cpu"``, ``"cuda"``...
        dtype : str or torch.dtype, optional
            Default bfloat16 on CUDA, float32 on CPU.
        load_in_4bit : bool
            4-bit quantisation with bitsandbytes (CUDA).
        adapter : str or path-like, optional
            A LoRA adapter directory (peft) to apply.
        trust_remote_code : bool
            Passed to transformers; off by default.
        convert : bool
            If the checkpoint is in the original LLaVA repository layout, convert it
            into the astrovl cache first (otherwise an error explains how).
        pad_to_square : bool
            Pad images to a square before the processor (LLaVA-1.5 behaviour).
        """
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        dev = resolve_device(device)
        path = Path(name_or_path)
        if path.is_dir() and is_original_llava_layout(path):
            if not convert:
                raise CheckpointError(
                    f"{str(path)!r} is an original-layout LLaVA checkpoint (model_type 'llava_llama', "
                    "mm_projector weights) that transformers cannot load. Convert it once with "
                    f"`astrovl convert-llava {path} OUT_DIR` (or astrovl.llava.convert_llava_checkpoint) "
                    "and load OUT_DIR, or pass convert=True to convert into the cache"
                )
            from .convert import convert_llava_checkpoint, converted_cache_path

            target = converted_cache_path(path)
            if not (target / "config.json").is_file():
                convert_llava_checkpoint(path, target)
            path = target
            name_or_path = str(target)
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
            model = LlavaForConditionalGeneration.from_pretrained(str(name_or_path), **kwargs)
            processor = AutoProcessor.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise ModelNotFoundError(
                f"could not load a LLaVA model from {str(name_or_path)!r}: {exc}. Pass a local directory in "
                "the transformers LLaVA layout (e.g. a downloaded llava-hf/llava-1.5-7b-hf, or one written "
                "by AstroLLaVA.save_pretrained / convert_llava_checkpoint)"
            ) from exc
        if not load_in_4bit:
            model = model.to(dev)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        return cls(model, processor, device=dev, pad_to_square=pad_to_square, source=str(name_or_path))

    def save_pretrained(self, directory: str | os.PathLike, *, merge_adapter: bool = False) -> Path:
        """Save model (safetensors) and processor to ``directory`` atomically.

        A LoRA-wrapped model saves only its adapter unless ``merge_adapter`` is true.
        """
        from ..utils.files import atomic_directory

        model = self.model
        if merge_adapter and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
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
        return _pad_to_square(pil) if self.pad_to_square else pil

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
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
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
        from ..clip.inputs import as_image_list

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
        prompt = self._prompt(messages)
        return self._generate([self._pil(image)], [prompt], max_new_tokens, **gen_kwargs)[0]

    def score(self, image, texts: Sequence[str], prompt: str | None = None) -> np.ndarray:
        """Mean log-likelihood per token of each text as the answer about ``image``.

        Higher is better; use it to rank candidate descriptions or classes
        zero-shot with the generative model.

        Returns
        -------
        numpy.ndarray
            One value per text.
        """
        import torch

        prompt = self._check_text(prompt if prompt is not None else DEFAULT_CAPTION_PROMPT, "prompt")
        texts = [self._check_text(t, "text") for t in ([texts] if isinstance(texts, str) else texts)]
        if not texts:
            raise ValueError("texts is empty")
        pil = self._pil(image)
        prefix = self._prompt([self._user(prompt)])
        tok = self.processor.tokenizer
        scores = []
        for t in texts:
            full = prefix + " " + t + (tok.eos_token or "")
            inputs = self.processor(images=[pil], text=[full], return_tensors="pt")
            n_prefix = self.processor(images=[pil], text=[prefix], return_tensors="pt")["input_ids"].shape[1]
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                logits = self.model(**inputs).logits.float()
            ids = inputs["input_ids"][0]
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            target = ids[1:]
            token_lp = logp.gather(1, target[:, None])[:, 0]
            answer = token_lp[n_prefix - 1:]
            scores.append(float(answer.mean()) if answer.numel() else float("nan"))
        return np.asarray(scores, dtype=np.float64)
