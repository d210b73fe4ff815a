"""Images larger than ``max_pixels`` are read block-averaged in strips, within bounded memory."""

from __future__ import annotations

import gzip
import io
import time
import tracemalloc
import warnings

import numpy as np
import pytest
from astropy.io import fits

from astrovl import load_image
from astrovl.exceptions import ImageInputError
from astrovl.imaging import interval_limits, pixel_grid
from astrovl.imaging.pixel_grid import block_mean, reduction_factor

SIDE = 4096
MAX_PIXELS = 1_000_000  # 4096^2 -> factor 5 -> 819 x 819


def _reference(data: np.ndarray, k: int) -> np.ndarray:
    """float64 NaN-aware block mean (astropy's convention: far edges dropped)."""
    h, w = (data.shape[0] // k) * k, (data.shape[1] // k) * k
    blocks = np.asarray(data[:h, :w], dtype=np.float64).reshape(h // k, k, w // k, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        return np.nanmean(blocks, axis=(1, 3))


@pytest.fixture(scope="module")
def big_pixels() -> np.ndarray:
    rng = np.random.default_rng(15)
    data = rng.lognormal(3.0, 1.0, size=(SIDE, SIDE)).astype(np.float32)
    data[100:103, 200:900] = np.nan  # a bad column segment: blocks partly NaN
    data[1000:1010, 1000:1010] = np.nan  # whole blocks NaN
    data[5, 5] = np.inf
    return data


@pytest.fixture(scope="module")
def big_file(tmp_path_factory, big_pixels):
    path = tmp_path_factory.mktemp("huge") / "big.fits"
    fits.PrimaryHDU(big_pixels).writeto(path)
    return path


def test_reduction_factor():
    assert reduction_factor(SIDE, SIDE, MAX_PIXELS) == 5
    assert reduction_factor(100, 100, 10_000) == 1
    assert reduction_factor(16_384, 16_384, 16_000_000) == 5
    for h, w, m in [(330, 400, 5000), (1001, 999, 7), (7, 10_000, 30)]:
        k = reduction_factor(h, w, m)
        assert (h // k) * (w // k) <= m or k == min(h, w)


def test_huge_file_equals_float64_block_mean(big_file, big_pixels):
    img = load_image(big_file, max_pixels=MAX_PIXELS)
    k = img.meta["downsample"]
    assert k == 5 and img.raw.shape == (819, 819) and img.raw.dtype == np.float32
    ref = big_pixels.astype(np.float64)
    ref[~np.isfinite(ref)] = np.nan  # non-finite values are left out of the means
    ref = _reference(ref, k)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(img.raw), finite)
    np.testing.assert_allclose(img.raw[finite], ref[finite], rtol=1e-6)
    assert img.mask is not None and img.mask[200:202, 200:202].all()  # all-NaN blocks
    assert img.data.shape == (819, 819) and float(img.data.max()) <= 1.0
    # the same pixels given as an array reduce to the same values
    arr = load_image(big_pixels, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(arr.raw, img.raw)
    np.testing.assert_array_equal(arr.data, img.data)


def test_huge_file_peak_memory_is_bounded(big_file, monkeypatch):
    """Peak Python-tracked allocation is a fraction of the 64 MiB file (strips of ~1 MiB values)."""
    monkeypatch.setattr(pixel_grid, "STRIP_VALUES", 1 << 18)
    file_bytes = SIDE * SIDE * 4
    load_image(big_file, max_pixels=MAX_PIXELS)  # warm caches (sample positions, imports)
    tracemalloc.start()
    try:
        img = load_image(big_file, max_pixels=MAX_PIXELS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert img.meta["downsample"] == 5
    # output (raw + data + masks, ~5.4 MiB) plus strips of 256 Ki values; reading the whole
    # file, as before, costs at least 64 MiB
    assert peak < file_bytes / 5, f"peak {peak / 2**20:.1f} MiB"


def test_array_input_peak_memory(monkeypatch):
    """An in-memory array is reduced without a full-size float copy."""
    monkeypatch.setattr(pixel_grid, "STRIP_VALUES", 1 << 18)
    ints = np.full((2048, 2048), 7, dtype=np.int32)  # 16 MiB, not float32
    tracemalloc.start()
    try:
        img = load_image(ints, max_pixels=100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert img.meta["downsample"] == 7 and np.all(img.raw == 7.0)
    assert peak < ints.nbytes / 2, f"peak {peak / 2**20:.1f} MiB"


def test_scaled_integers_with_blank(tmp_path, rng):
    raw = rng.integers(-3000, 30000, size=(1200, 1000), dtype=np.int16)
    raw[0:4, 0:4] = -32768
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"], hdu.header["BZERO"], hdu.header["BLANK"] = 0.5, 100.0, -32768
    path = tmp_path / "scaled.fits"
    hdu.writeto(path)
    expected = fits.getdata(path).astype(np.float64)  # astropy's scaling, BLANK -> NaN
    assert np.isnan(expected[0, 0])
    img = load_image(path, max_pixels=50_000)
    k = img.meta["downsample"]
    assert k == 5
    ref = _reference(expected, k)
    np.testing.assert_array_equal(np.isnan(img.raw), np.isnan(ref))
    ok = np.isfinite(ref)
    np.testing.assert_allclose(img.raw[ok], ref[ok], rtol=1e-6)


@pytest.mark.parametrize("tile_rows", [1, 16, 700])
def test_tile_compressed_is_read_in_strips(tmp_path, rng, tile_rows, monkeypatch):
    data = rng.integers(0, 5000, size=(1400, 900)).astype(np.int32)
    path = tmp_path / f"rice_{tile_rows}.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="RICE_1",
                                                       tile_shape=(tile_rows, 900))]).writeto(path)
    calls = []
    original = pixel_grid.block_mean

    def spy(source, factor, **kwargs):
        calls.append(kwargs.get("align_rows"))
        return original(source, factor, **kwargs)

    monkeypatch.setattr(pixel_grid, "block_mean", spy)
    monkeypatch.setattr(pixel_grid, "STRIP_VALUES", 1 << 16)
    img = load_image(path, max_pixels=30_000)
    k = img.meta["downsample"]
    assert calls == [tile_rows]
    np.testing.assert_allclose(img.raw, _reference(data, k), rtol=1e-6)


@pytest.mark.parametrize("tile_rows", [7, 40, 700])
def test_tile_row_cache_reads_each_tile_row_at_most_twice(tile_rows):
    image = np.arange(1400 * 30, dtype=np.float32).reshape(1400, 30)
    requested = []

    def read(y0, y1):
        requested.append((y0, y1))
        return image[y0:y1]

    cache = pixel_grid.TileRowCache(read, tile_rows, image.shape[0])
    for y0 in range(0, 1400, 15):  # strips of 15 rows, not aligned with the tiles
        np.testing.assert_array_equal(cache(y0, min(1400, y0 + 15)), image[y0:y0 + 15])
    assert all(a % tile_rows == 0 for a, _ in requested)
    assert sum(b - a for a, b in requested) <= 2 * 1400
    out, _ = block_mean(pixel_grid.TileRowCache(read, tile_rows, 1400), 5, shape=(1400, 30))
    np.testing.assert_allclose(out, _reference(image, 5), rtol=1e-6)


def test_gzip_file(tmp_path, big_pixels, monkeypatch):
    """A .fits.gz file is read at once (not in strips: each would decompress from the start)."""
    monkeypatch.setattr(pixel_grid, "STRIP_VALUES", 1 << 14)  # strips of ~16 rows
    data = np.ascontiguousarray(big_pixels[:1500, :1300])
    buffer = io.BytesIO()
    fits.PrimaryHDU(data).writeto(buffer)
    path = tmp_path / "small.fits.gz"
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(buffer.getvalue())
    start = time.perf_counter()
    img = load_image(path, max_pixels=100_000)
    assert time.perf_counter() - start < 3.0  # strip by strip from the stream takes ~30 s
    k = img.meta["downsample"]
    assert k == 5
    ref = data.astype(np.float64)
    ref[~np.isfinite(ref)] = np.nan
    ref = _reference(ref, k)
    ok = np.isfinite(ref)
    np.testing.assert_allclose(img.raw[ok], ref[ok], rtol=1e-6)


def test_cubes(tmp_path, rng):
    cube = rng.normal(10.0, 1.0, size=(5, 600, 500)).astype(np.float32)
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(cube).writeto(path)
    img = load_image(path, plane=3, max_pixels=10_000)
    k = img.meta["downsample"]
    np.testing.assert_allclose(img.raw, _reference(cube[3], k), rtol=1e-6)
    img = load_image(path, plane=-1, max_pixels=10_000)
    np.testing.assert_allclose(img.raw, _reference(cube[4], k), rtol=1e-6)
    start = time.perf_counter()
    with pytest.raises(ImageInputError, match="plane="):
        load_image(path, max_pixels=10_000)  # five planes, none chosen: refused unread
    with pytest.raises(ImageInputError, match="out of range"):
        load_image(path, plane=5, max_pixels=10_000)
    assert time.perf_counter() - start < 2.0
    colour_path = tmp_path / "rgb.fits"
    fits.PrimaryHDU(cube[:3]).writeto(colour_path)
    rgb = load_image(colour_path, max_pixels=10_000)
    assert rgb.is_color and rgb.raw.shape == (600 // k, 500 // k, 3)
    for c in range(3):
        np.testing.assert_allclose(rgb.raw[..., c], _reference(cube[c], k), rtol=1e-6)


def test_block_mean_mask_and_colour(rng):
    arr = rng.normal(size=(40, 30, 3))
    mask = np.zeros((40, 30), dtype=bool)
    mask[0:4, 0:4] = True  # one whole block (k=4)
    mask[8, 8] = True
    out, out_mask = block_mean(arr, 4, mask=mask)
    assert out.shape == (10, 7, 3) and out_mask.shape == (10, 7)
    assert out_mask[0, 0] and out_mask.sum() == 1 and np.isnan(out[0, 0]).all()
    expected = np.delete(arr[8:12, 8:12].reshape(16, 3), 0, axis=0).mean(axis=0)
    np.testing.assert_allclose(out[2, 2], expected, rtol=1e-6)
    # the caller's float64 array is not written to
    before = arr.copy()
    arr[1, 1, 1] = np.nan
    before[1, 1, 1] = np.nan
    block_mean(arr, 4)
    np.testing.assert_array_equal(np.isnan(arr), np.isnan(before))


def test_clip_fast_path_does_not_read_huge_files(big_file):
    from astrovl.clip.preprocess import _read_single_fits_image

    assert _read_single_fits_image(big_file, MAX_PIXELS) is None
    assert _read_single_fits_image(big_file, SIDE * SIDE).shape == (SIDE, SIDE)


def test_napari_reader_reads_huge_images_in_strips(big_file, monkeypatch):
    from astrovl import conf
    from astrovl_napari._reader import fits_layer_data

    monkeypatch.setattr(pixel_grid, "STRIP_VALUES", 1 << 18)
    reference = load_image(big_file, max_pixels=MAX_PIXELS)
    with conf.set_temp("max_pixels", MAX_PIXELS):
        tracemalloc.start()
        try:
            (data, kwargs, _), = fits_layer_data(big_file)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(data, reference.raw)
    assert kwargs["metadata"]["astrovl"]["downsample"] == 5
    assert kwargs["scale"] == (-5.0, 5.0) and kwargs["translate"] == (-2.0, 2.0)
    assert peak < SIDE * SIDE * 4 / 5, f"peak {peak / 2**20:.1f} MiB"


def test_sampled_percentiles_within_tolerance(big_file, big_pixels):
    """The display interval of the reduced image: percentiles of a 100,000-value sample lie
    within 0.1 percentage points of the exact ones (see astrovl.imaging.scaling)."""
    img = load_image(big_file, max_pixels=MAX_PIXELS)
    values = img.raw[np.isfinite(img.raw)]
    vmin, vmax = interval_limits(img.raw, "percentile")
    lo, hi = np.mean(values < vmin) * 100, np.mean(values <= vmax) * 100
    assert abs(lo - 0.25) < 0.1 and abs(hi - 99.75) < 0.1
