import json
import os

import numpy as np
import pytest
import torch

from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder
from astrovl.datasets import SyntheticSkyDataset
from astrovl.exceptions import CheckpointError, DatasetError
from astrovl.training import CLIPTrainingConfig, interpolate_weights, train_clip


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    return SyntheticSkyDataset.generate(tmp_path_factory.mktemp("sky"), n_images=330, image_size=64,
                                        seed=0, val_fraction=0.2, progress=False)


@pytest.fixture(scope="module")
def base():
    return CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)


def _cfg(tmp_path, name, **kw):
    defaults = dict(steps=20, batch_size=16, lr=1e-3, warmup_steps=5, eval_every=10, output_dir=str(tmp_path / name),
                    progress=False, tensorboard=False, weight_decay=0.1)
    defaults.update(kw)
    return CLIPTrainingConfig(**defaults)


def test_scratch_learns_and_shuffled_stays_at_chance(sky, base, tmp_path):
    train, val = sky.split("train"), sky.split("val")
    good = train_clip(base, train, val, _cfg(tmp_path, "scratch", mode="scratch", steps=150, batch_size=32,
                                              eval_every=75, best_metric="val_top10"))
    ctrl = train_clip(base, train, val, _cfg(tmp_path, "shuf", mode="shuffled", steps=150, batch_size=32,
                                             eval_every=75, best_metric="val_top10"))
    h = good.history
    assert list(h.colnames[:4]) == ["step", "train_loss", "val_loss", "val_top10"]
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert max(h["val_top10"]) > 0.3, h
    assert max(ctrl.history["val_top10"]) < 0.22, ctrl.history
    # outputs on disk
    out = tmp_path / "scratch"
    assert (out / "metrics.csv").is_file() and (out / "training_curves.png").is_file()
    reloaded = CLIPEmbedder.from_pretrained(good.best_path)
    vec = reloaded.embed_images(val, progress=False)
    from astrovl.evaluation import top_k_percent_accuracy

    acc = top_k_percent_accuracy(vec, reloaded.embed_text(val.captions), 10)
    assert acc == pytest.approx(max(h["val_top10"]), abs=1e-6)


def test_head_mode_changes_only_head_parameters(sky, base, tmp_path):
    import copy

    from astrovl.clip.heads import HeadCLIP
    from astrovl.training.common import seed_everything

    res = train_clip(base, sky.split("train"), sky.split("val"), _cfg(tmp_path, "head", mode="head", steps=6,
                                                                     eval_every=6, head_hidden=32))
    # the heads train_clip starts from: it seeds, then builds them the same way
    seed_everything(0)
    initial = HeadCLIP(copy.deepcopy(base.model).cpu(), base.embed_dim, 32).state_dict()
    trained = CLIPEmbedder.from_pretrained(tmp_path / "head" / "final")
    sd_new = trained.model.state_dict()
    assert sd_new.keys() == initial.keys()
    heads = [k for k in sd_new if k.startswith(("image_head.", "text_head."))]
    assert len(heads) == 8  # two heads of two linear layers, weight and bias
    for k, v in sd_new.items():
        if k in heads:
            continue
        assert k.startswith("base."), k
        assert torch.equal(v, base.model.state_dict()[k[len("base."):]]), k
    # every head tensor moved, by no more than six AdamW steps can move it (lr 1e-3, warm-up 5)
    for k in heads:
        delta = (sd_new[k] - initial[k]).abs().max().item()
        assert 0 < delta < 6e-3, (k, delta)
    assert list(res.history["step"]) == [6]
    assert res.history["lr"][-1] == pytest.approx(1e-3)


def test_resume_after_interruption_matches_uninterrupted(sky, base, tmp_path, interrupt_after_first_checkpoint):
    import math

    import astrovl.training.clip as clip_training

    train, val = sky.split("train"), sky.split("val")
    # warm-up then cosine: the scheduler's position must come back with the weights
    kw = dict(mode="finetune", steps=20, eval_every=10, schedule="cosine")
    full = train_clip(base, train, val, _cfg(tmp_path, "full", **kw))
    # the interrupted run is stopped right after its checkpoint at step 10, then resumed to 20
    interrupt_after_first_checkpoint(clip_training, train_clip, base, train, val, _cfg(tmp_path, "part", **kw))
    resumed = train_clip(base, train, val, _cfg(tmp_path, "part", resume=True, **kw))
    # lr 1e-3, 5 warm-up steps, cosine over the other 15
    expected_lr = [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 5) / 15)) for s in (10, 20)]
    np.testing.assert_allclose(full.history["lr"], expected_lr, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(resumed.history["lr"], expected_lr, rtol=1e-6, atol=1e-12)
    assert list(resumed.history["step"]) == [10, 20]
    a = CLIPEmbedder.from_pretrained(tmp_path / "full" / "final").model.state_dict()
    b = CLIPEmbedder.from_pretrained(tmp_path / "part" / "final").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(resumed.history["train_loss"]),
                               np.asarray(full.history["train_loss"]), rtol=1e-5)


