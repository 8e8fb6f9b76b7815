"""Run prompts through a real ComfyUI imported into this process.

Which ComfyUI (``COMFYUI_PATH`` for "N", else the vendored 2024-03 "O") is decided by
:mod:`harness.locate`; :func:`comfyui_dir` and :func:`comfy_version` are re-exported here.

Only one ComfyUI can be imported per Python process (it owns top-level modules such as
``nodes``, ``execution``, ``folder_paths``): :class:`ComfySession` enforces that.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import os
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import ComfyPromptError
from .locate import (ENV_VAR, REPO_ROOT, TEST_NODES_NAME, ComfyVersion, comfy_version, comfyui_dir,
                     make_custom_nodes_dir, pack_name)

__all__ = ["ENV_VAR", "REPO_ROOT", "ComfySession", "ComfyVersion", "PromptResult", "StubServer",
           "comfy_version", "comfyui_dir", "run_maybe_async"]

log = logging.getLogger(__name__)

#: Nodes from ``comfy_extras`` that tests rely on; missing ones make the session fail loudly.
#: (O predates ``SamplerCustomAdvanced``, added in 2024-04.)
REQUIRED_EXTRA_NODES: dict[str, tuple[str, ...]] = {
    "O": ("SamplerCustom", "KSamplerSelect", "BasicScheduler"),
    "N": ("SamplerCustom", "SamplerCustomAdvanced", "KSamplerSelect", "BasicScheduler"),
}


def run_maybe_async(value: Any) -> Any:
    """The value itself, or the result of awaiting it (N's node loading/validation is async)."""
    if not inspect.isawaitable(value):
        return value

    async def wait() -> Any:
        return await value

    return asyncio.run(wait())


class StubServer:
    """The attributes and methods of ``server.PromptServer`` that ``PromptExecutor`` touches.

    O reads ``client_id`` and ``last_node_id`` and calls ``send_sync``; N also reads
    ``sockets_metadata`` (progress previews) and ``last_prompt_id``.  Messages are dropped: the
    executor keeps its own ``status_messages``.
    """

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, Any] = {}

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        """Drop a websocket message (no clients in-process)."""

    def queue_updated(self) -> None:
        """No queue in-process."""


class PromptResult(dict):
    """``{node_id: ui_output}`` of one executed prompt, plus the nodes' Python return values."""

    def __init__(self, ui: dict[str, Any], outputs: dict[str, list[Any]], prompt_id: str):
        super().__init__(ui)
        self.prompt_id = prompt_id
        self._outputs = outputs

    def outputs(self, node_id: str) -> list[Any]:
        """The raw cached outputs of ``node_id``: one list (of list items) per output socket."""
        try:
            return self._outputs[str(node_id)]
        except KeyError:
            raise KeyError(f"node {node_id} has no cached outputs (known: {sorted(self._outputs)})") from None

    def result(self, node_id: str) -> tuple[Any, ...]:
        """The Python return values of ``node_id``: the first list item of each output socket
        (use :meth:`outputs` for ``OUTPUT_IS_LIST`` outputs)."""
        return tuple(o[0] if o else None for o in self.outputs(node_id))


