"""Tests of the image input layer: load_image, AstroImage, scaling, make_rgb and cutout.

Real telescope images ship inside installed packages (see conftest.py); values are
compared with what astropy itself computes for the same data.
"""

from __future__ import annotations

import gc
import gzip
import shutil
import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy import visualization as vis
from astropy.io import fits
from astropy.nddata import CCDData, Cutout2D, NDData, block_reduce
from astropy.wcs import WCS
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from astrovl import conf, cutout, load_image, make_rgb
from astrovl.exceptions import AstroVLError, ImageFileError, ImageInputError
from astrovl.imaging import AstroImage, get_interval, get_stretch, scale_to_unit

PIXELS = [(0, 0), (17, 211), (150.5, 149.5), (299, 299)]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def m13(m13_path):
    """M13 pixels and header read directly with astropy."""
    with fits.open(m13_path) as hdul:
        return hdul[0].data.astype(np.float64), hdul[0].header.copy()


def _reference_wcs(header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(header).celestial


def _astropy_scaled(data, stretch, interval, valid=None):
    """What astropy.visualization gives for the same data (interval on valid pixels)."""
    values = data[np.isfinite(data)] if valid is None else data[valid]
    vmin, vmax = interval.get_limits(values)
    norm = vis.ImageNormalize(vmin=vmin, vmax=vmax, stretch=stretch, clip=True)
    return np.asarray(norm(np.where(np.isfinite(data), data, vmin)).filled(0.0))


def _assert_same_sky(wcs_a, wcs_b, pixels=PIXELS, tol_arcsec=1e-6):
    for x, y in pixels:
        a = wcs_a.pixel_to_world(x, y)
        b = wcs_b.pixel_to_world(x, y)
        assert a.separation(b).to_value(u.arcsec) < tol_arcsec, (x, y, a, b)


def _assert_unit_image(img, shape):
    assert isinstance(img, AstroImage)
    assert img.data.shape == shape
    assert img.data.dtype == np.float32
    assert np.isfinite(img.data).all()
    assert img.data.min() >= 0.0 and img.data.max() <= 1.0


# --------------------------------------------------------------------------- FITS inputs


FITS_KINDS = [
    "str", "path", "gzip", "rice", "gzip-tiles", "hdulist", "primaryhdu", "imagehdu",
    "compimagehdu", "nddata", "ccddata", "tuple-header", "tuple-wcs", "astroimage",
]


def _make_fits_input(kind, m13_path, m13_rice_path, m13_gzip_path, tmp_path, data, header):
    if kind == "str":
        return str(m13_path)
    if kind == "path":
        return m13_path
    if kind == "gzip":
        target = tmp_path / "m13.fits.gz"
        with open(m13_path, "rb") as src, gzip.open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return target
    if kind == "rice":
        return m13_rice_path
    if kind == "gzip-tiles":
        return m13_gzip_path
    if kind == "hdulist":
        return fits.HDUList([fits.PrimaryHDU(data, header)])
    if kind == "primaryhdu":
        return fits.PrimaryHDU(data, header)
    if kind == "imagehdu":
        return fits.ImageHDU(data, header, name="SCI")
    if kind == "compimagehdu":
        with fits.open(m13_rice_path) as hdul:
            return fits.CompImageHDU(hdul[1].data.copy(), hdul[1].header.copy())
    if kind == "nddata":
        return NDData(data, wcs=_reference_wcs(header))
    if kind == "ccddata":
        return CCDData(data, unit="adu", wcs=_reference_wcs(header))
    if kind == "tuple-header":
        return (data, header)
    if kind == "tuple-wcs":
        return (data, _reference_wcs(header))
    if kind == "astroimage":
        return load_image(m13_path, stretch="linear")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", FITS_KINDS)
def test_fits_input_kinds_keep_pixels_wcs_and_scale(kind, m13, m13_path, m13_rice_path,
                                                    m13_gzip_path, tmp_path):
    data, header = m13
    obj = _make_fits_input(kind, m13_path, m13_rice_path, m13_gzip_path, tmp_path, data, header)
    img = load_image(obj)

    _assert_unit_image(img, (300, 300))
    assert not img.is_color
    # the pixels are M13's (the tile compressions of this integer image are lossless)
    np.testing.assert_array_equal(img.raw, data.astype(np.float32))
    # the WCS maps pixels to the same sky positions as astropy's own WCS of the header
    assert img.wcs is not None and img.wcs.pixel_shape == (300, 300)
    _assert_same_sky(img.wcs, _reference_wcs(header))
    # default scaling: asinh over PercentileInterval(99.5), the 0.25-99.75 percentiles
    expected = _astropy_scaled(data, vis.AsinhStretch(), vis.PercentileInterval(99.5))
    np.testing.assert_allclose(img.data, expected, atol=2e-6)
    assert img.meta["stretch"] == "asinh" and img.meta["interval"] == "percentile"
    assert img.meta["origin"] == "lower"
    assert img.mask is None


@pytest.mark.parametrize("kind", ["str", "gzip", "rice", "hdulist"])
def test_fits_source_and_header(kind, m13, m13_path, m13_rice_path, m13_gzip_path, tmp_path):
    data, header = m13
    obj = _make_fits_input(kind, m13_path, m13_rice_path, m13_gzip_path, tmp_path, data, header)
    img = load_image(obj)
    hdu_index = 1 if kind == "rice" else 0
    assert img.meta["hdu"] == hdu_index
    assert img.source.endswith(f"[{hdu_index}]")
    if kind != "hdulist":
        assert str(obj) in img.source
    assert img.header["CTYPE1"] == header["CTYPE1"]
    assert img.header["CRVAL2"] == header["CRVAL2"]


def test_nddata_header_in_meta_is_kept(m13):
    data, header = m13
    img = load_image(NDData(data, meta=header))
    assert img.header["CRVAL1"] == header["CRVAL1"]
    _assert_same_sky(img.wcs, _reference_wcs(header))


def test_ngc1316_uses_the_compressed_extension(ngc1316_path):
    with fits.open(ngc1316_path) as hdul:
        expected = hdul[1].data.astype(np.float32)
        ref = _reference_wcs(hdul[1].header)
    img = load_image(ngc1316_path)
    _assert_unit_image(img, (300, 440))
    assert img.meta["hdu"] == 1
    np.testing.assert_array_equal(img.raw, expected)
    _assert_same_sky(img.wcs, ref, pixels=[(0, 0), (439, 299), (120.25, 33.5)])
    # hdu= by index and by EXTNAME give the same image
    by_name = load_image(ngc1316_path, hdu="COMPRESSED_IMAGE")
    np.testing.assert_array_equal(by_name.raw, img.raw)


def test_dss_gzip_file_with_table_extension(dss_path):
    with fits.open(dss_path) as hdul:
        expected = hdul[0].data.astype(np.float32)
        ref = _reference_wcs(hdul[0].header)
    img = load_image(dss_path)
    assert img.meta["hdu"] == 0
    np.testing.assert_array_equal(img.raw, expected)
    _assert_same_sky(img.wcs, ref, pixels=[(0, 0), (99, 99), (50, 3)])


def test_acs_file_with_two_chips_asks_for_one_and_keeps_sip(acs_path):
    with pytest.raises(ImageInputError, match=r"2 SCI images .*hdu=\('SCI', 1\), hdu=\('SCI', 2\)"):
        load_image(acs_path)
    img = load_image(acs_path, hdu=1)
    assert img.meta["hdu"] == 1 and img.meta["extname"] == "SCI"
    assert img.wcs.sip is not None
    with fits.open(acs_path) as hdul:
        ref = WCS(hdul[1].header, hdul)
        fourth = hdul[4].data.astype(np.float32)
    _assert_same_sky(img.wcs, ref, pixels=[(0, 0), (2047, 1023), (10, 4000)])
    # the second chip can be chosen explicitly
    chip2 = load_image(acs_path, hdu=("SCI", 2))
    assert chip2.meta["hdu"] == ("SCI", 2)
    np.testing.assert_array_equal(chip2.raw, fourth)


def test_fits_cube_plane_selection_keeps_celestial_wcs(m13, tmp_path):
    data, header = m13
    cube = np.stack([data, 2 * data, 3 * data, 4 * data])
    hdr = header.copy()
    hdr["NAXIS"] = 3
    hdr["NAXIS3"] = 4
    hdr["CTYPE3"] = "FREQ"
    hdr["CRVAL3"] = 1.4e9
    hdr["CDELT3"] = 1e6
    hdr["CRPIX3"] = 1.0
    hdr["CUNIT3"] = "Hz"
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(cube, hdr).writeto(path)

    img = load_image(path, plane=2)
    np.testing.assert_array_equal(img.raw, (3 * data).astype(np.float32))
    assert img.wcs.naxis == 2
    _assert_same_sky(img.wcs, _reference_wcs(header))
    last = load_image(path, plane=-1)
    np.testing.assert_array_equal(last.raw, (4 * data).astype(np.float32))
    with pytest.raises(ImageInputError, match=r"4 planes; choose one with plane="):
        load_image(path)
    with pytest.raises(ImageInputError, match=r"plane=4 is out of range"):
        load_image(path, plane=4)


def test_three_plane_cube_is_colour_and_single_plane_cube_is_grey(m13):
    data, header = m13
    cube = np.stack([data, 0.5 * data, 0.25 * data])
    img = load_image((cube, header))
    assert img.is_color and img.shape == (300, 300, 3)
    np.testing.assert_array_equal(img.raw[..., 1], (0.5 * data).astype(np.float32))
    single = load_image(data[None])
    assert single.shape == (300, 300)
    four = load_image(data[None, None])
    np.testing.assert_array_equal(four.raw, data.astype(np.float32))


# --------------------------------------------------------------------------- arrays and pictures


def test_2d_array(rng):
    arr = rng.normal(100.0, 5.0, size=(37, 53))
    img = load_image(arr)
    _assert_unit_image(img, (37, 53))
    assert img.wcs is None and img.header is None
    assert img.source == "<ndarray (37, 53)>"
    expected = _astropy_scaled(arr, vis.AsinhStretch(), vis.PercentileInterval(99.5))
    np.testing.assert_allclose(img.data, expected, atol=2e-6)


def test_array_cube_planes(rng):
    cube = rng.normal(size=(5, 12, 14))
    for p in (0, 3, -1):
        img = load_image(cube, plane=p, stretch="linear", interval="minmax")
        np.testing.assert_array_equal(img.raw, cube[p].astype(np.float32))
        assert img.data.min() == 0.0 and img.data.max() == 1.0


def test_uint8_colour_array_is_divided_by_255(xdf_array):
    img = load_image(xdf_array)
    assert img.is_color and img.shape == xdf_array.shape
    np.testing.assert_allclose(img.data, xdf_array / 255.0, atol=1e-6)
    assert img.meta["origin"] == "upper" and img.meta["interval"] == "uint8/255"
    # picked back as uint8 without a flip: row 0 stays at the top
    np.testing.assert_array_equal(img.to_uint8(), xdf_array)
    # explicit scaling rescales the picture like any other data
    lin = load_image(xdf_array, stretch="linear", interval="minmax")
    lo, hi = xdf_array.min(), xdf_array.max()
    np.testing.assert_allclose(lin.data, (xdf_array - lo) / (hi - lo), atol=1e-6)


def test_plane_of_colour_array_is_a_channel(xdf_array):
    img = load_image(xdf_array, plane=1)
    assert not img.is_color and img.shape == xdf_array.shape[:2]
    np.testing.assert_allclose(img.data, xdf_array[..., 1] / 255.0, atol=1e-6)
    with pytest.raises(ImageInputError, match="out of range for a colour image of 3 channels"):
        load_image(xdf_array, plane=3)


def test_rgba_array_drops_alpha(xdf_array):
    small = xdf_array[:40, :50]
    rgba = np.dstack([small, np.full(small.shape[:2], 7, np.uint8)])
    img = load_image(rgba)
    assert img.shape == (40, 50, 3)
    np.testing.assert_allclose(img.data, small / 255.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "I;16"])
