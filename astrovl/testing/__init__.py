"""Public test helpers: tiny models in the released checkpoints' exact layouts, and hub caches to hold them.

Like astropy's test helpers, these are for the tests of astrovl and of code built
on it; nothing in the library imports them. Importing this package needs the
``test`` dependencies (torch, transformers, sentencepiece, safetensors).

- :mod:`astrovl.testing.hub`: :func:`write_hub_snapshot`, the one writer that
  puts any directory into a hub cache under a hub id (``cache_dir, repo_id,
  source``), so that it loads by hub id offline.
- :mod:`astrovl.testing.clip`: the one tiny CLIP configuration
  (:func:`~astrovl.testing.clip.tiny_clip_config`), tiny CLIP checkpoints in the
  transformers and open_clip layouts, a CLIP vision tower, synthetic embeddings.
- :mod:`astrovl.testing.llava`: tiny LLaVA checkpoints in today's layouts
  (transformers, original LLaVA, LoRA releases) and a hub of them.
- :mod:`astrovl.testing.galaxy10`: a tiny Galaxy10 DECaLS in the hub dataset's layout.
- :mod:`astrovl.testing.releases`: one writer per released checkpoint
  (``liuhaotian/llava-v1.5-7b``, ``openai/clip-vit-large-patch14-336``, the
  official LoRA and its Vicuna base, AstroLLaVA v1/v2/v3, ``llava-hf``) and
  :func:`make_release_hub`, which puts them all into a hub cache.
- :mod:`astrovl.testing.serve`: ``astrovl serve`` in a subprocess on a free port.
"""

from .hub import write_hub_snapshot
from .llava import make_sentencepiece_tokenizer
from .releases import (
    CURRENT_TOWER_ID,
    NOT_WRITTEN,
    RELEASES,
    TINY_SIZES,
    make_release_hub,
    write_astrollava_v1,
    write_astrollava_v2,
    write_astrollava_v3,
    write_clip_vit_l_336,
    write_current_clip_vision_tower,
    write_llava_hf,
    write_llava_v15,
    write_llava_v15_lora,
    write_vicuna_v15,
)

__all__ = ["make_release_hub", "write_hub_snapshot", "make_sentencepiece_tokenizer", "write_llava_v15",
           "write_clip_vit_l_336", "write_vicuna_v15", "write_llava_v15_lora", "write_astrollava_v1",
           "write_astrollava_v2", "write_astrollava_v3", "write_llava_hf", "write_current_clip_vision_tower",
           "RELEASES", "CURRENT_TOWER_ID", "TINY_SIZES", "NOT_WRITTEN"]
