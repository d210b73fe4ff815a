"""Training records for LLaVA: image + text, tokenized once, with loss only on what the model must say.

Two formats, as LLaVA-1.5:

stage 1 ("plain" pre-training)
    the image tokens followed by the caption and a line break
    (:func:`~astrovl.llava.template.plain_text`); no instruction, no roles; the
    loss covers the caption and the line break.
stage 2 (conversations)
    the conversation rendered by the processor's chat template as one string,
    every assistant answer closed by the end-of-sequence token (appended when the
    template does not add it, as ``llava-hf``'s does not); the loss covers the
    answers and their end-of-sequence tokens.

Either way the whole text is tokenized in one call (by the processor, which also
expands the image placeholder) and the labels come from the character offsets of
that one tokenization, so the tokens trained on are exactly the tokens the model
sees at inference.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import DatasetError
from ..llava.template import DEFAULT_CAPTION_PROMPT
from ..utils.files import safe_join

__all__ = [
    "IGNORE_INDEX",
    "load_conversation_records",
    "encode_conversation",
    "encode_plain",
    "collate_llava",
    "LLaVATorchDataset",
]

log = logging.getLogger(__name__)

#: Label value ignored by the loss (prompt, image and padding tokens).
IGNORE_INDEX = -100

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


def _manifest_splits(root: Path) -> dict[str, str]:
    """Record id -> split of the dataset manifest in ``root`` ({} when there is none)."""
    from ..datasets.records import MANIFEST_NAME, read_manifest

    if not (root / MANIFEST_NAME).is_file():
        return {}
    table = read_manifest(root)
    return {str(i): str(s) for i, s in zip(table["id"], table["split"])}


def load_conversation_records(data: Any, *, stage: int, image_root: str | os.PathLike | None = None,
                              split: str | None = "train") -> list[dict]:
    """Turn training data into records ``{"id", "image" (Path), "turns": [(role, text), ...]}``.

    Parameters
    ----------
    data : ManifestDataset, path or list of dict
        A dataset manifest (stage 1 uses its captions; stage 2 its
        ``conversations`` column, falling back to a description turn from the
        caption), a LLaVA conversation JSON file (``[{"id", "image",
        "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from":
        "gpt", "value": ...}, ...]}]``), or such a list already loaded.
    stage : int
        1 (the caption is the first answer) or 2.
    image_root : path, optional
        Directory that ``image`` paths of JSON records are relative to (default:
        the JSON file's directory). Paths escaping it are rejected.
    split : str or None
        Keep the records of this split (``"train"`` for training, ``"val"`` or
        ``"test"`` for evaluation; None keeps all). A manifest's ``split`` column
        decides; JSON records are filtered by their own ``split`` key, or by the
        split of the record with the same id in the manifest of ``image_root``
        (conversations generated for a dataset's validation images are so never
        trained on).
    """
    from ..datasets.records import SPLITS, ManifestDataset

    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {list(SPLITS)} or None")
    records: list[dict] = []
    if isinstance(data, ManifestDataset):
        splits = np.asarray(data.manifest["split"]).astype(str)
        for i in range(len(data)):
            if split is not None and splits[i] != split:
                continue
            caption = str(data.manifest["caption"][i]).strip()
            conv = data.conversations(i) if stage == 2 else None
            if conv:
                turns = _turns_from_llava(conv, f"record {data.manifest['id'][i]!r}")
            elif caption:
                # the instruction of captioning at inference, so training and use ask alike
                turns = [("user", DEFAULT_CAPTION_PROMPT), ("assistant", caption)]
            else:
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
    manifest_splits = _manifest_splits(root) if split is not None else {}
    dropped = 0
    for k, item in enumerate(items):
        where = f"record {item.get('id', k)!r}" if isinstance(item, dict) else f"record {k}"
        if not isinstance(item, dict) or "image" not in item or "conversations" not in item:
            raise DatasetError(f"{where}: needs 'image' and 'conversations'")
        rid = str(item.get("id", k))
        record_split = item.get("split") or manifest_splits.get(rid)
        if split is not None and record_split is not None and record_split != split:
            dropped += 1
            continue
        records.append({"id": rid, "image": safe_join(root, str(item["image"])),
                        "turns": _turns_from_llava(item["conversations"], where)})
    if dropped:
        log.info("kept %d %s records; %d of other splits left out", len(records), split, dropped)
    return records


def _labels_from_offsets(ids, offsets, spans, image_id: int, image_len: int):
    """Labels: the token ids whose text overlaps an answer span, :data:`IGNORE_INDEX` elsewhere.

    ``offsets`` refer to the text after the processor expanded each image
    placeholder into a run of image tokens; they are mapped back to the text the
    spans refer to.
    """
    import torch

    ids_np = ids.numpy()
    off = offsets.numpy().astype(np.int64)
    is_image = ids_np == image_id
    starts_run = is_image & ~np.concatenate([[False], is_image[:-1]])
    # characters added by the expansion before each token: (image tokens - image runs) * placeholder length
    extra = (np.cumsum(is_image) - np.cumsum(starts_run)) * image_len
    extra_before = np.concatenate([[0], extra[:-1]])
    start, end = off[:, 0] - extra_before, off[:, 1] - extra_before
    keep = np.zeros(len(ids_np), dtype=bool)
    for a, b in spans:
        keep |= (start < b) & (end > a)
    keep &= (end > start) & ~is_image
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[torch.from_numpy(keep)] = ids[torch.from_numpy(keep)]
    return labels


def _encode(processor, image, text: str, spans: list[tuple[int, int]], max_length: int) -> dict:
    tok = processor.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ValueError("answer-only training needs a fast (tokenizers) tokenizer for character offsets; "
                         f"{type(tok).__name__} is a slow one")
    add_special = not (tok.bos_token and text.startswith(tok.bos_token))
    enc = processor(images=[image], text=[text], return_offsets_mapping=True, add_special_tokens=add_special,
                    return_tensors="pt")
    ids = enc["input_ids"][0]
    image_token = getattr(processor, "image_token", "<image>")
    image_id = tok.convert_tokens_to_ids(image_token)
    labels = _labels_from_offsets(ids, enc["offset_mapping"][0], spans, image_id, len(image_token))
    if ids.numel() > max_length:
        last_image = int(np.flatnonzero(ids.numpy() == image_id).max(initial=-1))
        if last_image >= max_length:
            raise ValueError(f"max_length={max_length} is shorter than the image and the text before it "
                             f"({last_image + 1} tokens); raise max_length")
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "pixel_values": enc["pixel_values"][0]}


def encode_conversation(processor, image, turns, *, max_length: int = 2048, system: str | None = None) -> dict:
    """Tokenize one conversation: ``input_ids``, ``labels`` (answers only) and ``pixel_values``.

    The conversation is rendered by the processor's chat template as one string
    (every answer closed by the end-of-sequence token, see
    :func:`astrovl.llava.chat.close_assistant_turns`) and tokenized in one call;
    a token is trained on when its characters lie in an answer.

    Parameters
    ----------
    processor : transformers.LlavaProcessor
    image : PIL.Image.Image
    turns : sequence of (role, text)
        Starting with a user turn; the image goes with it.
    max_length : int
        Longer conversations are cut (never inside the image tokens).
    system : str, optional
        System message (the template's own default otherwise).
    """
    from ..llava.chat import answer_spans, to_messages

    turns = list(turns)
    if not turns or turns[0][0] != "user":
        raise ValueError("a conversation must start with a user turn")
    text, spans = answer_spans(processor, to_messages(turns, system=system))
    return _encode(processor, image, text, spans, max_length)


def encode_plain(processor, image, caption: str, *, max_length: int = 2048) -> dict:
    """Tokenize one caption in LLaVA-1.5's plain pre-training format (loss on the caption)."""
    from ..llava.template import PLAIN_SEPARATOR, plain_text

    caption = caption.strip()
    if not caption:
        raise ValueError("the caption is empty")
    text, start = plain_text(caption, getattr(processor, "image_token", "<image>"))
    return _encode(processor, image, text, [(start, start + len(caption) + len(PLAIN_SEPARATOR))], max_length)


def collate_llava(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad a list of encoded records into a batch.

    A ``"position"`` entry of the records (the data position after them, for
    resuming) is passed on from the last record.
    """
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
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
           "pixel_values": torch.stack([b["pixel_values"] for b in batch])}
    if "position" in batch[-1]:
        out["position"] = batch[-1]["position"]
    return out


def collate_fn(pad_token_id: int):
    """A picklable collate function for DataLoader workers."""
    return functools.partial(collate_llava, pad_token_id=pad_token_id)


class LLaVATorchDataset:
    """A map-style torch dataset of encoded records (images decoded and text tokenized lazily).

    Images are read with :func:`~astrovl.load_image` (FITS included), scaled for
    display and padded to a square with the image processor's mean colour like
    :class:`~astrovl.AstroLLaVA` does at inference, so training and inference
    see the same pixels. Everything runs in ``__getitem__``, so DataLoader
    workers do it off the training process.

    Parameters
    ----------
    records : list of dict
        From :func:`load_conversation_records`.
    processor : transformers.LlavaProcessor
    max_length : int
    pad_to_square : bool
    system : str, optional
        System message of stage-2 conversations.
    stage : {1, 2}
        1: plain format with the first answer as the caption; 2: conversations.

    Items may be indexed by an int, or by ``(index, position)``: ``position`` is
    then returned with the encoded record (the training loop uses it to know
    where in the data it is when it saves a checkpoint).
    """

    def __init__(self, records: list[dict], processor, *, max_length: int = 2048, pad_to_square: bool = True,
                 system: str | None = None, stage: int = 2):
        from ..llava.model import pad_colour

        if stage not in (1, 2):
            raise ValueError(f"stage={stage!r}; use 1 or 2")
        self.records = records
        self.processor = processor
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        self.system = system
        self.stage = stage
        self.pad_colour = pad_colour(processor)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict:
        from ..imaging import load_image
        from ..llava.model import expand2square

        index, position = (key if isinstance(key, tuple) else (key, None))
        rec = self.records[int(index)]
        try:
            pil = load_image(rec["image"]).to_pil()
        except Exception as exc:
            raise DatasetError(f"record {rec['id']!r}: image {str(rec['image'])!r} could not be read: {exc}") \
                from exc
        if self.pad_to_square:
            pil = expand2square(pil, self.pad_colour)
        try:
            if self.stage == 1:
                caption = next(text for role, text in rec["turns"] if role == "assistant")
                item = encode_plain(self.processor, pil, caption, max_length=self.max_length)
            else:
                item = encode_conversation(self.processor, pil, rec["turns"], max_length=self.max_length,
                                           system=self.system)
        except Exception as exc:  # named here: in a DataLoader worker the traceback is all the user would get
            raise DatasetError(f"record {rec['id']!r} (image {str(rec['image'])!r}) could not be encoded: {exc}") \
                from exc
        if position is not None:
            item["position"] = position
        return item
