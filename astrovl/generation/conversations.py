"""Synthetic visual question answering from image captions (AstroLLaVA style).

AstroLLaVA's instruction data were written by a language model that saw only each
image's caption: 3 to 6 question/answer turns about what the image shows, with the
rule that answers must not state what an image cannot reveal (a redshift, a
distance). :class:`ConversationGenerator` does the same with any causal LM and
writes the LLaVA conversation format that LLaVA training reads::

    {"id": "...", "image": "images/0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the centre?"},
                       {"from": "gpt", "value": "A barred spiral galaxy..."}, ...]}
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

try:
    from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
except ImportError as exc:
    from ..utils.imports import missing_dependency

    raise missing_dependency("pydantic", purpose="structured (JSON schema) generation") from exc

from ..exceptions import DatasetError
from ..utils.files import atomic_write_text
from .cache import JSONLCache
from .guided import JSON_SCHEMA_EXTRA, GuidedJSONGenerator, excerpt

__all__ = [
    "ConversationGenerator",
    "CONVERSATION_PROMPT",
    "IMAGE_TOKEN",
    "to_llava_record",
    "validate_llava_record",
    "read_llava_conversations",
    "conversation_schema",
    "conversation_token_budget",
    "fit_conversation_to_budget",
]

#: Placeholder of the image in the first human turn of a LLaVA conversation.
IMAGE_TOKEN = "<image>"


def _text_pattern(first: str, max_chars: int) -> str:
    # printable ASCII only, so that every character is at most one token of any tokenizer
    # (byte-fallback ones included) and the JSON closes within conversation_token_budget;
    # no double quotes or backslashes (nothing to escape), no angle brackets (so no
    # "<image>" or markup); the length bound lives in the pattern because some backends
    # ignore maxLength when a pattern is present
    return rf'^{first}[ !#-;=?-\[\]-~]{{1,{max_chars - 1}}}$'


#: characters of a conversation's JSON around its texts: ``{"turns": [`` and ``]}`` ...
_OUTER_CHARS = len('{"turns":[]}') + 10
#: ... and, per turn, ``{"question": "", "answer": ""}``, a comma and the optional spaces
#: between JSON tokens (one at most, ``JSON_SCHEMA_EXTRA``)
_TURN_CHARS = len('{"question":"","answer":""},') + 10
#: the shortest question and answer bounds :func:`fit_conversation_to_budget` accepts
MIN_QUESTION_CHARS, MIN_ANSWER_CHARS = 12, 20


def conversation_token_budget(max_turns: int = 6, max_question_chars: int = 200,
                              max_answer_chars: int = 400) -> int:
    """The most tokens a conversation of :func:`conversation_schema` can take, end of text included.

    Every character the schema allows is printable ASCII, which any tokenizer
    writes in at most one token, so the longest JSON the schema admits, in
    characters, bounds the tokens: with at least this ``max_new_tokens`` the
    guided decoding always reaches the schema's end (the closing ``]}``).

    Examples
    --------
    >>> conversation_token_budget(3, 40, 80)
    497
    """
    return _OUTER_CHARS + int(max_turns) * (_TURN_CHARS + int(max_question_chars) + int(max_answer_chars)) + 1


def fit_conversation_to_budget(max_new_tokens: int, *, min_turns: int = 3, max_turns: int = 6,
                               max_question_chars: int = 200,
                               max_answer_chars: int = 400) -> tuple[int, int, int]:
    """Bounds ``(max_turns, max_question_chars, max_answer_chars)`` whose JSON fits ``max_new_tokens``.

    The given bounds are kept when they fit; otherwise the texts are shortened
    (questions to a third, answers to two thirds of what a turn may hold) and,
    where texts would get shorter than 12 / 20 characters, the number of turns is
    lowered, down to ``min_turns``.

    Raises
    ------
    ValueError
        ``max_new_tokens`` cannot hold ``min_turns`` turns of the shortest texts;
        the message gives the smallest budget that can.

    Examples
    --------
    >>> fit_conversation_to_budget(256)
    (3, 13, 26)
    >>> fit_conversation_to_budget(4000)
    (6, 200, 400)
    """
    budget = int(max_new_tokens)
    if conversation_token_budget(max_turns, max_question_chars, max_answer_chars) <= budget:
        return int(max_turns), int(max_question_chars), int(max_answer_chars)
    for turns in range(int(max_turns), int(min_turns) - 1, -1):
        per_turn = (budget - 1 - _OUTER_CHARS) // turns - _TURN_CHARS
        question = min(int(max_question_chars), max(MIN_QUESTION_CHARS, per_turn // 3))
        answer = min(int(max_answer_chars), per_turn - question)
        if question >= MIN_QUESTION_CHARS and answer >= MIN_ANSWER_CHARS:
            return turns, question, answer
    need = conversation_token_budget(min_turns, MIN_QUESTION_CHARS, MIN_ANSWER_CHARS)
    raise ValueError(f"max_new_tokens={budget} cannot hold a conversation of {min_turns} turns; give "
                     f"at least {need} (or fewer turns)")


class _Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("question", "answer", mode="after", check_fields=False)
    @classmethod
    def _strip(cls, value: str) -> str:
        value = " ".join(value.split())
        if len(value) < 2:
            raise ValueError("text is blank")
        return value


@functools.lru_cache(maxsize=32)
def conversation_schema(min_turns: int = 3, max_turns: int = 6, max_question_chars: int = 200,
                        max_answer_chars: int = 400) -> type[BaseModel]:
    """The pydantic model of a conversation: ``{"turns": [{"question", "answer"}, ...]}``.

    Parameters
    ----------
    min_turns, max_turns : int
        Bounds on the number of question/answer pairs.
    max_question_chars, max_answer_chars : int
        Bounds on the length of each question and answer.
    """
    question = Annotated[str, Field(pattern=_text_pattern("[A-Za-z]", max_question_chars))]
    answer = Annotated[str, Field(pattern=_text_pattern("[A-Za-z0-9]", max_answer_chars))]
    turn = create_model("QATurn", __base__=_Turn, question=(question, ...), answer=(answer, ...))
    return create_model(
        "Conversation", __config__=ConfigDict(extra="forbid", json_schema_extra=JSON_SCHEMA_EXTRA),
        turns=(list[turn], Field(min_length=min_turns, max_length=max_turns)),
    )


CONVERSATION_PROMPT = """\
Below is the caption of an astronomical image. You cannot see the image; its \
caption is all you know. Write a conversation between a person looking at the image \
and an assistant who describes it: {min_turns} to {max_turns} question and answer \
pairs. Ask about what can be seen: the objects, their shapes, structures, colours, \
brightness and where they lie in the frame; questions may also ask what the objects \
are and why they look the way they do. Answer as if looking at the image. Never \
state facts that an image cannot show, such as a redshift, a distance, a mass, an \
age or a date, even when the caption gives them. Keep answers to a few sentences.
"""

_EXAMPLE_CAPTION = "A face-on barred spiral galaxy with blue star-forming knots along two arms."
_EXAMPLE_JSON = json.dumps({"turns": [
    {"question": "What is the main object in this image?",
     "answer": "A spiral galaxy seen face-on, with a bright central bar."},
    {"question": "What do the arms look like?",
     "answer": "Two arms wind out from the ends of the bar, dotted with small blue knots."},
    {"question": "What are the blue knots?",
     "answer": "Clusters of young, hot stars, which shine blue where new stars are forming."},
]})


def to_llava_record(record_id: str, image: str, turns: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Build a LLaVA conversation record from question/answer turns.

    Parameters
    ----------
    record_id : str
        Record id (the dataset's ``id``).
    image : str
        Image path relative to the image folder (the dataset root).
    turns : sequence of dict
        ``{"question": ..., "answer": ...}`` pairs, at least one.

    Returns
    -------
    dict
        ``{"id", "image", "conversations"}`` with alternating ``human``/``gpt``
        messages; only the first human message carries ``"<image>\\n"``.

    Examples
    --------
    >>> rec = to_llava_record("a1", "img/a1.png", [{"question": "What is it?", "answer": "A nebula."}])
    >>> rec["conversations"][0]
    {'from': 'human', 'value': '<image>\\nWhat is it?'}
    """
    if not turns:
        raise ValueError(f"record {record_id!r}: a LLaVA conversation needs at least one turn")
    conversations = []
    for i, turn in enumerate(turns):
        try:
            question, answer = str(turn["question"]), str(turn["answer"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"record {record_id!r}: turn {i} must be a dict with 'question' and "
                             f"'answer', got {turn!r}") from exc
        value = f"{IMAGE_TOKEN}\n{question}" if i == 0 else question
        conversations.append({"from": "human", "value": value})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": str(record_id), "image": str(image), "conversations": conversations}


def validate_llava_record(record: dict[str, Any]) -> dict[str, Any]:
    """Check that ``record`` is a LLaVA conversation record; return it.

    Raises
    ------
    DatasetError
        With the record id and the first problem found.
    """
    rid = record.get("id") if isinstance(record, dict) else None
    if not isinstance(record, dict) or not {"id", "image", "conversations"} <= set(record):
        raise DatasetError(f"LLaVA record {rid!r} needs the keys 'id', 'image' and 'conversations'")
    conv = record["conversations"]
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        raise DatasetError(f"LLaVA record {rid!r}: 'conversations' must be a non-empty list of "
                           "human/gpt pairs")
    for i, msg in enumerate(conv):
        want = "human" if i % 2 == 0 else "gpt"
        if not isinstance(msg, dict) or msg.get("from") != want or not isinstance(msg.get("value"), str):
            raise DatasetError(f"LLaVA record {rid!r}: message {i} must be {{'from': {want!r}, "
                               f"'value': str}}, got {msg!r}")
        has_image = IMAGE_TOKEN in msg["value"]
        if has_image != (i == 0):
            raise DatasetError(f"LLaVA record {rid!r}: {IMAGE_TOKEN!r} must appear in the first human "
                               f"message only (found in message {i})" if has_image else
                               f"LLaVA record {rid!r}: the first human message lacks {IMAGE_TOKEN!r}")
    return record


def read_llava_conversations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and check a LLaVA conversation JSON file (a list of records)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise DatasetError(f"no LLaVA conversation file at {str(path)!r}") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{str(path)!r} must hold a JSON list of conversation records")
    return [validate_llava_record(r) for r in data]


class ConversationGenerator(GuidedJSONGenerator):
    """Write visual question/answer conversations from image captions.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Causal language model.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.
    min_turns, max_turns : int
        Number of question/answer pairs per conversation (AstroLLaVA: 3 to 6).
    max_new_tokens : int, optional
        Token budget of one attempt. The guided JSON always closes within it: by
        default it is the budget of the longest conversation the bounds allow
        (:func:`conversation_token_budget`); a smaller one shortens the bounds
        (fewer turns, shorter texts) until they fit
        (:func:`fit_conversation_to_budget`, which says what was chosen in
        :attr:`max_turns`, :attr:`max_question_chars` and :attr:`max_answer_chars`).
    max_retries : int
        Attempts after the first (greedy) one.
    seed : int
        Base seed of the retries.
    cache : str, path-like or JSONLCache, optional
        JSON Lines cache keyed by model, prompt version, settings and caption.
    max_question_chars, max_answer_chars : int
        Length bounds of questions and answers.
    backend, model_id
        See :class:`~astrovl.generation.guided.GuidedJSONGenerator`.

    Attributes
    ----------
    report : GenerationReport
        Counts of generated, cached and failed conversations.
    """

    prompt_version = "conversation-v2"

    def __init__(self, model, tokenizer, *, min_turns: int = 3, max_turns: int = 6,
                 max_new_tokens: int | None = None, max_retries: int = 3, seed: int = 0,
                 cache: str | os.PathLike | JSONLCache | None = None, max_question_chars: int = 200,
                 max_answer_chars: int = 400, backend: str | None = None, model_id: str | None = None):
        if not 1 <= int(min_turns) <= int(max_turns):
            raise ValueError(f"need 1 <= min_turns <= max_turns, got min_turns={min_turns}, "
                             f"max_turns={max_turns}")
        for name, value in (("max_question_chars", max_question_chars),
                            ("max_answer_chars", max_answer_chars)):
            if int(value) < 4:
                raise ValueError(f"{name} must be at least 4, got {value}")
        self.min_turns = int(min_turns)
        if max_new_tokens is None:
            max_new_tokens = conversation_token_budget(max_turns, max_question_chars, max_answer_chars)
        elif int(max_new_tokens) >= 1:
            max_turns, max_question_chars, max_answer_chars = fit_conversation_to_budget(
                max_new_tokens, min_turns=min_turns, max_turns=max_turns,
                max_question_chars=max_question_chars, max_answer_chars=max_answer_chars)
        self.max_turns = int(max_turns)
        self.max_question_chars, self.max_answer_chars = int(max_question_chars), int(max_answer_chars)
        schema = conversation_schema(self.min_turns, self.max_turns, self.max_question_chars,
                                     self.max_answer_chars)
        super().__init__(model, tokenizer, schema, max_new_tokens=max_new_tokens,
                         max_retries=max_retries, seed=seed, cache=cache, backend=backend,
                         model_id=model_id)

    def prompt(self, caption: str) -> str:
        """The prompt for ``caption`` (before any chat template is applied)."""
        caption = " ".join(str(caption).split())
        rules = CONVERSATION_PROMPT.format(min_turns=self.min_turns, max_turns=self.max_turns)
        if self.use_chat_template:
            return (f"{rules}\nExample caption: {_EXAMPLE_CAPTION}\nExample answer: {_EXAMPLE_JSON}"
                    f"\n\nCaption: {caption}")
        return f"{rules}\nCaption: {_EXAMPLE_CAPTION}\nJSON: {_EXAMPLE_JSON}\n\nCaption: {caption}\nJSON: "

    def _settings(self) -> tuple[int, int, int, int]:
        return (self.min_turns, self.max_turns, self.max_question_chars, self.max_answer_chars)

    def generate(self, caption: str) -> list[dict[str, str]] | None:
        """Question/answer turns about the image that ``caption`` describes.

        Returns
        -------
        list of dict or None
            ``min_turns`` to ``max_turns`` dicts ``{"question": ..., "answer": ...}``;
            None (logged, counted in :attr:`report`) when every attempt failed or the
            caption is empty.
        """
        if not isinstance(caption, str):
            raise TypeError(f"generate takes a caption string, not {type(caption).__name__}")
        return self._turns(caption, excerpt(caption))

    def _turns(self, caption: str, label: str) -> list[dict[str, str]] | None:
        if not caption.strip():
            self.report.failed += 1
            self.report.failures.append((label, "empty caption"))
            return None
        result = self._generate(self.prompt(caption), self._key(caption, *self._settings()), label)
        if result is None:
            return None
        return [{"question": t.question, "answer": t.answer} for t in result.turns]

    def generate_many(self, captions: Sequence[str], *, batch_size: int = 8, progress: bool | None = True,
                      labels: Sequence[str] | None = None) -> list[list[dict[str, str]] | None]:
        """:meth:`generate` for many captions, in order; first attempts in batches.

        Parameters
        ----------
        captions : sequence of str
        batch_size : int
            Captions whose first (greedy) attempt runs in one ``generate`` call
            through the same guided path (left padding; the results are those of
            one caption at a time). Invalid outputs are retried one by one.
        progress : bool or None
        labels : sequence of str, optional
            How each caption is named in logs and in :attr:`report`.
        """
        if isinstance(captions, str):
            raise TypeError("generate_many takes a sequence of captions; use generate for one")
        captions = [str(c) for c in captions]
        labels = list(labels) if labels is not None else [excerpt(c) for c in captions]
        results: list[list[dict[str, str]] | None] = [None] * len(captions)
        items, where = [], []
        for i, (caption, label) in enumerate(zip(captions, labels)):
            if not caption.strip():
                self.report.failed += 1
                self.report.failures.append((label, "empty caption"))
                continue
            items.append((self.prompt(caption), self._key(caption, *self._settings()), label))
            where.append(i)
        done = self._generate_many(items, batch_size=batch_size, progress=progress, desc="conversations",
                                   unit="caption", skipped=len(captions) - len(items))
        for i, result in zip(where, done):
            if result is not None:
                results[i] = [{"question": t.question, "answer": t.answer} for t in result.turns]
        return results

    @staticmethod
    def to_llava(record_id: str, image_relpath: str, turns: Sequence[dict[str, str]]) -> dict[str, Any]:
        """LLaVA conversation record; see :func:`to_llava_record`."""
        return to_llava_record(record_id, image_relpath, turns)

    def generate_for_dataset(self, dataset, path: str | os.PathLike, *,
                             progress: bool | None = True, batch_size: int = 8,
                             limit: int | None = None) -> Path:
        """Write a LLaVA conversation file for every record of a manifest dataset.

        Each record's caption becomes a conversation about its image (the manifest's
        ``image`` path, relative to the dataset root, so the root is LLaVA's image
        folder); the record's ``split`` goes along (training reads ``train`` only). Records whose generation fails are left out and listed in
        :attr:`report`. The file is written atomically at the end; finished
        conversations are cached as they are made (in ``cache``, or else in
        ``<path>.cache.jsonl``), so an interrupted run resumes where it stopped.

        Parameters
        ----------
        dataset : astrovl.datasets.ManifestDataset
            Dataset with ``id``, ``image`` and ``caption`` columns.
        path : str or path-like
            JSON file to write (a list of LLaVA records).
        progress : bool or None
            Show a progress bar (None follows ``astrovl.conf.progress``).
        batch_size : int
            Captions per batched first attempt (see :meth:`generate_many`).
        limit : int, optional
            Only the first ``limit`` records of the manifest (a trial run).

        Returns
        -------
        pathlib.Path
            ``path``.
        """
        manifest = getattr(dataset, "manifest", None)
        if manifest is None or not {"id", "image"} <= set(manifest.colnames):
            raise DatasetError(
                f"generate_for_dataset needs an astrovl ManifestDataset (with 'id', 'image' and "
                f"'caption' columns), got {type(dataset).__name__}"
            )
        path = Path(path)
        if path.is_dir():
            raise DatasetError(f"output {str(path)!r} is a directory; pass a .json file path")
        own_cache = self.cache is None
        if own_cache:
            self.cache = JSONLCache(path.with_name(path.name + ".cache.jsonl"))
        try:
            if limit is not None and int(limit) < 1:
                raise ValueError(f"limit must be at least 1, got {limit}")
            n = len(manifest) if limit is None else min(int(limit), len(manifest))
            manifest = manifest[:n]
            ids = [str(x) for x in manifest["id"]]
            images = [str(x) for x in manifest["image"]]
            captions = list(dataset.captions)[:n]
            labels = [f"record {rid!r}: {excerpt(c)}" for rid, c in zip(ids, captions)]
            turns = self.generate_many(captions, batch_size=batch_size, progress=progress, labels=labels)
            splits = [str(x) for x in manifest["split"]] if "split" in manifest.colnames else [None] * len(ids)
            records = []
            for rid, image, t, split in zip(ids, images, turns, splits):
                if t is not None:
                    # the split goes along, so that training never learns validation conversations
                    records.append({**to_llava_record(rid, image, t), **({"split": split} if split else {})})
        finally:
            if own_cache:
                self.cache = None
        atomic_write_text(path, json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, gguf_file: str | None = None,
                        device=None, dtype=None, trust_remote_code: bool = False,
                        **kwargs) -> ConversationGenerator:
        """Load a causal LM with :func:`~astrovl.generation.load_causal_lm` and wrap it.

        ``**kwargs`` go to :class:`ConversationGenerator`.
        """
        model, tokenizer, mid = cls._from_pretrained_kwargs(
            name_or_path, gguf_file=gguf_file, device=device, dtype=dtype,
            trust_remote_code=trust_remote_code)
        kwargs.setdefault("model_id", mid)
        return cls(model, tokenizer, **kwargs)
