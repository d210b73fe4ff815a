"""astrovl: astronomical images and natural language.

CLIP-style retrieval over FITS images (``CLIPEmbedder``, ``EmbeddingIndex``),
LLaVA-style captioning and question answering (``AstroLLaVA``), the dataset
builders that feed them and the training and evaluation routines of both.

Heavy dependencies (torch, transformers, open_clip, outlines, faiss) are
imported lazily, so ``import astrovl`` is fast.
"""

from __future__ import annotations

from ._lazy import lazy_exports
from .config import conf

try:
    from ._version import version as __version__
except ImportError:  # pragma: no cover - source tree without a build
    __version__ = "0.0.0"

# public name -> module that defines it
_LAZY = {
    "AstroImage": "astrovl.imaging",
    "load_image": "astrovl.imaging",
    "make_rgb": "astrovl.imaging",
    "cutout": "astrovl.imaging",
    "CLIPEmbedder": "astrovl.clip",
    "EmbeddingIndex": "astrovl.clip",
    "AstroLLaVA": "astrovl.llava",
    "convert_llava_checkpoint": "astrovl.llava",
    "HubblePreviewDatasetBuilder": "astrovl.datasets",
    "OutreachDatasetBuilder": "astrovl.datasets",
    "SyntheticSkyDataset": "astrovl.datasets",
    "ManifestDataset": "astrovl.datasets",
    "AbstractSummarizer": "astrovl.generation",
    "ConversationGenerator": "astrovl.generation",
}

__all__ = ["__version__", "conf", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
