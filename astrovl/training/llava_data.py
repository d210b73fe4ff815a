"""Training records for LLaVA: image + conversation, tokenized with loss only on answers."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import DatasetError
from ..utils.files import safe_join

__all__ = [
    "BRIEF_INSTRUCTIONS",
    "IGNORE_INDEX",
    "load_conversation_records",
    "conversation_segments",
    "encode_conversation",
    "collate_llava",
    "LLaVATorchDataset",
]

#: Label value ignored by the loss (prompt, image and padding tokens).
IGNORE_INDEX = -100

#: Stage-1 instructions: one is drawn per caption record (LLaVA's brief-description prompts).
BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)

_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _turns_from_llava(conversations: Sequence[dict], where: str) -> list[tuple[str, str]]:
    turns = []
    for i, t in enumerate(conversations):
        role = _ROLE.get(str(t.get("from", t.get("role", ""))).lower())
        text = t.get("value", t.get("content"))
        if role is None or not isinstance(text, str):
            raise DatasetError(f"{where}: turn {i} must have 'from' (human/gpt) and 'value' (text)")
        turns.append((role, text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")
                      .strip()))
    if len(turns) < 2 or turns[0][0] != "user" or not any(r == "assistant" for r, _ in turns):
        raise DatasetError(f"{where}: a conversation needs a human turn followed by a gpt turn")
    return turns


def load_conversation_records(data: Any, *, stage: int, image_root: str | os.PathLike | None = None,
                              seed: int = 0) -> list[dict]:
    """Turn training data into records ``{"id", "image" (Path), "turns": [(role, text), ...]}``.

    Parameters
    ----------
    data : ManifestDataset, path or list of dict
        A dataset manifest (stage 1 uses its captions; stage 2 its ``conversations``
        column, falling back to detailed-description turns from the captions), a
        LLaVA conversation JSON file (``[{"id", "image", "conversations": [{"from":
        "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}]``),
        or such a list already loaded.
    stage : int
        1 or 2.
    image_root : path, optional
        Directory that ``image`` paths of JSON records are relative to (default:
        the JSON file's directory). Paths escaping it are rejected.
    """
    from ..datasets.records import ManifestDataset

    rng = np.random.default_rng(seed)
    records: list[dict] = []
    if isinstance(data, ManifestDataset):
        for i in range(len(data)):
            caption = str(data.manifest["caption"][i]).strip()
            conv = data.conversations(i) if stage == 2 else None
            if conv:
                turns = _turns_from_llava(conv, f"record {data.manifest['id'][i]!r}")
            elif stage == 1:
                turns = [("user", BRIEF_INSTRUCTIONS[int(rng.integers(len(BRIEF_INSTRUCTIONS)))]),
                         ("assistant", caption)]
            else:
                turns = [("user", "Describe this astronomical image in detail."), ("assistant", caption)]
            if not caption and not conv:
                continue
            records.append({"id": str(data.manifest["id"][i]), "image": data.image_path(i), "turns": turns})
        return records
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise DatasetError(f"training data {str(path)!r} does not exist; pass a dataset directory or a "
                               "LLaVA conversation JSON file")
        try:
            items = json.loads(path.read_text("utf-8"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{str(path)!r} is not valid JSON ({exc}); expected a list of LLaVA "
                               "conversation records") from exc
        root = Path(image_root) if image_root is not None else path.parent
    else:
        items = list(data)
        root = Path(image_root) if image_root is not None else Path.cwd()
    if not isinstance(items, list):
        raise DatasetError("LLaVA conversation data must be a JSON list of records")
    for k, item in enumerate(items):
        where = f"record {item.get('id', k)!r}" if isinstance(item, dict) else f"record {k}"
        if not isinstance(item, dict) or "image" not in item or "conversations" not in item:
            raise DatasetError(f"{where}: needs 'image' and 'conversations'")
        records.append({"id": str(item.get("id", k)), "image": safe_join(root, str(item["image"])),
                        "turns": _turns_from_llava(item["conversations"], where)})
    return records


def conversation_segments(processor, turns: Sequence[tuple[str, str]], system: str | None = None
                          ) -> list[tuple[str, bool]]:
    """Split the chat-template text of a conversation into ``(text, is_answer)`` pieces.

    The image placeholder goes into the first user turn. Answer pieces hold each
    assistant reply with its end-of-turn marker (so the model learns to stop).
    """
    messages: list[dict] = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    first = True
    segments: list[tuple[str, bool]] = []
    pos = 0
    for role, text in turns:
        if role == "user":
            content = ([{"type": "image"}] if first else []) + [{"type": "text", "text": text}]
            first = False
            messages.append({"role": "user", "content": content})
            continue
        prefix = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        full = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        if not full.startswith(prefix):
            raise ValueError("the chat template does not render conversations incrementally; "
                             "answer-only loss masking needs a template whose prompts are prefixes")
        answer = full[len(prefix):].rstrip()
        segments.append((prefix[pos:], False))
        segments.append((answer, True))
        pos = len(prefix) + len(answer)
    return [(t, a) for t, a in segments if t]


def encode_conversation(processor, image, turns, *, max_length: int = 2048, system: str | None = None
                        ) -> dict:
    """Tokenize one record: ``input_ids``, ``labels`` (answers only) and ``pixel_values``.

    The first piece (holding the image) goes through the processor, which expands
    the image placeholder to the model's image tokens; later pieces are tokenized
    without special tokens and appended. Answers keep their labels, everything
    else is :data:`IGNORE_INDEX`.
    """
    import torch

    segments = conversation_segments(processor, turns, system)
    tok = processor.tokenizer
    first = processor(images=[image], text=[segments[0][0]], return_tensors="pt")
    ids = [first["input_ids"][0]]
    labels = [torch.full_like(first["input_ids"][0], IGNORE_INDEX)]
    if segments[0][1]:
        raise ValueError("a conversation must start with a user turn")
    for text, is_answer in segments[1:]:
        piece = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        ids.append(piece)
        labels.append(piece.clone() if is_answer else torch.full_like(piece, IGNORE_INDEX))
    input_ids = torch.cat(ids)
    label_ids = torch.cat(labels)
    if input_ids.numel() > max_length:
        n_image = int(first["input_ids"].shape[1])
        if n_image >= max_length:
            raise ValueError(f"max_length={max_length} is shorter than the image and first prompt "
                             f"({n_image} tokens); raise max_length")
        input_ids, label_ids = input_ids[:max_length], label_ids[:max_length]
    return {"input_ids": input_ids, "labels": label_ids, "pixel_values": first["pixel_values"][0]}


def collate_llava(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad a list of encoded records into a batch."""
    import torch

    n = max(int(b["input_ids"].numel()) for b in batch)
    input_ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        m = int(b["input_ids"].numel())
        input_ids[i, :m] = b["input_ids"]
        labels[i, :m] = b["labels"]
        mask[i, :m] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.stack([b["pixel_values"] for b in batch])}


class LLaVATorchDataset:
    """A map-style torch dataset of encoded conversation records (images decoded lazily).

    Images are read with :func:`~astrovl.load_image` (FITS included), scaled for
    display and padded to a square like :class:`~astrovl.AstroLLaVA` does at
    inference, so training and inference see the same pixels.
    """

    def __init__(self, records: list[dict], processor, *, max_length: int = 2048, pad_to_square: bool = True,
                 system: str | None = None):
        self.records = records
        self.processor = processor
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        self.system = system

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from ..imaging import load_image
        from ..llava.model import _pad_to_square

        rec = self.records[index]
        try:
            pil = load_image(rec["image"]).to_pil()
        except Exception as exc:
            raise DatasetError(f"record {rec['id']!r}: image {str(rec['image'])!r} could not be read: {exc}") \
                from exc
        if self.pad_to_square:
            pil = _pad_to_square(pil)
        return encode_conversation(self.processor, pil, rec["turns"], max_length=self.max_length,
                                   system=self.system)
