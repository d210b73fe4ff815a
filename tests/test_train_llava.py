import json
import math
import shutil

import numpy as np
import pytest
import torch

from astrovl import AstroLLaVA
from astrovl.datasets import SyntheticSkyDataset
from astrovl.exceptions import CheckpointError, DatasetError
from astrovl.testing.llava import make_tiny_llava
from astrovl.training import LLaVATrainingConfig, train_llava
from astrovl.training.llava import DEEPSPEED_ZERO3_CONFIG
from astrovl.training.llava_data import (
    IGNORE_INDEX,
    LLaVATorchDataset,
    encode_conversation,
    load_conversation_records,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    return SyntheticSkyDataset.generate(tmp_path_factory.mktemp("sky") / "ds", n_images=8, image_size=32,
                                        classes=["elliptical", "cigar"],
                                        seed=0, val_fraction=0.25)


def _load(tiny_dir):
    return AstroLLaVA.from_pretrained(tiny_dir, device="cpu")


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), device="cpu", batch_size=2, progress=False, log_every=1,
                warmup_ratio=0.0, schedule="constant", num_workers=0)
    base.update(kw)
    return LLaVATrainingConfig(**base)


def test_loss_mask_covers_answers_only(tiny_dir):
    from PIL import Image

    model = _load(tiny_dir)
    turns = [("user", "What is it?"), ("assistant", "A spiral galaxy."),
             ("user", "Is there a bar?"), ("assistant", "Yes, a bar.")]
    enc = encode_conversation(model.processor, Image.new("RGB", (32, 32), (9, 9, 9)), turns)
    tok = model.processor.tokenizer
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids.shape == labels.shape
    image_id = model.model.config.image_token_index
    assert int((ids == image_id).sum()) == model.model.config.image_seq_length
    assert bool((labels[ids == image_id] == IGNORE_INDEX).all())
    answer_text = tok.decode(ids[labels != IGNORE_INDEX])
    assert answer_text.replace(" ", "") == "Aspiralgalaxy.</s>Yes,abar.</s>"
    prompt_text = tok.decode(ids[labels == IGNORE_INDEX], skip_special_tokens=True)
    assert "What is it?" in prompt_text and "USER:" in prompt_text and "ASSISTANT:" in prompt_text
    assert enc["pixel_values"].shape == (3, 32, 32)


