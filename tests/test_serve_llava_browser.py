"""``astrovl serve --llava`` in a real browser: "Describe" and "Ask" stream their answers into the page.

Skipped when Selenium, Chromium or ChromeDriver is missing (Debian packages
``chromium`` and ``chromium-driver``; CI installs them).
"""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest
from astropy.table import Table

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")

from browser import cards, needs_browser, serve_tiny_index, wait_for  # noqa: E402

pytestmark = needs_browser


@pytest.fixture(scope="module")
def served(tmp_path_factory, m13_path, ngc1316_path):
    """``astrovl serve INDEX --llava TINY`` in a subprocess, over two real FITS images."""
    from astrovl.testing.llava import make_tiny_llava

    base = tmp_path_factory.mktemp("browser-llava")
    images = base / "images"
    images.mkdir()
    paths = [str(shutil.copy(m13_path, images / "m13.fits")), str(shutil.copy(ngc1316_path, images / "n1316.fits"))]
    llava = make_tiny_llava(base / "llava")
    with serve_tiny_index(base, paths, Table({"path": paths, "name": ["M13", "NGC 1316"]}),
                          ["--llava", llava, "--llava-max-tokens", "48"]) as server:
        yield {"url": server.url, "paths": paths}


def _wait(driver, condition, timeout=90, message=""):
    return wait_for(driver, condition, timeout, message, poll_frequency=0.05)


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def _answer_text(d) -> str:
    """The answer as the page holds it (Selenium's ``.text`` would fold whitespace)."""
    return d.execute_script("return document.getElementById('answer').textContent")


def _answer_done(d) -> bool:
    from selenium.webdriver.common.by import By

    return "tokens" in d.find_element(By.ID, "answer-status").text


def test_describe_and_ask_stream_into_the_detail_view(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(served["url"])
    _wait(d, lambda d: "images" in d.find_element(By.ID, "index-info").text, message="index info")
    d.find_element(By.ID, "q").send_keys("a globular cluster", Keys.ENTER)
    _wait(d, lambda d: len(cards(d)) == 2, message="result cards")
    card = next(c for c in cards(d)
                if c.find_element(By.CSS_SELECTOR, ".label").text == "M13")
    row = int(card.get_attribute("data-id"))
    card.click()
    assistant = d.find_element(By.ID, "assistant")
    _wait(d, lambda d: assistant.is_displayed(), message="assistant section")

    # Describe: the answer grows piece by piece while it is generated, then says how many tokens
    d.find_element(By.ID, "describe").click()
    lengths = set()

    def grown(d):
        lengths.add(len(d.find_element(By.ID, "answer").text))
        return _answer_done(d)

    _wait(d, grown, message="the description")
    answer = d.find_element(By.ID, "answer")
    described = _answer_text(d)
    expected = _post_json(served["url"] + "api/caption", {"id": row})
    assert described == expected["text"] and described
    assert int(answer.get_attribute("data-pieces")) > 1  # streamed, not sent at once
    assert len(lengths) > 1 or int(answer.get_attribute("data-pieces")) > 1
    assert f"{expected['usage']['completion_tokens']} tokens" in d.find_element(By.ID, "answer-status").text

    # Ask: a question typed into the detail view, answered the same way
    question = "Is there a bar?"
    box = d.find_element(By.ID, "question")
    box.send_keys(question, Keys.ENTER)
    _wait(d, lambda d: _answer_done(d) and _answer_text(d) != described, message="the answer")
    asked = _post_json(served["url"] + "api/ask", {"id": row, "question": question})
    assert _answer_text(d) == asked["text"]
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)

    # an uploaded image: "Describe or ask about it" opens it with the assistant
    d.find_element(By.ID, "upload").send_keys(served["paths"][1])
    _wait(d, lambda d: d.find_elements(By.ID, "open-upload"), message="the upload's button")
    d.find_element(By.ID, "open-upload").click()
    _wait(d, lambda d: d.find_element(By.ID, "detail-title").text == "n1316.fits", message="upload detail")
    d.find_element(By.ID, "describe").click()
    _wait(d, _answer_done, message="the upload's description")
    row_1316 = 1 - row
    assert _answer_text(d) == _post_json(served["url"] + "api/caption", {"id": row_1316})["text"]
    assert d.title != "pwned"
