"""CLIP embeddings, search and zero-shot classification for astronomical images."""

from .categories import DEFAULT_TEMPLATES, HUBBLE_CATEGORIES
from .embedder import TINY_CLIP_CONFIG, CLIPEmbedder
from .index import EmbeddingIndex

__all__ = ["CLIPEmbedder", "EmbeddingIndex", "HUBBLE_CATEGORIES", "DEFAULT_TEMPLATES", "TINY_CLIP_CONFIG"]
