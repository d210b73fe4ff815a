"""The LLaVA-1.5 conversation format ("USER: <image>\\n... ASSISTANT: ...")."""

from __future__ import annotations

__all__ = ["LLAVA_CHAT_TEMPLATE", "STOP_STRINGS", "DEFAULT_CAPTION_PROMPT"]

#: Chat template of LLaVA-1.5: images first in a user turn, turns separated by spaces,
#: assistant turns closed by the end-of-sequence token.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ (message['content'] if message['content'] is string else message['content'][0]['text']) + ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: Text that marks the start of a new turn: generation is cut there (no runaway turns).
STOP_STRINGS = ("USER:", "ASSISTANT:", "\nUSER", "</s>")

DEFAULT_CAPTION_PROMPT = "Describe this astronomical image in detail."