def test_corrupt_checkpoint_is_a_clear_error(sky, base, tmp_path):
    train, val = sky.split("train"), sky.split("val")
    train_clip(base, train, val, _cfg(tmp_path, "c", steps=5, eval_every=5))
    (tmp_path / "c" / "checkpoint" / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match="corrupt"):
        train_clip(base, train, val, _cfg(tmp_path, "c", steps=10, eval_every=5, resume=True))


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=1), "at least 2"),
    (dict(mode="nonsense"), "mode="),
    (dict(lr=0.0), "lr="),
    (dict(grad_accum=3), "grad_accum"),
])
def test_bad_config(sky, base, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        train_clip(base, sky.split("train"), sky.split("val"), _cfg(tmp_path, "bad", **kw))


def test_bad_data(sky, base, tmp_path):
    empty_val = sky.split("test")
    with pytest.raises(DatasetError, match="validation set is empty"):
        train_clip(base, sky.split("train"), empty_val, _cfg(tmp_path, "bad"))
    big = CLIPEmbedder.from_config(dict(TINY_CLIP_CONFIG, vision_cfg=dict(TINY_CLIP_CONFIG["vision_cfg"],
                                                                            image_size=96)))
    with pytest.raises(DatasetError, match="smaller than the model input"):
        train_clip(big, sky.split("train"), sky.split("val"), _cfg(tmp_path, "bad"))


def test_wise_ft_interpolation(sky, base, tmp_path):
    res = train_clip(base, sky.split("train"), sky.split("val"), _cfg(tmp_path, "w", steps=5, eval_every=5))
    ft = CLIPEmbedder.from_pretrained(tmp_path / "w" / "final")
    zero, one, half = (interpolate_weights(base, ft, a) for a in (0.0, 1.0, 0.5))
    k = "visual.conv1.weight"
    torch.testing.assert_close(zero.model.state_dict()[k], base.model.state_dict()[k])
    torch.testing.assert_close(one.model.state_dict()[k], ft.model.state_dict()[k])
    torch.testing.assert_close(half.model.state_dict()[k],
                               (base.model.state_dict()[k] + ft.model.state_dict()[k]) / 2)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_weights(base, ft, 1.5)
    assert res.best_path.is_dir()


def _ddp_worker(rank, world, root, out, queue):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = "29533"
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = SyntheticSkyDataset(root)
        emb = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
        res = train_clip(emb, ds.split("train"), ds.split("val"),
                         CLIPTrainingConfig(mode="finetune", steps=4, batch_size=16, lr=1e-3, warmup_steps=0,
                                            eval_every=4, output_dir=out, progress=False, tensorboard=False,
                                            augment=False))
        queue.put((rank, len(res.history), float(res.history["train_loss"][0]) if len(res.history) else None))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(sky, tmp_path):
    import torch.multiprocessing as mp

    single = train_clip(CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0), sky.split("train"), sky.split("val"),
                        CLIPTrainingConfig(mode="finetune", steps=4, batch_size=16, lr=1e-3, warmup_steps=0,
                                           eval_every=4, output_dir=str(tmp_path / "single"), progress=False,
                                           tensorboard=False, augment=False))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, str(sky.root), str(tmp_path / "ddp"), queue), nprocs=2,
                       join=True, start_method="spawn")
    results = dict((r, (n, loss)) for r, n, loss in (queue.get(timeout=10) for _ in range(2)))
    assert results[0][1] == pytest.approx(float(single.history["train_loss"][0]), rel=1e-3)
    assert results[1][0] == 0  # validation ran on process 0 only


@pytest.mark.cuda
def test_torchrun_cuda_means_the_gpu_of_local_rank(monkeypatch):
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a CUDA GPU")
    from astrovl.training.clip import _training_device

    emb = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0, device="cuda")
    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(last))
    for device in (None, "cuda", "auto"):
        assert _training_device(CLIPTrainingConfig(device=device), emb, world=2) == torch.device("cuda", last)
    assert _training_device(CLIPTrainingConfig(device="cuda:0"), emb, world=2) == torch.device("cuda", 0)
    assert _training_device(CLIPTrainingConfig(device="cpu"), emb, world=2) == torch.device("cpu")


# ----------------------------------------------------------------------------- resume and overwrite
@pytest.fixture(scope="module")
def base_with_dropout():
    """The tiny CLIP with patch dropout: every training forward pass draws from torch's generator."""
    cfg = dict(TINY_CLIP_CONFIG, vision_cfg=dict(TINY_CLIP_CONFIG["vision_cfg"], patch_dropout=0.5))
    return CLIPEmbedder.from_config(cfg, seed=0)


