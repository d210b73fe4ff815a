"""The WCS stays right when images are block-averaged or cut (PC/CDELT, CD matrix, SIP)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from astrovl import cutout, load_image
from astrovl.imaging.pixel_grid import downsample_wcs, header_with_wcs, strip_wcs_keywords

TOLERANCE = 0.1  # of an original pixel


def _astropy_data(*parts: str) -> Path:
    import astropy

    path = Path(astropy.__file__).parent.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"astropy test file {path.name} is not installed")
    return path


def _wcs(header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(header)


def _m13_pc_header() -> fits.Header:
    """M13 (astropy test data): a PC/CDELT-style TAN header, 300x300."""
    path = _astropy_data("io", "fits", "hdu", "compressed", "tests", "data", "m13.fits")
    header = fits.getheader(path)
    w = _wcs(header)
    assert not w.wcs.has_cd()
    # a rotation, so that a wrong matrix cannot pass by symmetry
    angle = np.deg2rad(23.0)
    header["PC1_1"], header["PC1_2"] = np.cos(angle), -np.sin(angle)
    header["PC2_1"], header["PC2_2"] = np.sin(angle), np.cos(angle)
    return header


def _m13_cd_header() -> fits.Header:
    """The same M13 WCS written as a CD matrix (no PC/CDELT keys)."""
    header = _m13_pc_header()
    w = _wcs(header)
    cd = w.wcs.get_pc() * w.wcs.cdelt[:, None]
    for key in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2"):
        header.remove(key, ignore_missing=True)
    for i in range(2):
        for j in range(2):
            header[f"CD{i + 1}_{j + 1}"] = cd[i, j]
    assert _wcs(header).wcs.has_cd()
    return header


def _acs_sip_header() -> fits.Header:
    """HST ACS/WFC SCI header (astropy test data): CD matrix with SIP distortion, 4096x2048."""
    path = _astropy_data("wcs", "tests", "data", "j94f05bgq_flt.fits")
    with fits.open(path) as hdul:
        header = hdul["SCI", 1].header.copy()
    header["NAXIS1"], header["NAXIS2"] = 4096, 2048
    w = _wcs(header)
    assert w.wcs.has_cd() and w.sip is not None
    return header


HEADERS = {
    "pc": (_m13_pc_header, (300, 300), 10_000),     # factor 3
    "cd": (_m13_cd_header, (300, 300), 2_500),      # factor 6
    "cd_sip": (_acs_sip_header, (2048, 4096), 200_000),  # factor 7
}


def _block_centre(k: int, x, y):
    """Original pixel (0-based) at the centre of block (x, y) of a grid reduced by k."""
    return k * np.asarray(x, float) + (k - 1) / 2.0, k * np.asarray(y, float) + (k - 1) / 2.0


def _check_grid(reduced: WCS, original: WCS, k: int, shape: tuple[int, int]) -> float:
    """Largest distance, in original pixels, between the reduced WCS and the original one
    at the corners and centre of the reduced grid."""
    h, w = shape
    xs = np.array([0, w - 1, 0, w - 1, (w - 1) / 2])
    ys = np.array([0, 0, h - 1, h - 1, (h - 1) / 2])
    sky = reduced.pixel_to_world(xs, ys)
    px, py = original.world_to_pixel(sky)
    ex, ey = _block_centre(k, xs, ys)
    return float(np.max(np.hypot(px - ex, py - ey)))


@pytest.mark.parametrize("style", list(HEADERS))
def test_downsampled_image_keeps_sky_positions(style, rng):
    make_header, shape, max_pixels = HEADERS[style]
    header = make_header()
    data = rng.normal(100.0, 5.0, size=shape).astype(np.float32)
    img = load_image((data, header), max_pixels=max_pixels)
    k = img.meta["downsample"]
    assert k > 1
    assert img.shape == (shape[0] // k, shape[1] // k)
    original = _wcs(header)
    assert (img.wcs.sip is not None) == (original.sip is not None)  # SIP kept, rescaled
    assert img.wcs.pixel_shape == (img.shape[1], img.shape[0])
    assert _check_grid(img.wcs, original, k, img.shape) < TOLERANCE
    # the header written from the reduced WCS describes the same grid, with no stale keys
    written = header_with_wcs(header, img.wcs)
    assert _check_grid(_wcs(written), original, k, img.shape) < TOLERANCE
    assert not any(key.startswith("CD") and key[2:3].isdigit() for key in written)


def test_plain_slice_is_wrong_for_cd_matrix():
    """What downsample_wcs corrects: astropy's slice scales CDELT, which a CD matrix overrides."""
    header = _m13_cd_header()
    original = _wcs(header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = original.slice((slice(None, None, 6), slice(None, None, 6)))
    assert _check_grid(naive, original, 6, (50, 50)) > 10.0
    assert _check_grid(downsample_wcs(original, 6), original, 6, (50, 50)) < 1e-6


def test_sip_coefficients_are_rescaled():
    header = _acs_sip_header()
    original = _wcs(header)
    reduced = downsample_wcs(original, 8, (256, 512))
    a, b = original.sip.a, reduced.sip.a
    p, q = np.indices(a.shape)
    np.testing.assert_allclose(b, a * 8.0 ** (p + q - 1))
    assert reduced.pixel_shape == (512, 256)
    # dense check over the whole grid, not only corners
    ys, xs = np.mgrid[0:256:15, 0:512:15]
    px, py = original.world_to_pixel(reduced.pixel_to_world(xs.ravel(), ys.ravel()))
    ex, ey = _block_centre(8, xs.ravel(), ys.ravel())
    assert np.max(np.hypot(px - ex, py - ey)) < TOLERANCE


@pytest.mark.parametrize("style", ["pc", "cd", "cd_sip"])
def test_cutout_header_has_no_stale_wcs_keys(style, rng):
    make_header, shape, _ = HEADERS[style]
    header = make_header()
    data = rng.normal(100.0, 5.0, size=shape).astype(np.float32)
    cut = cutout((data, header), (shape[1] // 3, shape[0] // 2), (40, 60))
    keys = set(cut.header.keys())
    # astropy writes PC/CDELT: no CD keys of the input may stay next to them
    assert not {k for k in keys if k[:2] == "CD" and k[2:3].isdigit()}
    assert {"PC1_1", "CRPIX1", "CRVAL1"} <= keys or {"CRPIX1", "CDELT1"} <= keys
    from_header = _wcs(cut.header)
    xs, ys = np.array([0.0, 59.0, 30.0]), np.array([0.0, 39.0, 20.0])
    px, py = from_header.world_to_pixel(cut.wcs.pixel_to_world(xs, ys))
    assert np.max(np.hypot(px - xs, py - ys)) < 1e-3
    # and the cutout grid sits where it was cut from in the original image
    x0, y0 = cut.meta["bbox"][1][0], cut.meta["bbox"][0][0]
    px, py = _wcs(header).world_to_pixel(from_header.pixel_to_world(xs, ys))
    assert np.max(np.hypot(px - (xs + x0), py - (ys + y0))) < TOLERANCE


def test_cutout_of_downsampled_image(rng):
    header = _m13_cd_header()
    data = rng.normal(100.0, 5.0, size=(300, 300)).astype(np.float32)
    small = load_image((data, header), max_pixels=2_500)
    k = small.meta["downsample"]
    cut = cutout(small, (25, 25), (20, 20))
    x0, y0 = cut.meta["bbox"][1][0], cut.meta["bbox"][0][0]
    xs, ys = np.array([0.0, 19.0]), np.array([0.0, 19.0])
    px, py = _wcs(header).world_to_pixel(_wcs(cut.header).pixel_to_world(xs, ys))
    ex, ey = _block_centre(k, xs + x0, ys + y0)
    assert np.max(np.hypot(px - ex, py - ey)) < TOLERANCE


def test_strip_wcs_keywords_keeps_other_cards():
    header = _acs_sip_header()
    stripped = strip_wcs_keywords(header)
    for key in ("CD1_1", "CD1_1O", "CRPIX1", "CTYPE1", "A_ORDER", "A_2_0", "B_0_2", "WCSNAME"):
        assert key in header and key not in stripped
    for key in ("NAXIS1", "EXTNAME", "BUNIT"):
        if key in header:
            assert stripped[key] == header[key]
    assert _wcs(stripped).has_celestial is False


@pytest.mark.parametrize("style", ["pc", "cd"])
def test_napari_layer_of_downsampled_image_maps_to_sky(style, tmp_path, rng):
    from astrovl_napari._reader import fits_layer_data

    make_header, shape, max_pixels = HEADERS[style]
    header = make_header()
    path = tmp_path / f"{style}.fits"
    fits.PrimaryHDU(rng.normal(100.0, 5.0, size=shape).astype(np.float32), header).writeto(path)
    from astrovl import conf

    with conf.set_temp("max_pixels", max_pixels):
        (data, kwargs, _), = fits_layer_data(path)
    k = kwargs["metadata"]["astrovl"]["downsample"]
    assert k > 1 and data.shape == (shape[0] // k, shape[1] // k)
    scale, translate = np.asarray(kwargs["scale"]), np.asarray(kwargs["translate"])
    original = _wcs(header)
    layer_wcs = kwargs["metadata"]["wcs"]
    h, w = data.shape
    rows = np.array([0, 0, h - 1, h - 1, (h - 1) / 2])
    cols = np.array([0, w - 1, 0, w - 1, (w - 1) / 2])
    # napari world = data * scale + translate; world is (-row, column) of the full grid
    world_row = rows * scale[0] + translate[0]
    world_col = cols * scale[1] + translate[1]
    sky_original = original.pixel_to_world(world_col, -world_row)
    px, py = original.world_to_pixel(layer_wcs.pixel_to_world(cols, rows))
    ox, oy = original.world_to_pixel(sky_original)
    assert np.max(np.hypot(px - ox, py - oy)) < TOLERANCE


def test_napari_region_of_downsampled_cd_layer(tmp_path, rng):
    """A region sent to a model from a downsampled layer: its header holds the region's WCS only."""
    from astrovl import conf
    from astrovl_napari._reader import fits_layer_data
    from astrovl_napari._regions import BBox, RegionRequest

    header = _m13_cd_header()
    path = tmp_path / "cd.fits"
    fits.PrimaryHDU(rng.normal(100.0, 5.0, size=(300, 300)).astype(np.float32), header).writeto(path)
    with conf.set_temp("max_pixels", 2_500):
        (data, kwargs, _), = fits_layer_data(path)
    meta = kwargs["metadata"]
    k = meta["astrovl"]["downsample"]
    request = RegionRequest(data=data, name="cd", bbox=BBox(10, 30, 5, 25), wcs=meta["wcs"],
                            header=meta["header"], origin="lower")
    image = request.load()
    assert not {key for key in image.header if key[:2] == "CD" and key[2:3].isdigit()}
    xs, ys = np.array([0.0, 19.0]), np.array([0.0, 19.0])
    px, py = _wcs(header).world_to_pixel(_wcs(image.header).pixel_to_world(xs, ys))
    ex, ey = _block_centre(k, xs + 5, ys + 10)
    assert np.max(np.hypot(px - ex, py - ey)) < TOLERANCE
