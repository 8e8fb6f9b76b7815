"""Drive a real headless Chromium over the Chrome DevTools Protocol (CDP), offline.

No browser download and no driver: Debian's ``chromium`` package (``apt-get install chromium``)
is started with ``--remote-debugging-port=0`` on loopback, its port is read from the profile's
``DevToolsActivePort`` file, and the page is driven over one websocket with ``aiohttp`` (already a
test dependency). Enough for the web-extension tests: navigate, evaluate JavaScript (awaiting
promises), wait for a condition, collect page errors, take screenshots.

``find_chromium()`` returns ``None`` when no browser is installed: tests skip with that reason.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from devtools.comfy import server as _server  # process-group stop and log tails, shared with the server

log = logging.getLogger(__name__)

ENV_VAR = "SDN_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "apt-get install chromium (Debian's package), or set SDN_CHROMIUM to a Chromium/Chrome binary"
#: Flags for a closed network: no background connections, no first-run UI, a fresh profile.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


class BrowserError(RuntimeError):
    """The browser did not start, a CDP call failed, or a page condition timed out."""


def find_chromium() -> str | None:
    """``$SDN_CHROMIUM`` or the first Chromium/Chrome on ``PATH``; ``None`` if there is none."""
    env = os.environ.get(ENV_VAR)
    if env:
        return env if Path(env).is_file() else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """One headless Chromium with one page, driven over CDP. Use as a context manager."""

    def __init__(self, work_dir: Path, binary: str | None = None, width: int = 1600, height: int = 1000):
        self.work_dir = Path(work_dir)
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise BrowserError(f"no Chromium found: {INSTALL_HINT}")
        self.width, self.height = width, height
        self.profile = self.work_dir / "chromium-profile"
        self.log_path = self.work_dir / "chromium.log"
        self.errors: list[str] = []
        """Uncaught page exceptions and console errors, in order."""
        self.console: list[str] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._loop = asyncio.new_event_loop()
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "Chromium":
        self.profile.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary, *FLAGS, f"--user-data-dir={self.profile}",
               f"--window-size={self.width},{self.height}", "about:blank"]
        with self.log_path.open("wb") as log_file:
            self._process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self._process.poll() is not None:
                raise BrowserError(f"Chromium exited with code {self._process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.close()
                raise BrowserError(f"Chromium did not open its DevTools port in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)
        try:
            port = int(port_file.read_text().split()[0])
            self._run(self._connect(port, timeout))
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()  # never leave a browser behind
            raise
        return self

    async def _connect(self, port: int, timeout: float) -> None:
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{port}/json/list",
                                  timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            targets = await resp.json()
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError(f"Chromium has no page target: {targets}")
        self._ws = await self._http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = self._loop.create_task(self._read())

    def close(self) -> None:
        """Close the connection and end the browser's process group."""
        if self._ws is not None or self._http is not None:
            self._run(self._disconnect())
        process, self._process = self._process, None
        _server.stop_process_group(process)
        if not self._loop.is_closed():
            self._loop.close()

    async def _disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                log.debug("CDP reader stopped")
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        self._ws = self._http = self._reader = None

    def __enter__(self) -> "Chromium":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the browser's log."""
        return _server.log_tail(self.log_path, lines, "browser log")

    # -- CDP ------------------------------------------------------------------------------------
    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._on_event(data.get("method", ""), data.get("params", {}))

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.errors.append(f"exception: {text} ({details.get('url', '')}:{details.get('lineNumber', '')})")
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"{params.get('type')}: {text}")
            if params.get("type") == "error":
                self.errors.append(f"console.error: {text}")

    async def _send(self, method: str, params: dict[str, Any] | None, timeout: float) -> Any:
        if self._ws is None:
            raise BrowserError("browser not started")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[call_id] = future
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        try:
            reply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise BrowserError(f"CDP {method} got no answer in {timeout:.0f} s") from None
        if "error" in reply:
            raise BrowserError(f"CDP {method} failed: {reply['error']}")
        return reply.get("result", {})

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """One CDP command; its ``result``."""
        return self._run(self._send(method, params, timeout))

    def pump(self, seconds: float) -> None:
        """Let the page run (and events arrive) for ``seconds``."""
        self._run(asyncio.sleep(seconds))

    # -- page helpers ---------------------------------------------------------------------------
    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "userGesture": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error: {text}\nin: {expression[:300]}")
        return result.get("result", {}).get("value")

    def navigate(self, url: str, timeout: float = 60.0) -> None:
        """Open ``url`` and wait until the document has loaded."""
        self.send("Page.navigate", {"url": url}, timeout)
        self.wait_for("document.readyState === 'complete'", timeout, what=f"{url} to load")

    def wait_for(self, expression: str, timeout: float = 30.0, poll: float = 0.2, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        value: Any = None
        last = "(not evaluated)"
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression, timeout=max(1.0, deadline - time.monotonic()))
            except BrowserError as err:
                value = None
                last = str(err)
            else:
                last = repr(value)
                if value:
                    return value
            self.pump(poll)
        raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what or expression}; last: {last[:500]}"
                           f"\npage errors: {self.errors[-5:]}")

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport."""
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
