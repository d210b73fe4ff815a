"""AstroLLaVA: describe and answer questions about astronomical images with a LLaVA model."""

from __future__ import annotations

import copy
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import CheckpointError, ModelNotFoundError
from ..utils.devices import resolve_device
from ..utils.imports import optional_import
from ..utils.progress import progress_bar
from .chat import close_assistant_turns
from .checkpoints import detect_layout, fetch_weights, is_original_config, read_json
from .convert import CONVERSION_RECORD, LLAVA_CHUNKS, prompt_tokenization
from .hub import ResolvedCheckpoint, resolve_checkpoint, resolve_reference
from .template import (
    DEFAULT_CAPTION_PROMPT,
    LLAVA_CHAT_TEMPLATE,
    STOP_STRINGS,
    VICUNA_V1_CHAT_TEMPLATE,
)

__all__ = ["AstroLLaVA", "is_original_llava_layout", "expand2square", "llava_chunk_ids", "is_plain_language_model"]

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


def llava_chunk_ids(tokenizer, prompt: str, image_token: str, image_ids: Sequence[int]) -> list[int]:
    """Token ids of ``prompt`` as the original LLaVA code makes them (its ``tokenizer_image_token``).

    The text is split at every ``image_token``; each piece is tokenized on its
    own, with the tokenizer's own handling of a piece's start (for Llama's
    SentencePiece tokenizer a ``▁`` token before a piece that starts with a line
    break, as after ``<image>``); the beginning-of-sequence token is kept once,
    at the start, and ``image_ids`` go where the placeholders were.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    prompt : str
    image_token : str
        The placeholder, e.g. ``"<image>"``.
    image_ids : sequence of int
        What replaces each placeholder (the original code puts one id, -200, and
        swaps in the image features; transformers' LLaVA wants one image token
        per image feature).
    """
    chunks = [tokenizer(c).input_ids for c in prompt.split(image_token)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.extend(image_ids)
        ids.extend(chunk[offset:])
    return ids


def is_plain_language_model(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a language model without vision (``model_type`` ``llama`` or ``mistral``)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file() or (Path(path) / "adapter_config.json").is_file():
        return False
    cfg = read_json(cfg_path)
    return cfg.get("model_type") in ("llama", "mistral") and not is_original_config(cfg)


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
    prompt_tokenization : str or None
        ``"llava_chunks"`` for converted original LLaVA checkpoints: prompts are
        tokenized as the original LLaVA code does (:func:`llava_chunk_ids`);
        None: by the processor.
    """

    def __init__(self, model, processor, *, device=None, pad_to_square: bool = True,
                 source: str = "<in memory>", prompt_tokenization: str | None = None):
        if prompt_tokenization not in (None, LLAVA_CHUNKS):
            raise ValueError(f"prompt_tokenization={prompt_tokenization!r}; use None (the processor's) or "
                             f"{LLAVA_CHUNKS!r} (the original LLaVA code's)")
        self.device = resolve_device(device)
        self.model = model
        self.processor = processor
        self.pad_to_square = pad_to_square
        self.source = source
        self.prompt_tokenization = prompt_tokenization
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
            - original LLaVA layout (``model_type`` ``llava_llama``, or
              ``llava`` with ``LlavaLlamaForCausalLM``: ``liuhaotian/llava-v1.5-7b``,
              ``UniverseTBD/AstroLLaVA_v3``): converted once into the astrovl
              cache (keyed by hub id and revision, or path and digest, and by the
              resolved vision tower) with the vision tower named by
              ``mm_vision_tower`` (or held in the checkpoint) and the Vicuna-v1
              chat template, then reused; prompts are tokenized as the original
              LLaVA code does (:func:`llava_chunk_ids`);
            - LoRA release (``adapter_config.json``, e.g. AstroLLaVA v1/v2,
              ``liuhaotian/llava-v1.5-7b-lora``): its base
              (``base_model_name_or_path``, resolved the same way; a path of the
              training machine naming a known release is replaced by its hub id
              with a :class:`~astrovl.llava.hub.TrainingPathWarning`) is loaded,
              the projector from ``non_lora_trainables.bin`` put in and the
              adapter applied with peft. A base that is a plain language model
              (``model_type`` ``llama``, e.g. Vicuna) is made a LLaVA model from
              the release's own ``config.json`` first.

            A name that is an existing directory, starts with ``./``, ``../``,
            ``/`` or ``~``, or has more than one ``/`` is a local path and never
            looked up on the hub (:func:`astrovl.utils.hub.is_local_name`).
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
            For an original-layout checkpoint (or a LoRA release built on one): the
            CLIP vision tower to use instead of its ``mm_vision_tower`` or of the
            tower weights it holds. A full ``CLIPModel`` or a ``CLIPVisionModel``
            of any transformers version. An error for transformers-layout
            checkpoints, which hold their own tower.
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
        options = dict(dtype=dtype, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
        if (source.path / "adapter_config.json").is_file():
            model, processor, tokenization, label = _load_lora_release(source, dev, base=base, merge=merge,
                                                                       vision_tower=vision_tower, **options)
        else:
            directory = _checkpoint_directory(source, vision_tower)
            model, processor = _load_directory(directory, source, dev, **options)
            tokenization, label = prompt_tokenization(directory), source.name
        if adapter is not None:
            optional_import("peft", purpose="LoRA adapters")
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
            if merge:
                model = model.merge_and_unload()
            label += f" + adapter {adapter}"
        return cls(model, processor, device=dev, pad_to_square=pad_to_square, source=label,
                   prompt_tokenization=tokenization)

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
            if self.prompt_tokenization is not None:
                import json

                (tmp / CONVERSION_RECORD).write_text(json.dumps(
                    {"saved_from": self.source, "prompt_tokenization": self.prompt_tokenization}, indent=2),
                    encoding="utf-8")
        return directory

    # ------------------------------------------------------------------ inputs
    def _pil(self, image):
        from ..imaging import AstroImage, load_image

        img = image if isinstance(image, AstroImage) else load_image(image)
        pil = img.to_pil()
        if pil.mode != "RGB":  # as LLaVA reads its images; older image processors do not convert grey
            pil = pil.convert("RGB")
        if max(pil.size) > 4096:
            warnings.warn(f"image {img.source!r} is {pil.size[0]}x{pil.size[1]} pixels; it is resized "
                          "by the processor to the model's input size", stacklevel=3)
        return expand2square(pil, self.pad_colour) if self.pad_to_square else pil

    def _image_seq_length(self) -> int:
        cfg = self.model.config
        vision = cfg.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n + (1 if getattr(cfg, "vision_feature_select_strategy", "default") == "full" else 0)

    def _encode(self, pils: list, prompts: list[str]) -> dict:
        """Token ids (left padded), attention mask and pixel values of images with their prompts.

        Converted original LLaVA checkpoints (``prompt_tokenization="llava_chunks"``)
        get the token ids the original LLaVA code builds (:func:`llava_chunk_ids`),
        others those of their processor.
        """
        import torch

        if self.prompt_tokenization != LLAVA_CHUNKS:
            return self.processor(images=pils, text=prompts, padding=True, return_tensors="pt")
        tok = self.processor.tokenizer
        image_token = getattr(self.processor, "image_token", "<image>")
        image_ids = [self.model.config.image_token_index] * self._image_seq_length()
        rows = [llava_chunk_ids(tok, p, image_token, image_ids) for p in prompts]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        # PIL pictures are height x width x channels; say so (older processors guess, and can guess wrong)
        pixels = self.processor.image_processor(pils, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}

    def rendered_prompt(self, question: str) -> str:
        """The text the model reads for ``question`` asked about one image (its chat template applied).

        A converted original LLaVA-1.5 checkpoint, for instance, reads the Vicuna v1
        conversation: the system line, then ``USER:``, the image placeholder, the
        question and ``ASSISTANT:``.
        """
        return self._prompt([self._user(self._check_text(question, "question"))])

    def model_inputs(self, image, question: str | None = None) -> dict:
        """The inputs :meth:`ask` (and :meth:`caption`) give the model for ``image`` and ``question``.

        ``input_ids`` (the image placeholder expanded to the image's tokens),
        ``attention_mask`` and ``pixel_values``, on the model's device: the
        prompt exactly as the model sees it, e.g. to compare with another
        implementation or to compute the logits of the first answer token.
        """
        question = self._check_text(question if question is not None else DEFAULT_CAPTION_PROMPT, "question")
        return self._to_device(self._encode([self._pil(image)], [self._prompt([self._user(question)])]))

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

        inputs = self._to_device(self._encode(pils, prompts))
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

    def generate_chats(self, requests: Sequence) -> list:
        """Answer several conversations in one batched ``generate`` call, streaming each answer.

        The prompts are left-padded into one batch; each request keeps its own
        token limit, stop strings, temperature and top-p, and its answer goes
        to its ``on_text`` callback piece by piece as it is generated (from this
        thread), cut at the model's turn markers and its own stop strings, as
        :meth:`chat` cuts it. With greedy decoding (temperature 0, the default)
        each answer is the one :meth:`chat` or :meth:`ask` gives alone.

        Parameters
        ----------
        requests : sequence of ChatRequest
            See :class:`~astrovl.llava.streaming.ChatRequest`.

        Returns
        -------
        list of ChatResult
            The answers in the order of ``requests``, with their finish reasons
            and token counts.
        """
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from .streaming import BatchStreamer, ChatResult, RowSampling, RowStopping, TextStream

        if not requests:
            return []
        prompts = [self._prompt(close_assistant_turns(self.processor, r.messages)) for r in requests]
        pils = [self._pil(r.image) for r in requests if r.image is not None]
        inputs = self._to_device(self.processor(images=pils or None, text=prompts, padding=True,
                                                return_tensors="pt"))
        tok = self.processor.tokenizer
        stop_ids = self._stop_ids()
        streams = [TextStream(tok, stop_ids, (*STOP_STRINGS, *r.stop), r.max_new_tokens, r.on_text, r.cancel)
                   for r in requests]
        gen: dict[str, Any] = dict(max_new_tokens=max(r.max_new_tokens for r in requests), eos_token_id=stop_ids,
                                   pad_token_id=tok.pad_token_id, streamer=BatchStreamer(streams),
                                   stopping_criteria=StoppingCriteriaList([RowStopping.create(streams)]))
        if any(r.temperature > 0 for r in requests):
            processor = RowSampling.create([r.temperature for r in requests], [r.top_p for r in requests])
            gen.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                       logits_processor=LogitsProcessorList([processor]))
        else:
            gen.update(do_sample=False)
        with torch.inference_mode():
            self.model.generate(**inputs, **gen)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [ChatResult(text=s.text, finish_reason=s.finish_reason or "length", prompt_tokens=int(n),
                           completion_tokens=s.n_tokens) for s, n in zip(streams, prompt_tokens)]

    def stream(self, image, prompt: str | None = None, *, max_new_tokens: int = 200, temperature: float = 0.0,
               top_p: float = 1.0) -> Iterator[str]:
        """Describe an image, or answer a question about it, yielding the answer as it is generated.

        The pieces put together are the answer :meth:`caption` (or :meth:`ask`
        with ``prompt`` as the question) gives with greedy decoding. Generation
        runs in a background thread; closing the iterator early stops it.

        Parameters
        ----------
        image : image input
        prompt : str, optional
            The instruction or question; default ``"Describe this astronomical image in detail."``
        max_new_tokens : int
        temperature, top_p : float
            Sampling (temperature 0 is greedy decoding).

        Yields
        ------
        str
            The next piece of the answer.
        """
        import queue

        from .streaming import ChatRequest

        prompt = self._check_text(prompt if prompt is not None else DEFAULT_CAPTION_PROMPT, "prompt")
        pieces: queue.Queue = queue.Queue()
        cancel = threading.Event()
        request = ChatRequest([self._user(prompt)], image=image, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, on_text=pieces.put, cancel=cancel)
        done = object()

        def run():
            try:
                self.generate_chats([request])
            except BaseException as exc:  # handed to the reading thread
                pieces.put(exc)
            pieces.put(done)

        thread = threading.Thread(target=run, name="astrovl-llava-stream", daemon=True)
        thread.start()
        try:
            while (piece := pieces.get()) is not done:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            cancel.set()
            thread.join()

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
        inputs = self._to_device(self._encode([pil], [prefix]))
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
        eos = tok.eos_token or ""
        if self.prompt_tokenization == LLAVA_CHUNKS:
            return [torch.as_tensor(llava_chunk_ids(tok, prefix + " " + t + eos, image_token,
                                                    [image_id] * (n_image // n_slots)), dtype=torch.long)
                    for t in texts]
        expanded = prefix.replace(image_token, image_token * (n_image // n_slots))
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
            n_prefix = self._encode([pil], [prefix])["input_ids"].shape[1]
            full = prefix + " " + t + (tok.eos_token or "")
            inputs = self._to_device(self._encode([pil], [full]))
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


def _convert_once(source: ResolvedCheckpoint, **options) -> Path:
    """The conversion of an original-layout ``source`` (:func:`~astrovl.llava.convert.converted_checkpoint`).

    Under accelerate/torchrun process 0 converts, the others wait and reuse its conversion.
    """
    from ..config import cache_path
    from ..utils.distributed import main_process_first
    from .convert import converted_checkpoint

    with main_process_first(cache_path("converted-llava", ".lock"), what=f"converting {source.name}"):
        return converted_checkpoint(source, **options)


def _checkpoint_directory(source: ResolvedCheckpoint, vision_tower=None) -> Path:
    """The transformers-layout directory of a full checkpoint (an original layout converted once)."""
    layout = detect_layout(source.path)
    if layout == "original":
        return _convert_once(source, vision_tower=vision_tower)
    if vision_tower is not None:
        raise CheckpointError(f"vision_tower= applies to original-layout LLaVA checkpoints; {source.name!r} is in "
                              "the transformers layout and holds its own vision tower")
    if source.repo_id is not None:
        fetch_weights(source)
    return source.path


def _load_lora_release(source: ResolvedCheckpoint, dev, *, base=None, merge: bool = False, vision_tower=None,
                       **options):
    """Model, processor, prompt tokenization and label of a LoRA release (adapter applied)."""
    from .lora import LoRARelease, apply_lora_release, release_base

    release = LoRARelease.read(source)
    base_source = resolve_reference(release_base(release, base), what="base model") if base is None \
        else resolve_checkpoint(base)
    if (base_source.path / "adapter_config.json").is_file():
        raise CheckpointError(f"the base of {source.name!r}, {base_source.name!r}, is itself an adapter; "
                              "pass base= a full model")
    if is_plain_language_model(base_source.path):
        # the official LLaVA LoRA releases: a plain LLM base, the LLaVA config in the release
        if release.llava_config is None:
            raise CheckpointError(
                f"the base of {source.name!r}, {base_source.name!r}, is a language model without vision, and "
                f"{source.name!r} has no LLaVA config.json (mm_vision_tower) to build the LLaVA model from; "
                "pass base= a LLaVA checkpoint")
        directory = _convert_once(source, vision_tower=vision_tower, base=base_source,
                                  extra_state=release.projector_state())
    else:
        directory = _checkpoint_directory(base_source, vision_tower)
    model, processor = _load_directory(directory, base_source, dev, **options)
    tokenization = prompt_tokenization(directory)
    model = apply_lora_release(model, release, merge=merge)
    if release.trained_with_llava_code:
        processor.chat_template = VICUNA_V1_CHAT_TEMPLATE
    return model, processor, tokenization, f"{source.name} (LoRA on {base_source.name})"


def _load_directory(directory: Path, source: ResolvedCheckpoint, dev, *, dtype=None, load_in_4bit: bool = False,
                    trust_remote_code: bool = False):
    """Model and processor of a transformers-layout directory."""
    import torch
    optional_import("transformers", purpose="LLaVA models")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

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
