"""An independent referee: original LLaVA-1.5's answer computed from the raw release files, without astrovl.

The referee reads the files of a release as the original LLaVA code does
(``llava/mm_utils.py`` and ``llava/model/llava_arch.py`` of haotian-liu/LLaVA, written out
here with transformers and torch only): ``tokenizer_image_token`` (the prompt split at
``<image>``, every piece tokenized on its own, BOS once, the image id -200 in between),
``expand2square`` with the image processor's mean colour, the CLIP vision tower's
``hidden_states[-2][:, 1:]``, the ``mlp2x_gelu`` projector, the image features spliced
into the embeddings of a plain ``LlamaForCausalLM``, greedy decoding in the Vicuna-v1
conversation. The vision tower is rounded to the checkpoint's dtype, as the original loads the
whole model in it (``torch_dtype=float16``); everything is computed in float32 here, the LoRA
merged in float32.

astrovl's ``ask()`` must give the same answer, the same prompt token ids and the same
first-step logits (within 1e-4) for the original layout of 2023
(``liuhaotian/llava-v1.5-7b``), the AstroLLaVA_v3 layout (tower inside) and the official
LoRA (``liuhaotian/llava-v1.5-7b-lora`` on Vicuna, merged by hand here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE_TOKEN_INDEX = -200
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QUESTION = "Describe this galaxy. What type is it?"
MAX_NEW_TOKENS = 6


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, local_files_only=True))


def _load(directory: Path) -> dict:
    """Every weight file of a directory (the index's shards, or the single file)."""
    from safetensors.torch import load_file

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            break
    else:
        shards = [f.name for f in directory.iterdir() if f.name in ("model.safetensors", "pytorch_model.bin")]
    state = {}
    for name in shards:
        path = directory / name
        state.update(load_file(str(path)) if name.endswith(".safetensors")
                     else torch.load(str(path), map_location="cpu", weights_only=True))
    return state


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """llava.mm_utils.tokenizer_image_token, as released."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand2square(pil_img, background_color):
    """llava.mm_utils.expand2square, as released."""
    from PIL import Image

    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def _merge_lora(state: dict, adapter_dir: Path) -> dict:
    """W += alpha / r * B @ A for every adapted layer; the projector from non_lora_trainables.bin."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    adapter = torch.load(str(adapter_dir / "adapter_model.bin"), map_location="cpu", weights_only=True)
    state = {k: v.float() for k, v in state.items()}
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            target = key[len("base_model.model."):].replace(".lora_A.weight", ".weight")
            state[target] = state[target] + scale * (b.float() @ a.float())
    extra = torch.load(str(adapter_dir / "non_lora_trainables.bin"), map_location="cpu", weights_only=True)
    # llava/model/builder.py: strip 'base_model.' then 'model.' prefixes
    state.update({k[len("base_model.model."):]: v for k, v in extra.items()})
    return state


def _referee(repo_id: str, image_path: Path):
    """(prompt ids with -200, first-step logits, answer text) of original LLaVA-1.5 for the release."""
    import torch.nn.functional as F
    from PIL import Image
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    release = _snapshot(repo_id)
    cfg = json.loads((release / "config.json").read_text())
    if (release / "adapter_config.json").is_file():  # builder.py with --model-base lmsys/vicuna-7b-v1.5
        base = _snapshot("lmsys/vicuna-7b-v1.5")
        state, tokenizer_dir = _merge_lora(_load(base), release), base
        dtype = torch.float16
    else:
        state, tokenizer_dir = _load(release), release
        dtype = state["model.embed_tokens.weight"].dtype
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
            "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings")
    llm = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in keys})).eval()
    # the weights as stored (a hand-merged LoRA in float32), the vision tower in the checkpoint's dtype
    llm.load_state_dict({k: v.float() for k, v in state.items()
                         if k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head."))
                         and "rotary_emb.inv_freq" not in k})
    tower_dir = _snapshot(cfg["mm_vision_tower"])
    tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(str(tower_dir))).eval()
    inside = {k[len("model.vision_tower.vision_tower."):]: v for k, v in state.items()
              if k.startswith("model.vision_tower.vision_tower.")}
    clip = inside or {k: v for k, v in _load(tower_dir).items() if k.startswith("vision_model.")}
    names = set(tower.state_dict())  # with or without the vision_model. level, by transformers version
    tower.load_state_dict({(k if k in names else k[len("vision_model."):]): v.to(dtype).float()
                           for k, v in clip.items() if not k.endswith("position_ids")})
    processor = CLIPImageProcessor.from_pretrained(str(tower_dir))
    image = expand2square(Image.open(image_path).convert("RGB"), tuple(int(x * 255) for x in processor.image_mean))
    pixels = processor.preprocess(image, return_tensors="pt")["pixel_values"]

    prompt = f"{SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    ids = tokenizer_image_token(prompt, tokenizer)
    p = {k: state[f"model.mm_projector.{k}"].to(dtype).float() for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    with torch.no_grad():
        features = tower(pixels, output_hidden_states=True).hidden_states[cfg["mm_vision_select_layer"]][:, 1:]
        image_embeds = F.linear(F.gelu(F.linear(features, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])
        cut = ids.index(IMAGE_TOKEN_INDEX)
        embed = llm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(ids[:cut])), image_embeds[0], embed(torch.tensor(ids[cut + 1:]))])[None]
        first, new = None, []
        for _ in range(MAX_NEW_TOKENS):
            logits = llm(inputs_embeds=embeds).logits[0, -1]
            first = logits if first is None else first
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
    return ids, first, tokenizer.decode(new, skip_special_tokens=True).strip()


