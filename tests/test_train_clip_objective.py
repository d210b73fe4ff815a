"""train_clip keeps the paper's objective: accumulation, validation order, caches, texts, resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder
from astrovl.datasets import ManifestDataset, SyntheticSkyDataset
from astrovl.datasets.torch_datasets import ImageTextTorchDataset
from astrovl.training import CLIPTrainingConfig, train_clip
from astrovl.training import clip as tclip
from astrovl.training.batches import StepBatches

LONG = ("We image twelve nearby spiral galaxies. The bars drive gas inwards. Star formation "
        "follows in rings. We measure the rates with H-alpha. The rings are young. Older stars "
        "trace the bar itself. This tests secular evolution models. Our sample spans all types.")


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    return SyntheticSkyDataset.generate(tmp_path_factory.mktemp("sky"), n_images=150, image_size=64,
                                        seed=1, val_fraction=0.2, progress=False)


@pytest.fixture(scope="module")
def base():
    return CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)


def _cfg(tmp_path, name, **kw):
    defaults = dict(mode="finetune", steps=1, batch_size=16, lr=1e-3, warmup_steps=0, eval_every=1,
                    output_dir=str(tmp_path / name), progress=False, tensorboard=False)
    defaults.update(kw)
    return CLIPTrainingConfig(**defaults)


def test_gradient_accumulation_keeps_the_contrastive_batch(sky, base, tmp_path):
    train, val = sky.split("train"), sky.split("val")
    one = train_clip(base, train, val, _cfg(tmp_path, "a1", grad_accum=1))
    four = train_clip(base, train, val, _cfg(tmp_path, "a4", grad_accum=4))
    # the logged loss is the loss over all 16 pairs in both
    assert float(four.history["train_loss"][0]) == pytest.approx(float(one.history["train_loss"][0]), rel=1e-5)
    a = CLIPEmbedder.from_pretrained(tmp_path / "a1" / "final").model.state_dict()
    b = CLIPEmbedder.from_pretrained(tmp_path / "a4" / "final").model.state_dict()
    start = base.model.state_dict()
    # Adam's first step is about lr * sign(gradient): gradients of the order of Adam's eps (1e-6)
    # turn float rounding into differences of a few per cent of lr, hence the tolerance; the
    # gradients themselves agree to 1e-4 (next test)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=0.03 * 1e-3)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the step did change the weights


def test_accumulated_gradient_equals_full_batch_gradient(base):
    """The gradients themselves (not only after Adam) match, the temperature's included."""
    import contextlib

    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    images, tokens = torch.randn(8, 3, 64, 64), base.tokenizer([f"caption {i}" for i in range(8)])
    grads = {}
    for accum in (1, 4):
        model = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0).model.train()
        model.zero_grad()
        tclip._train_step(model, model, model, ClipLoss(), images, tokens, accum, contextlib.nullcontext,
                          distributed=False)
        grads[accum] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads[1].items():
        torch.testing.assert_close(grads[4][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_batches_never_repeat_an_image_across_an_epoch_boundary():
    sampler = StepBatches(n=50, batch_size=16, seed=3, start_step=0, steps=40)
    assert sampler.per_epoch == 3
    seen_in_epoch: set[int] = set()
    for step in range(40):
        rows = [i for i, _ in sampler.global_batch(step)]
        assert len(set(rows)) == 16
        if step % 3 == 0:
            seen_in_epoch = set()
        assert not seen_in_epoch & set(rows)
        seen_in_epoch |= set(rows)
    # a pure function of (seed, step): a resumed sampler gives the same batches
    again = StepBatches(n=50, batch_size=16, seed=3, start_step=17, steps=40)
    assert list(again)[0] == sampler.batch(17)


def test_validation_is_shuffled_with_a_seed_and_subsets_are_random(sky, base, tmp_path):
    val = sky.split("val")
    cfg = _cfg(tmp_path, "v", max_val=12, seed=4)
    sub = tclip._validation_subset(val, cfg)
    ids = list(sub.manifest["id"])
    assert len(ids) == 12 and ids != list(val.manifest["id"][:12])
    assert ids == list(tclip._validation_subset(val, cfg).manifest["id"])
    assert ids != list(tclip._validation_subset(val, _cfg(tmp_path, "v", max_val=12, seed=5)).manifest["id"])
    # the loss is the mean over consecutive batches of the seeded order, not of the manifest order
    emb = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
    cfg = _cfg(tmp_path, "v", batch_size=8, seed=4)
    ds = ImageTextTorchDataset(val, emb.image_size, emb.image_mean, emb.image_std, augment=False)
    got = tclip._evaluate(emb, ds, cfg, __import__("contextlib").nullcontext)
    order = np.random.default_rng([4, tclip._VAL_ORDER]).permutation(len(ds))

    def mean_loss(rows):
        losses, counts = [], []
        for s in range(0, len(rows), 8):
            batch = rows[s:s + 8]
            if len(batch) < 2:
                continue
            images = torch.stack([ds[(int(i), 0)][0] for i in batch])
            tokens = emb.tokenizer([ds.captions[int(i)] for i in batch])
            with torch.no_grad():
                img = emb.model.encode_image(images, normalize=True)
                txt = emb.model.encode_text(tokens, normalize=True)
                logits = emb.model.logit_scale.exp() * img @ txt.T
                labels = torch.arange(len(batch))
                loss = (torch.nn.functional.cross_entropy(logits, labels)
                        + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
            losses.append(float(loss) * len(batch))
            counts.append(len(batch))
        return sum(losses) / sum(counts)

    assert got["val_loss"] == pytest.approx(mean_loss(order), rel=1e-5)
    assert got["val_loss"] != pytest.approx(mean_loss(np.arange(len(ds))), rel=1e-5)
    assert np.isnan(got["val_top10_batch100"])  # fewer than 100 pairs


def test_raw_abstract_texts_are_the_same_kind_everywhere(sky, base, tmp_path):
    manifest = sky.manifest.copy()
    manifest["abstract"] = [LONG.replace("twelve", f"{i}") for i in range(len(manifest))]
    manifest["category"] = ["Galaxies"] * len(manifest)
    ds = ManifestDataset(sky.root, manifest)
    train, val = ds.split("train"), ds.split("val")
    texts = tclip._caption_texts(train, "abstract")
    assert all(t.startswith("Category: Galaxies. We image") for t in texts)
    assert tclip._caption_texts(val, "abstract")[0].startswith("Category: Galaxies.")
    count = tclip._token_counter(base.tokenizer)
    assert count(texts[0]) > base.context_length  # long: sentence runs are needed
    tds = ImageTextTorchDataset(train, base.image_size, base.image_mean, base.image_std, captions=texts,
                                caption_mode="abstract", fits_context=lambda t: count(t) <= base.context_length)
    chunks = {tds[(0, s)][1] for s in range(30)}
    assert len(chunks) > 3
    for c in chunks:
        assert count(c) <= base.context_length and c in texts[0]
    # the shuffled control shuffles the same texts; validation uses them too
    res = train_clip(base, train, val, _cfg(tmp_path, "abs", mode="shuffled", caption_mode="abstract",
                                            steps=2, eval_every=2))
    assert np.isfinite(res.history["val_loss"][0])
    with pytest.raises(Exception, match="'abstract' column"):
        train_clip(base, sky.split("train"), sky.split("val"), _cfg(tmp_path, "x", caption_mode="abstract"))


def test_resume_restores_numpy_and_python_random_state(tmp_path):
    from astrovl.training.common import restore_rng_state, rng_state

    np.random.seed(11)
    random.seed(12)
    np.random.rand(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = rng_state()
    expected = (np.random.rand(4), np.random.randn(2), random.random(), random.gauss(0, 1), torch.rand(2))
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    restore_rng_state(torch.load(_saved(state, tmp_path), weights_only=True))
    got = (np.random.rand(4), np.random.randn(2), random.random(), random.gauss(0, 1), torch.rand(2))
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]
    assert torch.equal(got[4], expected[4])


def _saved(state, tmp_path):
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    return path


def test_image_caches_give_the_same_items_and_stay_bounded(sky, base, tmp_path):
    from astrovl.datasets.imagecache import DiskImageCache, MemoryImageCache

    train = sky.split("train")
    args = (train, base.image_size, base.image_mean, base.image_std)
    plain = ImageTextTorchDataset(*args, cache="none")
    disk = ImageTextTorchDataset(*args, cache="disk", cache_dir=tmp_path / "c")
    memory = ImageTextTorchDataset(*args, cache="memory", cache_max_bytes=5 * 64 * 64)
    assert isinstance(disk.cache, DiskImageCache) and isinstance(memory.cache, MemoryImageCache)
    for i in range(8):
        for ds in (disk, memory):
            torch.testing.assert_close(ds[(i, 7)][0], plain[(i, 7)][0], rtol=0, atol=0)
            torch.testing.assert_close(ds[(i, 7)][0], plain[(i, 7)][0], rtol=0, atol=0)  # from the cache
    assert len(memory.cache) == 5 and memory.cache.nbytes <= 5 * 64 * 64
    assert len(disk.cache) == 8
    # the workers share one file: what one process wrote, a fresh copy of the dataset reads
    loader = torch.utils.data.DataLoader(disk, batch_size=4, num_workers=2,
                                         sampler=[(i, 0) for i in range(8, 16)], collate_fn=tclip._collate)
    for _ in loader:
        pass
    assert len(disk.cache) == 16
    reopened = DiskImageCache(tmp_path / "c", disk.paths, disk.cache.shape)
    assert len(reopened) == 16  # an earlier run's cache over the same files is reused
    with pytest.raises(ValueError, match="filled again in each of the DataLoader workers"):
        tclip._image_caches(_cfg(tmp_path, "m", image_cache="memory"), 2, tmp_path, 0)


def test_augmentation_on_8_bit_pixels_gives_the_former_numbers(sky, base):
    """Rotation, flip and crop before the float conversion: the same tensors as after it."""
    from torchvision.transforms import v2

    from astrovl.datasets.torch_datasets import uint8_to_tensor

    train = sky.split("train")
    ds = ImageTextTorchDataset(train, 48, base.image_mean, base.image_std, cache="none")
    norm = v2.Normalize(mean=list(base.image_mean), std=list(base.image_std))
    for i, seed in ((0, 1), (3, 2), (7, 99)):
        img = uint8_to_tensor(ds._pixels(i))  # the former path: the whole image as floats first
        gen = torch.Generator().manual_seed(seed)
        img = torch.rot90(img, int(torch.randint(0, 4, (1,), generator=gen)), dims=(-2, -1))
        if torch.rand(1, generator=gen) < 0.5:
            img = img.flip(-1)
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - 48 + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - 48 + 1, (1,), generator=gen))
        expected = norm(img[..., top:top + 48, left:left + 48].contiguous())
        torch.testing.assert_close(ds[(i, seed)][0], expected, rtol=0, atol=0)