def test_pil_images(mode, xdf_array):
    from PIL import Image

    base = Image.fromarray(xdf_array[:64, :80])
    im = base.convert(mode) if mode != "I;16" else Image.fromarray(
        xdf_array[:64, :80, 0].astype(np.uint16) * 200)
    img = load_image(im)
    assert img.meta["origin"] == "upper"
    assert img.source.startswith("<PIL.Image")
    if mode == "RGB":
        np.testing.assert_allclose(img.data, np.asarray(im) / 255.0, atol=1e-6)
    elif mode == "L":
        assert img.shape == (64, 80)
        np.testing.assert_allclose(img.data, np.asarray(im) / 255.0, atol=1e-6)
    elif mode == "P":
        assert img.shape == (64, 80, 3)
        np.testing.assert_allclose(img.data, np.asarray(im.convert("RGB")) / 255.0, atol=1e-6)
    else:  # 16-bit pictures are scientific data: default asinh scaling
        arr = np.asarray(im, dtype=np.float64)
        np.testing.assert_array_equal(img.raw, arr.astype(np.float32))
        expected = _astropy_scaled(arr, vis.AsinhStretch(), vis.PercentileInterval(99.5))
        np.testing.assert_allclose(img.data, expected, atol=2e-6)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tiff"])
def test_picture_files(suffix, xdf_array, tmp_path):
    from PIL import Image

    path = tmp_path / f"xdf{suffix}"
    Image.fromarray(xdf_array).save(path)
    img = load_image(path)
    assert img.source == str(path)
    assert img.shape == xdf_array.shape
    with Image.open(path) as im:
        decoded = np.asarray(im.convert("RGB"))
    np.testing.assert_allclose(img.data, decoded / 255.0, atol=1e-6)
    if suffix != ".jpg":  # lossless formats give the pixels back
        np.testing.assert_array_equal(decoded, xdf_array)
    # to_pil gives the same picture back (no vertical flip for pictures)
    np.testing.assert_array_equal(np.asarray(img.to_pil()), decoded)


