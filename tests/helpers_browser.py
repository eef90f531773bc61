"""A page as a person sees it: Debian's headless Chromium (``/usr/bin/chromium``, installed by
``make setup``), driven over its DevTools protocol with ``websockets`` — no WebDriver, nothing
downloaded at run time. ``CHROMIUM`` names another binary."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

# What the page looks like to a reader: every image decoded, and what sticks out past the window
# (each offender with its tag, class and right edge; boxes that scroll on their own hold theirs).
LAYOUT = """(() => {
  const root = document.documentElement, width = root.clientWidth;
  const scrolls = el => { for (let p = el.parentElement; p; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX; if (o === 'auto' || o === 'scroll') return true; }
    return false; };
  const wide = [...document.body.querySelectorAll('*')]
    .filter(el => el.getBoundingClientRect().right > width + 0.5 && !scrolls(el))
    .slice(0, 10).map(el => `${el.tagName.toLowerCase()}.${el.className}: `
      + `${Math.round(el.getBoundingClientRect().right)} px`);
  return {
    scrollWidth: root.scrollWidth, clientWidth: width, innerWidth: window.innerWidth,
    height: root.scrollHeight, wide,
    images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth,
                                            alt: i.alt})),
    svgs: document.querySelectorAll('svg').length,
  };
})()"""


def chromium_missing() -> str | None:
    """Why no browser test can run here, or None."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return (
            f"{CHROMIUM} not found: `make setup` installs Debian's chromium package "
            "(apt-get install chromium), or set CHROMIUM to a Chromium binary"
        )
    return None


class Browser:
    """One headless Chromium with one page; ``open`` a URL at a window size, ``layout``, ``shot``."""

    def __init__(self, workdir: Path | None = None):
        from websockets.sync.client import connect

        if missing := chromium_missing():
            raise RuntimeError(missing)
        self._dir = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
        args = [
            CHROMIUM,
            "--headless=new",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            f"--user-data-dir={self._dir}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--force-device-scale-factor=1",
            "about:blank",
        ]
        if os.geteuid() == 0:  # Chromium's sandbox refuses root
            args.insert(1, "--no-sandbox")
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=open(self._dir / "stderr.log", "wb")
        )
        port = self._port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self._ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self._ids = itertools.count(1)
        self.requests: list[str] = []  # every URL the page asked for
        self.send("Page.enable")
        self.send("Network.enable")

    def _port(self, timeout: float = 30.0) -> int:
        marker = self._dir / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            if self._proc.poll() is not None:
                break
            time.sleep(0.1)
        log = (self._dir / "stderr.log").read_text(errors="replace")[-2000:]
        self.close()
        raise RuntimeError(f"{CHROMIUM} did not start its DevTools server:\n{log}")

    def send(self, method: str, timeout: float = 60.0, **params) -> dict:
        """One DevTools command; events that arrive meanwhile are noted (``requests``)."""
        call = next(self._ids)
        self._ws.send(json.dumps({"id": call, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("method") == "Network.requestWillBeSent":
                self.requests.append(msg["params"]["request"]["url"])
            if msg.get("id") == call:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, width: int, height: int, timeout: float = 60.0) -> None:
        """Load ``url`` in a ``width`` × ``height`` window and wait until it and its images are in."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        ready = "document.readyState === 'complete' && [...document.images].every(i => i.complete)"
        while not self.evaluate(ready):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading in {timeout:.0f} s")
            time.sleep(0.1)

    def layout(self) -> dict:
        return self.evaluate(LAYOUT)

    def shot(self, path: Path, full_page: bool = False) -> Path:
        """A PNG of the window (``full_page``: of the whole page)."""
        params: dict = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            )
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", **params)["data"]))
        return path

    def close(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            ws.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_report(html: Path, out: Path, widths=((1440, 900), (1024, 768))) -> dict[int, dict]:
    """Open ``html`` at each window size and assert what a reader needs: every image decodes
    (naturalWidth > 0), nothing is wider than the window, nothing is fetched but the file itself;
    saves ``report_<width>.png`` (the first screen) and ``report_<width>_full.png`` (the whole page,
    every ``<details>`` opened, and checked so too) under ``out``.
    Returns the layout measured at each width."""
    seen = {}
    with Browser(out) as browser:
        for width, height in widths:
            browser.open(html.resolve().as_uri(), width, height)
            page = browser.layout()
            browser.shot(out / f"report_{width}.png")
            # every folded table opened: it too must stay inside the window
            browser.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
            unfolded = browser.layout()
            browser.shot(out / f"report_{width}_full.png", full_page=True)
            page["wide"] += unfolded["wide"]
            page["scrollWidth"] = max(page["scrollWidth"], unfolded["scrollWidth"])
            assert page["images"], f"no <img> in {html}"
            broken = [i["alt"] for i in page["images"] if not i["complete"] or i["width"] <= 0]
            assert not broken, f"{len(broken)} images do not decode at {width} px: {broken[:5]}"
            assert page["scrollWidth"] <= page["clientWidth"] and not page["wide"], (
                f"the page is {page['scrollWidth']} px wide in a {page['clientWidth']} px window; "
                f"sticking out: {page['wide']}"
            )
            seen[width] = page
        remote = [u for u in browser.requests if not u.startswith(("file:", "data:", "about:"))]
        assert not remote, f"the report fetched {remote[:5]}"
    return seen
