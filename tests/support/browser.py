"""A real headless Chromium, driven over the DevTools protocol straight from Python.

Debian's ``chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it): no tool here
downloads a browser. Chromium starts with ``--remote-debugging-port=0`` and writes the port it
chose to ``DevToolsActivePort`` in its profile folder; the protocol is JSON over one WebSocket
(the ``websockets`` library), each page a target attached in flat mode (its messages carry a
``sessionId``).

``Chromium`` is the process (started and stopped by pid); ``DevTools`` one connection to it,
which opens ``Page``s. A page records what the browser reports as going wrong (a script
exception, a console error, a CSP violation, a failed request) in ``problems``, so a test can
fail on a page that broke quietly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1440,1200",
)
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 20.0


class BrowserMissing(RuntimeError):
    """No Chromium on this machine: install Debian's package, never a downloaded browser."""


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise BrowserMissing(
            "no chromium on PATH: `apt-get install -y chromium` (Debian's package; .ci/run "
            "installs it). The console's end-to-end tests need a real browser."
        )
    return found


class Chromium:
    """One headless Chromium process with its own profile folder."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self._log = (profile.parent / f"{profile.name}.log").open("wb")
        command = [chromium_binary(), *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.url = self._wait_for_devtools()
        except BaseException:
            self.stop()  # neither the process nor its log outlives a failed start
            raise

    def _wait_for_devtools(self) -> str:
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}: {self.log()}")
            lines = active.read_text().splitlines() if active.exists() else []
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{int(lines[0])}{lines[1]}"
            time.sleep(0.05)
        raise RuntimeError(f"chromium wrote no DevToolsActivePort in {START_TIMEOUT_S}s")

    def log(self) -> str:
        self._log.flush()
        return (self.profile.parent / f"{self.profile.name}.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class DevTools:
    """One protocol connection: commands by id, events to the page (session) they belong to."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read(), name="devtools-reader")

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
    ) -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = answer
        await self._socket.send(json.dumps(message))
        try:
            reply = await asyncio.wait_for(answer, CALL_TIMEOUT_S)
        finally:
            self._waiting.pop(message_id, None)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def _read(self) -> None:
        async for raw in self._socket:
            message = json.loads(raw)
            waiting = self._waiting.get(message.get("id", -1))
            if waiting is not None and not waiting.done():
                waiting.set_result(message)
            elif "method" in message and message.get("sessionId") in self._pages:
                self._pages[message["sessionId"]].on_event(message["method"], message["params"])

    async def open(self, url: str) -> Page:
        """A new tab at ``url``, loaded (``document.readyState`` complete)."""
        target = await self.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"], target["targetId"])
        self._pages[page.session] = page
        for domain in ("Page", "Runtime", "Log", "Network"):
            await page.call(f"{domain}.enable")
        await page.call("Page.navigate", {"url": url})
        # about:blank is complete at once: wait for the new document, not the old one.
        loaded = "location.href !== 'about:blank' && document.readyState === 'complete'"
        await page.wait_for(loaded, timeout_s=15)
        return page

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._socket.close()


@contextlib.asynccontextmanager
async def devtools(browser: Chromium) -> AsyncIterator[DevTools]:
    # Screenshots of a large page are several MB of base64 in one message.
    async with connect(browser.url, max_size=64 * 1024 * 1024) as socket:
        tools = DevTools(socket)
        try:
            yield tools
        finally:
            await tools.close()


class Page:
    """One tab: evaluate JavaScript in it, take screenshots, see what went wrong in it."""

    def __init__(self, tools: DevTools, session: str, target: str) -> None:
        self._tools = tools
        self.session = session
        self.target = target
        self.problems: list[str] = []

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._tools.call(method, params, session=self.session)

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (awaited if a promise), as JSON gives it back."""
        result = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, timeout_s: float, interval_s: float = 0.05) -> Any:
        """Poll ``expression`` until it is truthy; its value. Fails with the last value."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(interval_s)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {expression} ({value!r})")

    async def screenshot(self, *paths: Path) -> bytes:
        """A PNG of the whole page, written to each of ``paths``."""
        metrics = await self.call("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = await self.call(
            "Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True}
        )
        png = base64.b64decode(shot["data"])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        return png

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            self.problems.append(f"exception: {params['exceptionDetails']}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.problems.append(f"console.{params['type']}: {params['args']}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.problems.append(f"log {entry['source']}: {entry['text']}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            self.problems.append(f"request failed: {params.get('errorText')}")