def test_fits_to_uint8_and_pil_are_flipped_right_way_up(m13_path):
    img = load_image(m13_path)
    u8 = img.to_uint8()
    np.testing.assert_array_equal(u8, np.clip(np.rint(img.data * 255), 0, 255)[::-1])
    pil = img.to_pil()
    assert pil.size == (300, 300) and pil.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil)[..., 2], u8)
    np.testing.assert_array_equal(np.asarray(img.to_pil("L")), u8)
    with pytest.raises(ValueError, match="mode='CMYK'"):
        img.to_pil("CMYK")


def test_astroimage_round_trip_keeps_picture_scaling(xdf_array):
    pic = load_image(xdf_array[:50, :60])
    again = load_image(pic)
    np.testing.assert_array_equal(again.data, pic.data)
    assert again.is_color


def test_colour_astroimage_with_header_can_be_rescaled(m13):
    data, header = m13
    rgb = make_rgb([(data, header), (0.5 * data, header), (0.2 * data, header)])
    lin = load_image(rgb, stretch="linear", interval="minmax")
    assert lin.is_color and lin.shape == (300, 300, 3)
    stack = rgb.raw.astype(np.float64)
    expected = (stack - stack.min()) / (stack.max() - stack.min())
    np.testing.assert_allclose(lin.data, expected, atol=2e-6)