def test_killed_and_resumed_run_equals_an_uninterrupted_one(sky, base_with_dropout, tmp_path, caplog,
                                                            interrupt_after_first_checkpoint):
    import astrovl.training.clip as clip_training

    train, val = sky.split("train"), sky.split("val")
    net = base_with_dropout.model.train()
    images = torch.zeros(1, 3, base_with_dropout.image_size, base_with_dropout.image_size)
    assert not torch.equal(net.encode_image(images), net.encode_image(images))  # dropout is on
    kw = dict(steps=4, eval_every=2, max_val=20, schedule="cosine", warmup_steps=1)
    full = train_clip(base_with_dropout, train, val, _cfg(tmp_path, "full", **kw))
    interrupt_after_first_checkpoint(clip_training, train_clip, base_with_dropout, train, val,
                                     _cfg(tmp_path, "part", **kw))
    with caplog.at_level("WARNING", logger="astrovl.training.clip"):
        resumed = train_clip(base_with_dropout, train, val, _cfg(tmp_path, "part", resume=True,
                                                                 **dict(kw, eval_every=1)))
    assert "resumed from step 2" in caplog.text and resumed.start_step == 2
    a = CLIPEmbedder.from_pretrained(tmp_path / "full" / "final").model.state_dict()
    b = CLIPEmbedder.from_pretrained(tmp_path / "part" / "final").model.state_dict()
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max().item() == 0.0, k
    # the last row of the uninterrupted run averages steps 3 and 4; the resumed run logged each of them
    assert list(resumed.history["step"]) == [2, 3, 4]
    assert full.history["train_loss"][-1] == pytest.approx(np.mean(resumed.history["train_loss"][1:]), rel=1e-6)
    record = json.loads((tmp_path / "part" / "training.json").read_text())
    assert record["resumes"] == [{"step": 2, "changed": {"eval_every": [2, 1]}}]


def test_resume_compares_settings_and_never_replaces_a_checkpoint_silently(sky, base, tmp_path,
                                                                          interrupt_after_first_checkpoint):
    import astrovl.training.clip as clip_training
    from astrovl.exceptions import OutputDirectoryError

    train, val = sky.split("train"), sky.split("val")
    kw = dict(steps=4, eval_every=2, max_val=20)
    interrupt_after_first_checkpoint(clip_training, train_clip, base, train, val, _cfg(tmp_path, "r", **kw))
    with pytest.raises(OutputDirectoryError, match="pass --resume to continue from step 2, or --overwrite"):
        train_clip(base, train, val, _cfg(tmp_path, "r", **kw))
    with pytest.raises(CheckpointError, match=r"batch_size is 8 .* lr is 0\.5 but the checkpoint was written "
                                              r"with 0\.001"):
        train_clip(base, train, val, _cfg(tmp_path, "r", resume=True, **dict(kw, batch_size=8, lr=0.5)))
    with pytest.raises(CheckpointError, match="steps is 6"):
        train_clip(base, train, val, _cfg(tmp_path, "r", resume=True, **dict(kw, steps=6, schedule="cosine")))
    # with a constant rate the run may be made longer; then it is finished, and reported so
    done = train_clip(base, train, val, _cfg(tmp_path, "r", resume=True, **dict(kw, steps=6)))
    assert list(done.history["step"]) == [2, 4, 6] and not done.finished_before
    assert CLIPTrainingConfig.RESUME_MAY_CHANGE.keys() >= {"steps", "eval_every", "num_workers"}
    before = (tmp_path / "r" / "config.json").read_text()
    again = train_clip(base, train, val, _cfg(tmp_path, "r", resume=True, **kw))
    assert again.finished_before and again.start_step == 6 and len(again.history) == 3
    assert (tmp_path / "r" / "config.json").read_text() == before
    # --overwrite starts again and keeps what astrovl did not write
    (tmp_path / "r" / "notes.txt").write_text("mine")
    fresh = train_clip(base, train, val, _cfg(tmp_path, "r", overwrite=True, **kw))
    assert fresh.start_step == 0 and list(fresh.history["step"]) == [2, 4]
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"


def test_unreadable_images_are_reported_before_training(sky, base, tmp_path):
    import shutil

    from astrovl.datasets import ManifestDataset

    root = tmp_path / "copy"
    shutil.copytree(sky.root, root)
    ds = ManifestDataset(root)
    train = ds.split("train")
    train.image_path(0).unlink()
    with pytest.raises(DatasetError) as info:
        train_clip(base, train, ds.split("val"), _cfg(tmp_path, "x", steps=1, eval_every=1, max_val=4))
    msg = str(info.value)
    assert msg.startswith(f"1 of {len(train)} training images cannot be read")
    assert repr(str(train.manifest["id"][0])) in msg and train.image_path(0).name in msg
