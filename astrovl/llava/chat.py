"""Conversations as the model sees them: messages, chat templates, answer spans.

Inference and training render a conversation the same way, through the
processor's chat template, with one rule added: every assistant answer ends
with the end-of-sequence token. Templates that close assistant turns with it
(Vicuna-v1, the format of original LLaVA-1.5 checkpoints) are used as they
are; templates that do not (the ``llava-hf`` one ends answers with a space) get
the token appended to each answer, so a model trained here learns to stop and
a conversation history at inference reads exactly as in training.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from ..utils.imports import optional_import

__all__ = ["to_messages", "close_assistant_turns", "template_closes_turns", "render", "answer_spans",
           "eos_token"]

_PROBE = "ZqxProbeAnswer"


def eos_token(processor) -> str:
    """The end-of-sequence token text of a processor's tokenizer."""
    tok = getattr(processor, "tokenizer", processor)
    eos = tok.eos_token
    if not eos:
        raise ValueError("the tokenizer has no end-of-sequence token; set tokenizer.eos_token")
    return str(eos)


def to_messages(turns: Sequence[tuple[str, str]], *, system: str | None = None, image: bool = True
                ) -> list[dict]:
    """Chat messages from ``(role, text)`` turns; the image goes with the first user turn."""
    messages: list[dict] = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    first = image
    for role, text in turns:
        content = ([{"type": "image"}] if role == "user" and first else []) + [{"type": "text", "text": text}]
        if role == "user":
            first = False
        messages.append({"role": role, "content": content})
    return messages


def render(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat-template text of ``messages``."""
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


@functools.lru_cache(maxsize=64)
def _closes(template: str, eos: str) -> bool:
    optional_import("transformers", purpose="LLaVA chat templates")
    from transformers.utils.chat_template_utils import render_jinja_template

    probe = [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
             {"role": "assistant", "content": [{"type": "text", "text": _PROBE}]},
             {"role": "user", "content": [{"type": "text", "text": "Q"}]}]
    text = render_jinja_template(conversations=[probe], chat_template=template, eos_token=eos, bos_token="",
                                 add_generation_prompt=False)[0][0]
    after = text[text.index(_PROBE) + len(_PROBE):]
    return after.lstrip().startswith(eos)


def _template(processor) -> str:
    template = getattr(processor, "chat_template", None) or getattr(
        getattr(processor, "tokenizer", None), "chat_template", None)
    if not template:
        raise ValueError("the processor has no chat template; set processor.chat_template")
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    return template


def template_closes_turns(processor) -> bool:
    """True if the processor's chat template ends assistant turns with the end-of-sequence token."""
    return _closes(_template(processor), eos_token(processor))


def close_assistant_turns(processor, messages: list[dict]) -> list[dict]:
    """``messages`` with the end-of-sequence token after each answer, unless the template adds it."""
    if template_closes_turns(processor):
        return messages
    eos = eos_token(processor)
    out = []
    for m in messages:
        if m["role"] == "assistant":
            text = m["content"] if isinstance(m["content"], str) else \
                "".join(c["text"] for c in m["content"] if c.get("type") == "text")
            m = {"role": "assistant", "content": [{"type": "text", "text": text + eos}]}
        out.append(m)
    return out


def answer_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation as one string and locate each assistant answer in it.

    Parameters
    ----------
    processor
        Its chat template renders the messages.
    messages : list of dict
        The conversation (assistant turns are closed with the end-of-sequence
        token first, see :func:`close_assistant_turns`).

    Returns
    -------
    text : str
        The whole conversation.
    spans : list of (int, int)
        Character ranges of the answers in ``text``: from the end of the
        generation prompt that precedes the answer to the end of its
        end-of-sequence token (the text the model must produce).

    Raises
    ------
    ValueError
        If the template does not render conversations incrementally (a prompt
        must be a prefix of the conversation that continues it).
    """
    messages = close_assistant_turns(processor, messages)
    eos = eos_token(processor)
    text = render(processor, messages, add_generation_prompt=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(processor, messages[:k], add_generation_prompt=True)
        upto = render(processor, messages[:k + 1], add_generation_prompt=False)
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise ValueError("the chat template does not render conversations incrementally (a prompt is not "
                             "a prefix of the conversation that continues it), so the answers cannot be "
                             "located for answer-only training")
        end = upto.find(eos, len(prefix))
        if end < 0:
            raise ValueError(f"answer {k} does not end with the end-of-sequence token {eos!r} in the rendered "
                             "conversation")
        spans.append((len(prefix), end + len(eos)))
    return text, spans