# --------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("stretch, stretch_obj", [
    ("linear", vis.LinearStretch()), ("asinh", vis.AsinhStretch()), ("sqrt", vis.SqrtStretch()),
    ("log", vis.LogStretch()), (vis.AsinhStretch(a=0.02), vis.AsinhStretch(a=0.02)),
])
@pytest.mark.parametrize("interval, interval_obj", [
    ("percentile", vis.PercentileInterval(99.5)), ("minmax", vis.MinMaxInterval()),
    ("zscale", vis.ZScaleInterval()), (95.0, vis.PercentileInterval(95.0)),
    ((100.0, 3000.0), vis.ManualInterval(100.0, 3000.0)),
])
def test_stretch_and_interval_match_astropy(stretch, stretch_obj, interval, interval_obj, m13):
    data, _ = m13
    img = load_image(data, stretch=stretch, interval=interval)
    expected = _astropy_scaled(data, stretch_obj, interval_obj)
    np.testing.assert_allclose(img.data, expected, atol=2e-6)
    _assert_unit_image(img, (300, 300))


def test_options_change_values(m13):
    data, _ = m13
    asinh = load_image(data).data
    linear = load_image(data, stretch="linear").data
    zscale = load_image(data, interval="zscale").data
    # asinh lifts the faint end above the linear stretch on the same interval
    faint = (linear > 0.01) & (linear < 0.2)
    assert faint.sum() > 100
    assert np.all(asinh[faint] > linear[faint])
    assert np.abs(zscale - asinh).max() > 0.1


def test_conf_defaults_are_used(m13):
    data, _ = m13
    with conf.set_temp("stretch", "linear"), conf.set_temp("interval", "minmax"):
        img = load_image(data)
    np.testing.assert_allclose(img.data, (data - data.min()) / (data.max() - data.min()),
                               atol=2e-6)
    assert img.meta["stretch"] == "linear"


def test_constant_image_gives_zeros_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = load_image(np.full((8, 9), 42.0))
    assert img.data.shape == (8, 9) and not img.data.any()


def test_scaling_helpers_reject_unknown_names():
    with pytest.raises(ValueError, match="stretch='gamma' is not known"):
        get_stretch("gamma")
    with pytest.raises(ValueError, match="interval='middle' is not known"):
        get_interval("middle")
    with pytest.raises(ValueError, match="must be in"):
        get_interval(150)
    with pytest.raises(ValueError, match="stretch='gamma'"):
        load_image(np.ones((3, 3)), stretch="gamma")
    power = get_stretch("power")
    assert isinstance(power, vis.PowerStretch) and power.a == 2.0
    np.testing.assert_allclose(power(np.array([0.0, 0.5, 1.0])), [0.0, 0.25, 1.0])
    manual = get_interval([1, 2])
    assert isinstance(manual, vis.ManualInterval)
    assert manual.get_limits(np.arange(10.0)) == (1.0, 2.0)


