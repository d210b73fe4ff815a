"""Many conversations in one batched ``generate`` call, each streamed and stopped on its own.

:meth:`AstroLLaVA.generate_chats <astrovl.AstroLLaVA.generate_chats>` runs a
list of :class:`ChatRequest` together (left padding, one ``generate`` call).
Each request keeps its own limits: its number of new tokens, its stop
strings, its temperature and top-p. Its answer is handed out piece by piece
as it is generated (``on_text``), already cut at the stop strings, so that the
pieces put together are the final answer of :class:`ChatResult`.

The parts used by ``generate``:

:class:`TextStream`
    one row's token ids turned into text pieces: decoded as a whole at every
    step (so multi-byte characters and SentencePiece spaces come out right),
    held back while the text may be the start of a stop string, cut at the
    first stop string.
:class:`BatchStreamer`
    the ``streamer`` of ``generate``: hands each new token of each row to its
    :class:`TextStream`.
:class:`RowStopping`
    the stopping criterion that ends each row when its stream is done.
:class:`RowSampling`
    the logits processor that applies each row's temperature and top-p
    (greedy rows keep only their most likely token).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChatRequest", "ChatResult", "TextStream", "BatchStreamer", "RowStopping", "RowSampling",
           "FINISH_REASONS"]

#: why a row stopped: its end-of-sequence token or a stop string ("stop"), its token limit
#: ("length"), or its client went away ("cancelled")
FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass
class ChatRequest:
    """One conversation to continue.

    Parameters
    ----------
    messages : list of dict
        Chat messages as the processor's chat template takes them: ``{"role":
        "system"|"user"|"assistant", "content": str or list of parts}``, a part
        being ``{"type": "text", "text": ...}`` or ``{"type": "image"}`` (where
        the image goes). At most one image part.
    image : image input, optional
        The image of the image part (anything :func:`~astrovl.load_image`
        accepts); required when there is an image part.
    max_new_tokens : int
        Most tokens generated for this answer.
    temperature : float
        0 (the default) is greedy decoding; above 0, sampling at this temperature.
    top_p : float
        Nucleus sampling: sample among the most likely tokens whose probabilities
        add up to ``top_p`` (1 keeps all).
    stop : sequence of str
        More strings that end the answer (the model's own turn markers always do);
        the answer ends before them.
    on_text : callable, optional
        Called with each new piece of the answer, from the generating thread.
    cancel : threading.Event, optional
        When set, the answer stops at the next token (finish reason
        ``"cancelled"``); for a client that went away.
    """

    messages: list
    image: Any = None
    max_new_tokens: int = 200
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event | None = field(default=None, repr=False)

    def __post_init__(self):
        if not isinstance(self.messages, list) or not self.messages:
            raise ValueError("messages must be a non-empty list of chat messages")
        n_images = sum(1 for m in self.messages if not isinstance(m.get("content"), str)
                       for part in m["content"] if part.get("type") == "image")
        if n_images > 1:
            raise ValueError(f"the conversation has {n_images} images; the model takes one image per "
                             "conversation")
        if n_images == 1 and self.image is None:
            raise ValueError("the conversation has an image part but no image was given (image=)")
        if n_images == 0 and self.image is not None:
            raise ValueError("an image was given but no message has an image part ({'type': 'image'})")
        if isinstance(self.max_new_tokens, bool) or int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        self.max_new_tokens = int(self.max_new_tokens)
        self.stop = tuple(s for s in self.stop if s)


@dataclass
class ChatResult:
    """The answer to one :class:`ChatRequest`.

    Attributes
    ----------
    text : str
        The answer (the pieces handed to ``on_text``, put together).
    finish_reason : str
        One of :data:`FINISH_REASONS`.
    prompt_tokens : int
        Tokens of the prompt as the model saw it (image tokens included).
    completion_tokens : int
        Tokens generated for this answer (its end-of-sequence token included).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class TextStream:
    """The text of one generated row, handed out in pieces and cut at stop strings.

    Parameters
    ----------
    tokenizer
        Decodes the row's token ids.
    stop_ids : collection of int
        Tokens that end the answer (not part of it).
    stop_strings : sequence of str
        Strings that end the answer (the answer ends before the first one).
    max_new_tokens : int
    on_text : callable, optional
        Receives each new piece.
    cancel : threading.Event, optional
    """

    def __init__(self, tokenizer, stop_ids, stop_strings: Sequence[str], max_new_tokens: int,
                 on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.max_new_tokens = int(max_new_tokens)
        self.on_text = on_text
        self.cancel = cancel
        self.ids: list[int] = []
        self.n_tokens = 0
        self.sent = ""
        self.done = False
        self.finish_reason: str | None = None
        self.text = ""

    def add(self, token_id: int) -> None:
        """Take the next generated token of this row."""
        if self.done:
            return
        if self.cancel is not None and self.cancel.is_set():
            self._finish("cancelled", self.sent)
            return
        self.n_tokens += 1
        if token_id in self.stop_ids:
            self._finish("stop", self._decoded())
            return
        self.ids.append(int(token_id))
        text = self._decoded()
        cut = self._first_stop(text)
        if cut is not None:
            self._finish("stop", text[:cut])
        elif self.n_tokens >= self.max_new_tokens:
            self._finish("length", text)
        elif not text.endswith("\ufffd"):  # a character whose bytes are not all generated yet
            self._emit(text[:len(text) - self._held(text)].strip())

    def end(self) -> None:
        """Generation stopped for the whole batch: the row ends where it is."""
        if not self.done:
            self._finish("length", self._decoded())

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """Length of the end of ``text`` that may be the start of a stop string."""
        held = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held

    def _emit(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            piece, self.sent = text[len(self.sent):], text
            if self.on_text is not None:
                self.on_text(piece)

    def _finish(self, reason: str, text: str) -> None:
        text = text.strip()
        self._emit(text)
        # what was handed out is the answer: a decoding that changed earlier text cannot be taken back
        self.text = text if text.startswith(self.sent) else self.sent
        self.finish_reason = reason
        self.done = True


class BatchStreamer:
    """The ``streamer`` of a batched ``generate``: each row's new token goes to its :class:`TextStream`."""

    def __init__(self, streams: Sequence[TextStream]):
        self.streams = list(streams)
        self._prompt_seen = False

    def put(self, value) -> None:
        """Called by ``generate`` with the prompt ids first, then with each step's tokens."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for stream, token in zip(self.streams, value.reshape(-1).tolist()):
            stream.add(int(token))

    def end(self) -> None:
        """Called by ``generate`` when it stops."""
        for stream in self.streams:
            stream.end()


def _stopping_base():
    from transformers import StoppingCriteria

    return StoppingCriteria


def _processor_base():
    from transformers import LogitsProcessor

    return LogitsProcessor


class RowStopping:
    """Stopping criterion: a row is finished when its :class:`TextStream` is done.

    Built with :meth:`create` (a subclass of transformers' ``StoppingCriteria``).
    """

    @staticmethod
    def create(streams: Sequence[TextStream]):
        """The criterion for ``generate(stopping_criteria=[...])``."""
        import torch

        class _RowStopping(_stopping_base()):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([s.done for s in streams], dtype=torch.bool, device=input_ids.device)

        return _RowStopping()


class RowSampling:
    """Logits processor with a temperature and a top-p per row; greedy rows keep only their best token.

    Built with :meth:`create` (a subclass of transformers' ``LogitsProcessor``),
    for ``generate(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)``.
    """

    @staticmethod
    def create(temperatures: Sequence[float], top_ps: Sequence[float]):
        """The processor for ``generate(logits_processor=[...])``."""
        import torch

        class _RowSampling(_processor_base()):
            def __call__(self, input_ids, scores):
                temps = torch.tensor(temperatures, dtype=scores.dtype, device=scores.device)
                tops = torch.tensor(top_ps, dtype=torch.float32, device=scores.device)
                out = scores / temps.clamp(min=1e-5)[:, None]
                ordered, order = torch.sort(out, descending=False, dim=-1)
                cumulative = ordered.float().softmax(dim=-1).cumsum(dim=-1)
                drop = cumulative <= (1 - tops)[:, None]
                drop[:, -1] = False  # the most likely token always stays
                out = out.masked_fill(drop.scatter(1, order, drop), -math.inf)
                greedy = temps <= 0
                if bool(greedy.any()):
                    best = torch.full_like(scores, -math.inf).scatter_(1, scores.argmax(-1, keepdim=True), 0.0)
                    out = torch.where(greedy[:, None], best, out)
                return out

        return _RowSampling()
