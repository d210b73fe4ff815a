"""The batched image preprocessing of embed_images: host and device paths against the reference.

The reference is the path of earlier versions: ``load_image``, ``AstroImage.to_pil``
and the model's open_clip PIL transform, image by image. Percentiles of large
images come from a fixed sample (astrovl.imaging.scaling); the tests here check
that tolerance too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy import visualization as vis
from astropy.io import fits

from astrovl import AstroImage, conf, load_image
from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder
from astrovl.clip import preprocess as pp
from astrovl.exceptions import ImageFileError, ImageInputError
from astrovl.imaging import (
    PERCENTILE_SAMPLES,
    get_interval,
    get_stretch,
    interval_limits,
    scale_to_unit,
)


@pytest.fixture(scope="module")
def embedder():
    return CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0, device="cpu")


@pytest.fixture(scope="module")
def big_sky(m13_path):
    """M13 tiled to 640 x 600 float32 with a gradient: more pixels than the percentile sample."""
    base = fits.getdata(m13_path).astype(np.float32)
    tiled = np.tile(base, (3, 2))[:640, :600]
    return tiled + np.linspace(0, 50, 600, dtype=np.float32)[None, :]


def _reference_pixels(embedder, item):
    """The model input of the earlier embed_images: load_image, to_pil, the open_clip transform."""
    img = item if isinstance(item, AstroImage) else load_image(item)
    return embedder.preprocess(img.to_pil())


def _full_percentile_pixels(embedder, item):
    """The reference with the percentile interval on every pixel (no sample)."""
    if isinstance(item, AstroImage):
        return embedder.preprocess(item.to_pil())
    img = load_image(item)
    if not img.meta["picture"]:  # 8-bit pictures are divided by 255, not scaled
        img.data = scale_to_unit(img.raw, mask=img.mask, max_samples=None)
    return embedder.preprocess(img.to_pil())


def _levels(pixels, embedder):
    """Normalised model input back to 0-255 levels."""
    std = torch.tensor(embedder.image_std).view(3, 1, 1)
    mean = torch.tensor(embedder.image_mean).view(3, 1, 1)
    return (pixels * std + mean) * 255.0


# --------------------------------------------------------------------------- sampled percentiles


def test_sampled_percentiles_are_within_a_tenth_of_a_point(big_sky):
    assert big_sky.size > PERCENTILE_SAMPLES
    vmin, vmax = interval_limits(big_sky)
    exact = vis.PercentileInterval(99.5).get_limits(big_sky.ravel())
    assert (vmin, vmax) != tuple(float(v) for v in exact)  # really a sample
    # the full-image rank of each limit is within 0.1 percentage points of the request
    ranks = [100.0 * np.mean(big_sky <= v) for v in (vmin, vmax)]
    assert abs(ranks[0] - 0.25) < 0.1 and abs(ranks[1] - 99.75) < 0.1
    # same positions every time; max_samples=None is astropy on every pixel
    assert interval_limits(big_sky) == (vmin, vmax)
    np.testing.assert_allclose(interval_limits(big_sky, max_samples=None), exact, rtol=1e-7)
    # in values: the asinh stretch magnifies the faint end, where the lower limit moved
    scaled = scale_to_unit(big_sky)
    full = scale_to_unit(big_sky, max_samples=None)
    assert np.abs(scaled - full).max() < 0.03 and np.abs(scaled - full).mean() < 0.01


def test_small_images_and_other_intervals_use_every_pixel(m13_path, big_sky):
    data = fits.getdata(m13_path).astype(np.float32)
    assert data.size <= PERCENTILE_SAMPLES
    assert interval_limits(data) == tuple(
        float(v) for v in vis.PercentileInterval(99.5).get_limits(data.ravel()))
    assert interval_limits(big_sky, "minmax") == (float(big_sky.min()), float(big_sky.max()))


def test_mostly_invalid_images_use_all_valid_pixels(big_sky):
    holes = big_sky.copy()
    holes[:, 200:] = np.nan  # two thirds of the pixels
    valid = holes[np.isfinite(holes)]
    exact = vis.PercentileInterval(99.5).get_limits(valid)
    np.testing.assert_allclose(interval_limits(holes), exact, rtol=1e-7)


@pytest.mark.parametrize("stretch", ["asinh", "linear", "sqrt", "log", "sinh", "power"])
def test_scaling_matches_image_normalize(stretch, m13_path):
    data = fits.getdata(m13_path).astype(np.float64)
    for values in (data, data + 1e6):  # a faint signal on a large offset takes the float64 way
        vmin, vmax = vis.PercentileInterval(99.5).get_limits(values.ravel())
        norm = vis.ImageNormalize(vmin=vmin, vmax=vmax, clip=True, stretch=get_stretch(stretch))
        expected = np.clip(np.asarray(norm(values)), 0, 1)
        got = scale_to_unit(values, stretch=stretch)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=2e-6)


# --------------------------------------------------------------------------- host path


def test_fast_reads_equal_load_image(tmp_path, m13_path, big_sky):
    scaled = (fits.getdata(m13_path).astype(np.float32) - 1000) / 3
    files = {
        "big-endian float32": fits.PrimaryHDU(big_sky),
        "float64": fits.PrimaryHDU(big_sky.astype(np.float64)),
        "int16 with BZERO": fits.PrimaryHDU(fits.getdata(m13_path)),
        "image in extension 1": fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(scaled)]),
    }
    for name, hdu in files.items():
        path = tmp_path / f"{name.replace(' ', '_')}.fits"
        hdu.writeto(path)
        unit = pp.read_unit_image(path)
        assert unit.lower
        np.testing.assert_array_equal(unit.data, load_image(path).data, err_msg=name)
    for arr in (big_sky, big_sky.astype(np.float64), fits.getdata(m13_path)):
        np.testing.assert_array_equal(pp.read_unit_image(arr).data, load_image(arr).data)


def test_host_path_matches_the_reference(embedder, m13_path, ngc1316_path, dss_path, acs_path,
                                         xdf_array, big_sky):
    m13 = load_image(m13_path)
    with fits.open(acs_path) as hdul:  # two SCI chips: the file itself asks for hdu=
        acs_chip = fits.ImageHDU(hdul[1].data, hdul[1].header)
    inputs = {"m13": m13_path, "ngc1316 (440x300, cropped)": ngc1316_path, "dss .fits.gz": dss_path,
              "acs chip (an ImageHDU)": acs_chip, "xdf colour picture": xdf_array,
              "AstroImage": m13, "big array": big_sky}
    batch = embedder.embed_images(list(inputs.values()), batch_size=3, progress=False)
    ref_pixels = torch.stack([_full_percentile_pixels(embedder, x) for x in inputs.values()])
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(embedder.model.encode_image(ref_pixels), dim=-1).numpy()
    for k, (name, item) in enumerate(inputs.items()):
        new = embedder.image_tensor(item)
        diff = (_levels(new, embedder) - _levels(_reference_pixels(embedder, item), embedder)).abs()
        # PIL resizes 8-bit images in two rounded passes; torch in float
        assert float(diff.max()) <= 3.0 + 1e-3, name
        assert float(diff.mean()) < 0.5, name
        # embeddings: the reference with every pixel in the percentiles, sampling included
        assert np.abs(batch[k] - ref[k]).max() < 2e-3, name
        assert float(batch[k] @ ref[k]) > 0.9999, name


def test_fits_rows_are_flipped_like_to_pil(embedder, m13_path):
    data = fits.getdata(m13_path).astype(np.float32)
    top = pp.host_model_input(pp.read_unit_image(data[::-1].copy()), pp.InputSpec.from_embedder(embedder))
    picture = load_image(data).to_uint8()  # row 0 at the top
    flipped = pp.host_model_input(pp.UnitImage(picture / np.float32(255), lower=False),
                                  pp.InputSpec.from_embedder(embedder))
    np.testing.assert_allclose(flipped, embedder.image_tensor(data), atol=1e-6)
    assert not torch.allclose(top, flipped, atol=0.1)


def test_longest_resize_mode_uses_the_pil_transform(m13_path):
    emb = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0, device="cpu")
    emb.preprocess_cfg["resize_mode"] = "longest"
    emb.preprocess = CLIPEmbedder._tokenizer_and_transform(emb.model_cfg, emb.preprocess_cfg)[1]
    assert not pp.InputSpec.from_embedder(emb).tensor_path
    np.testing.assert_array_equal(emb.image_tensor(m13_path), _reference_pixels(emb, m13_path))
    assert emb.embed_images([m13_path], preprocess="gpu", progress=False).shape == (1, 64)


# --------------------------------------------------------------------------- device path


def test_torch_percentiles_match_numpy(rng):
    values = rng.gamma(2.0, 10.0, (4, 1001)).astype(np.float32)
    values[1, ::3] = np.nan
    values[2, :1000] = np.inf  # one valid value
    valid = np.isfinite(values)
    got = pp._torch_percentiles(torch.from_numpy(values), torch.from_numpy(valid), (0.25, 50.0, 99.75))
    for r in range(4):
        want = np.percentile(values[r][valid[r]], (0.25, 50.0, 99.75))
        np.testing.assert_allclose(got[r].numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("stretch, interval", [
    ("asinh", "percentile"), ("linear", "minmax"), ("sqrt", 90.0), ("log", (100.0, 3000.0)),
    ("sinh", "percentile"), ("power", "minmax"), ("squared", vis.AsymmetricPercentileInterval(1, 95)),
])
def test_device_scaling_on_cpu_tensors_matches_host(embedder, stretch, interval, m13_path, big_sky):
    holes = big_sky.copy()
    holes[10:40, 20:90] = np.nan
    holes[5, 5] = np.inf
    arrays = [fits.getdata(m13_path).astype(np.float32), big_sky, holes]
    spec = pp.InputSpec.from_embedder(embedder)
    st, iv = get_stretch(stretch), get_interval(interval)
    assert pp._device_scaling_supported(st, iv)
    for arr in arrays:
        host = pp.host_model_input(pp.read_unit_image(arr, st, iv), spec)
        raw = torch.from_numpy(pp.read_raw_pixels(arr))[None]
        dev = pp.device_model_input(raw, spec, st, iv)[0]
        diff = (_levels(dev, embedder) - _levels(host, embedder)).abs()
        # float32 scaling on the device may move a value across an 8-bit level
        assert float(diff.max()) <= 1.0 + 1e-3
        assert float(diff.mean()) < 0.02


def test_device_scaling_follows_conf(embedder, m13_path):
    with conf.set_temp("stretch", "sqrt"), conf.set_temp("interval", "minmax"):
        cpu = embedder.embed_images([m13_path], preprocess="cpu", progress=False)
        gpu = embedder.embed_images([m13_path], preprocess="gpu", progress=False)
    default = embedder.embed_images([m13_path], preprocess="gpu", progress=False)
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
    assert np.abs(gpu - default).max() > 1e-3  # the untrained model barely tells images apart


def test_gpu_preprocess_on_cpu_tensors_gives_the_same_embeddings(embedder, tmp_path, m13_path,
                                                                  ngc1316_path, xdf_array, big_sky):
    path = tmp_path / "big.fits"
    fits.PrimaryHDU(big_sky).writeto(path)
    inputs = [m13_path, path, big_sky, ngc1316_path, xdf_array, load_image(m13_path),
              fits.getdata(m13_path).astype(np.float32)]
    cpu = embedder.embed_images(inputs, batch_size=4, progress=False, preprocess="cpu")
    gpu = embedder.embed_images(inputs, batch_size=4, progress=False, preprocess="gpu")
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)
    assert np.all(np.sum(gpu * cpu, axis=1) > 0.99999)
    # in the device batch: raw groups of two shapes and host-made inputs, in input order
    ds = pp.FeedDataset(inputs, pp.InputSpec.from_embedder(embedder), device_scaling=True)
    batch = pp.collate_feed([ds[i] for i in range(len(inputs))])
    assert sorted(len(i) for i in batch["raw_index"]) == [1, 2, 2]
    assert batch["ready_index"].tolist() == [4, 5]


def test_unsupported_scaling_falls_back_to_the_host(embedder, m13_path):
    with conf.set_temp("interval", "zscale"):
        ds = pp.FeedDataset([m13_path], pp.InputSpec.from_embedder(embedder), device_scaling=True)
        assert not ds.device_scaling
        a = embedder.embed_images([m13_path], preprocess="gpu", progress=False)
        b = embedder.embed_images([m13_path], preprocess="cpu", progress=False)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- workers and errors


def test_small_calls_start_no_worker_process(embedder, m13_path, monkeypatch):
    import torch.utils.data

    def no_loader(*args, **kwargs):
        raise AssertionError("a DataLoader (worker processes) was started for a small call")

    monkeypatch.setattr(torch.utils.data, "DataLoader", no_loader)
    assert embedder.embed_images([m13_path] * 5, progress=False).shape == (5, 64)
    assert len(embedder.zero_shot([m13_path], ["globular cluster", "galaxy"], top_k=1)) == 1
    cuda = torch.device("cuda")
    assert pp.auto_num_workers(5, 64, cuda) == 0
    assert pp.auto_num_workers(10_000, 64, torch.device("cpu")) == 0
    assert 1 <= pp.auto_num_workers(10_000, 64, cuda) <= 8
    assert pp.auto_num_workers(300, 256, cuda) <= 2  # never more workers than batches


def test_worker_processes_give_the_same_embeddings(embedder, m13_path, ngc1316_path):
    items = [m13_path, ngc1316_path] * 3
    inproc = embedder.embed_images(items, batch_size=2, progress=False, num_workers=0)
    workers = embedder.embed_images(items, batch_size=2, progress=False, num_workers=2)
    np.testing.assert_array_equal(workers, inproc)


def test_errors_name_the_input(embedder, tmp_path, m13_path):
    with pytest.raises(ValueError, match="preprocess='tpu'"):
        embedder.embed_images([m13_path], preprocess="tpu")
    nan = tmp_path / "nan.fits"
    fits.PrimaryHDU(np.full((8, 8), np.nan, dtype=np.float32)).writeto(nan)
    for mode in ("cpu", "gpu"):
        with pytest.raises(ImageInputError, match="nan.fits"):
            embedder.embed_images([m13_path, nan], preprocess=mode, progress=False)
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(m13_path.read_bytes()[:5000])
    with pytest.raises(ImageFileError, match="truncated"):
        embedder.embed_images([truncated], progress=False)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gpu_preprocess_matches_cpu(embedder, tmp_path, m13_path, ngc1316_path, big_sky):
    path = tmp_path / "big.fits"
    fits.PrimaryHDU(big_sky).writeto(path)
    items = [m13_path, path, ngc1316_path, big_sky] * 80  # enough for worker processes
    cpu = embedder.embed_images(items[:4], preprocess="cpu", progress=False)
    gpu_emb = CLIPEmbedder(embedder.model, embedder.tokenizer, embedder.preprocess,
                           model_name=embedder.model_name, model_cfg=embedder.model_cfg,
                           preprocess_cfg=embedder.preprocess_cfg, device="cuda", precision="fp32",
                           model_id=embedder.model_id)
    try:
        gpu = gpu_emb.embed_images(items, preprocess="gpu", batch_size=64, progress=False)
        host = gpu_emb.embed_images(items[:4], preprocess="cpu", progress=False)
    finally:
        embedder.model.to("cpu")
    np.testing.assert_allclose(gpu[:4], cpu, atol=2e-3)
    np.testing.assert_allclose(host, cpu, atol=2e-3)
    np.testing.assert_allclose(gpu[4:8], gpu[:4], atol=1e-5)