def test_stage1_trains_only_the_projector(tiny_dir, sky, tmp_path):
    model = _load(tiny_dir)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    result = train_llava(model, sky.split("train"), _cfg(tmp_path, stage=1, max_steps=3, lr=1e-2,
                                                         gradient_checkpointing=True))
    after = dict(result.model.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all(".multi_modal_projector." in n for n in changed)
    assert any("linear_1" in n for n in changed) and any("linear_2" in n for n in changed)
    assert list(result.history["step"]) == [1, 2, 3]
    assert np.all(np.isfinite(result.history["train_loss"]))
    assert result.history.meta["trainable_parameters"] == sum(
        p.numel() for p in model.model.model.multi_modal_projector.parameters())
    assert (result.output_dir / "metrics.csv").is_file() and (result.output_dir / "loss.png").is_file()
    reloaded = AstroLLaVA.from_pretrained(result.model_dir)
    w = "model.multi_modal_projector.linear_1.weight"
    torch.testing.assert_close(dict(reloaded.model.named_parameters())[w], after[w].detach())


def _conversation_json(tmp_path, m13_path, answer):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    shutil.copy(m13_path, root / "img" / "m13.fits")
    records = [{"id": "m13", "image": "img/m13.fits",
                "conversations": [{"from": "human", "value": "<image>\nWhat is this object?"},
                                  {"from": "gpt", "value": answer}]}]
    (root / "conv.json").write_text(json.dumps(records))
    return root / "conv.json"


def test_stage2_learns_an_answer_and_stops(tiny_dir, tmp_path, m13_path):
    answer = "A globular cluster of old stars."
    path = _conversation_json(tmp_path, m13_path, answer)
    model = _load(tiny_dir)
    assert model.ask(m13_path, "What is this object?", max_new_tokens=20) != answer
    result = train_llava(model, path, _cfg(tmp_path, stage=2, max_steps=40, batch_size=1, lr=3e-3))
    assert result.history["train_loss"][-1] < 0.1 * result.history["train_loss"][0]
    # the learned answer comes back, and generation stops at the end of the turn
    assert result.model.ask(m13_path, "What is this object?", max_new_tokens=30) == answer
    reloaded = AstroLLaVA.from_pretrained(result.model_dir)
    assert reloaded.ask(m13_path, "What is this object?", max_new_tokens=30) == answer


def test_lora_adapter_saves_and_reloads(tiny_dir, tmp_path, m13_path):
    path = _conversation_json(tmp_path, m13_path, "A dense cluster.")
    result = train_llava(_load(tiny_dir), path,
                         _cfg(tmp_path, stage=2, lora=True, lora_r=4, lora_alpha=8, max_steps=3, batch_size=1,
                              lr=1e-2))
    assert result.model_dir is None and (result.adapter_dir / "adapter_config.json").is_file()
    assert any(f.suffix == ".safetensors" for f in result.adapter_dir.iterdir())
    with_adapter = AstroLLaVA.from_pretrained(tiny_dir, adapter=result.adapter_dir)
    base = _load(tiny_dir)
    prompt = base._prompt([base._user("What is this object?")])
    inputs = base.processor(images=[base._pil(m13_path)], text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        trained = result.model.model(**inputs).logits
        reloaded = with_adapter.model(**inputs).logits
        original = base.model(**inputs).logits
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained, original, atol=1e-4)
    # the adapter directory loads by itself too: a LoRA release naming its base
    alone = AstroLLaVA.from_pretrained(result.adapter_dir, device="cpu")
    with torch.inference_mode():
        torch.testing.assert_close(alone.model(**inputs).logits, trained, rtol=1e-5, atol=1e-5)


def test_resume_continues_exactly(tiny_dir, sky, tmp_path, interrupt_after_first_checkpoint):
    import astrovl.training.llava as llava_training

    data = sky.split("train")
    # a warm-up step, then cosine over 3 steps: the scheduler's position must come back too
    sched = dict(stage=1, lr=1e-2, warmup_ratio=0.25, schedule="cosine", save_every=2)
    full = train_llava(_load(tiny_dir), data, _cfg(tmp_path / "a", max_steps=4, **sched))
    # the interrupted run is stopped right after its checkpoint at step 2
    interrupt_after_first_checkpoint(llava_training, train_llava, _load(tiny_dir), data,
                                     _cfg(tmp_path / "b", max_steps=4, **sched))
    assert json.loads((tmp_path / "b" / "run" / "checkpoint" / "state.json").read_text())["step"] == 2
    resumed = train_llava(_load(tiny_dir), data, _cfg(tmp_path / "b", max_steps=4, resume=True, **sched))
    assert list(resumed.history["step"]) == [1, 2, 3, 4]
    # transformers' cosine schedule after one warm-up step: lr * (1 + cos(pi * (step - 1) / 3)) / 2
    expected_lr = [1e-2 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 3)) for s in (1, 2, 3, 4)]
    np.testing.assert_allclose(full.history["lr"], expected_lr, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(resumed.history["lr"], expected_lr, rtol=1e-6, atol=1e-12)
    a = dict(full.model.model.named_parameters())
    b = dict(resumed.model.model.named_parameters())
    for n in a:
        if ".multi_modal_projector." in n:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6)
    np.testing.assert_allclose(full.history["train_loss"], resumed.history["train_loss"], rtol=1e-5)


