"""Start a real ComfyUI server (``python main.py --cpu``) on loopback and drive its HTTP API.

The server itself is the pack's runner (:mod:`devtools.comfy.server`, shared with the demo); this
module gives it the tests' packs (the pack and ``tests/test_nodes``, linked into a temporary
``custom_nodes`` folder, see :func:`harness.locate.packs_under_test`), N's web UI when
``comfyui_frontend_package`` is installed, and the harness's :class:`ComfyPromptError`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from devtools.comfy import server as _server

from .errors import ComfyPromptError
from .locate import REPO_ROOT, comfyui_dir, packs_under_test

log = logging.getLogger(__name__)

HOST: str = _server.HOST
PathLike = str | os.PathLike[str]
ComfyServerError = _server.ServerError
free_port = _server.free_port


def frontend_root() -> Path | None:
    """The static directory of the installed ``comfyui_frontend_package`` (N's web UI), if any."""
    spec = importlib.util.find_spec("comfyui_frontend_package")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(list(spec.submodule_search_locations)[0]) / "static"
    return static if static.is_dir() else None


class ComfyServer(_server.ComfyServer):
    """One ``main.py`` process with the pack and the test nodes loaded; use :meth:`start` /
    :meth:`stop` (or ``with``).  Prompt failures raise :class:`ComfyPromptError`.

    ``extra_model_paths`` adds entries to the generated ``extra_model_paths.yaml``, e.g.
    ``{"negation_sets": tmp_dir}`` (a value may be a list of directories).
    """

    def __init__(self, work_dir: Path, *, comfy_path: Path | None = None,
                 extra_model_paths: Mapping[str, PathLike | Sequence[PathLike]] | None = None,
                 pack_root: Path = REPO_ROOT, python: str = sys.executable):
        comfy_path = comfy_path or comfyui_dir()
        self.pack_root = pack_root
        front_end = frontend_root()
        super().__init__(comfy_path, work_dir, packs=packs_under_test(pack_root),
                         extra_model_paths=extra_model_paths, front_end_root=front_end, python=python)
        if self.version == "N" and front_end is None:
            log.warning("comfyui_frontend_package is not installed: the server runs without a web UI")

    def refused(self, prompt: Mapping[str, Any], body: Mapping[str, Any]) -> ComfyPromptError:
        return ComfyPromptError.from_validation(dict(prompt), body.get("error"), body.get("node_errors") or {})

    def failed(self, prompt: Mapping[str, Any], messages: list[tuple[str, dict[str, Any]]]) -> ComfyPromptError:
        return ComfyPromptError.from_execution(dict(prompt), messages)

    def prompt_error(self, prompt: dict[str, Any], timeout: float = 60.0) -> ComfyPromptError | None:
        """The error ComfyUI reports for ``prompt``, or None if it ran successfully.

        A validation error comes from ``POST /prompt`` (HTTP 400: ``error`` + ``node_errors``,
        the same in N and O); an execution error from the ``execution_error`` message in
        ``/history/<id>`` ``status.messages`` (N and O both record the executor's status
        messages there, with ``node_id``, ``node_type``, ``exception_type`` and
        ``exception_message``).  :class:`ComfyServerError` (server died, timeout) propagates.
        """
        try:
            self.run_prompt(prompt, timeout)
        except ComfyPromptError as err:
            return err
        return None
