"""A real ComfyUI server (``python main.py --cpu``) on loopback with this pack, driven over HTTP.

Shared by the demo runner (``demo/run_demo.py``) and the test harness (``tests/harness/server.py``
subclasses :class:`ComfyServer`, adding the test-only nodes and its own error types through
:meth:`ComfyServer.refused` / :meth:`ComfyServer.failed`). Packs are installed for the server
through an ``extra_model_paths.yaml`` whose ``custom_nodes`` entry names a folder of symlinks
(:func:`devtools.comfy.locate.link_custom_nodes`), so nothing is copied. On current ComfyUI ("N") the
server gets a private user folder and an in-memory database (a ``COMFYUI_PATH`` checkout stays
read-only) and loads only the packs it was given. Imports only the standard library.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .locate import comfy_version, link_custom_nodes

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PathLike = Union[str, os.PathLike]
#: Section name of the generated ``extra_model_paths.yaml``.
CONFIG_SECTION = "safe_denoiser_server"


class ServerError(RuntimeError):
    """The server did not start, died, refused or failed a prompt, or answered unexpectedly."""


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def stop_process_group(process: Optional[subprocess.Popen], timeout: float = 10.0) -> None:
    """End the process group of ``process`` (started with ``start_new_session=True``): SIGTERM,
    then SIGKILL after ``timeout`` seconds. Nothing happens when it has already exited."""
    if process is None or process.poll() is not None:
        return
    pgid = os.getpgid(process.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("process group %d did not stop on SIGTERM; killing it", pgid)
        os.killpg(pgid, signal.SIGKILL)
        process.wait(timeout)


def log_tail(path: Path, lines: int, title: str) -> str:
    """The last ``lines`` lines of a log file under a ``--- title ---`` line."""
    if not path.is_file():
        return f"(no {title})"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return f"--- {title} ---\n" + "\n".join(text[-lines:])


def write_extra_model_paths(path: Path, entries: Mapping[str, Union[PathLike, Sequence[PathLike]]]) -> Path:
    """An ``extra_model_paths.yaml`` with one section of ``{folder name: directory or directories}``.

    Written without PyYAML: each value is a JSON string, which YAML reads as a double-quoted
    scalar; several directories become one value of lines, as ComfyUI reads them.
    """
    lines = [f"{CONFIG_SECTION}:"]
    for name, value in entries.items():
        paths = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        lines.append(f"  {json.dumps(name)}: {json.dumps(chr(10).join(str(Path(p).resolve()) for p in paths))}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class ComfyClient:
    """HTTP client of a running ComfyUI (``POST /prompt``, ``/history``, ``/view``, ``/object_info``).

    Used as is for servers someone else started (``ComfyClient("http://host:8188")``) and as the
    base of :class:`ComfyServer`, which owns its process. :meth:`alive` is how :meth:`wait` learns
    that the server died (an attached client can only tell from failed requests).
    """

    def __init__(self, url: str = ""):
        self._url = url.rstrip("/")
        self._prompts: dict[str, dict[str, Any]] = {}

    @property
    def url(self) -> str:
        return self._url

    def alive(self) -> bool:
        """False once the server is known to have exited."""
        return True

    def log_tail(self, lines: int = 60) -> str:
        """The server's log tail where this client can read it (an attached server: nothing)."""
        return ""

    # -- HTTP -----------------------------------------------------------------------------------
    def request(self, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        """``(status, body)`` of one request: decoded JSON, else text, else raw bytes (images);
        HTTP error statuses are returned too."""
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read()
        try:
            return status, json.loads(body) if body else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            try:
                return status, body.decode("utf-8")
            except UnicodeDecodeError:
                return status, body

    def get_json(self, path: str) -> Any:
        """The body of ``GET path``; :class:`ServerError` unless it answers 200."""
        status, body = self.request("GET", path)
        if status != 200:
            raise ServerError(f"GET {path} answered {status}: {body}\n{self.log_tail(20)}")
        return body

    def object_info(self) -> dict[str, Any]:
        """``/object_info``: every node definition, by node id."""
        return self.get_json("/object_info")

    def refused(self, prompt: Mapping[str, Any], body: Mapping[str, Any]) -> Exception:
        """The exception for a prompt ComfyUI refused (``POST /prompt``'s ``error`` + ``node_errors``)."""
        return ServerError(f"ComfyUI refused the prompt: {json.dumps(body)[:2000]}")

    def failed(self, prompt: Mapping[str, Any], messages: list[tuple[str, dict[str, Any]]]) -> Exception:
        """The exception for a prompt that failed to run (its ``/history`` status messages)."""
        errors = [data for event, data in messages if event == "execution_error"]
        detail = errors[-1].get("exception_message", "") if errors else [event for event, _ in messages]
        return ServerError(f"ComfyUI failed to run the prompt: {detail}\n{self.log_tail(20)}")

    def post_prompt(self, prompt: dict[str, Any], client_id: Optional[str] = None) -> str:
        """Queue an API prompt; return its prompt id or raise :meth:`refused`'s exception."""
        payload = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        status, body = self.request("POST", "/prompt", payload)
        if status != 200:
            if isinstance(body, dict) and ("error" in body or "node_errors" in body):
                raise self.refused(prompt, body)
            raise ServerError(f"POST /prompt answered {status}: {body}\n{self.log_tail(20)}")
        prompt_id = str(body["prompt_id"])
        self._prompts[prompt_id] = prompt
        return prompt_id

    def wait(self, prompt_id: str, timeout: float = 60.0, poll: float = 0.1) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished; return its history entry.

        Raises :meth:`failed`'s exception if it failed, :class:`ServerError` if the server died
        or the prompt did not finish within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or status.get("completed") is False:
                    messages = [(m[0], m[1]) for m in status.get("messages", [])]
                    raise self.failed(self._prompts.get(prompt_id, {}), messages)
                return entry
            if not self.alive():
                raise ServerError(f"ComfyUI died while running prompt {prompt_id}\n{self.log_tail()}")
            time.sleep(poll)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail()}")

    def run_prompt(self, prompt: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Queue a prompt, wait for it and return its ``outputs`` (``{node_id: ui_output}``)."""
        return self.wait(self.post_prompt(prompt), timeout)["outputs"]

    def view(self, item: Mapping[str, Any], timeout: float = 60.0) -> bytes:
        """The bytes of one image of a history entry's outputs (``{"filename", "subfolder", "type"}``)
        through ``GET /view``, so a server on another machine works as well as a local one."""
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                        "type": item.get("type", "output")})
        status, body = self.request("GET", f"/view?{query}", timeout=timeout)
        if status != 200 or not isinstance(body, (bytes, bytearray)):
            raise ServerError(f"GET /view for {item.get('filename')!r} answered {status}")
        return bytes(body)


class ComfyServer(ComfyClient):
    """One ``main.py --cpu`` process on loopback; :meth:`start` / :meth:`stop` (or ``with``).

    ``packs`` ``{installed name: folder}`` are linked into a ``custom_nodes`` folder for the
    server; ``whitelist`` names packs already installed in the checkout's ``custom_nodes``
    (on N only the packs named in either are loaded). ``extra_model_paths`` adds entries to the
    generated ``extra_model_paths.yaml``, e.g. ``{"negation_sets": folder}`` (a value may be a
    list of folders). ``front_end_root`` is passed to N as ``--front-end-root``.
    """

    def __init__(self, comfy_path: Path, work_dir: Path, *, packs: Optional[Mapping[str, Path]] = None,
                 whitelist: Sequence[str] = (),
                 extra_model_paths: Optional[Mapping[str, Union[PathLike, Sequence[PathLike]]]] = None,
                 front_end_root: Optional[Path] = None, python: str = sys.executable):
        self.comfy_path = Path(comfy_path).resolve()
        self.version = comfy_version(self.comfy_path)
        self.work_dir = Path(work_dir)
        self.packs = dict(packs or {})
        self.whitelist = [*self.packs, *whitelist]
        self.extra_model_paths = dict(extra_model_paths or {})
        self.front_end_root = front_end_root
        self.python = python
        self.port = 0
        self.boot_seconds = 0.0
        self.log_path = self.work_dir / "server.log"
        self.output_dir = self.work_dir / "output"
        self.input_dir = self.work_dir / "input"
        self.temp_dir = self.work_dir / "temp"
        self._process: Optional[subprocess.Popen] = None
        super().__init__()

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        """The server's command line (``main.py`` of the selected ComfyUI); makes its folders."""
        for directory in (self.output_dir, self.input_dir, self.temp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, str(self.comfy_path / "main.py"), "--cpu", "--listen", HOST, "--port", str(self.port),
               "--disable-auto-launch", "--output-directory", str(self.output_dir),
               "--input-directory", str(self.input_dir), "--temp-directory", str(self.temp_dir)]
        entries: dict[str, Any] = dict(self.extra_model_paths)
        if self.packs:
            entries = {"custom_nodes": link_custom_nodes(self.work_dir, self.packs), **entries}
        if entries:
            config = write_extra_model_paths(self.work_dir / "extra_model_paths.yaml", entries)
            cmd += ["--extra-model-paths-config", str(config)]
        if self.version == "N":
            cmd += self._isolation_flags()
        return cmd

    def _isolation_flags(self) -> list[str]:
        """N's flags that keep the checkout read-only and load only our packs (those it knows)."""
        known = (self.comfy_path / "comfy" / "cli_args.py").read_text(encoding="utf-8")
        user_dir = self.work_dir / "user"
        user_dir.mkdir(exist_ok=True)
        flags = [("--user-directory", [str(user_dir)]), ("--database-url", ["sqlite:///:memory:"]),
                 ("--disable-api-nodes", [])]
        if self.whitelist and "--whitelist-custom-nodes" in known:
            flags += [("--disable-all-custom-nodes", []), ("--whitelist-custom-nodes", self.whitelist)]
        if self.front_end_root is not None:
            flags.append(("--front-end-root", [str(self.front_end_root)]))
        cmd: list[str] = []
        for flag, values in flags:
            if flag in known:
                cmd += [flag, *values]
            else:
                log.info("ComfyUI at %s has no %s flag; started without it", self.comfy_path, flag)
        return cmd

    @staticmethod
    def environment() -> dict[str, str]:
        # Waiting threads sleep instead of spinning: on a shared CPU, spinning OpenMP threads take
        # the cores their partners need (measured several times slower under load).
        return dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        """Start the server and wait until ``/object_info`` answers (``boot_seconds`` records how
        long that took); raise :class:`ServerError` with the log tail if it does not."""
        if self._process is not None:
            raise ServerError("server already started")
        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd = self.command()
        log.info("starting ComfyUI %s server: %s", self.version, " ".join(cmd))
        with self.log_path.open("wb") as log_file:
            self._process = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=log_file, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.environment(),
                                             start_new_session=True)
        while time.monotonic() - started < timeout:
            if self._process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self._process.returncode} during start-up"
                                  f"\n{self.log_tail()}")
            try:
                self.request("GET", "/object_info", timeout=10)
                self.boot_seconds = time.monotonic() - started
                log.info("ComfyUI server ready at %s in %.1f s", self.url, self.boot_seconds)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                log.debug("server not ready yet: %s", exc)
            time.sleep(0.3)
        self.stop()
        raise ServerError(f"ComfyUI did not answer /object_info within {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server's whole process group (SIGTERM, then SIGKILL)."""
        process, self._process = self._process, None
        stop_process_group(process, timeout)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server's log."""
        return log_tail(self.log_path, lines, f"ComfyUI server log ({self.log_path})")
