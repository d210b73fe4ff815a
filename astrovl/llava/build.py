"""New LLaVA models from parts: a CLIP vision tower, a byte-level BPE tokenizer, a small Llama.

For training a small AstroLLaVA from scratch where no pretrained language model
can be downloaded (the offline demonstration, tests): :func:`train_bpe_tokenizer`
learns a byte-level BPE vocabulary from a corpus with ``tokenizers`` (no
download), and :func:`new_llava` puts a given CLIP vision tower, a 2-layer GELU
projector and a randomly initialised Llama language model together as a
transformers ``LlavaForConditionalGeneration`` with its processor, ready for
:func:`~astrovl.training.train_llava`.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..utils.imports import optional_import
from .template import VICUNA_V1_CHAT_TEMPLATE

__all__ = ["SPECIAL_TOKENS", "SMALL_LLAMA", "train_bpe_tokenizer", "new_llava"]

#: Special tokens of :func:`train_bpe_tokenizer`, ids 0 to 4 in this order.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

#: Sizes of the small Llama language model of :func:`new_llava` (about 0.2 M parameters
#: besides the embeddings).
SMALL_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512)


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 400):
    """Learn a byte-level BPE tokenizer from ``corpus`` (offline, with ``tokenizers``).

    Every byte is in the vocabulary, so any text can be encoded; the merges come
    from the corpus. Special tokens: :data:`SPECIAL_TOKENS` (``<s>``/``</s>``
    begin and end a sequence, ``<pad>`` pads, ``<image>`` stands for the image).

    Parameters
    ----------
    corpus : iterable of str
    vocab_size : int
        Target size of the vocabulary (at least the 256 bytes and the special tokens).

    Returns
    -------
    transformers.PreTrainedTokenizerFast
    """
    optional_import("transformers", purpose="LLaVA tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is below the 256 bytes and {len(SPECIAL_TOKENS)} special "
                         "tokens a byte-level vocabulary holds")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def new_llava(vision_tower, image_processor, tokenizer, *, text_config: dict | None = None,
              chat_template: str = VICUNA_V1_CHAT_TEMPLATE, vision_feature_layer: int = -2, seed: int = 0,
              device=None):
    """A new LLaVA model: the given vision tower, a new projector and a new Llama language model.

    Parameters
    ----------
    vision_tower : transformers.CLIPVisionModel or CLIPVisionModelWithProjection
        Its weights are copied into the model (e.g. from
        :func:`astrovl.clip.export.transformers_vision_tower`).
    image_processor : transformers.CLIPImageProcessor
    tokenizer : transformers.PreTrainedTokenizerFast
        With ``<image>`` and a padding token (e.g. from :func:`train_bpe_tokenizer`).
    text_config : dict, optional
        ``LlamaConfig`` sizes (default :data:`SMALL_LLAMA`).
    chat_template : str
        Default: the Vicuna-v1 conversation AstroLLaVA trains with.
    vision_feature_layer : int
        The hidden layer of the tower whose patch features the projector reads
        (-2 in LLaVA-1.5; -1, the last, suits towers of very few layers).
    seed : int
        Seed of the new weights.
    device : str, optional

    Returns
    -------
    AstroLLaVA
    """
    optional_import("transformers", purpose="LLaVA models")
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from ..utils.devices import resolve_device
    from .model import AstroLLaVA

    image_token = "<image>"
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs an '<image>' token and a padding token; make one with "
                         "train_bpe_tokenizer()")
    tokenizer.padding_side = "left"
    tokenizer.chat_template = chat_template
    vision_config = vision_tower.config
    patch, size = int(vision_config.patch_size), int(vision_config.image_size)
    text = LlamaConfig(vocab_size=len(tokenizer), **(text_config or SMALL_LLAMA), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=text, image_token_index=image_token_id,
                         image_seq_length=(size // patch) ** 2, vision_feature_layer=vision_feature_layer,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    target = model.model.vision_tower
    # a CLIPVisionModel (transformers 4) or its CLIPVisionTransformer (transformers 5)
    prefix = "" if any(k.startswith("vision_model.") for k in target.state_dict()) else "vision_model."
    tower_state = {k[len(prefix):]: v for k, v in vision_tower.state_dict().items() if k.startswith("vision_model.")}
    missing, unexpected = target.load_state_dict(tower_state, strict=False)
    if [k for k in missing if not k.endswith("position_ids")] or unexpected:
        raise ValueError(f"the vision tower does not fit a CLIPVisionModel (missing {list(missing)[:3]}, "
                         f"unexpected {list(unexpected)[:3]})")
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = (tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                            tokenizer.bos_token_id)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_template)
    dev = resolve_device(device)
    return AstroLLaVA(model.to(dev).eval(), processor, device=dev, source="<new LLaVA model>")
