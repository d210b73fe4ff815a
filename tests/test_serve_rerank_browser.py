"""``astrovl serve --rerank`` in a real browser: both scores on the cards, the Re-rank switch.

Headless Chromium driven by Selenium against ``astrovl serve`` in a subprocess
with a tiny AstroLLaVA; skipped when Selenium, Chromium or ChromeDriver is missing.
"""

from __future__ import annotations

import pytest
from astropy.table import Table

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("transformers")
pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")

from browser import chromium_driver, chromium_paths  # noqa: E402

from astrovl.testing.serve import ServerProcess  # noqa: E402

CHROMIUM, CHROMEDRIVER = chromium_paths()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium and ChromeDriver on this machine (Debian: apt-get install chromium chromium-driver)")

EVIL = '<img src=x onerror="document.title=\'pwned\'">'


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from astrovl import SyntheticSkyDataset
    from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex
    from astrovl.testing.llava import make_tiny_llava

    base = tmp_path_factory.mktemp("rerank-browser")
    sky = SyntheticSkyDataset.generate(base / "images", n_images=12, image_size=32, seed=5, val_fraction=0.0,
                                       progress=False)
    names = [f"synthetic {r['label']}" for r in sky]
    names[0] = EVIL
    embedder = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
    embedder.save_pretrained(base / "clip")
    embedder = CLIPEmbedder.from_pretrained(base / "clip")
    meta = Table({"path": [str(p) for p in sky.image_paths], "name": names})
    EmbeddingIndex.build(embedder, sky.image_paths, metadata=meta, progress=False).save(base / "index")
    llava = make_tiny_llava(base / "llava")
    server = ServerProcess([base / "index", "--thumbnail-cache", base / "thumbs", "--log-level", "warning",
                            "--rerank", llava, "--rerank-top", "12"], base / "server.log", timeout=400)
    with server:
        yield {"url": server.url, "n": len(sky)}


def test_cards_show_both_scores_and_the_switch_turns_re_ranking_off(served, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(condition, message):
        WebDriverWait(d, 120, ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)

    def cards():
        return d.find_elements(By.CSS_SELECTOR, "#results .card")

    d = chromium_driver(tmp_path / "profile")
    try:
        d.get(served["url"])
        wait(lambda d: "re-ranked by" in d.find_element(By.ID, "index-info").text, "index info")
        switch = d.find_element(By.ID, "rerank")
        assert switch.is_displayed() and switch.is_selected()
        d.find_element(By.ID, "q").send_keys("a barred spiral galaxy", Keys.ENTER)
        wait(lambda d: len(cards()) == served["n"] and cards()[0].find_elements(By.CSS_SELECTOR, ".rerank-score"),
             "re-ranked cards")
        model = [float(c.find_element(By.CSS_SELECTOR, ".rerank-score").text) for c in cards()]
        clip = [float(c.find_element(By.CSS_SELECTOR, ".score").text) for c in cards()]
        assert model == sorted(model, reverse=True) and all(-1 <= s <= 1 for s in clip)
        assert "AstroLLaVA score" in cards()[0].get_attribute("title")
        assert "rerank=1" in d.current_url
        labels = [c.find_element(By.CSS_SELECTOR, ".label").text for c in cards()]
        assert EVIL in labels and d.title != "pwned" and not d.find_elements(By.CSS_SELECTOR, "img[src='x']")
        # the detail view names both scores
        cards()[0].click()
        wait(lambda d: "AstroLLaVA score" in d.find_element(By.ID, "detail-score").text, "detail scores")
        d.find_element(By.ID, "detail-close").click()
        # off: CLIP's order, one score per card
        switch.click()
        wait(lambda d: len(cards()) == served["n"] and not d.find_elements(By.CSS_SELECTOR, "#results .rerank-score"),
             "CLIP-only cards")
        clip_only = [float(c.find_element(By.CSS_SELECTOR, ".score").text) for c in cards()]
        assert clip_only == sorted(clip_only, reverse=True)
        assert "rerank=0" in d.current_url
    finally:
        d.quit()
