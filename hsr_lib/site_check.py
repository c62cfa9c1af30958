"""Open a static site in headless Chromium and report what a reader would hit: console errors, images
that do not decode, internal links that lead nowhere, and any request that leaves the site.

Chromium is driven through its DevTools protocol over a pipe (``--remote-debugging-pipe``: commands on
its fd 3, answers on its fd 4, JSON messages ended by NUL), so no browser-driver package is needed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-pipe")
ALLOWED = ("file://", "data:", "about:", "http://localhost", "http://127.0.0.1")

_PAGE_JS = """(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const links = Array.from(document.querySelectorAll('a[href]')).map(a => ({href: a.href, raw: a.getAttribute('href')}));
  const missing = links.filter(l => l.raw.startsWith('#') && l.raw.length > 1
      && !document.getElementById(l.raw.slice(1))
      && !document.getElementById(decodeURIComponent(l.raw.slice(1)))).map(l => l.raw);
  return JSON.stringify({images: imgs.map(i => ({src: i.src.slice(0, 80), w: i.naturalWidth, ok: i.complete})),
                         links: links.map(l => l.href), missing_anchors: missing,
                         maths: document.getElementsByTagName('math').length, title: document.title});
})()"""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """A headless Chromium with a fresh profile, spoken to over the DevTools pipe."""

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 900):
        binary = binary or find_chromium()
        if binary is None:
            raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="hsr-chromium-")
        # the shell hands our pipes to Chromium as fd 3 (its input) and fd 4 (its output)
        self.proc = subprocess.Popen(
            ["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null', binary, *FLAGS,
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._id = 0
        self._buf = b""
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError("chromium did not answer (it exited or hung)")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    raise TimeoutError("chromium closed the DevTools pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: bool = False, timeout: float = 30, **params: Any) -> dict:
        """Send one command and wait for its answer (events that arrive meanwhile are kept)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self._send(msg)
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e["method"] == method:
                return self.events.pop(i)
        while True:
            m = self._read(deadline)
            if m.get("method") == method:
                return m
            if "method" in m:
                self.events.append(m)

    def open(self, url: str) -> dict:
        """Load ``url``; what the page did: console errors, exceptions, requests, images, links."""
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_event("Page.loadEventFired")
        res = self.call("Runtime.evaluate", session=True, expression=_PAGE_JS, awaitPromise=True, returnByValue=True)
        info = json.loads(res["result"]["value"])
        time.sleep(0.2)
        self.call("Runtime.evaluate", session=True, expression="1")  # drain events that came after load
        errors, requests = [], []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                errors.append("exception: " + p["exceptionDetails"].get("text", "") + " " +
                              str(p["exceptionDetails"].get("exception", {}).get("description", "")))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
            elif e["method"] == "Network.requestWillBeSent":
                requests.append(p["request"]["url"])
            elif e["method"] == "Network.loadingFailed":
                errors.append(f"request failed: {p.get('errorText')}")
        return {**info, "errors": errors, "requests": requests}

    def screenshot(self, path: str | os.PathLike, url: str | None = None) -> Path:
        if url is not None:
            self.open(url)
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _anchor_ok(path: Path, fragment: str) -> bool:
    if not fragment:
        return True
    text = path.read_text(encoding="utf-8", errors="replace")
    return any(re.search(r'id=["\']' + re.escape(f) + r'["\']', text) for f in (fragment, unquote(fragment)))


def check_site(site: str | os.PathLike, screenshot: str | os.PathLike | None = None,
               binary: str | None = None) -> dict[str, Any]:
    """Open the index and every page linked from the site (anchors are matched as written and percent-decoded,
    as browsers do); ``{"pages": {...}, "problems": [...]}``.
    A problem: a console error, an image that did not decode, an internal link to a missing page or
    anchor, a request that left the site (anything but file://, data: or localhost)."""
    root = Path(site).resolve()
    index = root / "index.html"
    todo, seen, pages, problems = [index], set(), {}, []
    with Chromium(binary) as browser:
        if screenshot is not None:
            browser.screenshot(screenshot, index.as_uri())
        while todo:
            page = todo.pop(0)
            if page in seen:
                continue
            seen.add(page)
            rel = page.relative_to(root).as_posix()
            info = browser.open(page.as_uri())
            pages[rel] = info
            problems += [f"{rel}: {e}" for e in info["errors"]]
            problems += [f"{rel}: request leaves the site: {u}" for u in info["requests"] if not u.startswith(ALLOWED)]
            problems += [f"{rel}: image does not decode: {i['src']}" for i in info["images"] if not (i["ok"] and i["w"] > 0)]
            problems += [f"{rel}: link to a missing anchor {a}" for a in info["missing_anchors"]]
            for href in info["links"]:
                u = urlparse(href)
                if u.scheme != "file":
                    continue  # a link out (e.g. to Colab) is not loaded by the page
                target = Path(unquote(u.path))
                if not target.is_file():
                    problems.append(f"{rel}: link to a missing page {href}")
                elif target.resolve() != page and not _anchor_ok(target, u.fragment):
                    problems.append(f"{rel}: link to a missing anchor {href}")
                elif target.suffix == ".html" and root in target.resolve().parents and target.resolve() not in seen:
                    todo.append(target.resolve())
    return {"pages": pages, "problems": problems}
