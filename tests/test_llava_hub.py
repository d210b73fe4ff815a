"""Released LLaVA checkpoints by hub id: tiny models in the exact released layouts in a temporary hub cache.

Everything goes through huggingface_hub's real cache resolution (``HF_HUB_OFFLINE=1``).
"""

import contextlib
import json
import logging
import pickle

import numpy as np
import pytest
import torch

from astrovl import AstroLLaVA, conf
from astrovl.exceptions import CheckpointError, ModelNotFoundError
from astrovl.llava import (
    LLAVA_HF_CHAT_TEMPLATE,
    VICUNA_V1_CHAT_TEMPLATE,
    VICUNA_V1_SYSTEM,
    expand2square,
)
from astrovl.llava.checkpoints import load_weights, weight_files
from astrovl.llava.convert import converted_cache_path
from astrovl.llava.hub import resolve_checkpoint
from astrovl.testing import write_hub_snapshot
from astrovl.testing.llava import make_tiny_hub, make_tiny_lora_release, make_tiny_original_llava

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOWER = "openai/clip-vit-large-patch14-336"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache holding every released layout, offline, and a private astrovl cache."""
    import huggingface_hub.constants as hf_constants

    root = tmp_path_factory.mktemp("hub")
    cache = root / "hub-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        with conf.set_temp("cache_dir", str(root / "astrovl-cache")):
            src = root / "src"
            make_tiny_hub(cache, src)
            yield {"cache": cache, "root": root, "src": src}


def _inputs(model, image):
    """What ask() gives the model (converted original checkpoints: the original LLaVA code's token ids)."""
    return model.model_inputs(image, "Describe this galaxy.")


def _reference_logits(orig_dir, tower_dir, input_ids, pixel_values, image_token_id):
    """LLaVA-1.5's forward pass written out from the original weights (no transformers LLaVA code)."""
    import torch.nn.functional as F
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    cfg = json.loads((orig_dir / "config.json").read_text())
    state = load_weights(weight_files(orig_dir))
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
            "rms_norm_eps", "max_position_embeddings", "vocab_size", "rope_theta", "tie_word_embeddings")
    lm = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in keys if k in cfg})).eval()
    lm.load_state_dict({k: v for k, v in state.items() if "mm_projector" not in k})
    tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(tower_dir)).eval()
    clip = load_weights(weight_files(tower_dir))
    names = set(tower.state_dict())  # with or without the vision_model. level, by transformers version
    tower.load_state_dict({(k if k in names else k[len("vision_model."):]): v for k, v in clip.items()
                           if k.startswith("vision_model.")})
    with torch.no_grad():
        feats = tower(pixel_values, output_hidden_states=True).hidden_states[cfg["mm_vision_select_layer"]][:, 1:]
        proj = F.linear(F.gelu(F.linear(feats, state["model.mm_projector.0.weight"],
                                        state["model.mm_projector.0.bias"])),
                        state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
        is_image = input_ids == image_token_id
        embeds = lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        embeds[is_image] = proj.reshape(-1, proj.shape[-1])
        return lm(inputs_embeds=embeds).logits


def _snapshot(hub, repo_id):
    return resolve_checkpoint(repo_id).path


@pytest.mark.parametrize("repo_id", ["UniverseTBD/AstroLLaVA_v3", "liuhaotian/llava-v1.5-7b"])
def test_original_layout_by_hub_id_matches_the_reference(hub, repo_id, m13_path):
    model = AstroLLaVA.from_pretrained(repo_id, device="cpu")
    assert model.source.startswith(repo_id + "@")
    inputs = _inputs(model, m13_path)
    with torch.inference_mode():
        got = model.model(**inputs).logits
    expected = _reference_logits(_snapshot(hub, repo_id), _snapshot(hub, TOWER), inputs["input_ids"],
                                 inputs["pixel_values"], model.model.config.image_token_index)
    torch.testing.assert_close(got[..., :expected.shape[-1]], expected, rtol=1e-4, atol=1e-4)
    # the Vicuna-v1 conversation of LLaVA-1.5 training
    assert model.processor.chat_template == VICUNA_V1_CHAT_TEMPLATE
    assert model._prompt([model._user("What is it?")]) == f"{VICUNA_V1_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    # generation starts from the same logits: its first token is the reference's argmax
    first = model.processor.tokenizer.decode([int(expected[0, -1].argmax())], skip_special_tokens=True)
    assert model.ask(m13_path, "Describe this galaxy.", max_new_tokens=1) == model._cut(first)


def test_conversion_is_cached_per_revision(hub, caplog):
    caplog.set_level(logging.INFO, logger="astrovl.llava.convert")
    first = AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v3", device="cpu")
    caplog.clear()
    again = AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v3", device="cpu")
    assert "reusing the conversion" in caplog.text and "converting" not in caplog.text
    assert again.source == first.source
    old = resolve_checkpoint("UniverseTBD/AstroLLaVA_v3").revision
    # a new revision of the repository (new weights, main moved): converted again
    new_dir = make_tiny_original_llava(hub["root"] / "v3-new", vision_tower=TOWER, seed=11)
    new = write_hub_snapshot(hub["cache"], "UniverseTBD/AstroLLaVA_v3", new_dir).name
    try:
        caplog.clear()
        newer = AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v3", device="cpu")
        assert "converting UniverseTBD/AstroLLaVA_v3@" + new[:12] in caplog.text
        assert newer.source.endswith(new[:12]) and new != old
        assert converted_cache_path(resolve_checkpoint("UniverseTBD/AstroLLaVA_v3")).parent.name == new
        # the old revision stays pinnable and its conversion is reused
        caplog.clear()
        pinned = AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v3", revision=old, device="cpu")
        assert "reusing the conversion" in caplog.text and pinned.source == first.source
        a, b = first.model.state_dict(), newer.model.state_dict()
        assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    finally:
        (hub["cache"] / "models--UniverseTBD--AstroLLaVA_v3" / "refs" / "main").write_text(old)


def test_llava_hf_layout_keeps_its_template_and_pads_with_the_processor_mean(hub):
    model = AstroLLaVA.from_pretrained("llava-hf/llava-1.5-7b-hf", device="cpu")
    assert model.processor.chat_template == LLAVA_HF_CHAT_TEMPLATE
    assert model._prompt([model._user("Hi?")]) == "USER: <image>\nHi? ASSISTANT:"
    mean = model.processor.image_processor.image_mean
    assert model.pad_colour == tuple(int(m * 255) for m in mean) == (122, 116, 104)
    wide = np.zeros((10, 30), dtype=float)
    pil = model._pil(wide)
    assert pil.size == (30, 30)
    arr = np.asarray(pil)
    assert tuple(arr[0, 0]) == (122, 116, 104) and tuple(arr[15, 15]) == (0, 0, 0)


def test_chat_history_answers_end_with_eos_under_the_llava_hf_template(hub):
    model = AstroLLaVA.from_pretrained("llava-hf/llava-1.5-7b-hf", device="cpu")
    from astrovl.llava.chat import close_assistant_turns, template_closes_turns

    assert not template_closes_turns(model.processor)
    messages = [model._user("What is it?"), {"role": "assistant", "content": [{"type": "text", "text": "A cluster."}]},
                model._user("How old?", with_image=False)]
    prompt = model._prompt(close_assistant_turns(model.processor, messages))
    assert prompt == "USER: <image>\nWhat is it? ASSISTANT: A cluster.</s> USER: How old? ASSISTANT:"
    # chat sends exactly that prompt: its first token is the argmax of the logits on it
    inputs = model.processor(images=[model._pil(np.ones((8, 8)))], text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        token = int(model.model(**inputs).logits[0, -1].argmax())
    first = model._cut(model.processor.tokenizer.decode([token], skip_special_tokens=True))
    assert model.chat(np.ones((8, 8)), [("user", "What is it?"), ("assistant", "A cluster."),
                                        ("user", "How old?")], max_new_tokens=1) == first


def test_expand2square_centres_the_image():
    from PIL import Image

    tall = expand2square(Image.new("RGB", (4, 10), (255, 0, 0)), (1, 2, 3))
    arr = np.asarray(tall)
    assert tall.size == (10, 10)
    assert tuple(arr[0, 0]) == (1, 2, 3) and tuple(arr[0, 3]) == (255, 0, 0) and tuple(arr[0, 7]) == (1, 2, 3)


def _lora_reference(base_name, release_dir, image):
    """Base model + the release's projector + W += alpha/r * B @ A for every adapted layer."""
    model = AstroLLaVA.from_pretrained(base_name, device="cpu")
    cfg = json.loads((release_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    adapter = load_weights([next(f for f in release_dir.iterdir() if f.name.startswith("adapter_model"))])
    params = dict(model.model.named_parameters())
    with torch.no_grad():
        for k, a in adapter.items():
            if ".lora_A." not in k:
                continue
            b = adapter[k.replace(".lora_A.", ".lora_B.")]
            module = k[len("base_model.model.model."):].replace(".lora_A.weight", ".weight")
            params["model.language_model." + module] += scale * (b.float() @ a.float())
        proj = load_weights([release_dir / "non_lora_trainables.bin"])
        for idx, layer in (("0", "linear_1"), ("2", "linear_2")):
            for p in ("weight", "bias"):
                params[f"model.multi_modal_projector.{layer}.{p}"].copy_(
                    proj[f"base_model.model.model.mm_projector.{idx}.{p}"].float())
    inputs = _inputs(model, image)
    with torch.inference_mode():
        return model.model(**inputs).logits, inputs


@pytest.mark.parametrize("repo_id, base", [("UniverseTBD/AstroLLaVA_v2", "liuhaotian/llava-v1.5-7b"),
                                           ("UniverseTBD/AstroLLaVA_v1", "llava-hf/llava-1.5-7b-hf")])
def test_lora_release_equals_base_plus_merged_adapter(hub, repo_id, base, m13_path, expect_warning):
    from astrovl.llava.hub import TrainingPathWarning

    # v2's base is a path on the training machine: the known release is used, with a warning
    warns = expect_warning(TrainingPathWarning, "using the hub checkpoint 'liuhaotian/llava-v1.5-7b'") \
        if "v2" in repo_id else contextlib.nullcontext()
    with warns:
        release = AstroLLaVA.from_pretrained(repo_id, device="cpu")
    assert "LoRA on " + base in release.source and hasattr(release.model, "merge_and_unload")
    assert release.processor.chat_template == VICUNA_V1_CHAT_TEMPLATE
    expected, inputs = _lora_reference(base, _snapshot(hub, repo_id), m13_path)
    with torch.inference_mode():
        got = release.model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with expect_warning(TrainingPathWarning, "llava-v1.5-7b") if "v2" in repo_id else contextlib.nullcontext():
        merged = AstroLLaVA.from_pretrained(repo_id, device="cpu", merge=True)
    assert not hasattr(merged.model, "merge_and_unload")
    with torch.inference_mode():
        torch.testing.assert_close(merged.model(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    plain = AstroLLaVA.from_pretrained(base, device="cpu")
    with torch.inference_mode():
        assert not torch.allclose(plain.model(**inputs).logits, expected, atol=1e-3)


class _Payload:
    """An object whose unpickling would need code."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_pickles_that_need_code_are_refused(hub, tmp_path):
    release = tmp_path / "evil"
    make_tiny_lora_release(release, base_model_name_or_path="llava-hf/llava-1.5-7b-hf",
                           base_dir=hub["src"] / "hf", weight_format="bin")
    with open(release / "non_lora_trainables.bin", "wb") as fh:
        pickle.dump({"x": _Payload()}, fh)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        AstroLLaVA.from_pretrained(release, device="cpu")


def test_uncached_hub_id_gives_a_clear_error(hub):
    with pytest.raises(ModelNotFoundError) as info:
        AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v4", device="cpu")
    msg = str(info.value)
    assert "'UniverseTBD/AstroLLaVA_v4'" in msg and str(hub["cache"]) in msg
    assert "hf download UniverseTBD/AstroLLaVA_v4" in msg and "HF_HUB_OFFLINE=1" in msg
    with pytest.raises(ModelNotFoundError, match="revision 'v9'"):
        AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v3", revision="v9", device="cpu")
    with pytest.raises(ModelNotFoundError, match="directory not found"):
        AstroLLaVA.from_pretrained("./no/such/dir", device="cpu")


def test_default_model_is_the_released_astrollava(hub):
    assert conf.llava_model == "UniverseTBD/AstroLLaVA_v3"
    model = AstroLLaVA.from_pretrained(device="cpu")
    assert model.source.startswith("UniverseTBD/AstroLLaVA_v3@")


def test_local_original_directory_converts_without_a_flag(hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="astrovl.llava.convert")
    local = make_tiny_original_llava(tmp_path / "AstroLLaVA_v3", vision_tower=TOWER, seed=1, shards=1)
    model = AstroLLaVA.from_pretrained(local, device="cpu")
    assert "converting" in caplog.text
    reference = AstroLLaVA.from_pretrained("UniverseTBD/AstroLLaVA_v3", device="cpu")
    inputs = _inputs(model, np.ones((8, 8)))
    with torch.inference_mode():
        torch.testing.assert_close(model.model(**inputs).logits, reference.model(**inputs).logits)
    caplog.clear()
    AstroLLaVA.from_pretrained(local, device="cpu")
    assert "reusing the conversion" in caplog.text


def test_mistral_is_converted_with_a_mistral_text_model(hub, tmp_path):
    from astrovl.llava.template import MISTRAL_INSTRUCT_CHAT_TEMPLATE

    src = make_tiny_original_llava(tmp_path / "mistral", vision_tower=TOWER, text_model="mistral", shards=1)
    model = AstroLLaVA.from_pretrained(src, device="cpu")
    assert model.model.config.text_config.model_type == "mistral"
    assert model.processor.chat_template == MISTRAL_INSTRUCT_CHAT_TEMPLATE
    inputs = _inputs(model, np.ones((8, 8)))
    with torch.inference_mode():
        got = model.model(**inputs).logits
    # a Mistral with an unbounded sliding window computes what a Llama of the same weights does
    expected = _reference_logits(src, _snapshot(hub, TOWER), inputs["input_ids"], inputs["pixel_values"],
                                 model.model.config.image_token_index)
    torch.testing.assert_close(got[..., :expected.shape[-1]], expected, rtol=1e-4, atol=1e-4)


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unconvertible_checkpoints_are_refused_clearly(hub, tmp_path):
    src = make_tiny_original_llava(tmp_path / "base", vision_tower=TOWER, shards=1)
    cases = [
        ({"model_type": "llava_mpt", "architectures": ["LlavaMptForCausalLM"]}, "MPT"),
        ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"}, "LLaVA-NeXT"),
        ({"mm_projector_type": "linear"}, "projector type 'linear'"),
        ({"mm_hidden_size": 48}, "mm_hidden_size=48"),
        ({"hidden_size": 96}, r"weight '.*' has shape \(.*\), but the architecture built from its config.json "
                              r"expects"),
    ]
    for i, (change, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message):
            AstroLLaVA.from_pretrained(_edit_config(src, tmp_path / f"bad{i}", **change), device="cpu")
    from safetensors.torch import load_file, save_file

    bad = _edit_config(src, tmp_path / "proj4")
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.mm_projector.4.weight"] = torch.zeros(2, 2)
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.mm_projector\.4\.weight.*mlp2x_gelu"):
        AstroLLaVA.from_pretrained(bad, device="cpu")
