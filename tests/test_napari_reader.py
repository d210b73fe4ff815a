"""The napari reader (no viewer): FITS files -> image layer data, and the plugin manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.visualization import PercentileInterval
from astropy.wcs import WCS

from astrovl.exceptions import ImageFileError, ImageInputError
from astrovl_napari import fits_layer_data, image_layer_data, napari_get_reader, read_fits
from astrovl_napari._reader import FITS_PATTERNS, contrast_limits_for, list_image_hdus

MANIFEST = Path(__file__).parent.parent / "astrovl_napari" / "napari.yaml"


@pytest.fixture
def mef_path(tmp_path, m13_path):
    """A multi-extension file: empty primary, SCI,1 (with WCS), ERR, DQ, a table and SCI,2."""
    with fits.open(m13_path) as hdul:
        data = hdul[0].data.astype(np.float32)
        header = hdul[0].header.copy()
    wcs_header = WCS(header).celestial.to_header()
    sci1 = fits.ImageHDU(data, header=wcs_header, name="SCI", ver=1)
    err = fits.ImageHDU(np.sqrt(np.abs(data)) + 1, name="ERR", ver=1)
    dq = fits.ImageHDU((data > np.median(data)).astype(np.int16), name="DQ", ver=1)
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=[1.0, 2.0])],
                                          name="CAT")
    sci2 = fits.ImageHDU(data[::-1].copy(), header=wcs_header, name="SCI", ver=2)
    path = tmp_path / "mef.fits"
    fits.HDUList([fits.PrimaryHDU(), sci1, err, dq, table, sci2]).writeto(path)
    return path


def test_get_reader_accepts_fits_names_only():
    for name in ("a.fits", "b.FITS", "c.fit", "d.fts", "e.fits.gz", "f.fz", "g.Fits.Gz"):
        assert napari_get_reader(name) is read_fits, name
    assert napari_get_reader(["a.fits", "b.fits.gz"]) is read_fits
    for bad in ("a.png", "b.jpg", "fits", ["a.fits", "b.png"], [], "a.fits.txt"):
        assert napari_get_reader(bad) is None, bad


def test_m13_layer_raw_values_contrast_and_wcs(m13_path):
    layers = read_fits(str(m13_path))
    assert len(layers) == 1
    data, kwargs, kind = layers[0]
    assert kind == "image"
    raw = fits.getdata(m13_path).astype(np.float32)
    np.testing.assert_array_equal(data, raw)  # not flipped, not scaled
    vmin, vmax = PercentileInterval(99.5).get_limits(raw[np.isfinite(raw)])
    np.testing.assert_allclose(kwargs["contrast_limits"], [vmin, vmax], rtol=1e-6)
    assert kwargs["name"] == "m13"
    assert kwargs["scale"] == (-1.0, 1.0)  # row 0 shows at the bottom
    assert kwargs["rgb"] is False and kwargs["colormap"] == "gray"
    meta = kwargs["metadata"]
    assert isinstance(meta["header"], fits.Header) and meta["header"]["NAXIS1"] == 300
    wcs = meta["wcs"]
    assert wcs is not None and wcs.has_celestial
    np.testing.assert_allclose(wcs.wcs.crval, WCS(fits.getheader(m13_path)).celestial.wcs.crval)
    info = meta["astrovl"]
    assert info["hdu"] == 0 and info["origin"] == "lower" and info["downsample"] == 1
    assert info["stretch"] == "asinh" and info["interval"] == "percentile"


def test_compressed_extension(ngc1316_path):
    (data, kwargs, _), = read_fits(ngc1316_path)
    assert data.shape == (300, 440) and data.dtype == np.float32
    assert kwargs["name"] == "comp"
    assert kwargs["metadata"]["astrovl"]["hdu"] == 1
    with fits.open(ngc1316_path) as hdul:
        np.testing.assert_allclose(data, hdul[1].data.astype(np.float32))
        np.testing.assert_allclose(kwargs["metadata"]["wcs"].wcs.crval, WCS(hdul[1].header).celestial.wcs.crval)


def test_multi_extension_file_opens_each_image_hdu(mef_path):
    hdus = list_image_hdus(mef_path)
    assert [(i, n, v) for i, n, v, _ in hdus] == [(1, "SCI", 1), (2, "ERR", 1), (3, "DQ", 1),
                                                 (5, "SCI", 2)]
    layers = fits_layer_data(mef_path)
    names = [kw["name"] for _, kw, _ in layers]
    assert names == ["mef [SCI,1]", "mef [ERR]", "mef [DQ]", "mef [SCI,2]"]
    visible = [kw["visible"] for _, kw, _ in layers]
    assert visible == [True, False, False, True]  # auxiliary planes start hidden
    with fits.open(mef_path) as hdul:
        for (data, kw, _), (index, *_rest) in zip(layers, hdus):
            assert kw["metadata"]["astrovl"]["hdu"] == index
            np.testing.assert_array_equal(data, hdul[index].data.astype(np.float32))
        np.testing.assert_allclose(layers[0][1]["metadata"]["wcs"].wcs.crval,
                                   WCS(hdul[1].header).celestial.wcs.crval)
    assert layers[1][1]["metadata"]["wcs"] is None


def test_cube_and_colour_cube(tmp_path, rng):
    cube = rng.normal(100, 5, size=(5, 40, 30)).astype(np.float32)
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(cube).writeto(path)
    (data, kwargs, _), = read_fits(path)
    assert data.shape == (5, 40, 30)
    np.testing.assert_array_equal(data, cube)
    assert kwargs["scale"] == (1.0, -1.0, 1.0) and kwargs["rgb"] is False

    colour = rng.uniform(0, 1000, size=(3, 20, 24)).astype(np.float32)
    path3 = tmp_path / "colour.fits.gz"
    fits.PrimaryHDU(colour).writeto(path3)
    (data3, kwargs3, _), = read_fits(path3)
    assert data3.shape == (20, 24, 3) and kwargs3["rgb"] is True
    np.testing.assert_array_equal(data3[..., 1], colour[1])
    assert kwargs3["name"] == "colour"
    assert "colormap" not in kwargs3


def test_bad_files(tmp_path, m13_path):
    table_only = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column(name="a", format="J", array=[1, 2])])]).writeto(table_only)
    with pytest.raises(ImageInputError, match="no image HDU"):
        read_fits(table_only)
    with pytest.raises(ImageFileError, match="does not exist"):
        read_fits(tmp_path / "missing.fits")
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(m13_path.read_bytes()[:5000])
    with pytest.raises(ImageFileError, match="truncated or corrupt"):
        read_fits(truncated)
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"not a fits file at all" * 10)
    with pytest.raises(ImageFileError):
        read_fits(garbage)


def test_contrast_limits_rules():
    assert contrast_limits_for(np.full((4, 4), 7.0)) == (7.0, 8.0)
    arr = np.arange(100, dtype=float).reshape(10, 10)
    arr[0, 0] = np.nan
    lo, hi = contrast_limits_for(arr, interval="minmax")
    assert (lo, hi) == (1.0, 99.0)
    mask = arr > 50
    assert contrast_limits_for(arr, interval="minmax", mask=mask) == (1.0, 50.0)
    assert contrast_limits_for(np.full((3, 3), np.nan)) == (0.0, 1.0)


def test_picture_layer_data(tmp_path, xdf_array):
    from PIL import Image

    path = tmp_path / "xdf.png"
    Image.fromarray(xdf_array).save(path)
    (data, kwargs, _), = image_layer_data(path)
    assert data.dtype == np.uint8 and kwargs["rgb"] is True
    np.testing.assert_array_equal(data, xdf_array)  # pictures keep row 0 at the top
    assert kwargs["contrast_limits"] == [0, 255]
    assert kwargs["metadata"]["astrovl"]["origin"] == "upper"


def test_manifest_is_valid_and_points_at_code():
    import npe2

    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "astrovl"
    assert {w.display_name for w in manifest.contributions.widgets} == {
        "Caption & Ask", "Search", "Classify"}
    (reader,) = manifest.contributions.readers
    assert set(reader.filename_patterns) == set(FITS_PATTERNS)
    for cmd in manifest.contributions.commands:
        module, _, attr = cmd.python_name.partition(":")
        imported = __import__(module, fromlist=[attr])
        assert callable(getattr(imported, attr)), cmd.python_name


@pytest.fixture
def cube_mef_path(tmp_path, rng):
    """A cube of 6 planes with NaNs, a 2-D SCI image and a colour cube, in one file."""
    cube = rng.normal(100, 5, size=(6, 50, 40)).astype(np.float32)
    cube[2, :5, :5] = np.nan
    sci = rng.gamma(2.0, 30.0, size=(50, 40)).astype(np.float32)
    colour = rng.uniform(0, 1000, size=(3, 20, 24)).astype(np.float32)
    path = tmp_path / "cube_mef.fits"
    fits.HDUList([fits.PrimaryHDU(cube), fits.ImageHDU(sci, name="SCI"),
                  fits.ImageHDU(colour, name="RGB")]).writeto(path)
    return path, cube, sci


def test_a_file_is_read_once_for_all_hdus_and_planes(cube_mef_path, monkeypatch):
    import astropy.io.fits

    path, cube, sci = cube_mef_path
    opened = []
    real_open = astropy.io.fits.open

    def counting_open(*args, **kwargs):
        opened.append(args[0] if args else kwargs.get("name"))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(astropy.io.fits, "open", counting_open)
    layers = read_fits(path)
    assert len(opened) == 1
    assert [kw["name"] for _, kw, _ in layers] == ["cube_mef [0]", "cube_mef [SCI]", "cube_mef [RGB]"]
    data, kwargs, _ = layers[0]
    assert data.shape == (6, 50, 40) and kwargs["scale"] == (1.0, -1.0, 1.0)  # one layer, a slider
    np.testing.assert_array_equal(data, cube)
    vmin, vmax = PercentileInterval(99.5).get_limits(cube[np.isfinite(cube)])
    np.testing.assert_allclose(kwargs["contrast_limits"], [vmin, vmax], rtol=1e-6)
    np.testing.assert_array_equal(layers[1][0], sci)
    assert layers[2][0].shape == (20, 24, 3) and layers[2][1]["rgb"] is True


def test_cube_planes_equal_load_image_planes_with_downsampling(cube_mef_path):
    from astrovl import conf, load_image

    path, cube, _ = cube_mef_path
    with conf.set_temp("max_pixels", 500):  # 2000-pixel planes: factor 2
        (data, kwargs, _), *_ = read_fits(path)
        planes = [load_image(path, hdu=0, plane=k) for k in range(cube.shape[0])]
    assert kwargs["metadata"]["astrovl"]["downsample"] == planes[0].meta["downsample"] == 2
    np.testing.assert_array_equal(data, np.stack([p.raw for p in planes]))
    assert kwargs["metadata"]["wcs"] is None and kwargs["metadata"]["header"]["NAXIS3"] == 6