def test_corrupt_checkpoint_is_reported(tiny_dir, sky, tmp_path):
    cfg = _cfg(tmp_path, stage=1, max_steps=1)
    train_llava(_load(tiny_dir), sky.split("train"), cfg)
    (tmp_path / "run" / "checkpoint" / "trainable.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        train_llava(_load(tiny_dir), sky.split("train"), _cfg(tmp_path, stage=1, max_steps=2, resume=True))


def test_mixing_general_data(tiny_dir, sky, tmp_path, m13_path):
    general = _conversation_json(tmp_path, m13_path, "General answer.")
    records = load_conversation_records(sky.split("train"), stage=1)
    cfg = _cfg(tmp_path, stage=1, max_steps=1, mix_data=str(general), mix_ratio=0.5)
    result = train_llava(_load(tiny_dir), sky.split("train"), cfg)
    assert result.history.meta["records"] == 2 * len(records)


def test_bad_configs_and_data(tmp_path, sky):
    with pytest.raises(ValueError, match="stage"):
        LLaVATrainingConfig(stage=3)
    with pytest.raises(ValueError, match="lora"):
        LLaVATrainingConfig(stage=1, lora=True)
    with pytest.raises(ValueError, match="mix_data"):
        LLaVATrainingConfig(stage=2, mix_ratio=0.2)
    assert LLaVATrainingConfig(stage=1).lr == 1e-3 and LLaVATrainingConfig(stage=2).lr == 2e-5
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_conversation_records(tmp_path / "bad.json", stage=2)
    (tmp_path / "esc.json").write_text(json.dumps([{"image": "../../etc/passwd", "conversations": [
        {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}]))
    with pytest.raises(Exception, match="escape|outside"):
        load_conversation_records(tmp_path / "esc.json", stage=2)
    (tmp_path / "noans.json").write_text(json.dumps([{"image": "a.png", "conversations": [
        {"from": "human", "value": "hi"}]}]))
    with pytest.raises(DatasetError, match="gpt turn"):
        load_conversation_records(tmp_path / "noans.json", stage=2)
    recs = load_conversation_records(sky, stage=1)
    train = sky.split("train")
    assert len(recs) == len(train) < len(sky) and recs[0]["turns"][1] == ("assistant", train.captions[0])
    assert len(load_conversation_records(sky, stage=1, split="val")) == len(sky.split("val"))
    assert len(load_conversation_records(sky, stage=1, split=None)) == len(sky)
    with pytest.raises(ValueError, match="split"):
        load_conversation_records(sky, stage=1, split="training")


def test_deepspeed_zero3_config_is_shipped():
    cfg = json.loads(DEEPSPEED_ZERO3_CONFIG.read_text())
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"]["enabled"] is True


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stage1_on_cuda_bf16(tiny_dir, sky, tmp_path):
    model = AstroLLaVA.from_pretrained(tiny_dir, device="cuda", dtype="float32")
    result = train_llava(model, sky.split("train"), LLaVATrainingConfig(
        stage=1, output_dir=str(tmp_path / "cuda"), max_steps=3, batch_size=2, progress=False, log_every=1))
    assert np.all(np.isfinite(result.history["train_loss"]))


def test_cli_train_then_evaluate_galaxy10(tiny_dir, sky, tmp_path, capsys):
    import h5py
    from astropy.table import Table

    from astrovl.cli import main

    rc = main(["train-llava", "--model", str(tiny_dir), "--stage", "1", "--data", str(sky.root),
               "--output", str(tmp_path / "cli"), "--max-steps", "2", "--batch-size", "2", "--device", "cpu"])
    assert rc == 0
    assert "model written to" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "g10.h5", "w") as f:
        f["images"] = rng.integers(0, 255, size=(20, 24, 24, 3), dtype=np.uint8)
        f["ans"] = np.repeat(np.arange(10), 2)
    rc = main(["evaluate", "galaxy10", str(tmp_path / "g10.h5"), "--model", str(tmp_path / "cli" / "model"),
               "--device", "cpu", "--limit", "3", "--max-new-tokens", "5", "--output",
               str(tmp_path / "scores.ecsv"), "--plot", str(tmp_path / "scores.png")])
    assert rc == 0
    scores = Table.read(tmp_path / "scores_descriptions.ecsv")
    assert len(scores) == 3 and np.all(np.isfinite(scores["semantic_score"]))
    summary = Table.read(tmp_path / "scores.ecsv")
    assert summary["label"][-1] == "all" and summary["n"][-1] == 3
    assert (tmp_path / "scores.png").stat().st_size > 5000


# ----------------------------------------------------------------------------- LLaVA-1.5 formats
TURNS = [("user", "What is it?"), ("assistant", "A spiral galaxy."), ("user", "Is there a bar?"),
         ("assistant", "Yes, a bar.")]


@pytest.fixture(scope="module", params=["llava-hf", "vicuna-v1"])
def sp_processor(request, tmp_path_factory):
    """Processors with a Llama-style SentencePiece tokenizer and the llava-hf or Vicuna-v1 template."""
    from transformers import AutoProcessor

    from astrovl.llava import LLAVA_HF_CHAT_TEMPLATE, VICUNA_V1_CHAT_TEMPLATE

    template = LLAVA_HF_CHAT_TEMPLATE if request.param == "llava-hf" else VICUNA_V1_CHAT_TEMPLATE
    path = make_tiny_llava(tmp_path_factory.mktemp("sp") / request.param, chat_template=template,
                           tokenizer="sentencepiece")
    return AutoProcessor.from_pretrained(path)


def test_every_answer_ends_with_eos_and_carries_loss(sp_processor):
    from PIL import Image

    tok = sp_processor.tokenizer
    enc = encode_conversation(sp_processor, Image.new("RGB", (40, 20), (9, 9, 9)), TURNS)
    ids, labels = enc["input_ids"], enc["labels"]
    trained = labels != IGNORE_INDEX
    # two answers, each a run of labelled tokens ending with the end-of-sequence id
    runs = np.split(np.flatnonzero(trained.numpy()), np.flatnonzero(np.diff(np.flatnonzero(trained.numpy())) > 1)
                    + 1)
    assert len(runs) == 2
    for run, (_, answer) in zip(runs, TURNS[1::2]):
        assert int(ids[run[-1]]) == tok.eos_token_id == int(labels[run[-1]])
        assert tok.decode(ids[run[:-1]]).strip() == answer
    assert int((ids == tok.eos_token_id).sum()) == 2
    # the SentencePiece word-start marks of the answers are trained on, spaces are not normalised away
    assert tok.convert_ids_to_tokens(ids[runs[0]].tolist())[0] == "▁A"


def test_trained_tokens_equal_the_chat_template_tokenization(sp_processor):
    from PIL import Image

    from astrovl.llava.chat import close_assistant_turns, to_messages

    image = Image.new("RGB", (32, 32), (9, 9, 9))
    enc = encode_conversation(sp_processor, image, TURNS, system="You describe sky images.")
    messages = close_assistant_turns(sp_processor, to_messages(TURNS, system="You describe sky images."))
    messages[1]["content"][0] = {"type": "image", "image": image}
    ref = sp_processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert enc["input_ids"].tolist() == list(np.ravel(ref))
    # and the generation prompt of inference is a prefix of the training tokens
    prompt = sp_processor.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
    prompt = list(np.ravel(prompt))
    assert enc["input_ids"].tolist()[:len(prompt)] == prompt
    assert bool((enc["labels"][:len(prompt)] == IGNORE_INDEX).all())
    assert int(enc["labels"][len(prompt)]) != IGNORE_INDEX


def test_stage1_uses_the_plain_format(sp_processor, sky):
    ds = LLaVATorchDataset(load_conversation_records(sky, stage=1), sp_processor, stage=1)
    item = ds[0]
    tok = sp_processor.tokenizer
    ids, labels = item["input_ids"], item["labels"]
    image_id = tok.convert_tokens_to_ids("<image>")
    prompt = ids[labels == IGNORE_INDEX]
    # the prompt is the beginning-of-sequence token and the image tokens: no instruction, no roles
    assert prompt[0] == tok.bos_token_id and bool((prompt[1:] == image_id).all())
    caption = sky.split("train").captions[0]
    assert tok.decode(ids[labels != IGNORE_INDEX]) == caption + "\n"


def test_validation_conversations_are_never_trained_on(tiny_dir, sky, tmp_path):
    from astrovl.generation import to_llava_record

    records = [to_llava_record(sky.manifest["id"][i], sky.manifest["image"][i],
                               [{"question": "What is it?", "answer": f"Answer {i}."}]) for i in range(len(sky))]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(records))
    train_ids = set(sky.split("train").manifest["id"])
    loaded = load_conversation_records(path, stage=2, image_root=sky.root)
    assert {r["id"] for r in loaded} == train_ids
    val = load_conversation_records(path, stage=2, image_root=sky.root, split="val")
    assert {r["id"] for r in val} == set(sky.split("val").manifest["id"])
    # a split key in the records themselves decides too
    for r in records:
        r["split"] = "test"
    path.write_text(json.dumps(records))
    assert load_conversation_records(path, stage=2, image_root=tmp_path) == []
    # training on the whole dataset reads train only, and reports the validation loss
    result = train_llava(_load(tiny_dir), sky, _cfg(tmp_path, stage=1, max_steps=2, eval_every=1))
    assert result.history.meta["records"] == len(train_ids)
    assert result.history.meta["val_records"] == len(sky.split("val"))
    assert np.all(np.isfinite(result.history["val_loss"]))
    # the last validation loss is the mean answer-token loss of the trained model on the val records
    from astrovl.training.llava_data import collate_fn

    val_set = LLaVATorchDataset(load_conversation_records(sky, stage=1, split="val"), result.model.processor,
                                max_length=2048, pad_to_square=result.model.pad_to_square, system=None, stage=1)
    loader = torch.utils.data.DataLoader(val_set, batch_size=2,
                                         collate_fn=collate_fn(result.model.processor.tokenizer.pad_token_id))
    net = result.model.model.eval()
    with torch.no_grad():
        losses = [(float(net(**{k: v for k, v in b.items() if k != "position"}).loss),
                   int((b["labels"][:, 1:] != IGNORE_INDEX).sum())) for b in loader]
    total_tokens = sum(n for _, n in losses)
    assert result.history["val_loss"][-1] == pytest.approx(sum(m * n for m, n in losses) / total_tokens, rel=1e-5)


def test_dataloader_workers_prepare_the_same_batches(tiny_dir, sky, tmp_path):
    inline = train_llava(_load(tiny_dir), sky, _cfg(tmp_path / "a", stage=1, max_steps=4, lr=1e-2))
    workers = train_llava(_load(tiny_dir), sky, _cfg(tmp_path / "b", stage=1, max_steps=4, lr=1e-2,
                                                      num_workers=2))
    np.testing.assert_allclose(inline.history["train_loss"], workers.history["train_loss"], rtol=1e-6)
    assert LLaVATrainingConfig().num_workers > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_per_training_step(tiny_dir, sky, tmp_path):
    """Host synchronisations do not grow with the number of steps between logging steps."""
    import warnings

    def syncs(steps, where):
        model = AstroLLaVA.from_pretrained(tiny_dir, device="cuda", dtype="float32")
        cfg = LLaVATrainingConfig(stage=1, output_dir=str(tmp_path / where), max_steps=steps, batch_size=2,
                                  progress=False, log_every=1000, save_every=1000, num_workers=0)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_llava(model, sky, cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(8, "long") == syncs(3, "short")


# ----------------------------------------------------------------------------- resume, overwrite, data checks
@pytest.fixture(scope="module")
def dropout_dir(tmp_path_factory):
    """A tiny model whose attention dropout draws from torch's generator at every training step."""
    return make_tiny_llava(tmp_path_factory.mktemp("llava-dropout") / "tiny", dropout=0.3)


RESUME_MODES = {
    "stage1": dict(stage=1),
    "full": dict(stage=2),
    "lora": dict(stage=2, lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.3),
}


def _trained(result):
    return {n: p.detach().clone() for n, p in result.model.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", list(RESUME_MODES))
def test_killed_and_resumed_run_equals_an_uninterrupted_one(dropout_dir, sky, tmp_path, mode, caplog,
                                                            interrupt_after_first_checkpoint):
    import astrovl.training.llava as llava_training

    # dropout is on: two forward passes in training mode differ
    net = _load(dropout_dir).model.train()
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    assert not torch.equal(net.model.language_model(input_ids=ids).last_hidden_state,
                           net.model.language_model(input_ids=ids).last_hidden_state)
    kw = dict(RESUME_MODES[mode], max_steps=4, save_every=2, eval_every=1, lr=1e-2)
    full = train_llava(_load(dropout_dir), sky, _cfg(tmp_path / "a", **kw))
    interrupt_after_first_checkpoint(llava_training, train_llava, _load(dropout_dir), sky, _cfg(tmp_path / "b", **kw))
    # a setting that may change (how often validation runs) changes nothing in the training
    with caplog.at_level("WARNING", logger="astrovl.training.llava"):
        resumed = train_llava(_load(dropout_dir), sky, _cfg(tmp_path / "b", resume=True, **dict(kw, eval_every=2)))
    assert "resumed from step 2" in caplog.text
    assert resumed.start_step == 2 and list(resumed.history["step"]) == [1, 2, 3, 4]
    a, b = _trained(full), _trained(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        assert (a[n] - b[n]).abs().max().item() == 0.0, n
    np.testing.assert_array_equal(full.history["train_loss"], resumed.history["train_loss"])
    record = json.loads((tmp_path / "b" / "run" / "training.json").read_text())
    assert record["config"]["eval_every"] == 2 and record["steps"] == 4
    assert record["resumes"] == [{"step": 2, "changed": {"eval_every": [1, 2]}}]


def test_resume_refuses_settings_that_cannot_change(tiny_dir, sky, tmp_path, interrupt_after_first_checkpoint):
    import astrovl.training.llava as llava_training

    kw = dict(stage=1, max_steps=4, save_every=2, lr=1e-2)
    interrupt_after_first_checkpoint(llava_training, train_llava, _load(tiny_dir), sky, _cfg(tmp_path, **kw))
    with pytest.raises(CheckpointError) as info:
        train_llava(_load(tiny_dir), sky, _cfg(tmp_path, resume=True, **dict(kw, batch_size=3, lr=0.5)))
    msg = str(info.value)
    assert "batch_size is 3 but the checkpoint was written with 2" in msg
    assert "lr is 0.5 but the checkpoint was written with 0.01" in msg and "--overwrite" in msg
    with pytest.raises(CheckpointError, match="train_data is '2 records"):
        train_llava(_load(tiny_dir), sky.split("train").subset([0, 1]), _cfg(tmp_path, resume=True, **kw))
    with pytest.raises(CheckpointError, match="model is "):
        other = make_tiny_llava(tmp_path / "other", seed=1)
        train_llava(AstroLLaVA.from_pretrained(other, device="cpu"), sky, _cfg(tmp_path, resume=True, **kw))
    # more steps may be asked for; a finished run is reported and left as it is
    done = train_llava(_load(tiny_dir), sky, _cfg(tmp_path, resume=True, **dict(kw, max_steps=5)))
    assert list(done.history["step"]) == [1, 2, 3, 4, 5] and not done.finished_before
    record = (tmp_path / "run" / "training.json").read_text()
    again = train_llava(_load(tiny_dir), sky, _cfg(tmp_path, resume=True, **dict(kw, max_steps=3)))
    assert again.finished_before and again.start_step == 5 and again.model_dir == tmp_path / "run" / "model"
    assert (tmp_path / "run" / "training.json").read_text() == record
    assert json.loads(record)["config"]["max_steps"] == 5


def test_a_checkpoint_is_never_replaced_silently(tiny_dir, sky, tmp_path, interrupt_after_first_checkpoint,
                                                 capsys):
    import astrovl.training.llava as llava_training
    from astrovl.cli import main
    from astrovl.exceptions import OutputDirectoryError

    kw = dict(stage=1, max_steps=4, save_every=2)
    interrupt_after_first_checkpoint(llava_training, train_llava, _load(tiny_dir), sky, _cfg(tmp_path, **kw))
    with pytest.raises(OutputDirectoryError, match="pass --resume to continue from step 2, or --overwrite to "
                                                   "start again"):
        train_llava(_load(tiny_dir), sky, _cfg(tmp_path, **kw))
    cli = ["train-llava", "--model", str(tmp_path / "missing-model"), "--stage", "1", "--data", str(sky.root),
           "--output", str(tmp_path / "run"), "--max-steps", "4", "--device", "cpu"]
    assert main(cli) == 1  # refused before the (missing) model is looked at
    assert "pass --resume to continue from step 2, or --overwrite to start again" in capsys.readouterr().err
    (tmp_path / "run" / "notes.txt").write_text("mine")
    again = train_llava(_load(tiny_dir), sky, _cfg(tmp_path, overwrite=True, **kw))
    assert again.start_step == 0 and list(again.history["step"]) == [1, 2, 3, 4]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="exclude each other"):
        _cfg(tmp_path, resume=True, overwrite=True, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_an_error(tiny_dir, sky, tmp_path, capsys):
    from astrovl.cli import main

    with pytest.raises(ValueError, match="CUDA is not available"):
        train_llava(_load(tiny_dir), sky, _cfg(tmp_path, stage=1, max_steps=1, device="cuda"))
    assert not (tmp_path / "run" / "checkpoint").exists()
    for cli in (["train-llava", "--model", str(tiny_dir), "--stage", "1", "--data", str(sky.root), "--output",
                 str(tmp_path / "c"), "--device", "cuda"],
                ["caption", str(sky.image_path(0)), "--model", str(tiny_dir), "--device", "cuda:0"]):
        assert main(cli) == 1
        assert "CUDA is not available" in capsys.readouterr().err


def _records_with(tmp_path, sky, broken: dict):
    """Conversation JSON over the sky images, with the images of ``broken`` ids replaced."""
    from astrovl.generation import to_llava_record

    records = []
    train = sky.split("train")
    for i in range(len(train)):
        rid, image = str(train.manifest["id"][i]), str(train.manifest["image"][i])
        if rid in broken:
            image = broken[rid]
        records.append(to_llava_record(rid, image, [{"question": "What is it?", "answer": f"Answer {i}."}]))
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(records))
    return path, [str(i) for i in train.manifest["id"]]


def test_images_are_checked_before_the_first_step(tiny_dir, sky, tmp_path):
    ids = [str(i) for i in sky.split("train").manifest["id"]]
    (sky.root / "not-an-image.png").write_text("text")
    path, _ = _records_with(tmp_path, sky, {ids[1]: "missing.png", ids[3]: "not-an-image.png"})
    with pytest.raises(DatasetError) as info:
        train_llava(_load(tiny_dir), path, _cfg(tmp_path, stage=2, max_steps=1), image_root=sky.root)
    msg = str(info.value)
    assert msg.startswith("2 of 6 training images cannot be read")
    assert f"record {ids[1]!r}" in msg and "missing.png" in msg
    assert f"record {ids[3]!r}" in msg and "not-an-image.png" in msg
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_errors_in_dataloader_workers_name_the_record_and_its_image(tiny_dir, sky, tmp_path):
    from PIL import Image

    # a picture whose header reads but whose pixels are cut off: only decoding (in a worker) finds it
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        sky.root / "cut.png")
    data = (sky.root / "cut.png").read_bytes()
    (sky.root / "cut.png").write_bytes(data[:len(data) // 2])
    ids = [str(i) for i in sky.split("train").manifest["id"]]
    path, _ = _records_with(tmp_path, sky, {r: "cut.png" for r in ids})
    with pytest.raises(DatasetError) as info:
        train_llava(_load(tiny_dir), path, _cfg(tmp_path, stage=2, max_steps=1, num_workers=1),
                    image_root=sky.root)
    first_line = str(info.value).splitlines()[0]
    assert first_line.startswith("record ") and "cut.png" in first_line and "DataLoader worker" not in first_line


def test_mix_data_needs_a_ratio(tmp_path):
    with pytest.raises(ValueError, match="needs mix_ratio"):
        LLaVATrainingConfig(stage=2, mix_data="general.json")


def test_loss_plot_shows_the_validation_loss():
    from astropy.table import Table

    from astrovl.training.llava import plot_loss

    history = Table({"step": [1, 2, 3], "train_loss": [3.0, 2.0, 1.5], "val_loss": [np.nan, 2.5, 2.0]})
    lines = plot_loss(history, title="t").axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["training loss", "validation loss"]
    assert list(lines[1].get_xdata()) == [2, 3] and list(lines[1].get_ydata()) == [2.5, 2.0]
    only_train = plot_loss(history[["step", "train_loss"]]).axes[0].get_lines()
    assert [ln.get_label() for ln in only_train] == ["training loss"]
