"""The synthetic sky: the faster renderer writes the same files as the original one."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.convolution import Gaussian2DKernel, convolve_fft
from astropy.io import fits
from astropy.wcs import WCS

from astrovl.datasets import SyntheticSkyDataset
from astrovl.datasets import synthetic as syn


def _original_observe(truth, rng, size):
    """The original PSF and noise model: astropy's FFT convolution with a Gaussian2DKernel."""
    psf = Gaussian2DKernel(rng.uniform(0.8, 1.4) * size / 64.0)
    img = convolve_fft(truth, psf, boundary="wrap")
    img = np.clip(img, 0, None)
    peak = np.percentile(img, 99.7) + 1e-12
    counts = img / peak * rng.uniform(300, 1200)
    observed = rng.poisson(counts + 20.0).astype(np.float32) - 20.0
    observed += rng.normal(0, 4.0, observed.shape).astype(np.float32)
    return observed


def _original_header(size, rng):
    """The original header: a WCS built per image and written by WCS.to_header."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]
    w.wcs.crval = [float(rng.uniform(0, 360)), float(np.degrees(np.arcsin(rng.uniform(-0.95, 0.95))))]
    scale = syn.PIXEL_SCALE_ARCSEC / 3600.0
    w.wcs.cdelt = [-scale, scale]
    w.wcs.cunit = ["deg", "deg"]
    return w.to_header()


def _original_file(path, i, label, seed, size):
    """Image ``i`` as the original generate() wrote it."""
    rng = np.random.default_rng([seed, 1, i])
    syn._caption(label, rng)
    header = _original_header(size, rng)
    data = _original_observe(syn.render_object(label, size, rng), rng, size)
    header["OBJECT"] = (label, "synthetic object class")
    header["BUNIT"] = "count"
    header["ORIGIN"] = "astrovl synthetic sky"
    fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(path)
    return path.read_bytes()


@pytest.mark.parametrize("size", [32, 64])
def test_files_equal_the_original_renderer(tmp_path, size):
    ds = SyntheticSkyDataset.generate(tmp_path / "sky", n_images=22, image_size=size, seed=3,
                                      progress=False)
    assert sorted(set(ds.manifest["label"])) == sorted(syn.SYNTHETIC_CLASSES)  # every class
    for k, row in enumerate(ds.manifest):
        expected = _original_file(tmp_path / f"ref_{k}.fits", k, row["label"], 3, size)
        assert (tmp_path / "sky" / row["image"]).read_bytes() == expected, row["label"]


def test_psf_is_astropys_gaussian_kernel(rng):
    for sigma in (0.4, 0.8, 1.37, 2.8):
        taps = syn._gaussian_taps(sigma)
        np.testing.assert_allclose(np.outer(taps, taps), Gaussian2DKernel(sigma).array, atol=1e-15)
    truth = rng.gamma(1.0, 1.0, (48, 48))
    np.testing.assert_allclose(syn._convolve_psf(truth, 1.3),
                               convolve_fft(truth, Gaussian2DKernel(1.3), boundary="wrap"),
                               rtol=1e-10, atol=1e-13)


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # Python >= 3.12, threads of torch
def test_resume_rewrites_incomplete_files_and_workers_change_nothing(tmp_path):
    one = SyntheticSkyDataset.generate(tmp_path / "a", n_images=120, image_size=32, seed=1,
                                       progress=False)
    files = [tmp_path / "a" / p for p in one.manifest["image"]]
    first = [f.read_bytes() for f in files]
    files[5].write_bytes(first[5][:3000])  # as if cut off
    files[9].write_bytes(b"")
    SyntheticSkyDataset.generate(tmp_path / "a", n_images=120, image_size=32, seed=1, progress=False)
    assert [f.read_bytes() for f in files] == first
    two = SyntheticSkyDataset.generate(tmp_path / "b", n_images=120, image_size=32, seed=1,
                                       progress=False, workers=2)
    assert [(tmp_path / "b" / p).read_bytes() for p in two.manifest["image"]] == first
    assert list(two.manifest["caption"]) == list(one.manifest["caption"])