# --------------------------------------------------------------------------- NaN and masks


def test_nan_and_inf_are_zero_and_excluded_from_interval(m13):
    data, _ = m13
    bad = data.copy()
    bad[10:20, 30:40] = np.nan
    bad[200, 5] = np.inf
    bad[201, 5] = -np.inf
    img = load_image(bad)
    invalid = ~np.isfinite(bad)
    np.testing.assert_array_equal(img.mask, invalid)
    assert not img.data[invalid].any()
    expected = _astropy_scaled(bad, vis.AsinhStretch(), vis.PercentileInterval(99.5))
    np.testing.assert_allclose(img.data[~invalid], expected[~invalid], atol=2e-6)
    _assert_unit_image(img, (300, 300))


def test_nddata_mask_is_honoured(m13):
    data, header = m13
    mask = np.zeros(data.shape, bool)
    mask[data > np.percentile(data, 99)] = True  # mask the brightest stars
    img = load_image(NDData(data, mask=mask, wcs=_reference_wcs(header)))
    np.testing.assert_array_equal(img.mask, mask)
    assert not img.data[mask].any()
    # the interval is computed on the unmasked pixels only
    expected = _astropy_scaled(data, vis.AsinhStretch(), vis.PercentileInterval(99.5),
                               valid=~mask)
    np.testing.assert_allclose(img.data[~mask], expected[~mask], atol=2e-6)
    plain = load_image(data)
    assert not np.allclose(img.data[~mask], plain.data[~mask], atol=1e-3)


def test_ccddata_mask_on_cube_plane_and_colour(rng):
    cube = rng.normal(10.0, 1.0, size=(3, 20, 30))
    mask = np.zeros(cube.shape, bool)
    mask[1, 4, 5] = True
    mask[2, 7, 8] = True
    plane = load_image(CCDData(cube, unit="adu", mask=mask), plane=1)
    assert plane.mask[4, 5] and plane.mask.sum() == 1
    colour = load_image(NDData(cube, mask=mask))
    assert colour.is_color
    # a pixel is masked when any of its bands is masked
    assert colour.mask[4, 5] and colour.mask[7, 8] and colour.mask.sum() == 2
    assert not colour.data[4, 5].any()


def test_mask_of_wrong_shape_is_rejected():
    data = np.ones((5, 5))
    nd = NDData(data)
    nd._mask = np.zeros((4, 4), bool)  # NDData itself does not check the shape
    with pytest.raises(ImageInputError, match=r"mask shape \(4, 4\) does not match"):
        load_image(nd)


# --------------------------------------------------------------------------- large images


def test_max_pixels_block_averages_and_adjusts_wcs(m13):
    data, header = m13
    img = load_image((data, header), max_pixels=10_000)
    assert img.meta["downsample"] == 3
    assert img.shape == (100, 100) and img.raw.shape == (100, 100)
    np.testing.assert_allclose(img.raw, block_reduce(data, 3, func=np.mean), rtol=1e-6)
    # new pixel (i, j) is the centre of block (3i..3i+2, 3j..3j+2) of the original grid
    ref = _reference_wcs(header)
    for x, y in [(0, 0), (10, 40), (99, 99)]:
        a = img.wcs.pixel_to_world(x, y)
        b = ref.pixel_to_world(3 * x + 1, 3 * y + 1)
        assert a.separation(b).to_value(u.arcsec) < 1e-6
    assert img.wcs.pixel_shape == (100, 100)


def test_max_pixels_non_square_and_conf(ngc1316_path):
    img = load_image(ngc1316_path, max_pixels=5_000)  # 132000 px -> factor 6
    assert img.meta["downsample"] == 6 and img.shape == (50, 73)
    with conf.set_temp("max_pixels", 40_000):
        assert load_image(ngc1316_path).meta["downsample"] == 2
    assert load_image(ngc1316_path).meta["downsample"] == 1
    tiny = load_image(ngc1316_path, max_pixels=1)  # never below one pixel
    assert min(tiny.shape) == 1
    with pytest.raises(ValueError, match="max_pixels=0"):
        load_image(ngc1316_path, max_pixels=0)


def test_max_pixels_is_nan_aware():
    arr = np.arange(36.0).reshape(6, 6)
    arr[0, 0] = np.nan
    arr[4:6, 4:6] = np.nan
    img = load_image(arr, max_pixels=9)
    assert img.shape == (3, 3)
    assert img.raw[0, 0] == pytest.approx(np.mean([1.0, 6.0, 7.0]))
    assert img.mask is not None and img.mask[2, 2] and img.mask.sum() == 1


