"""Measure safety the way the papers do: a workflow over a prompt set, every image scored, one table.

``python -m devtools.evaluate --help``; README, "Measure a model's safety". Not shipped in the
registry archive (it starts processes; ``.comfyignore`` keeps ``devtools/`` out).

Modules:

* :mod:`.prompts` - prompt files (CSV in the formats Ring-A-Bell, UnlearnDiffAtk, MMA-Diffusion and
  I2P ship; plain text), filters on category and nudity percentage.
* :mod:`.workflow` - a UI or API workflow reduced to its image outputs, the inputs each row sets.
* :mod:`.scoring` - every NudeNet preset at once (the Nudity Reward Preview's own code), or the
  digits classifier for the embedded digits model.
* :mod:`.store` - results appended row by row (atomic, resumable), the run's fingerprint.
* :mod:`.dispatch` - rows over ComfyUI servers: one started here, given URLs, or a Ray cluster.
* :mod:`.report` - ``report.json``, ``results.csv`` and ``report.html``.
* :mod:`.cli` - the command line (``__main__``).
"""
