"""AstroLLaVA behind ``astrovl serve --llava``: checked requests, queued and answered in micro-batches.

Nothing here knows about HTTP: :class:`AssistantService` turns a description
request, a question or an OpenAI chat (already checked by
:mod:`astrovl.serve.openai_api`) into a :class:`~astrovl.llava.ChatRequest`
and queues it; one worker thread runs the queued requests together through
:meth:`AstroLLaVA.generate_chats <astrovl.AstroLLaVA.generate_chats>`
(:class:`~astrovl.serve.batching.MicroBatcher`), and every answer streams to its
own ``on_text`` callback as it is generated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from ..exceptions import QueryError
from ..llava.streaming import ChatRequest, ChatResult
from ..llava.template import DEFAULT_CAPTION_PROMPT
from .batching import MicroBatcher

__all__ = ["AssistantService", "MAX_PROMPT_CHARS", "DEFAULT_MAX_TOKENS", "MAX_TOKENS"]

#: longest prompt or question accepted from the page or the JSON API
MAX_PROMPT_CHARS = 4000
#: tokens generated when a request does not say
DEFAULT_MAX_TOKENS = 256
#: most tokens a request may ask for (``max_tokens`` of :class:`AssistantService` changes it)
MAX_TOKENS = 1024


class AssistantService:
    """An :class:`~astrovl.AstroLLaVA` model answering requests from many clients at once.

    Requests wait in a bounded queue; those that arrive within ``max_wait``
    seconds of each other (up to ``max_batch``) are generated together in one
    batched, left-padded ``generate`` call, each with its own token limit,
    stop strings and sampling settings.

    Parameters
    ----------
    llava : AstroLLaVA
    model_id : str, optional
        The name clients use for the model (``GET /v1/models``); default the
        model's source.
    max_batch : int
        Most requests generated together.
    max_wait : float
        Seconds the first request of a batch waits for others.
    max_queue : int
        Most requests waiting; more are refused with
        :class:`~astrovl.serve.batching.ServiceBusy` (503).
    max_tokens : int
        Most new tokens one request may ask for.
    default_max_tokens : int
        New tokens of a request that does not say.
    """

    def __init__(self, llava, *, model_id: str | None = None, max_batch: int = 8, max_wait: float = 0.01,
                 max_queue: int = 32, max_tokens: int = MAX_TOKENS, default_max_tokens: int = DEFAULT_MAX_TOKENS):
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be >= 1")
        self.llava = llava
        self.model_id = str(model_id or llava.source)
        self.max_tokens = int(max_tokens)
        self.default_max_tokens = min(int(default_max_tokens), self.max_tokens)
        self.created = int(time.time())
        self.batcher = MicroBatcher(llava.generate_chats, max_batch=max_batch, max_wait=max_wait,
                                    max_queue=max_queue, name="the assistant model")

    # ------------------------------------------------------------------ request checks
    def check_max_tokens(self, value) -> int:
        """``max_tokens`` as an int in ``1..max_tokens`` (default when None), or a 400 QueryError."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return self.default_max_tokens
        text = str(value).strip()
        if isinstance(value, bool) or not (isinstance(value, int) or (text.isascii() and text.isdigit())):
            raise QueryError(f"max_tokens={value!r} is not a whole number; ask for 1 to {self.max_tokens}")
        number = int(text)
        if not 1 <= number <= self.max_tokens:
            raise QueryError(f"max_tokens={number} is out of range; ask for 1 to {self.max_tokens}")
        return number

    @staticmethod
    def check_prompt(text, what: str = "prompt", default: str | None = None) -> str:
        """A prompt or question: a non-empty string of at most :data:`MAX_PROMPT_CHARS`, or a 400 QueryError."""
        if text is None and default is not None:
            return default
        if not isinstance(text, str) or not text.strip():
            raise QueryError(f"the {what} is empty; write what you want to know about the image")
        if len(text) > MAX_PROMPT_CHARS:
            raise QueryError(f"the {what} has {len(text)} characters; use at most {MAX_PROMPT_CHARS}")
        return text.strip()

    # ------------------------------------------------------------------ requests
    def describe_request(self, image, prompt: str | None = None, max_tokens=None, *,
                         on_text: Callable[[str], None] | None = None,
                         cancel: threading.Event | None = None) -> ChatRequest:
        """A checked request to describe ``image`` (or to answer ``prompt`` about it), greedy."""
        prompt = self.check_prompt(prompt, "prompt", DEFAULT_CAPTION_PROMPT)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return ChatRequest(messages, image=image, max_new_tokens=self.check_max_tokens(max_tokens),
                           on_text=on_text, cancel=cancel)

    def chat_request(self, parsed, image=None, *, on_text: Callable[[str], None] | None = None,
                     cancel: threading.Event | None = None) -> ChatRequest:
        """The request of a checked OpenAI chat (:class:`~astrovl.serve.openai_api.ParsedChat`).

        ``image`` is the decoded image of its image part, if it has one.
        """
        return ChatRequest(parsed.messages, image=image, max_new_tokens=min(parsed.max_tokens, self.max_tokens),
                           temperature=parsed.temperature, top_p=parsed.top_p, stop=parsed.stop,
                           on_text=on_text, cancel=cancel)

    def submit(self, request: ChatRequest) -> Future:
        """Queue a request; the future gets its :class:`~astrovl.llava.ChatResult`.

        Raises
        ------
        ServiceBusy
            The queue is full (a 503 answer with ``Retry-After``).
        """
        return self.batcher.submit(request)

    def answer(self, request: ChatRequest, timeout: float | None = None) -> ChatResult:
        """Queue a request and wait for its answer (from a thread that is not the event loop)."""
        return self.submit(request).result(timeout)

    def info(self) -> dict:
        """The model and the limits, for ``/api/info`` and the page."""
        return {"model": self.model_id, "max_tokens": self.max_tokens, "default_max_tokens": self.default_max_tokens,
                "max_batch": self.batcher.max_batch, "max_queue": self.batcher.max_queue,
                "batches": self.batcher.batches, "largest_batch": self.batcher.largest_batch,
                "max_prompt_chars": MAX_PROMPT_CHARS, "default_prompt": DEFAULT_CAPTION_PROMPT}

    def close(self) -> None:
        """Stop taking requests; those queued are still answered."""
        self.batcher.close()

