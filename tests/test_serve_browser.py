"""``astrovl serve`` in a real browser: headless Chromium driven by Selenium.

Skipped when Selenium, Chromium or ChromeDriver is missing (Debian packages
``chromium`` and ``chromium-driver``; CI installs them).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")

from browser import cards, images_loaded, needs_browser, serve_tiny_index, wait_for  # noqa: E402

pytestmark = needs_browser

EVIL = '<img src=x onerror="document.title=\'pwned\'">'


@pytest.fixture(scope="module")
def served(tmp_path_factory, m13_path, ngc1316_path, dss_path, xdf_array):
    """``astrovl serve`` in a subprocess over real and synthetic images, with a tiny CLIP."""
    from PIL import Image

    from astrovl import SyntheticSkyDataset

    base = tmp_path_factory.mktemp("browser")
    images = base / "images"
    images.mkdir()
    real = {"M13": shutil.copy(m13_path, images / "m13.fits"),
            "NGC 1316": shutil.copy(ngc1316_path, images / "ngc1316.fits"),
            "DSS plate": shutil.copy(dss_path, images / "dss.fits.gz")}
    Image.fromarray(xdf_array).save(images / "xdf.png")
    real["Hubble eXtreme Deep Field"] = images / "xdf.png"
    sky = SyntheticSkyDataset.generate(images / "sky", n_images=14, image_size=64, seed=4, progress=False)
    paths = [str(p) for p in real.values()] + [str(p) for p in sky.image_paths]
    names = list(real) + [f"synthetic {r['label']}" for r in sky]
    names[-1] = EVIL
    meta = Table({"path": paths, "name": names,
                  "kind": ["real"] * len(real) + ["synthetic"] * len(sky)})
    # no --model: the index loads the model it was built with from where it was recorded
    with serve_tiny_index(base, paths, meta) as server:
        yield {"url": server.url, "base": base, "names": names, "paths": paths, "proc": server.proc}


def test_search_detail_more_like_this_in_a_browser(served, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(served["url"])
    wait_for(d, lambda d: "images" in d.find_element(By.ID, "index-info").text, message="index info")
    assert f"{len(served['paths'])} images" in d.find_element(By.ID, "index-info").text
    kind_filter = d.find_element(By.ID, "filter-kind")  # filters come from the metadata columns
    assert not d.find_elements(By.ID, "filter-name")  # one name per image: not a filter
    assert [o.text for o in kind_filter.find_elements(By.TAG_NAME, "option")] == ["any", "real", "synthetic"]

    # type a query: a grid of thumbnails with scores, best first
    box = d.find_element(By.ID, "q")
    assert d.switch_to.active_element == box
    box.send_keys("a dense globular star cluster", Keys.ENTER)
    wait_for(d, lambda d: len(cards(d)) == len(served["paths"]), message="result cards")
    wait_for(d, images_loaded, message="thumbnails")
    scores = [float(c.find_element(By.CSS_SELECTOR, ".score").text) for c in cards(d)]
    assert all(-1 <= s <= 1 for s in scores) and scores == sorted(scores, reverse=True)
    assert "for “a dense globular star cluster”" in d.find_element(By.ID, "status").text
    assert "q=a+dense+globular" in d.current_url  # the address remembers the query

    # the metadata text is shown as text, never run as HTML
    labels = [c.find_element(By.CSS_SELECTOR, ".label").text for c in cards(d)]
    assert EVIL in labels
    assert d.title != "pwned" and not d.find_elements(By.CSS_SELECTOR, "img[src='x']")

    # keyboard: "/" focuses the search box, arrow down enters the grid, Enter opens the detail
    d.find_element(By.TAG_NAME, "body").send_keys("/")
    assert d.switch_to.active_element == box
    box.send_keys(Keys.ARROW_DOWN)
    first = cards(d)[0]
    assert d.switch_to.active_element == first
    d.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    assert d.switch_to.active_element == cards(d)[1]
    d.switch_to.active_element.send_keys(Keys.ARROW_LEFT, Keys.ENTER)
    detail = d.find_element(By.ID, "detail")
    wait_for(d, lambda d: detail.is_displayed() and d.find_elements(By.CSS_SELECTOR, "#detail-meta tr"),
          message="detail view")
    first_label = labels[0]
    wait_for(d, lambda d: d.find_element(By.ID, "detail-title").text == first_label, message="detail title")
    d.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait_for(d, lambda d: not detail.is_displayed(), message="detail closes on Escape")
    assert d.switch_to.active_element == cards(d)[0]  # focus returns to the card

    # open M13's detail: header and sky position from its WCS
    m13 = next(c for c in cards(d) if c.find_element(By.CSS_SELECTOR, ".label").text == "M13")
    m13.click()
    wait_for(d, lambda d: "RA 250.4" in d.find_element(By.ID, "detail-sky").text, message="sky position")
    sky = d.find_element(By.ID, "detail-sky").text
    assert "Dec +36.4" in sky and "16:41:" in sky
    header = d.find_element(By.ID, "detail-header").text
    assert "NAXIS1" in header and "CRVAL1" in header
    wait_for(d, lambda d: images_loaded(d, "#detail-image"), message="detail image")
    shot = tmp_path / "detail.png"
    assert d.save_screenshot(str(shot))

    # "more like this" from the detail view: M13 itself is left out
    d.find_element(By.ID, "more-like").click()
    wait_for(d, lambda d: "like M13" in d.find_element(By.ID, "status").text, message="more like this")
    wait_for(d, lambda d: len(cards(d)) == len(served["paths"]) - 1, message="similar results")
    wait_for(d, images_loaded, message="thumbnails of similar results")
    assert "M13" not in [c.find_element(By.CSS_SELECTOR, ".label").text for c in cards(d)]
    assert not detail.is_displayed()

    # a metadata filter narrows the results
    from selenium.webdriver.support.ui import Select

    Select(kind_filter).select_by_visible_text("real")
    wait_for(d, lambda d: len(cards(d)) == 3, message="filtered results")  # 4 real images minus M13
    assert "where kind = real" in d.find_element(By.ID, "status").text

    # search by an uploaded FITS file
    Select(kind_filter).select_by_visible_text("any")
    wait_for(d, lambda d: len(cards(d)) == len(served["paths"]) - 1)
    d.find_element(By.ID, "upload").send_keys(served["paths"][1])  # NGC 1316
    wait_for(d, lambda d: "like the uploaded ngc1316.fits" in d.find_element(By.ID, "status").text,
          message="upload search")
    wait_for(d, lambda d: cards(d) and cards(d)[0].find_element(By.CSS_SELECTOR, ".label").text == "NGC 1316")
    assert float(cards(d)[0].find_element(By.CSS_SELECTOR, ".score").text) == pytest.approx(1.0, abs=1e-3)

    # an empty query is answered on the page, not sent
    box.clear()
    d.find_element(By.ID, "search-button").click()
    assert "Type what you are looking for" in d.find_element(By.ID, "status").text

    # the whole page, with thumbnails and scores, is not blank
    box.send_keys("a dense globular star cluster", Keys.ENTER)
    wait_for(d, lambda d: "for “a dense" in d.find_element(By.ID, "status").text)
    wait_for(d, images_loaded)
    page = tmp_path / "page.png"
    assert d.save_screenshot(str(page))
    for path in (page, shot):
        pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert pixels.shape[0] > 500 and pixels.shape[1] > 1000
        assert pixels.std() > 20, f"{path.name} looks blank"
        assert len(np.unique(pixels)) > 64
    out = os.environ.get("ASTROVL_SCREENSHOT_DIR")
    if out:  # keep the screenshots for a look
        for path in (page, shot):
            shutil.copy(path, Path(out) / f"serve_{path.name}")
    assert d.title != "pwned"
    assert served["proc"].poll() is None  # the server is still running
