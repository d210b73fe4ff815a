"""The browser harness of the web-page tests: headless Chromium driven by Selenium.

Chromium and ChromeDriver come from the system (Debian packages ``chromium`` and
``chromium-driver``), Selenium from PyPI. The page tests share:

- :data:`needs_browser`, the mark that skips a test module without them;
- the ``browser`` fixture (``tests/conftest.py``): one driver per test module;
- :func:`serve_tiny_index`: ``astrovl serve`` over an index of the given images
  built with the tiny CLIP of :data:`astrovl.clip.TINY_CLIP_CONFIG`;
- :func:`wait_for`, :func:`cards` and :func:`images_loaded` to read the page.

``docs/scripts/make_serve_screenshot.py`` uses the driver too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from astrovl.testing.serve import ServerProcess

__all__ = ["CHROMIUM_FLAGS", "chromium_paths", "chromium_driver", "images_loaded", "needs_browser", "wait_for",
           "cards", "serve_tiny_index"]

#: flags for a headless Chromium that never reaches the network on its own
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-quic", "--hide-scrollbars")


def chromium_paths() -> tuple[str | None, str | None]:
    """Paths of the Chromium browser and of ChromeDriver (None when missing)."""
    browser = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                                shutil.which("google-chrome")) if p), None)
    return browser, shutil.which("chromedriver")


def chromium_driver(profile: str | os.PathLike, width: int = 1360, height: int = 900):
    """A Selenium driver for a headless Chromium with a fresh profile in ``profile``.

    Raises
    ------
    RuntimeError
        Chromium or ChromeDriver is not installed.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    if browser is None or driver is None:
        raise RuntimeError("Chromium and ChromeDriver are needed (Debian: apt-get install chromium "
                           "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--user-data-dir={profile}")
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.set_page_load_timeout(60)
    return chrome


def images_loaded(driver, selector: str = "#results .card img") -> bool:
    """True when the page has images matching ``selector`` and every one has loaded."""
    return bool(driver.execute_script(
        "const imgs = Array.from(document.querySelectorAll(arguments[0]));"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);", selector))


def _has_browser() -> bool:
    browser, driver = chromium_paths()
    return browser is not None and driver is not None


#: skips a test without Chromium and ChromeDriver (Selenium, starlette and uvicorn are checked on import)
needs_browser = pytest.mark.skipif(
    not _has_browser(),
    reason="no Chromium and ChromeDriver on this machine (Debian: apt-get install chromium chromium-driver)")


def wait_for(driver, condition, timeout: float = 60, message: str = "", poll_frequency: float = 0.5):
    """Wait until ``condition(driver)`` is true (results are redrawn as answers arrive: stale elements are retried)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, poll_frequency=poll_frequency,
                         ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(condition, message)


def cards(driver) -> list:
    """The result cards on the page."""
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


@contextmanager
def serve_tiny_index(base: Path, paths: Sequence[str], metadata, args: Sequence = ()):
    """``astrovl serve`` (a :class:`~astrovl.testing.serve.ServerProcess`) over an index of ``paths``.

    The index is built in ``base / "index"`` with the tiny CLIP of
    :data:`~astrovl.clip.TINY_CLIP_CONFIG` (seed 0), saved to ``base / "clip"`` and
    loaded back, so that the server loads the model from where the index recorded it
    (no ``--model``). ``args`` are further ``astrovl serve`` arguments; thumbnails go
    to ``base / "thumbs"``, the server's output to ``base / "server.log"``.
    """
    from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder, EmbeddingIndex

    embedder = CLIPEmbedder.from_config(TINY_CLIP_CONFIG, seed=0)
    embedder.save_pretrained(base / "clip")
    embedder = CLIPEmbedder.from_pretrained(base / "clip")
    EmbeddingIndex.build(embedder, list(paths), metadata=metadata, progress=False).save(base / "index")
    server = ServerProcess([base / "index", *args, "--thumbnail-cache", base / "thumbs", "--log-level", "warning"],
                           base / "server.log")
    with server:
        yield server
