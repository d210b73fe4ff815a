import json

import numpy as np
import pytest
import torch

from astrovl import AstroLLaVA
from astrovl.exceptions import CheckpointError, ModelNotFoundError
from astrovl.llava import convert_llava_checkpoint
from astrovl.testing.llava import make_tiny_llava

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")


@pytest.fixture(scope="module")
def llava(tiny_dir):
    return AstroLLaVA.from_pretrained(tiny_dir, device="cpu")


def _first_token(model, image, messages) -> str:
    """The greedy first answer token, straight from the model's logits on the chat-template prompt."""
    inputs = model.processor(images=[model._pil(image)], text=[model._prompt(messages)], return_tensors="pt")
    with torch.inference_mode():
        token = int(model.model(**inputs).logits[0, -1].argmax())
    return model._cut(model.processor.tokenizer.decode([token], skip_special_tokens=True))


def test_caption_ask_chat_on_fits(llava, m13_path, ngc1316_path):
    from astrovl.llava.chat import close_assistant_turns
    from astrovl.llava.template import DEFAULT_CAPTION_PROMPT

    text = llava.caption(m13_path, max_new_tokens=12)
    many = llava.caption([m13_path, ngc1316_path], max_new_tokens=12)
    assert isinstance(many, list) and len(many) == 2
    assert many[0] == text
    assert many[1] == llava.caption(ngc1316_path, max_new_tokens=12)
    # each call sends its own prompt: the first greedy token is the argmax of the logits on it
    assert llava.caption(m13_path, max_new_tokens=1) == _first_token(llava, m13_path,
                                                                     [llava._user(DEFAULT_CAPTION_PROMPT)])
    question = "What kind of object is this?"
    assert llava.ask(m13_path, question, max_new_tokens=1) == _first_token(llava, m13_path, [llava._user(question)])
    assert llava.ask(m13_path, question, max_new_tokens=8) == llava.chat(m13_path, [("user", question)],
                                                                       max_new_tokens=8)
    history = [("user", "Describe it."), ("assistant", "A cluster."), ("user", "How old?")]
    messages = close_assistant_turns(llava.processor, [
        llava._user("Describe it."), {"role": "assistant", "content": [{"type": "text", "text": "A cluster."}]},
        llava._user("How old?", with_image=False)])
    assert llava.chat(m13_path, history, max_new_tokens=1) == _first_token(llava, m13_path, messages)


def test_batched_equals_unbatched_greedy(llava, m13_path, ngc1316_path, dss_path):
    images = [m13_path, ngc1316_path, dss_path, np.linspace(0, 1, 40 * 70).reshape(40, 70)]
    batched = llava.caption(images, max_new_tokens=10, batch_size=4)
    single = [llava.caption(im, max_new_tokens=10) for im in images]
    assert batched == single


def test_generation_stops_at_end_of_turn(llava, m13_path, monkeypatch):
    tok = llava.processor.tokenizer
    reply = tok(" A globular cluster. USER: And its age? ASSISTANT: Old.", add_special_tokens=False,
                return_tensors="pt").input_ids
    seen = {}

    def generate(input_ids, **kwargs):  # a model that runs on into the next turn
        seen.update(kwargs)
        return torch.cat([input_ids, reply.expand(len(input_ids), -1)], dim=1)

    monkeypatch.setattr(llava.model, "generate", generate)
    assert llava.caption(m13_path, max_new_tokens=40) == "A globular cluster."
    # generation itself stops at the end-of-sequence token
    assert tok.eos_token_id in seen["eos_token_id"] and seen["max_new_tokens"] == 40
    assert seen["do_sample"] is False


def test_batched_score_equals_one_forward_per_text(llava, m13_path):
    candidates = [f"This is a {name.lower()} galaxy." for name in (
        "Disturbed", "Merging", "Round Smooth", "In-between Round Smooth", "Cigar Shaped Smooth",
        "Barred Spiral", "Unbarred Tight Spiral", "Unbarred Loose Spiral", "Edge-on without Bulge",
        "Edge-on with Bulge")]
    reference = llava._score_unbatched(m13_path, candidates, prompt="What galaxy is this?")
    for batch_size in (1, 3, 16):
        got = llava.score(m13_path, candidates, prompt="What galaxy is this?", batch_size=batch_size)
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        llava.score(m13_path, candidates, batch_size=0)


