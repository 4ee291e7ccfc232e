"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``): open a page,
click like a person (mouse events at an element's centre), read the live DOM, capture a download, take a
screenshot. Standard library only: the browser is the Debian package, no driver or browser download.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = "headless Chromium not installed (Debian: apt-get install -y chromium; `make tools` does it as root)"


class Browser:
    """One headless Chromium with one tab; use as a context manager."""

    def __init__(self, profile: Path, downloads: Path | None = None, size: tuple[int, int] = (1400, 1000)):
        if CHROMIUM is None:
            raise RuntimeError(MISSING)
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def plumb() -> None:  # Chromium reads commands on fd 3 and writes replies and events on fd 4
            # Out of the way first: either pipe end may itself be fd 3 or 4.
            commands, replies = (
                fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10),
                fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10),
            )
            os.dup2(commands, 3)  # inheritable, unlike os.pipe()'s ends
            os.dup2(replies, 4)

        self._process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                "about:blank",
            ],
            close_fds=False,  # the child closes what it does not keep after plumb() ran: fds 3 and 4 with them
            preexec_fn=plumb,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        if downloads is not None:
            self.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads), eventsEnabled=True)
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=False
        )

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close")
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- the protocol -----------------------------------------------------------------------------

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        """One command (to the browser, or to ``session``); its result, events seen meanwhile kept."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def call(self, method: str, **params) -> dict:
        """A command to the tab."""
        return self.send(method, session=self._session, **params)

    def wait_event(self, method: str, timeout: float = 30, **match) -> dict:
        """The first event ``method`` whose params include ``match`` (one already seen counts)."""
        deadline = time.monotonic() + timeout
        while True:
            for k, event in enumerate(self.events):
                params = event.get("params", {})
                if event.get("method") == method and all(params.get(a) == b for a, b in match.items()):
                    del self.events[k]
                    return params
            self.events.append(self._read(deadline))

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_chrome], [], [], 0.5)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its pipe (did it crash?)")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    # --- what a test does -------------------------------------------------------------------------

    def open(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def reload(self) -> None:
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.call("Page.reload")
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        """A JavaScript expression's value in the page (JSON-able values)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A left click at the centre of the first element ``selector`` matches, scrolled into view first:
        the mouse events a person's click makes, not a script's ``element.click()``."""
        locate = (
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        box, deadline = None, time.monotonic() + 5
        while time.monotonic() < deadline:  # until layout settles (images loading as they scroll into view)
            seen = self.evaluate(locate)
            if seen is None:
                raise LookupError(f"nothing on the page matches {selector!r}")
            if seen == box:
                break
            box = seen
            time.sleep(0.1)
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def download(self, selector: str, timeout: float = 30) -> str:
        """Click ``selector`` and wait for the download it starts to complete; the file's suggested name."""
        self.events = [e for e in self.events if not e.get("method", "").startswith("Browser.download")]
        self.click(selector)
        begin = self.wait_event("Browser.downloadWillBegin", timeout)
        self.wait_event("Browser.downloadProgress", timeout, guid=begin["guid"], state="completed")
        return begin["suggestedFilename"]

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """A PNG of the viewport (or the whole page, up to 16384 pixels tall)."""
        params: dict = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16384), "scale": 1}
            params["captureBeyondViewport"] = True
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        return path
