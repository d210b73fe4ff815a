"""Public test helpers: tiny models in the released checkpoints' exact layouts, and hub caches to hold them.

Like astropy's test helpers, these are for the tests of astrovl and of code built
on it; nothing in the library imports them. Importing this package needs the
``test`` dependencies (torch, transformers, sentencepiece, safetensors).

- :mod:`astrovl.testing.releases`: one writer per released checkpoint
  (``liuhaotian/llava-v1.5-7b``, ``openai/clip-vit-large-patch14-336``, the
  official LoRA and its Vicuna base, AstroLLaVA v1/v2/v3, ``llava-hf``) and
  :func:`make_release_hub`, which puts them all into a hub cache.
- :func:`write_hub_snapshot`: any directory into a hub cache under a hub id
  (also :mod:`astrovl.llava.testing`, with the tiny models of today's layouts).
"""

from ..llava.testing import make_sentencepiece_tokenizer, write_hub_snapshot
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
