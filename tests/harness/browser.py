"""Drive a real headless Chromium over the Chrome DevTools Protocol (CDP), offline.

No browser download and no driver: Debian's ``chromium`` package (``apt-get install chromium``)
is started with ``--remote-debugging-port=0`` on loopback, its port is read from the profile's
``DevToolsActivePort`` file, and the page is driven over one websocket with ``aiohttp`` (already a
test dependency). Enough for the web-extension tests: navigate, evaluate JavaScript (awaiting
promises), wait for a condition, collect page errors, take screenshots.

``find_chromium()`` returns ``None`` when no browser is installed: tests skip with that reason;
``web_ui_skip_reason(server)`` says why a server's web UI cannot be tested (no browser, no frontend).
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
from .server import ComfyServer, frontend_root

log = logging.getLogger(__name__)

ENV_VAR = "SDN_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "apt-get install chromium (Debian's package), or set SDN_CHROMIUM to a Chromium/Chrome binary"
#: Flags for a closed network: no background connections, no first-run UI, a fresh profile.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


#: Model loaders the current frontend looks up at start-up; without them (e.g. no `spandrel` for
#: UpscaleModelLoader) its combo widgets break. Part of ComfyUI's own requirements.
FRONTEND_LOADERS = ("CheckpointLoaderSimple", "ImageOnlyCheckpointLoader", "LoraLoader", "LoraLoaderModelOnly",
                    "VAELoader", "ControlNetLoader", "UNETLoader", "UpscaleModelLoader", "StyleModelLoader",
                    "GLIGENLoader")


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


def web_ui_skip_reason(server: ComfyServer) -> str | None:
    """Why ``server``'s web UI cannot be driven in a browser here (``None``: it can)."""
    if find_chromium() is None:
        return f"no Chromium for the web UI test: {INSTALL_HINT}"
    if server.version == "N":
        if frontend_root() is None:
            return "the N server has no web UI: pip install comfyui-frontend-package (the version in its requirements.txt)"
        info = server.object_info()
        missing = [name for name in FRONTEND_LOADERS if name not in info]
        if missing:
            return (f"the ComfyUI frontend breaks without {missing} (ComfyUI's own requirements, e.g. spandrel, "
                    "are not installed)")
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
        self.responses: list[tuple[str, int]] = []
        """``(url, HTTP status)`` of every response the page received since :meth:`record_network`."""
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
        if method == "Network.responseReceived":
            response = params.get("response", {})
            self.responses.append((response.get("url", ""), int(response.get("status", 0))))
        elif method == "Runtime.exceptionThrown":
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
    def record_network(self) -> None:
        """From now on, collect the URL and status of every response in :attr:`responses`."""
        self.responses.clear()
        self.send("Network.enable")

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

    def hover(self, element: str, what: str = "") -> dict[str, float]:
        """Move the mouse onto the centre of the element a JavaScript expression returns (scrolled into
        view first), as a user pointing at it does: hover-revealed controls appear. Its centre."""
        box = self.evaluate(f"(() => {{ const el = ({element}); if (!el) return null; "
                            "el.scrollIntoView({block: 'center', inline: 'center'}); "
                            "const r = el.getBoundingClientRect(); "
                            "return {x: r.left + r.width / 2, y: r.top + r.height / 2, w: r.width, h: r.height}; })()")
        if not box or box["w"] <= 0 or box["h"] <= 0:
            raise BrowserError(f"cannot point at {what or element}: it is {'absent' if not box else 'not visible'}")
        point = {"x": box["x"], "y": box["y"]}
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", **point})
        self.pump(0.1)
        return point

    def click(self, element: str, what: str = "") -> None:
        """Click the element a JavaScript expression returns the way a user does: :meth:`hover`, then
        the left button pressed and released there (real input events, not ``element.click()``)."""
        point = self.hover(element, what)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "button": "left", "clickCount": 1, **point})

    def type_text(self, element: str, text: str) -> None:
        """Focus the input a JavaScript expression returns and type ``text`` into it (key by key input events)."""
        if not self.evaluate(f"(() => {{ const el = ({element}); if (!el) return false; el.focus(); "
                             "return document.activeElement === el; })()"):
            raise BrowserError(f"cannot focus {element}")
        for char in text:
            self.send("Input.insertText", {"text": char})

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport."""
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
