"""Shared test fixtures: real telescope images shipped inside installed packages."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

try:
    from pytest_astropy_header.display import PYTEST_HEADER_MODULES

    PYTEST_HEADER_MODULES.clear()
    PYTEST_HEADER_MODULES.update({"Numpy": "numpy", "Astropy": "astropy", "Torch": "torch",
                                  "Transformers": "transformers", "open_clip": "open_clip"})
except ImportError:  # pragma: no cover
    pass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _astropy_file(*parts: str) -> Path:
    import astropy

    path = Path(astropy.__file__).parent.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"astropy test file {path.name} is not installed")
    return path


@pytest.fixture(scope="session")
def m13_path() -> Path:
    """M13 globular cluster, 300x300, uncompressed FITS with WCS (astropy test data)."""
    return _astropy_file("io", "fits", "hdu", "compressed", "tests", "data", "m13.fits")


@pytest.fixture(scope="session")
def m13_rice_path() -> Path:
    """M13, Rice tile-compressed (CompImageHDU)."""
    return _astropy_file("io", "fits", "hdu", "compressed", "tests", "data", "m13_rice.fits")


@pytest.fixture(scope="session")
def m13_gzip_path() -> Path:
    """M13, gzip tile-compressed."""
    return _astropy_file("io", "fits", "hdu", "compressed", "tests", "data", "m13_gzip.fits")


@pytest.fixture(scope="session")
def ngc1316_path() -> Path:
    """NGC 1316, 300x440, tile-compressed in extension 1 with WCS (astropy test data)."""
    return _astropy_file("io", "fits", "tests", "data", "comp.fits")


@pytest.fixture(scope="session")
def dss_path() -> Path:
    """A DSS plate cutout, gzip-compressed FITS with a table extension (astropy test data)."""
    return _astropy_file("wcs", "tests", "data", "dss.14.29.56-62.41.05.fits.gz")


@pytest.fixture(scope="session")
def acs_path() -> Path:
    """An HST ACS/WFC flt file header set with SCI/ERR/DQ extensions (astropy test data)."""
    return _astropy_file("wcs", "tests", "data", "j94f05bgq_flt.fits")


@pytest.fixture(scope="session")
def xdf_array() -> np.ndarray:
    """The Hubble eXtreme Deep Field colour image shipped with scikit-image."""
    skdata = pytest.importorskip("skimage.data")
    return skdata.hubble_deep_field()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache used (offline) by huggingface_hub for this test."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one torch thread.

    With tiny matrices, handing work between threads costs more than the work, and on
    a loaded machine a descheduled thread stalls every operation (a 64 x 64 matmul
    then takes milliseconds). Use with ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def interrupt_after_first_checkpoint(monkeypatch):
    """``run(module, train, *args, **kwargs)``: call ``train`` and stop it right after its first checkpoint.

    As a job killed mid-run: ``module.save_checkpoint`` writes the checkpoint, then
    the run ends with an exception (which ``run`` expects).
    """

    class Interrupted(Exception):
        pass

    def run(module, train, *args, **kwargs):
        save = module.save_checkpoint

        def save_then_stop(*a, **k):
            save(*a, **k)
            raise Interrupted

        with monkeypatch.context() as m:
            m.setattr(module, "save_checkpoint", save_then_stop)
            with pytest.raises(Interrupted):
                train(*args, **kwargs)

    return run


@pytest.fixture(scope="session")
def release_files(tmp_path_factory) -> dict:
    """Tiny models in the released checkpoints' exact layouts in a hub cache (built once per session).

    ``{"cache": hub cache, "root": work directory, "sources": {hub id: source directory}}``; use
    :func:`release_hub` to load them by hub id.
    """
    from astrovl.testing import make_release_hub

    root = tmp_path_factory.mktemp("releases")
    sources = make_release_hub(root / "hub-cache", root / "src")
    return {"cache": root / "hub-cache", "root": root, "sources": sources}


@pytest.fixture(scope="module")
def release_hub(release_files):
    """:func:`release_files` as the offline hub cache, with an astrovl cache shared by the modules using it."""
    import huggingface_hub.constants as hf_constants

    from astrovl import conf

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_constants, "HF_HUB_CACHE", str(release_files["cache"]))
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        with conf.set_temp("cache_dir", str(release_files["root"] / "astrovl-cache")):
            yield release_files


@pytest.fixture
def expect_warning():
    """``with expect_warning(Category, "regex"):`` — the block must warn so; other warnings follow the filters.

    Unlike ``pytest.warns``, warnings of other kinds are not re-emitted (which would lose the
    module-based ignore filters of pyproject.toml, e.g. for transformers' FutureWarnings).
    """
    import contextlib
    import re
    import warnings

    @contextlib.contextmanager
    def expect(category, match: str):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", category)
            yield caught
        messages = [str(w.message) for w in caught if issubclass(w.category, category)]
        assert any(re.search(match, m) for m in messages), f"no {category.__name__} matching {match!r}: {messages}"
        for w in caught:  # any other warning recorded is a failure, as under filterwarnings = error
            assert issubclass(w.category, category), f"unexpected {w.category.__name__}: {w.message}"

    return expect


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium driven by Selenium, one per test module (the harness is ``tests/browser.py``)."""
    from browser import chromium_driver

    driver = chromium_driver(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()
