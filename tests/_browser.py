"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
JSON messages ended by NUL on file descriptors 3 and 4), with the standard library only.

`Browser.open(page)` loads a page from the file system and reports what a reader would see:
console errors and uncaught exceptions, every URL the page requested, and per plotly figure
whether it drew (an SVG with a size and marks in its plot area). `screenshot` writes a PNG and
measures its pixels (decoded by Chromium in a blank tab) so a blank capture is caught. A
figure has drawn when its SVG has a size and holds marks: a heatmap's image (a data URL) or
a trace's path (markers, lines, bars) with a shape.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

FIGURES_JS = """(() => [...document.querySelectorAll('.plotly-graph-div')].map(d => {
  const svg = d.querySelector('svg.main-svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  const maps = [...d.querySelectorAll('.heatmaplayer image')]
    .filter(i => (i.getAttribute('href') || '').length > 100);
  const paths = [...d.querySelectorAll('g.trace path')].filter(p => (p.getAttribute('d') || '').length > 4);
  return {id: d.id, width: box.width, height: box.height, marks: maps.length + paths.length};
}))()"""
PIXELS_JS = """new Promise(done => { const img = new Image(); img.onload = () => {
  const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data; const colours = new Set();
  let ink = 0, n = 0;
  for (let i = 0; i < d.length; i += 4 * 3) { n++; colours.add((d[i] << 16) | (d[i+1] << 8) | d[i+2]);
    if (d[i] < 235 || d[i+1] < 235 || d[i+2] < 235) ink++; }
  done({width: img.width, height: img.height, ink: ink / n, colours: colours.size}); };
  img.onerror = () => done({error: 'not a PNG'}); img.src = 'data:image/png;base64,%s'; })"""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, if any."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@dataclass(frozen=True)
class Tab:
    """An open tab: its target id and the protocol session attached to it."""

    target: str
    session: str


@dataclass
class Loaded:
    """What one page did: `errors` (console errors, uncaught exceptions, failed loads),
    `requests` (every URL asked for), `figures` (one dict per plotly figure div)."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)


class Browser:
    """One headless Chromium process; each `open` uses a new tab, closed afterwards."""

    def __init__(self, executable: str, profile: Path, timeout: float = 60.0) -> None:
        self.timeout = timeout
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()
        # the child finds the protocol on fds 3 (commands in) and 4 (replies out)
        high = [os.dup(fd) for fd in (to_child, from_child)]

        def fds() -> None:
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        args = [executable, "--headless", "--remote-debugging-pipe", "--no-sandbox",
                "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--hide-scrollbars", "--mute-audio",
                f"--user-data-dir={profile}", "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for fd in (to_child, from_child, *high):
            os.close(fd)
        self._buffer = b""
        self._id = 0
        self._events: list[dict] = []

    # ------------------------------------------------------------------ protocol
    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """One command; returns its result (raises on a protocol error or a timeout)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def _next(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer within {self.timeout:.0f} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium exited")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)

    def wait_for(self, method: str, session: str) -> dict:
        """The first event `method` of `session` (already received or next)."""
        deadline = time.monotonic() + self.timeout
        while True:
            for i, e in enumerate(self._events):
                if e.get("method") == method and e.get("sessionId") == session:
                    return self._events.pop(i)
            self._events.append(self._next(deadline))

    # ------------------------------------------------------------------ pages
    def new_tab(self) -> Tab:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        return Tab(target, attached["sessionId"])

    def close(self, tab: Tab) -> None:
        self.send("Target.closeTarget", {"targetId": tab.target})
        self._events = [e for e in self._events if e.get("sessionId") != tab.session]

    def open(self, page: Path | str, *, width: int = 1280, height: int = 900) -> tuple[Loaded, Tab]:
        """Load `page` (a file, or a URL) in a new tab and wait until every plotly figure has
        drawn (or the timeout); returns what it did and the tab, for `screenshot` and `close`."""
        tab = self.new_tab()
        session = tab.session
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                  "deviceScaleFactor": 1, "mobile": False}, session)  # fmt: skip
        self._events = [e for e in self._events if e.get("sessionId") != session]
        url = page if isinstance(page, str) else page.resolve().as_uri()
        self.send("Page.navigate", {"url": url}, session)
        self.wait_for("Page.loadEventFired", session)
        deadline = time.monotonic() + self.timeout
        while True:
            figures = self.evaluate(FIGURES_JS, session)
            if all(f["marks"] and f["width"] and f["height"] for f in figures):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(0.3)  # a late error (an animation frame, a resize) still gets reported
        loaded = self._drain(session)
        loaded.figures = figures
        return loaded, tab

    def errors(self, tab: Tab) -> list[str]:
        """The errors `tab` reported since it was opened or last asked (after a click, say)."""
        return self._drain(tab.session).errors

    def _drain(self, session: str) -> Loaded:
        """What `session` reported and was not read yet: its errors and requests."""
        self.evaluate("1", session)  # the events that arrived meanwhile come before its reply
        loaded = Loaded()
        for e in self._events:
            if e.get("sessionId") != session:
                continue
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                loaded.errors.append(d.get("exception", {}).get("description") or d["text"])
            elif e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                loaded.errors.append(" ".join(str(a.get("value", a.get("description")))
                                              for a in p["args"]))  # fmt: skip
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                loaded.errors.append(f"{p['entry']['text']} ({p['entry'].get('url', '')})")
            elif e["method"] == "Network.requestWillBeSent":
                loaded.requests.append(p["request"]["url"])
            elif e["method"] == "Network.loadingFailed":
                loaded.errors.append(f"failed to load: {p.get('errorText')}")
        self._events = [e for e in self._events if e.get("sessionId") != session]
        return loaded

    def evaluate(self, expression: str, session: str):
        out = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                        "awaitPromise": True}, session)  # fmt: skip
        if "exceptionDetails" in out:
            raise RuntimeError(f"evaluating in the page failed: {out['exceptionDetails']}")
        return out["result"].get("value")

    def click(self, tab: Tab, selector: str) -> None:
        """A real left click (mouse events from the browser, not a script's) in the middle of
        the first element matching `selector`, scrolled into view; raises if none is visible."""
        box = self.evaluate(
            f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
          if (!e) return null; e.scrollIntoView({{block: 'center'}});
          const r = e.getBoundingClientRect();
          return {{x: r.x + r.width / 2, y: r.y + r.height / 2, w: r.width}}; }})()""",
            tab.session,
        )
        if not box or not box["w"]:
            raise RuntimeError(f"nothing visible to click at {selector!r}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"],
                      "button": "left", "clickCount": 1}, tab.session)  # fmt: skip

    def screenshot(self, tab: Tab, path: Path, *, max_height: int = 4000) -> dict:
        """The page (its top `max_height` pixels at most) as a PNG at `path`; returns its
        pixel statistics: width, height, ink (share of pixels that are not near white) and
        colours (distinct colours among every third pixel)."""
        session = tab.session
        size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"],
                "height": min(size["height"], max_height), "scale": 1}  # fmt: skip
        data = self.send("Page.captureScreenshot", {"format": "png", "clip": clip,
                         "captureBeyondViewport": True}, session)["data"]  # fmt: skip
        path.write_bytes(base64.b64decode(data))
        blank = self.new_tab()  # decoded away from the page, which cannot touch the result
        try:
            return self.evaluate(PIXELS_JS % data, blank.session)
        finally:
            self.close(blank)

    def quit(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):  # exiting anyway
            self.send("Browser.close")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)