def _cut(text: str) -> str:
    """astrovl's documented end of an answer: text from a new turn on is dropped (docs/llava.rst)."""
    for stop in ("USER:", "ASSISTANT:", "\nUSER", "</s>"):
        if stop in text:
            text = text[:text.index(stop)]
    return text.strip()


@pytest.fixture(scope="module")
def galaxy_png(tmp_path_factory):
    from PIL import Image

    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("img") / "galaxy.png"
    Image.fromarray(rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)).save(path)  # wide: padded
    return path


@pytest.mark.parametrize("repo_id", ["liuhaotian/llava-v1.5-7b", "UniverseTBD/AstroLLaVA_v3",
                                     "liuhaotian/llava-v1.5-7b-lora"])
def test_astrovl_answers_as_original_llava(release_hub, repo_id, galaxy_png, expect_warning):
    from PIL import Image

    from astrovl import AstroLLaVA, load_image
    from astrovl.llava.hub import TrainingPathWarning

    ids, first, answer = _referee(repo_id, galaxy_png)
    if repo_id.endswith("-lora"):
        with expect_warning(TrainingPathWarning, "vicuna-7b-v1-5.*lmsys/vicuna-7b-v1.5"):
            model = AstroLLaVA.from_pretrained(repo_id, device="cpu")
    else:
        model = AstroLLaVA.from_pretrained(repo_id, device="cpu")
    # the same picture reaches both
    assert np.array_equal(np.asarray(load_image(galaxy_png).to_pil()),
                          np.asarray(Image.open(galaxy_png).convert("RGB")))
    inputs = model.model_inputs(galaxy_png, QUESTION)
    got_ids = inputs["input_ids"][0].tolist()
    image_id = model.model.config.image_token_index
    collapsed = [t for i, t in enumerate(got_ids) if t != image_id or i == 0 or got_ids[i - 1] != image_id]
    assert [IMAGE_TOKEN_INDEX if t == image_id else t for t in collapsed] == ids
    # the '▁' piece before the line break that follows <image>, as the original tokenizes it
    after = ids[ids.index(IMAGE_TOKEN_INDEX) + 1:]
    tok = model.processor.tokenizer
    assert tok.convert_ids_to_tokens(after[:2])[0] == "▁" and tok.decode(after[:2]).strip() == ""
    with torch.inference_mode():
        logits = model.model(**inputs).logits[0, -1]
    torch.testing.assert_close(logits[:first.shape[0]].float(), first, rtol=0, atol=1e-4)
    assert model.ask(galaxy_png, QUESTION, max_new_tokens=MAX_NEW_TOKENS) == _cut(answer)


def test_llava_hf_keeps_its_processor_tokens(release_hub, galaxy_png):
    """llava-hf checkpoints are prompted as their own processor does (no piece-wise tokenization)."""
    from astrovl import AstroLLaVA

    model = AstroLLaVA.from_pretrained("llava-hf/llava-1.5-7b-hf", device="cpu")
    assert model.prompt_tokenization is None
    inputs = model.model_inputs(galaxy_png, QUESTION)
    prompt = model._prompt([model._user(QUESTION)])
    expected = model.processor(images=[model._pil(galaxy_png)], text=[prompt], return_tensors="pt")
    assert inputs["input_ids"].tolist() == expected["input_ids"].tolist()
