"""Start a real ComfyUI server (``python main.py --cpu``) on loopback and drive its HTTP API.

The pack and ``tests/test_nodes`` are installed for the server through an
``extra_model_paths.yaml`` whose ``custom_nodes`` entry names a temporary directory holding
symlinks to them (see :func:`harness.runtime.make_custom_nodes_dir`), so nothing is copied.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ComfyPromptError
from .locate import REPO_ROOT, TEST_NODES_NAME, comfy_version, comfyui_dir, make_custom_nodes_dir, pack_name

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PathLike = str | os.PathLike[str]


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def frontend_root() -> Path | None:
    """The static directory of the installed ``comfyui_frontend_package`` (N's web UI), if any."""
    spec = importlib.util.find_spec("comfyui_frontend_package")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(list(spec.submodule_search_locations)[0]) / "static"
    return static if static.is_dir() else None


class ComfyServerError(RuntimeError):
    """The server did not start, died, or answered unexpectedly (message ends with its log tail)."""


class ComfyServer:
    """One ``main.py`` process with the pack loaded; use :meth:`start` / :meth:`stop` (or ``with``).

    ``extra_model_paths`` adds entries to the generated ``extra_model_paths.yaml``, e.g.
    ``{"negation_sets": tmp_dir}`` (a value may be a list of directories).
    """

    def __init__(self, work_dir: Path, *, comfy_path: Path | None = None,
                 extra_model_paths: Mapping[str, PathLike | Sequence[PathLike]] | None = None,
                 pack_root: Path = REPO_ROOT, python: str = sys.executable):
        self.work_dir = Path(work_dir)
        self.comfy_path = (comfy_path or comfyui_dir()).resolve()
        self.version = comfy_version(self.comfy_path)
        self.extra_model_paths = dict(extra_model_paths or {})
        self.pack_root = pack_root
        self.python = python
        self.port = 0
        self.log_path = self.work_dir / "server.log"
        self.output_dir = self.work_dir / "output"
        self.input_dir = self.work_dir / "input"
        self.temp_dir = self.work_dir / "temp"
        self._process: subprocess.Popen[bytes] | None = None
        self._prompts: dict[str, dict[str, Any]] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _write_config(self) -> Path:
        entries: dict[str, str] = {"custom_nodes": str(make_custom_nodes_dir(self.work_dir, self.pack_root))}
        for name, value in self.extra_model_paths.items():
            paths = [value] if isinstance(value, (str, os.PathLike)) else list(value)
            entries[name] = "\n".join(str(Path(p).resolve()) for p in paths)
        config = self.work_dir / "extra_model_paths.yaml"
        config.write_text(yaml.safe_dump({"sdn_tests": entries}, sort_keys=False), encoding="utf-8")
        return config

    def command(self) -> list[str]:
        """The server's command line (``main.py`` of the selected ComfyUI)."""
        for directory in (self.output_dir, self.input_dir, self.temp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, str(self.comfy_path / "main.py"), "--cpu", "--listen", HOST,
               "--port", str(self.port), "--disable-auto-launch",
               "--extra-model-paths-config", str(self._write_config()),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.temp_dir)]
        if self.version == "N":
            user_dir = self.work_dir / "user"
            user_dir.mkdir(exist_ok=True)
            # Keep a COMFYUI_PATH checkout read-only (user dir, database) and load only our packs.
            cmd += ["--user-directory", str(user_dir), "--database-url", "sqlite:///:memory:",
                    "--disable-api-nodes", "--disable-all-custom-nodes",
                    "--whitelist-custom-nodes", pack_name(), TEST_NODES_NAME]
            frontend = frontend_root()
            if frontend is not None:
                cmd += ["--front-end-root", str(frontend)]
            else:
                log.warning("comfyui_frontend_package is not installed: the server runs without a web UI")
        return cmd

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        """Start the server and wait until ``/object_info`` answers; raise with the log tail."""
        if self._process is not None:
            raise ComfyServerError("server already started")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd = self.command()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log.info("starting ComfyUI %s server: %s", self.version, " ".join(cmd))
        with self.log_path.open("wb") as log_file:
            self._process = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=log_file,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ComfyServerError(f"server exited with code {self._process.returncode} during start-up"
                                       f"\n{self.log_tail()}")
            try:
                self.object_info()
                log.info("ComfyUI server ready at %s", self.url)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                log.debug("server not ready yet: %s", exc)
            time.sleep(0.5)
        self.stop()
        raise ComfyServerError(f"server did not answer /object_info within {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server's whole process group (SIGTERM, then SIGKILL)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        pgid = os.getpgid(process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("server did not stop on SIGTERM; killing process group %d", pgid)
            os.killpg(pgid, signal.SIGKILL)
            process.wait(timeout)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server's log."""
        if not self.log_path.is_file():
            return "(no server log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "--- server log tail ---\n" + "\n".join(text[-lines:])

    # -- HTTP -----------------------------------------------------------------------------------
    def request(self, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        """``(status, decoded JSON body)`` of one request; HTTP error statuses are returned too."""
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
        except json.JSONDecodeError:
            return status, body.decode("utf-8", errors="replace")

    def get_json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise ComfyServerError(f"GET {path} answered {status}: {body}\n{self.log_tail(20)}")
        return body

    def object_info(self) -> dict[str, Any]:
        """``/object_info``: every node definition, by node id."""
        return self.get_json("/object_info")

    def post_prompt(self, prompt: dict[str, Any], client_id: str | None = None) -> str:
        """Queue an API prompt; return its prompt id or raise :class:`ComfyPromptError`."""
        payload = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        status, body = self.request("POST", "/prompt", payload)
        if status != 200:
            if isinstance(body, dict) and ("error" in body or "node_errors" in body):
                raise ComfyPromptError.from_validation(prompt, body.get("error"), body.get("node_errors") or {})
            raise ComfyServerError(f"POST /prompt answered {status}: {body}\n{self.log_tail(20)}")
        prompt_id = str(body["prompt_id"])
        self._prompts[prompt_id] = prompt
        return prompt_id

    def wait(self, prompt_id: str, timeout: float = 60.0, poll: float = 0.2) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished; return its history entry.

        Raises :class:`ComfyPromptError` if it failed, :class:`ComfyServerError` on timeout.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or status.get("completed") is False:
                    messages = [(m[0], m[1]) for m in status.get("messages", [])]
                    raise ComfyPromptError.from_execution(self._prompts.get(prompt_id, {}), messages)
                return entry
            if self._process is None or self._process.poll() is not None:
                raise ComfyServerError(f"server died while running prompt {prompt_id}\n{self.log_tail()}")
            time.sleep(poll)
        raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail()}")

    def run_prompt(self, prompt: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Queue a prompt, wait for it and return its ``outputs`` (``{node_id: ui_output}``)."""
        return self.wait(self.post_prompt(prompt), timeout)["outputs"]
