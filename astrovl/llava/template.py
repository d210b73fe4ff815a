"""Conversation formats of LLaVA checkpoints, as chat templates.

``VICUNA_V1_CHAT_TEMPLATE``
    the format the original LLaVA-1.5 repository trains with (``--version v1``),
    and so the format of every original-layout LLaVA-1.5 checkpoint, AstroLLaVA
    among them: a system line, then ``USER: <image>\\n... ASSISTANT: ...</s>``
    with turns separated by a space and assistant turns closed by ``</s>``.
``LLAVA_HF_CHAT_TEMPLATE``
    the template shipped with the ``llava-hf`` conversions
    (``llava-hf/llava-1.5-7b-hf``): no system line, every turn followed by a
    space, and assistant turns *not* closed by the end-of-sequence token.
``LLAVA_CHAT_TEMPLATE``
    the LLaVA-1.5 turn format without a system line, assistant turns closed by
    the end-of-sequence token (the tiny test models use it).
``PLAIN``
    LLaVA-1.5's pre-training ("plain") format: the image tokens, the caption and
    a line break; no instruction, no roles.
"""

from __future__ import annotations

__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "LLAVA_HF_CHAT_TEMPLATE",
    "VICUNA_V1_CHAT_TEMPLATE",
    "VICUNA_V1_SYSTEM",
    "MISTRAL_INSTRUCT_CHAT_TEMPLATE",
    "PLAIN_SEPARATOR",
    "plain_text",
    "STOP_STRINGS",
    "DEFAULT_CAPTION_PROMPT",
]

_TEXT = "(message['content'] if message['content'] is string else message['content'][0]['text'])"
_IMAGES = ("{% if message['content'] is not string %}"
           "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
           "{% endfor %}{% endif %}")
_TEXTS = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
          "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
          "{% endfor %}{% endif %}")

#: Chat template of LLaVA-1.5 without a system line: images first in a user turn, turns
#: separated by spaces, assistant turns closed by the end-of-sequence token.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ " + _TEXT + " + ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    + _IMAGES + _TEXTS +
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: System line of the Vicuna-v1 conversation (``conv_vicuna_v1`` of the LLaVA repository).
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")

#: The Vicuna-v1 conversation of LLaVA-1.5 training (``--version v1``)::
#:
#:     SYSTEM USER: <image>\nQUESTION ASSISTANT: ANSWER</s>USER: QUESTION ASSISTANT:
#:
#: A leading system message replaces the default system line.
VICUNA_V1_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set message = messages[0] %}{{ " + _TEXT + " + ' ' }}{% set loop_messages = messages[1:] %}"
    "{% else %}{{ '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + " ' }}{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ 'USER: ' }}" + _IMAGES + _TEXTS + "{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT: ' }}{% generation %}" + _TEXTS + "{{ eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: The Mistral-instruct conversation of the original LLaVA repository (``llava_mistral``
#: checkpoints): ``[INST] <image>\nQUESTION [/INST] ANSWER </s>[INST] QUESTION [/INST]``;
#: a leading system message goes into the first instruction (``<<SYS>>`` block).
MISTRAL_INSTRUCT_CHAT_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set message = messages[0] %}{% set ns.system = '<<SYS>>\n' + " + _TEXT + " + '\n<</SYS>>\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (ns.system if loop.first else '') }}" + _IMAGES + _TEXTS + "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' }}{% generation %}" + _TEXTS + "{{ ' ' + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)

#: The chat template of the ``llava-hf`` LLaVA-1.5 conversions (assistant turns end with a
#: space, not with the end-of-sequence token).
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: Separator that ends a caption in the plain pre-training format.
PLAIN_SEPARATOR = "\n"


def plain_text(caption: str, image_token: str = "<image>") -> tuple[str, int]:
    """The plain (pre-training) text of a caption, and where the caption starts in it.

    LLaVA-1.5's stage-1 format: the image placeholder, then the caption, then
    :data:`PLAIN_SEPARATOR`; the loss covers the caption and the separator.

    >>> plain_text("A spiral galaxy.")
    ('<image>A spiral galaxy.\\n', 7)
    """
    return image_token + caption + PLAIN_SEPARATOR, len(image_token)


#: Text that marks the start of a new turn: generation is cut there (no runaway turns).
STOP_STRINGS = ("USER:", "ASSISTANT:", "\nUSER", "</s>")

DEFAULT_CAPTION_PROMPT = "Describe this astronomical image in detail."