def test_max_pixels_colour(xdf_array):
    img = load_image(xdf_array, max_pixels=xdf_array.shape[0] * xdf_array.shape[1] // 4)
    assert img.meta["downsample"] == 2 and img.is_color
    assert img.shape == (xdf_array.shape[0] // 2, xdf_array.shape[1] // 2, 3)


# --------------------------------------------------------------------------- RGB composites


def test_make_rgb_matches_astropy(m13):
    data, header = m13
    bands = [(data, header), (0.6 * data, header), (0.3 * data, header)]
    rgb = make_rgb(bands)
    assert rgb.is_color and rgb.shape == (300, 300, 3) and rgb.data.dtype == np.float32
    stack = np.stack([data, 0.6 * data, 0.3 * data], axis=-1)
    vmin, vmax = vis.PercentileInterval(99.5).get_limits(stack)
    expected = vis.make_rgb(data, 0.6 * data, 0.3 * data,
                            interval=vis.ManualInterval(vmin, vmax),
                            stretch=vis.AsinhStretch(), output_dtype=np.float64)
    np.testing.assert_allclose(rgb.data, expected, atol=2e-6)
    # red is the brightest band everywhere it is not saturated
    assert np.all(rgb.data[..., 0] >= rgb.data[..., 2])
    _assert_same_sky(rgb.wcs, _reference_wcs(header))


def test_make_rgb_lupton(m13):
    data, header = m13
    rgb = make_rgb([(data, header)] * 3, method="lupton", interval="minmax")
    vmin, vmax = data.min(), data.max()
    with np.errstate(invalid="ignore"):  # astropy divides 0 by 0 at the minimum pixel
        expected = vis.make_lupton_rgb(data, data, data, minimum=vmin,
                                       stretch=(vmax - vmin) / 5, Q=8) / 255.0
    assert (data == vmin).any()  # the case that used to raise a RuntimeWarning
    np.testing.assert_allclose(rgb.data, expected, atol=1e-6)


def test_make_rgb_reprojects_bands_with_different_wcs(m13):
    data, header = m13
    ref = _reference_wcs(header)
    # the green band covers the same sky on a grid shifted by 5 columns
    green = (data[:, 5:], ref[:, 5:])
    rgb = make_rgb([(data, ref), green, (data, ref)], stretch="linear", interval="minmax")
    np.testing.assert_allclose(rgb.raw[:, 5:, 1], data[:, 5:], rtol=1e-5)
    assert np.isnan(rgb.raw[:, :5, 1]).all()
    assert rgb.mask[:, :5].all() and not rgb.mask[:, 5:].any()
    assert not rgb.data[:, :5].any()
    with pytest.raises(ImageInputError, match="has shape"):
        make_rgb([(data, ref), green, (data, ref)], reproject=False)


def test_make_rgb_bad_inputs(m13, xdf_array):
    data, _ = m13
    with pytest.raises(ImageInputError, match="exactly three bands"):
        make_rgb([data, data])
    with pytest.raises(ImageInputError, match="has shape"):
        make_rgb([data, data[:100], data])
    with pytest.raises(ImageInputError, match="already a colour image"):
        make_rgb([xdf_array, data, data])
    with pytest.raises(ValueError, match="method='hsv'"):
        make_rgb([data, data, data], method="hsv")
    with pytest.raises(ValueError, match="reference=5"):
        make_rgb([data, data, data], reference=5)


# --------------------------------------------------------------------------- cutouts


def test_cutout_pixel_position_matches_cutout2d(m13):
    data, header = m13
    ref = _reference_wcs(header)
    out = cutout((data, header), (150, 120), (41, 31), stretch="linear", interval="minmax")
    expected = Cutout2D(data, (150, 120), (41, 31), wcs=ref)
    assert out.shape == (41, 31)
    np.testing.assert_array_equal(out.raw, expected.data.astype(np.float32))
    _assert_same_sky(out.wcs, expected.wcs, pixels=[(0, 0), (30, 40), (15, 20)])
    assert out.meta["bbox"] == expected.bbox_original
    assert out.data.min() == 0.0 and out.data.max() == 1.0
    assert "cutout(" in out.source
    # the header now describes the cutout grid
    _assert_same_sky(_reference_wcs(out.header), expected.wcs, pixels=[(0, 0), (30, 40)])


def test_cutout_sky_position_and_angular_size(m13_path, m13):
    data, header = m13
    ref = _reference_wcs(header)
    centre = ref.pixel_to_world(100.0, 180.0)
    size = (30 * u.arcsec, 1 * u.arcmin)
    out = cutout(m13_path, centre, size)
    expected = Cutout2D(data, centre, size, wcs=ref)
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out.raw, expected.data.astype(np.float32))
    _assert_same_sky(out.wcs, expected.wcs, pixels=[(0, 0), (5, 7)])
    # centre of the cutout is the requested sky position
    cx, cy = expected.input_position_cutout
    assert out.wcs.pixel_to_world(cx, cy).separation(centre).to_value(u.arcsec) < 1e-6
    # an AstroImage works too, and keeps its stretch by name
    base = load_image(m13_path, stretch="sqrt")
    again = cutout(base, centre, size)
    assert again.meta["stretch"] == "sqrt"
    np.testing.assert_array_equal(again.raw, out.raw)


def test_cutout_partial_mode_marks_outside_pixels(m13):
    data, header = m13
    out = cutout((data, header), (2, 2), 9, mode="partial")
    assert out.shape == (9, 9)
    outside = np.zeros((9, 9), bool)
    outside[:2, :] = True
    outside[:, :2] = True
    np.testing.assert_array_equal(out.mask, outside)
    assert not out.data[outside].any()
    np.testing.assert_array_equal(out.raw[2:, 2:], data[:7, :7].astype(np.float32))


def test_cutout_keeps_mask_of_base(m13):
    data, _ = m13
    mask = np.zeros(data.shape, bool)
    mask[100, 100] = True
    out = cutout(NDData(data, mask=mask), (100, 100), 5)
    assert out.mask is not None and out.mask[2, 2] and out.mask.sum() == 1


def test_cutout_of_colour_and_stretch_instance(m13_path, xdf_array):
    pic = cutout(xdf_array, (60, 40), 3)
    assert pic.is_color and pic.shape == (3, 3, 3)
    np.testing.assert_allclose(pic.data, xdf_array[39:42, 59:62] / 255.0, atol=1e-6)
    base = load_image(m13_path, stretch=vis.AsinhStretch(a=0.05))
    out = cutout(base, (150, 150), 11)  # used to fail on the recorded class name
    assert out.shape == (11, 11)


def test_cutout_bad_inputs(m13):
    data, header = m13
    sky = _reference_wcs(header).pixel_to_world(10, 10)
    with pytest.raises(ImageInputError, match="needs a celestial WCS"):
        cutout(data, sky, 5)
    with pytest.raises(ImageInputError, match="needs a celestial WCS"):
        cutout(data, (10, 10), 5 * u.arcsec)
    with pytest.raises(ImageInputError, match="does not overlap"):
        cutout(data, (1000, 1000), 5)
    with pytest.raises(ImageInputError, match="cannot cut out"):
        cutout(data, (1, 1), 5, mode="strict")


# --------------------------------------------------------------------------- bad inputs


def test_error_classes_derive_from_builtins():
    assert issubclass(ImageFileError, OSError) and issubclass(ImageFileError, AstroVLError)
    assert issubclass(ImageInputError, ValueError) and issubclass(ImageInputError, AstroVLError)


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nowhere" / "m31.fits"
    with pytest.raises(ImageFileError, match="does not exist") as info:
        load_image(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ImageFileError, match="is a directory"):
        load_image(tmp_path)


def test_text_file_named_fits(tmp_path):
    path = tmp_path / "notes.fits"
    path.write_text("this is not a FITS file\n" * 200)
    with pytest.raises(ImageFileError, match="could not be read") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_fits(m13_path, tmp_path):
    path = tmp_path / "truncated.fits"
    path.write_bytes(m13_path.read_bytes()[:100_000])

    def message():
        try:
            load_image(path)
        except ImageFileError as exc:  # the traceback is freed on leaving the handler
            return str(exc)
        return "no error"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = message()
        gc.collect()
    assert "truncated" in text and str(path) in text
    # the file is closed although astropy failed half-way through opening it
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize("name", ["noise.png", "noise.dat"])
def test_unreadable_picture(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ImageFileError, match="neither a FITS file nor a readable picture") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_fits_with_only_a_table(tmp_path):
    path = tmp_path / "catalog.fits"
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="flux", format="E", array=np.arange(5.0))], name="CAT")
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    with pytest.raises(ImageInputError, match="no HDU holds 2-D image data") as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "'CAT' BinTableHDU table of 5 rows" in message
    with pytest.raises(ImageInputError, match="is a table, not an image"):
        load_image(path, hdu="CAT")
    with pytest.raises(ImageInputError, match="holds a table, not an image"):
        load_image(table)


