"""Render the screenshots of the ``astrovl serve`` search page used in docs/serve.rst.

Runs a quick ``astrovl demo`` (a small CLIP trained from scratch on the
procedural sky, with the real telescope images that ship with astropy and
scikit-image in its index), or reuses a demo directory given with ``--demo``,
starts the ``astrovl serve`` command the demo prints, and drives the page in
headless Chromium with Selenium: a text query, then the detail view of a result.

Needs the ``serve`` extra, Selenium, and Chromium with ChromeDriver (Debian:
``apt-get install chromium chromium-driver``)::

    python docs/scripts/make_serve_screenshot.py
    python docs/scripts/make_serve_screenshot.py --demo ./astrovl-demo
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "docs" / "_static"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=None,
                        help="an existing 'astrovl demo' output directory (default: run a quick demo)")
    parser.add_argument("--query", default="dense globular star cluster")
    parser.add_argument("--output", type=Path, default=STATIC / "serve_page.png")
    parser.add_argument("--detail-output", type=Path, default=STATIC / "serve_detail.png")
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--height", type=int, default=860)
    parser.add_argument("--detail-height", type=int, default=1180)
    args = parser.parse_args()

    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    sys.path.insert(0, str(ROOT / "tests"))  # the browser harness of the page tests
    from browser import chromium_driver, images_loaded

    from astrovl.testing.serve import ServerProcess

    with tempfile.TemporaryDirectory(prefix="astrovl-serve-shot-") as tmp:
        tmp = Path(tmp)
        if args.demo is None:
            from astrovl.demo import run_demo

            result = run_demo(tmp / "demo", quick=True, steps=300, n_images=660, progress=False)
            command = result.serve_command
        else:
            command = f"astrovl serve {shlex.quote(str(args.demo / 'index'))}"
        print(f"serving: {command}")
        server = ServerProcess([*shlex.split(command)[2:], "--thumbnail-cache", tmp / "thumbs",
                                "--log-level", "warning"], tmp / "server.log")
        with server:
            driver = chromium_driver(tmp / "profile", args.width, args.height)
            wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))
            try:
                driver.get(server.url)
                wait.until(lambda d: "images" in d.find_element(By.ID, "index-info").text)
                driver.find_element(By.ID, "q").send_keys(args.query, Keys.ENTER)
                wait.until(images_loaded)
                driver.execute_script("document.activeElement.blur()")
                args.output.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.output))
                print(f"wrote {args.output}")
                # the detail view of a real telescope image: its FITS header and WCS position
                Select(driver.find_element(By.ID, "filter-kind")).select_by_visible_text("real")
                wait.until(lambda d: any("M13" in c.text for c in d.find_elements(By.CSS_SELECTOR, "#results .card")))
                wait.until(images_loaded)
                next(c for c in driver.find_elements(By.CSS_SELECTOR, "#results .card") if "M13" in c.text).click()
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail-meta tr"))
                wait.until(lambda d: images_loaded(d, "#detail-image") and "RA" in d.find_element(
                    By.ID, "detail-sky").text)
                driver.set_window_size(args.width, args.detail_height)  # room for the FITS header
                time.sleep(1)  # the larger preview replaces the thumbnail
                driver.save_screenshot(str(args.detail_output))
                print(f"wrote {args.detail_output}")
            finally:
                driver.quit()


if __name__ == "__main__":
    main()