def test_score_ranks_own_answer_above_unrelated_text(llava, m13_path):
    prompt = "Describe this astronomical image in detail."
    inputs = llava.processor(images=[llava._pil(m13_path)], text=[llava._prompt([llava._user(prompt)])],
                             return_tensors="pt")
    inputs.pop("token_type_ids", None)  # generate of transformers 4.x rejects them
    with torch.inference_mode():
        out = llava.model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                   pad_token_id=llava.processor.tokenizer.pad_token_id)
    own_ids = out[0, inputs["input_ids"].shape[1]:]
    own = llava.processor.tokenizer.decode(own_ids, skip_special_tokens=True).strip() or "A"
    scores = llava.score(m13_path, [own, "Unbarred Loose Spiral, Edge-on with Bulge, Disturbed"], prompt=prompt)
    assert scores.shape == (2,)
    assert np.all(np.isfinite(scores))
    assert scores[0] > scores[1]


def test_save_and_reload(llava, tmp_path, m13_path):
    llava.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    again = AstroLLaVA.from_pretrained(tmp_path / "saved")
    assert again.caption(m13_path, max_new_tokens=8) == llava.caption(m13_path, max_new_tokens=8)


def test_bad_inputs(llava, tmp_path):
    with pytest.raises(TypeError):
        llava.caption(object())
    with pytest.raises(ValueError, match="empty"):
        llava.ask(np.ones((8, 8)), "   ")
    with pytest.raises(ValueError, match="empty"):
        llava.caption([])
    with pytest.raises(ValueError, match="user turn"):
        llava.chat(np.ones((8, 8)), [("assistant", "hi")])
    with pytest.raises(ModelNotFoundError, match="directory not found"):
        AstroLLaVA.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="neither config.json nor adapter_config.json"):
        AstroLLaVA.from_pretrained(tmp_path)


def test_conversion_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        convert_llava_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="original-layout"):
        convert_llava_checkpoint(tmp_path, tmp_path / "out")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_caption(tiny_dir, m13_path):
    model = AstroLLaVA.from_pretrained(tiny_dir, device="cuda")
    assert model.model.dtype == torch.bfloat16
    assert isinstance(model.caption(m13_path, max_new_tokens=8), str)


def test_key_renaming_handles_both_vision_tower_layouts():
    from astrovl.llava.convert import _match_vision_prefix, rename_llava_key

    assert rename_llava_key("model.mm_projector.0.weight") == "model.multi_modal_projector.linear_1.weight"
    assert rename_llava_key("model.mm_projector.2.bias") == "model.multi_modal_projector.linear_2.bias"
    assert rename_llava_key("model.layers.3.self_attn.q_proj.weight") == \
        "model.language_model.layers.3.self_attn.q_proj.weight"
    assert rename_llava_key("lm_head.weight") == "lm_head.weight"
    assert rename_llava_key("optimizer_step") is None
    with pytest.raises(CheckpointError, match="mlp2x_gelu"):
        rename_llava_key("model.mm_projector.4.weight")
    old = rename_llava_key("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")
    flat = {"model.vision_tower.encoder.layers.0.mlp.fc1.weight"}
    nested = {"model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"}
    assert set(_match_vision_prefix({old: 1}, flat)) == flat
    assert set(_match_vision_prefix({old: 1}, nested)) == nested
    assert set(_match_vision_prefix({next(iter(flat)): 1}, nested)) == nested


def test_static_kv_cache_gives_the_same_captions(llava, m13_path, ngc1316_path):
    images = [m13_path, ngc1316_path]
    dynamic = llava.caption(images, max_new_tokens=12)
    static = llava.caption(images, max_new_tokens=12, cache_implementation="static")
    assert static == dynamic
