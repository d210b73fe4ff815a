"""A tiny, randomly initialised LLaVA for tests, demonstrations and benchmarks of the code paths.

It has the real architecture (a CLIP vision tower, a two-layer GELU projector and a
Llama language model) with very small sizes, a byte-level BPE tokenizer trained
locally with :mod:`tokenizers`, and a processor with the LLaVA-1.5 chat template,
so :class:`~astrovl.AstroLLaVA` loads it like any transformers LLaVA checkpoint.
Its outputs are meaningless: it exists to exercise the real code without a download.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..utils.files import atomic_directory
from .template import LLAVA_CHAT_TEMPLATE

__all__ = ["make_tiny_llava", "TINY_CORPUS"]

TINY_CORPUS = [
    "USER: ASSISTANT: Describe this astronomical image in detail.",
    "This image shows a spiral galaxy with bright arms and a central bulge.",
    "A globular cluster of old stars, densely packed toward the centre.",
    "An elliptical galaxy with a smooth light profile.",
    "A barred spiral galaxy; the bar connects the spiral arms.",
    "Merging galaxies with a long tidal tail.",
    "A gravitational lens: an arc around a massive foreground galaxy.",
    "An emission nebula with dark dust lanes and glowing filaments of gas.",
    "What kind of object is this? How many stars are visible? Is there a bar?",
    "The galaxy is edge-on, with a thin disk and a small bulge.",
    "Disturbed, Merging, Round Smooth, In-between Round Smooth, Cigar Shaped Smooth, Barred Spiral,",
    "Unbarred Tight Spiral, Unbarred Loose Spiral, Edge-on without Bulge, Edge-on with Bulge.",
]


def make_tiny_llava(directory: str | os.PathLike, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                    vocab_size: int = 400) -> Path:
    """Write a tiny LLaVA checkpoint (model, tokenizer, processor) to ``directory``.

    Parameters
    ----------
    directory : path
    seed : int
        Seed of the random weights.
    image_size, patch_size : int
        Vision tower input and patch size: ``(image_size / patch_size) ** 2`` image tokens.
    vocab_size : int
        Size of the locally trained BPE vocabulary.

    Returns
    -------
    pathlib.Path
        The directory, loadable with :meth:`AstroLLaVA.from_pretrained`.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"})
    tokenizer.padding_side = "left"
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    n_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=n_tokens, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return directory