def test_several_image_hdus_need_a_choice(tmp_path, rng):
    path = tmp_path / "two.fits"
    a, b = rng.normal(size=(6, 7)), rng.normal(size=(6, 7))
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(a, name="BLUE"),
                  fits.ImageHDU(b, name="RED")]).writeto(path)
    with pytest.raises(ImageInputError, match="choose one with hdu=") as info:
        load_image(path)
    assert str(path) in str(info.value) and "'RED'" in str(info.value)
    np.testing.assert_array_equal(load_image(path, hdu="RED").raw, b.astype(np.float32))
    np.testing.assert_array_equal(load_image(path, hdu=1).raw, a.astype(np.float32))
    # SCI + ERR + DQ is not ambiguous: SCI is the image
    path2 = tmp_path / "sci.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(a, name="SCI"), fits.ImageHDU(b, name="ERR"),
                  fits.ImageHDU(np.zeros((6, 7), np.int16), name="DQ")]).writeto(path2)
    np.testing.assert_array_equal(load_image(path2).raw, a.astype(np.float32))


def test_wrong_hdu_index_and_name(m13_path):
    with pytest.raises(ImageInputError, match=r"hdu=5 does not exist; available HDUs") as info:
        load_image(m13_path, hdu=5)
    assert str(m13_path) in str(info.value)
    with pytest.raises(ImageInputError, match=r"hdu='SCI' does not exist"):
        load_image(m13_path, hdu="SCI")
    with fits.open(m13_path) as hdul:
        with pytest.raises(ImageInputError, match=r"<HDUList>: hdu=2 does not exist"):
            load_image(hdul, hdu=2)


