"""Real-browser test helpers: a Streamlit server on a free loopback port and Debian's chromium via Playwright.

Never `playwright install`: the browser is /usr/bin/chromium from Debian (installed by `make test`).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
LINK = ".hs-link"  # the share link's text in the sidebar
PICTURE = ".hs-pic img"  # a figure drawn by pages/widgets.picture (explorer, atlas, intervene, vision, gaze)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(str):
    """The base URL of a running test server (a str), with the server process as `.proc`."""

    proc: subprocess.Popen

    def peak_rss_bytes(self) -> int:
        """The server process's peak resident memory so far (VmHWM)."""
        with open(f"/proc/{self.proc.pid}/status") as fh:
            line = next(line for line in fh if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024


@contextmanager
def streamlit_server(env: dict | None = None, timeout: float = 120.0):
    """Start `streamlit run app.py` on 127.0.0.1:<free port>; yields its base URL (a `Server`)."""
    port = free_port()
    environment = dict(os.environ, **(env or {}))
    log = open(ROOT / "tests" / "artifacts" / f"streamlit-{port}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
    )
    url = Server(f"http://127.0.0.1:{port}")
    url.proc = proc
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"streamlit did not start; see {log.name}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def browser():
    """A headless Debian chromium driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


# Streamlit marks its root with the script's run state: "initial" before the first run, "running",
# "rerunRequested" (set the moment a widget's change is sent), "notRunning" once a run has ended.
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning'][data-test-connection-state='CONNECTED']"


def wait_idle(page, selector: str = "h1", timeout: float = 120_000) -> None:
    """Wait until Streamlit has finished running the script and `selector` is on the page.

    The short first wait lets a widget's change reach the frontend's run state (a slider sends its value
    after a debounce); the status widget ("Running...") is checked too, as before.
    """
    page.wait_for_timeout(300)
    page.wait_for_selector(IDLE, timeout=timeout)
    page.wait_for_selector(selector, timeout=timeout)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout)
    page.wait_for_timeout(500)


def shown_link(page) -> str:
    """The share link the sidebar shows (pages/widgets.share_link)."""
    return page.locator(LINK).last.inner_text().strip()


def wait_for_link(page, fragment: str, timeout: float = 300_000) -> str:
    """Wait until the sidebar's share link (written at the very end of a script run) contains `fragment`;
    returns the link."""
    page.wait_for_function(f"() => [...document.querySelectorAll(\"{LINK}\")]"
                           f".some(c => c.textContent.includes({fragment!r}))", timeout=timeout)
    return shown_link(page)
