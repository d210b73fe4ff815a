"""Run ``astrovl serve`` in a subprocess and drive its page in headless Chromium.

Used by the browser tests, the load benchmark and the script that makes the
documentation's screenshots; handy for checking a deployment the same way.
Chromium and ChromeDriver come from the system (Debian packages ``chromium``
and ``chromium-driver``), Selenium from PyPI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["free_port", "ServerProcess", "chromium_paths", "chromium_driver", "images_loaded",
           "CHROMIUM_FLAGS"]

#: flags for a headless Chromium that never reaches the network on its own
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-quic", "--hide-scrollbars")


def free_port() -> int:
    """A TCP port that is free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``astrovl serve`` with the given arguments on a free loopback port, as a context manager.

    Parameters
    ----------
    args : sequence of str
        Arguments after ``astrovl serve`` (the index directory, ``--model``...).
    log : path
        File that receives the server's output.
    timeout : float
        Seconds to wait for ``/api/health`` to answer.
    host : str
        Loopback address to listen on (``--host``).
    token : str, optional
        Token the server requires, given through its environment variable (never
        on the command line); the health check sends it.

    Attributes
    ----------
    url : str
        ``http://127.0.0.1:PORT/``.
    proc : subprocess.Popen
    """

    def __init__(self, args: Sequence[str], log: str | os.PathLike, timeout: float = 120.0, *,
                 host: str = "127.0.0.1", token: str | None = None):
        self.port = free_port()
        self.url = f"http://{host}:{self.port}/"
        self.log = Path(log)
        self.timeout = float(timeout)
        self.token = token
        self.argv = [sys.executable, "-m", "astrovl.cli", "serve", *map(str, args), "--port", str(self.port)]
        if host != "127.0.0.1":
            self.argv += ["--host", host]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("ASTROVL_SERVE_TOKEN", None)
        headers = {}
        if self.token is not None:
            env["ASTROVL_SERVE_TOKEN"] = self.token
            headers["Authorization"] = "Bearer " + self.token.encode("utf-8").decode("latin-1")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                health = urllib.request.Request(self.url + "api/health", headers=headers)
                with urllib.request.urlopen(health, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"astrovl serve did not start:\n{self.log.read_text()}")
            time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server (terminate, then kill after 20 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
