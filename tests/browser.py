"""A page rendered in a real headless Chromium (the Debian package), driven over the DevTools protocol.

`render(path, screenshot)` loads a local HTML file, waits for its load event, and returns every
<img> with whether it loaded (naturalWidth > 0) and every console error, uncaught exception and
failed request that Chromium reported; it saves a full-page screenshot PNG. The websocket client
is tornado's (installed with flower); no browser is downloaded.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str | None:
    return next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)


@dataclass
class Rendered:
    images: list[dict] = field(default_factory=list)  # {src, complete, width}
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    title: str = ""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _page_ws(port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("Chromium's DevTools endpoint did not come up")
        time.sleep(0.2)


async def _drive(ws_url: str, url: str, screenshot: Path, timeout: float) -> Rendered:
    from tornado.websocket import websocket_connect

    conn = await websocket_connect(ws_url, max_message_size=256 * 1024 * 1024)
    ids = itertools.count(1)
    result = Rendered()
    loaded = asyncio.Event()
    replies: dict[int, asyncio.Future] = {}

    async def reader() -> None:
        while True:
            msg = await conn.read_message()
            if msg is None:
                return
            data = json.loads(msg)
            if "id" in data and data["id"] in replies:
                replies.pop(data["id"]).set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Page.loadEventFired":
                loaded.set()
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                result.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                            for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                result.errors.append("exception: " + params["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                result.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Network.loadingFailed":
                result.errors.append(f"load failed: {params.get('errorText')}")

    async def call(method: str, **params) -> dict:
        i = next(ids)
        replies[i] = asyncio.get_running_loop().create_future()
        conn.write_message(json.dumps({"id": i, "method": method, "params": params}))
        reply = await asyncio.wait_for(replies[i], timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    task = asyncio.create_task(reader())
    for domain in ("Page", "Runtime", "Log", "Network"):
        await call(f"{domain}.enable")
    await call("Emulation.setDeviceMetricsOverride", width=1100, height=900, deviceScaleFactor=1, mobile=False)
    await call("Page.navigate", url=url)
    await asyncio.wait_for(loaded.wait(), timeout)
    probe = ("JSON.stringify({title: document.title, images: Array.from(document.images).map(i => "
             "({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth}))})")
    page = json.loads((await call("Runtime.evaluate", expression=probe, returnByValue=True))["result"]["value"])
    result.images, result.title = page["images"], page["title"]
    size = (await call("Page.getLayoutMetrics"))["cssContentSize"]
    shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                      clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    await asyncio.sleep(0.2)  # late console messages
    conn.close()
    task.cancel()
    return result


def render(page: Path, screenshot: Path, timeout: float = 60) -> Rendered:
    """Load page (a local HTML file) in headless Chromium; what it showed and what went wrong."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    port = _port()
    # Chromium's helper processes may still be writing the profile when the browser exits; the
    # whole process group is killed before the profile is removed, and a file it left is no failure.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                                 f"--remote-debugging-port={port}", "--remote-allow-origins=*", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            ws = _page_ws(port, timeout)
            return asyncio.run(_drive(ws, page.resolve().as_uri(), screenshot, timeout))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # helpers in the browser's session
            except ProcessLookupError:
                pass
