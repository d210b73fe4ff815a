"""AstroLLaVA: captions and answers for astronomical images with LLaVA models."""

from .convert import convert_llava_checkpoint
from .model import AstroLLaVA, expand2square, is_original_llava_layout
from .streaming import ChatRequest, ChatResult
from .template import (
    DEFAULT_CAPTION_PROMPT,
    LLAVA_CHAT_TEMPLATE,
    LLAVA_HF_CHAT_TEMPLATE,
    VICUNA_V1_CHAT_TEMPLATE,
    VICUNA_V1_SYSTEM,
)

__all__ = ["AstroLLaVA", "ChatRequest", "ChatResult", "convert_llava_checkpoint", "is_original_llava_layout",
           "expand2square",
           "LLAVA_CHAT_TEMPLATE", "LLAVA_HF_CHAT_TEMPLATE", "VICUNA_V1_CHAT_TEMPLATE", "VICUNA_V1_SYSTEM",
           "DEFAULT_CAPTION_PROMPT"]
