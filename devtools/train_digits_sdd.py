"""Train the shipped SDD edit of the digits demo: the digit 7 erased (600 steps, learning rate 3e-4,
EMA 0.99, seed 0; README "Erase Concept (SDD)"), written by Save Concept-Erased Weights' own code to
``demo/concept_erased/digits_sdd7.safetensors`` with its SHA-256 beside it.

Usage: COMFYUI_PATH=/path/to/ComfyUI-v0.3.64 python -m devtools.train_digits_sdd
(training needs a current ComfyUI; the result is deterministic for the seed on a given torch build)
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "demo" / "concept_erased" / "digits_sdd7.safetensors"
SETTINGS = dict(steps=600, learning_rate=3e-4, ema_decay=0.99, guidance=3.0, parameters="cross-attention",
                width=64, height=64, seed=0)


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from harness.runtime import ComfySession

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="train-digits-sdd-"))
    session = ComfySession.start(work)
    session.load_pack(test_nodes=False)
    (work / "out").mkdir()
    session.add_model_folder("concept_erased", work / "out", first=True)
    import torch

    nodes = session.nodes.NODE_CLASS_MAPPINGS
    model, _ = nodes["SDN_LoadDemoModel"]().load()
    cond = nodes["SDN_DemoDigitConditioning"]()
    with torch.inference_mode():
        _, edit, report = nodes["SDN_EraseConceptSDD"]().train(model, cond.encode("7")[0], cond.encode("any")[0],
                                                             **SETTINGS)["result"]
        saved = nodes["SDN_SaveConceptErasedWeights"]().save(edit, TARGET.stem, "diffusers", True)["result"][0]
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(saved, TARGET)
    digest = hashlib.sha256(TARGET.read_bytes()).hexdigest()
    TARGET.with_suffix(".safetensors.sha256").write_text(f"{digest}  {TARGET.name}\n", encoding="utf-8")
    logging.info("%s\nwrote %s (sha256 %s)", report, TARGET.relative_to(ROOT), digest[:16])


if __name__ == "__main__":
    main()
