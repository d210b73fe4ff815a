"""Run ``astrovl serve`` in a subprocess on a free loopback port, and wait until it answers.

Used by the web service's tests, its load benchmarks and the script that makes
the documentation's screenshots; handy for checking a deployment the same way.
The browser (Selenium) harness of the page tests lives in the tests
(``tests/browser.py``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["free_port", "ServerProcess"]


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
