"""File-system helpers shared by the node modules: model-folder registration, resolving a
dropdown entry inside its allowed roots (:func:`.files.confined`), atomic writes and the
declarations shared by the Save nodes (:class:`SaveFileNode`).

Rules (CONTRIBUTING.md): paths never escape their roots (no absolute paths, no ``..``, no
symlink that leads elsewhere) and files are written through a temp file + ``os.replace``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Iterable, Optional

import safetensors.torch
import torch

import folder_paths

from .comfy_compat import NodeInputError
from .files import OutsideRoot, confined

log = logging.getLogger(__name__)

_DRIVE = re.compile(r"^[A-Za-z]:")


def register_model_folder(folder_name: str, extensions: Iterable[str]) -> None:
    """Register ``models/<folder_name>`` with ComfyUI, keeping the dirs (and extensions) that
    ``extra_model_paths.yaml`` already added: that file is read before custom nodes load."""
    default = os.path.join(folder_paths.models_dir, folder_name)
    wanted = set(extensions)
    entry = folder_paths.folder_names_and_paths.get(folder_name)
    if entry is None:
        folder_paths.folder_names_and_paths[folder_name] = ([default], wanted)
        return
    paths, exts = entry
    if default not in paths:
        paths.append(default)
    if not wanted <= set(exts):
        folder_paths.folder_names_and_paths[folder_name] = (paths, set(exts) | wanted)


def relative_parts(name: str, node: str, what: str, fix: str) -> list[str]:
    """The components of a dropdown entry (``a/b/c``); absolute paths and ``..`` are refused."""
    if not isinstance(name, str) or not name.strip():
        raise NodeInputError(node, f"no {what} chosen. {fix}")
    rel = name.replace("\\", "/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if os.path.isabs(rel) or rel.startswith("/") or ".." in parts or not parts or _DRIVE.match(rel):
        raise NodeInputError(node, f"'{name}' is not a {what} name: absolute paths and '..' are refused. {fix}")
    return parts


def inside_root(root: str, rel: str, node: str, what: str = "the entry",
                fix: str = "Put the files inside the folder itself.") -> Optional[str]:
    """``root/rel`` resolved (symlinks followed), or None when absent; raises
    :class:`NodeInputError` when the resolved path escapes ``root``."""
    try:
        candidate = confined(root, rel)
    except OutsideRoot as err:
        raise NodeInputError(node, f"{what} '{rel}' resolves outside {err.root} (a '..' or a symlink "
                                   f"pointing elsewhere). {fix}") from err
    return candidate if os.path.exists(candidate) else None


def resolve_in_roots(name: str, roots: list[str], node: str, *, what: str, fix: str) -> str:
    """Absolute path of a dropdown entry found in the first of ``roots`` that holds it.

    Refuses absolute paths, ``..`` and anything that resolves outside its root; raises
    :class:`NodeInputError` (naming the roots searched) when no root holds it.
    """
    parts = relative_parts(name, node, what, fix)
    for root in roots:
        found = inside_root(root, "/".join(parts), node, what=f"the {what}", fix=fix)
        if found is not None:
            return found
    raise NodeInputError(node, f"{what} '{name}' was not found in {', '.join(roots) or '(no folders registered)'}. "
                               f"{fix}")


FILENAME_TOOLTIP = "File name (letters, digits, '.', '_', '-', spaces; no folders). '.safetensors' is added."


class SaveFileNode:
    """What the nodes that write one ``.safetensors`` file into a model folder declare alike: an
    output node whose ``save`` returns the written ``path`` (see :func:`output_path`)."""

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the file was written.",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @staticmethod
    def filename_input(default: str) -> tuple[str, dict]:
        """The ``filename`` input (checked by :func:`output_path`)."""
        return ("STRING", {"default": default, "tooltip": FILENAME_TOOLTIP})

    @staticmethod
    def overwrite_input() -> tuple[str, dict]:
        """The ``overwrite`` input (:func:`output_path` refuses an existing file without it)."""
        return ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of the same name."})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")


def output_path(folder_name: str, filename: str, overwrite: bool, node: str) -> str:
    """Where a Save node writes ``filename``: ``<first folder registered as folder_name>/<stem>.safetensors``.

    Refuses names with folders, ``..`` or odd characters, and an existing file unless ``overwrite``.
    """
    stem = (filename or "").strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not _SAFE_NAME.match(stem) or ".." in stem:
        raise NodeInputError(node, f"'{filename}' is not a valid file name: use letters, digits, '.', '_', '-' "
                                   "and spaces, without folders.")
    folders = folder_paths.get_folder_paths(folder_name)
    root = folders[0] if folders else os.path.join(folder_paths.models_dir, folder_name)
    path = os.path.join(root, stem + ".safetensors")
    if os.path.exists(path) and not overwrite:
        raise NodeInputError(node, f"{path} already exists. Choose another filename or enable overwrite.")
    return path


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    """Write a ``.safetensors`` file through a temp file in the same folder + rename."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