def test_header_only_hdu(m13_rice_path):
    with pytest.raises(ImageInputError, match="has no data") as info:
        load_image(m13_rice_path, hdu=0)
    assert str(m13_rice_path) in str(info.value) and "hdu=1" in str(info.value)


def test_all_nan_image(tmp_path):
    with pytest.raises(ImageInputError, match="no finite, unmasked pixel") as info:
        load_image(np.full((6, 6), np.nan))
    assert "<ndarray (6, 6)>" in str(info.value)
    path = tmp_path / "blank.fits"
    fits.PrimaryHDU(np.full((6, 6), np.nan, np.float32)).writeto(path)
    with pytest.raises(ImageInputError, match="no finite, unmasked pixel") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageInputError, match="no finite, unmasked pixel"):
        load_image(NDData(np.ones((4, 4)), mask=np.ones((4, 4), bool)))
    with pytest.raises(ImageInputError, match="no finite, unmasked pixel"):
        scale_to_unit(np.full((2, 2), np.inf))


@pytest.mark.parametrize("shape, match", [
    ((7,), r"1-D array \(shape \(7,\)\) is not an image"),
    ((), r"0-D array"),
    ((1, 1, 1, 1, 4), r"5-D data"),
    ((2, 3, 4, 5), r"non-trivial 4th axis"),
])
def test_bad_dimensionality(shape, match):
    with pytest.raises(ImageInputError, match=match) as info:
        load_image(np.ones(shape))
    assert f"<ndarray {shape}>" in str(info.value)


def test_bad_plane_and_dtype():
    with pytest.raises(ImageInputError, match="plane=1 given for a 2-D image"):
        load_image(np.ones((4, 4)), plane=1)
    with pytest.raises(ImageInputError, match="is not numeric"):
        load_image(np.ones((4, 4), dtype=complex))


def test_unsupported_types():
    with pytest.raises(TypeError, match="object of type dict"):
        load_image({"data": [1, 2]})
    with pytest.raises(TypeError, match="tuple of 3 items"):
        load_image((np.ones((3, 3)), None, None))
    with pytest.raises(TypeError, match="must be an astropy Header or WCS, not str"):
        load_image((np.ones((3, 3)), "header"))


def test_malformed_wcs_is_dropped_with_a_warning():
    header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "RA---TAN"})
    with pytest.warns(UserWarning, match="WCS in the header could not be interpreted"):
        img = load_image((np.ones((4, 4)), header))
    assert img.wcs is None


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    arr=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    stretch=st.sampled_from(["asinh", "linear", "sqrt", "log"]),
    interval=st.sampled_from(["percentile", "minmax", "zscale"]),
)
def test_any_finite_2d_array_gives_unit_output(arr, stretch, interval):
    img = load_image(arr, stretch=stretch, interval=interval)
    assert img.data.shape == arr.shape
    assert img.data.dtype == np.float32
    assert np.isfinite(img.data).all()
    assert img.data.min() >= 0.0 and img.data.max() <= 1.0
    assert img.mask is None