class _LogCapture(logging.Handler):
    """Collects log records (ComfyUI reports custom-node import failures only by logging)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


class ComfySession:
    """ComfyUI imported into this process, with the pack loaded, running prompts like the server.

    Create with :meth:`start`.  ``version`` is "N" or "O"; ``nodes``, ``execution`` and
    ``folder_paths`` are ComfyUI's own modules.
    """

    def __init__(self, work_dir: Path, path: Path | None = None):
        self.path = (path or comfyui_dir()).resolve()
        self.version: ComfyVersion = comfy_version(self.path)
        self.work_dir = Path(work_dir)
        self.nodes: ModuleType
        self.execution: ModuleType
        self.folder_paths: ModuleType
        self._server = StubServer()
        self._executor: Any = None
        self._executed_classes: dict[str, str] = {}  # node id -> class_type, for the executor's cache
        self.loaded_modules: list[str] = []

    # -- start-up -------------------------------------------------------------------------------
    @classmethod
    def start(cls, work_dir: Path, path: Path | None = None) -> "ComfySession":
        """Import ComfyUI, point its folders at ``work_dir`` and load the builtin extra nodes."""
        session = cls(work_dir, path)
        session._import_comfyui()
        session._set_directories()
        session._init_builtin_nodes()
        return session

    def _import_comfyui(self) -> None:
        loaded = sys.modules.get("nodes")
        if loaded is not None:
            origin = Path(getattr(loaded, "__file__", "") or "").resolve()
            if origin.parent != self.path:
                raise RuntimeError(f"A different `nodes` module is already imported ({origin}); "
                                   "one ComfyUI per process.")
        if str(self.path) not in sys.path:
            sys.path.insert(0, str(self.path))
        saved_argv = sys.argv
        # SDN_TEST_GPU=1: let ComfyUI pick the GPU (the CUDA paths of the in-process tests); else the CPU.
        sys.argv = ["comfyui-in-process"] + ([] if os.environ.get("SDN_TEST_GPU") == "1" else ["--cpu"])
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401  (parses sys.argv once, at import)
        finally:
            sys.argv = saved_argv
        if (self.path / "utils" / "__init__.py").is_file():
            # N: nodes.py puts ComfyUI's comfy/ dir first on sys.path, where comfy/utils.py would
            # then shadow the top-level `utils` package; main.py imports that package first.
            import utils  # noqa: F401
        import execution
        import folder_paths
        import nodes

        for module in (nodes, execution, folder_paths):
            if Path(module.__file__).resolve().parent != self.path:
                raise RuntimeError(f"{module.__name__} imported from {module.__file__}, not {self.path}: "
                                   "something shadows ComfyUI on sys.path.")
        self.nodes, self.execution, self.folder_paths = nodes, execution, folder_paths
        log.info("ComfyUI %s imported from %s", self.version, self.path)

    def _set_directories(self) -> None:
        fp = self.folder_paths
        for kind, setter in (("output", fp.set_output_directory), ("temp", fp.set_temp_directory),
                             ("input", fp.set_input_directory)):
            directory = self.work_dir / kind
            directory.mkdir(parents=True, exist_ok=True)
            setter(str(directory))

    def _init_builtin_nodes(self) -> None:
        nodes, fp = self.nodes, self.folder_paths
        if self.version == "N":
            run_maybe_async(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        else:
            # O's init_custom_nodes() also imports everything in the ComfyUI dir's custom_nodes/:
            # point that folder at an empty directory for the call.
            empty = self.work_dir / "no_custom_nodes"
            empty.mkdir(parents=True, exist_ok=True)
            saved = fp.folder_names_and_paths["custom_nodes"]
            fp.folder_names_and_paths["custom_nodes"] = ([str(empty)], set())
            try:
                nodes.init_custom_nodes()
            finally:
                fp.folder_names_and_paths["custom_nodes"] = saved
        missing = [n for n in REQUIRED_EXTRA_NODES[self.version] if n not in nodes.NODE_CLASS_MAPPINGS]
        if missing:
            raise RuntimeError(f"ComfyUI's comfy_extras nodes did not load: missing {missing} (see log).")

    # -- custom nodes ---------------------------------------------------------------------------
    def load_custom_node(self, module_path: Path) -> None:
        """Load one custom node module/package with ComfyUI's own loader; raise if it fails."""
        capture = _LogCapture()
        root = logging.getLogger()
        root.addHandler(capture)
        try:
            ok = run_maybe_async(self.nodes.load_custom_node(str(module_path)))
        finally:
            root.removeHandler(capture)
        if not ok:
            detail = "\n".join(capture.records[-5:])
            raise RuntimeError(f"ComfyUI failed to load custom node {module_path}:\n{detail}")
        self.loaded_modules.append(str(module_path))

    def load_pack(self, pack_root: Path = REPO_ROOT, test_nodes: bool = True) -> Path:
        """Load the pack (and ``tests/test_nodes``) through symlinks named as when installed."""
        custom_nodes = make_custom_nodes_dir(self.work_dir, pack_root)
        self.load_custom_node(custom_nodes / pack_name())
        if test_nodes:
            self.load_custom_node(custom_nodes / TEST_NODES_NAME)
        return custom_nodes

    def add_model_folder(self, folder_name: str, path: Path, first: bool = False) -> None:
        """Register an extra model folder, like an ``extra_model_paths.yaml`` entry.

        ``first=True`` puts it ahead of the folders already registered, so its entries win over
        same-named ones that other tests of the session registered earlier.
        """
        self.folder_paths.add_model_folder_path(folder_name, str(path))
        if first:  # O's add_model_folder_path has no is_default: reorder (same list in N and O)
            paths = self.folder_paths.folder_names_and_paths[folder_name][0]
            paths.remove(str(path))
            paths.insert(0, str(path))

    # -- node definitions -----------------------------------------------------------------------
    def node_module(self, name: str) -> ModuleType:
        """The pack's ``nodes/<name>.py`` as ComfyUI loaded it (its package name depends on the
        folder the pack is installed under)."""
        package = self.nodes.NODE_CLASS_MAPPINGS["SDN_LoadNegationSet"].__module__.rsplit(".", 1)[0]
        return sys.modules[f"{package}.{name}"]

    def object_info(self) -> dict[str, dict[str, Any]]:
        """Node definitions shaped like the server's ``/object_info`` (input, output, flags)."""
        info: dict[str, dict[str, Any]] = {}
        for name, cls in self.nodes.NODE_CLASS_MAPPINGS.items():
            if hasattr(cls, "GET_NODE_INFO_V1"):  # N's V3 (comfy_api) nodes
                info[name] = cls.GET_NODE_INFO_V1()
                continue
            inputs = cls.INPUT_TYPES()
            info[name] = {
                "input": inputs,
                "input_order": {key: list(value) for key, value in inputs.items()},
                "output": list(cls.RETURN_TYPES),
                "name": name,
                "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
            }
        return info

    # -- execution ------------------------------------------------------------------------------
    def _new_executor(self) -> Any:
        # N: PromptExecutor(server, cache_type=False, cache_size=None) (classic cache);
        # O: PromptExecutor(server).  The positional call is valid for both.
        return self.execution.PromptExecutor(self._server)

    def validate(self, prompt: dict[str, Any], prompt_id: str = "validate") -> list[str]:
        """Validate an API prompt; return the output node ids or raise :class:`ComfyPromptError`."""
        for node_id, node in prompt.items():
            class_type = node.get("class_type") if isinstance(node, dict) else None
            if class_type not in self.nodes.NODE_CLASS_MAPPINGS:
                # O's validate_prompt raises KeyError here; N reports "invalid_prompt".
                raise ComfyPromptError("validation", f"node type {class_type!r} does not exist",
                                       node_id=str(node_id), class_type=class_type,
                                       exception_type="invalid_prompt")
        if self.version == "N":
            result = run_maybe_async(self.execution.validate_prompt(prompt_id, prompt, None))
        else:
            result = self.execution.validate_prompt(prompt)
        ok, error, good_outputs, node_errors = result
        if not ok or node_errors:
            raise ComfyPromptError.from_validation(prompt, error, node_errors)
        return list(good_outputs)

    def run_prompt(self, prompt: dict[str, Any], *, fresh: bool = False,
                   extra_data: dict[str, Any] | None = None) -> PromptResult:
        """Validate and execute an API prompt like the server's queue worker does.

        The executor (and so ComfyUI's output cache) persists across calls, as in the server;
        ``fresh=True`` starts from an empty cache.  So does a prompt that reuses a node id for
        another class: O's cache is keyed by node id and compares only the inputs, so it would hand
        that node the old class's outputs (e.g. two workflows whose node "1" is a loader without
        inputs).  Raises :class:`ComfyPromptError`.
        """
        prompt = copy.deepcopy(prompt)
        prompt_id = str(uuid.uuid4())
        outputs = self.validate(prompt, prompt_id)
        classes = {str(node_id): node["class_type"] for node_id, node in prompt.items()}
        reused = any(self._executed_classes.get(node_id, cls) != cls for node_id, cls in classes.items())
        if fresh or reused or self._executor is None:
            self._executor = self._new_executor()
            self._executed_classes = {}
        self._executed_classes.update(classes)
        executor = self._executor
        executor.execute(prompt, prompt_id, dict(extra_data or {}), outputs)
        messages = list(executor.status_messages)
        events = [event for event, _ in messages]
        failed = ("execution_error" in events or "execution_interrupted" in events
                  or not executor.success or (self.version == "N" and "execution_success" not in events))
        if failed:
            raise ComfyPromptError.from_execution(prompt, messages)
        if self.version == "N":
            ui = dict(executor.history_result["outputs"])
        else:
            ui = dict(executor.outputs_ui)
        return PromptResult(ui, {nid: self._cached_outputs(nid) for nid in prompt}, prompt_id)

    def _cached_outputs(self, node_id: str) -> list[Any]:
        executor = self._executor
        if self.version == "N":
            value = executor.caches.outputs.get(node_id)
            value = getattr(value, "outputs", value)  # newer N wraps entries in CacheEntry
        else:
            value = executor.outputs.get(node_id)
        return [] if value is None else list(value)
