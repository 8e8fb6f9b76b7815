"""The embedded default: a tiny class-conditional latent diffusion model of handwritten digits.

Lets the pack run its main job anywhere, in minutes, without downloading a checkpoint:

* :mod:`demo.digits` - the shipped bundle (weights, the 8x8 digits it was trained on, the
  measuring classifier), its hash check, the negation-set images and the classifier (numpy
  only; no ComfyUI import).
* ``python -m demo.train_digits`` - the seeded training script that wrote the bundle.
* ``python -m demo.run_demo`` (``bash demo/run.sh`` sets up an environment first) - starts a
  real ComfyUI headless, runs ``example_workflows/digits_demo.json`` through ``/prompt`` and
  measures what the Safe Denoiser removes.

The scripts find and start ComfyUI with the runner in ``devtools/comfy`` (not shipped; they run
from the repository root). The ComfyUI nodes that use the bundle live in :mod:`nodes.demo`.
"""

import logging as _logging
import sys as _sys


def console_logger(name: str, quiet: bool = False) -> _logging.Logger:
    """The logger ``name`` of a command-line script (the demo, the benchmarks), writing bare messages
    to stdout: INFO and up, WARNING and up when ``quiet``. Idempotent; does not propagate."""
    logger = _logging.getLogger(name)
    if not any(getattr(h, "sdn_console", False) for h in logger.handlers):
        handler = _logging.StreamHandler(_sys.stdout)
        handler.setFormatter(_logging.Formatter("%(message)s"))
        handler.sdn_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(_logging.WARNING if quiet else _logging.INFO)
    logger.propagate = False
    return logger
