"""AstroLLaVA: captions and answers for astronomical images with LLaVA models."""

from .convert import convert_llava_checkpoint
from .model import AstroLLaVA, is_original_llava_layout
from .template import DEFAULT_CAPTION_PROMPT, LLAVA_CHAT_TEMPLATE

__all__ = ["AstroLLaVA", "convert_llava_checkpoint", "is_original_llava_layout", "LLAVA_CHAT_TEMPLATE",
           "DEFAULT_CAPTION_PROMPT"]
