"""Measure Erase Concept (SDD) on the digits demo model: the digit 7 erased, then samples of the
plain and the erased model (same seeds) classified for every prompt, and the erased model under the
Safe Denoiser KSampler (built-in negation set digits_7).  Prints one line per arm: the rate of 7s,
the prompted digit's rate, the distance to the nearest training digit and the total variation of
the ten classes against the plain model.

Usage: python -m devtools.sdd_digits [--steps 600] [--learning-rate 3e-4] [--ema 0.99] [--samples 300]
                                    [--sample-seed 0]
(needs a ComfyUI that can train: COMFYUI_PATH=/path/to/ComfyUI v0.3.64)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--sample-seed", type=int, default=0,
                   help="the samplers' seed (the same for every arm): another seed checks against sampling noise")
    args = p.parse_args()
    seed = args.sample_seed
    sys.path.insert(0, str(ROOT / "tests"))
    from harness.runtime import ComfySession

    import logging

    logging.basicConfig(level=logging.WARNING)
    out = logging.getLogger("devtools.sdd_digits")
    out.setLevel(logging.INFO)
    session = ComfySession.start(Path(tempfile.mkdtemp(prefix="sdd-digits-")))
    session.load_pack(test_nodes=False)
    import torch

    from demo import digits

    nodes = session.nodes.NODE_CLASS_MAPPINGS
    model, vae = nodes["SDN_LoadDemoModel"]().load()

    def cond(digit: str):
        return nodes["SDN_DemoDigitConditioning"]().encode(digit)[0]

    classifier, nearest = digits.DigitClassifier.load(), digits.NearestTraining.load()
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        start = time.time()
        erased, _, report = nodes["SDN_EraseConceptSDD"]().train(model, cond("7"), cond("any"), args.steps,
                                                                 args.learning_rate, args.ema, 3.0,
                                                                 "cross-attention", 64, 64, 0)["result"]
        out.info("%s\n(%.0f s)", report, time.time() - start)
        negation = nodes["SDN_LoadNegationSet"]().load("digits_7", 64, 0, vae)[0]

        def classify(latent):
            images = nodes["VAEDecode"]().decode(vae, latent)[0].numpy()
            labels = classifier.probabilities(images).argmax(1)
            return np.bincount(labels, minlength=digits.CLASSES) / len(labels), float(nearest.distances(images).mean())

        def sample(m, prompt, guidance=None):
            latent = {"samples": torch.zeros(args.samples, 4, 8, 8)}
            if guidance is None:
                return classify(nodes["KSampler"]().sample(m, seed, 20, 1.0, "euler", "normal", cond(prompt), cond("any"),
                                                           latent, 1.0)[0])
            result = nodes["SDN_SafeDenoiserKSampler"]().sample(m, seed, 20, 1.0, "euler", "normal", cond(prompt),
                                                                cond("any"), latent, 1.0, negation_set=negation,
                                                                mode="calibrated", start_percent=0.0, end_percent=1.0,
                                                                beta_threshold=0.0, **guidance)
            return classify(result[0])

        for prompt in ["7", "any"] + [str(d) for d in range(10) if d != 7]:
            (hp, dp), (he, de) = sample(model, prompt), sample(erased, prompt)
            target = "" if prompt == "any" else f" digit {prompt}: {hp[int(prompt)]:.3f} -> {he[int(prompt)]:.3f};"
            out.info("prompt %-3s 7s %.3f -> %.3f;%s distance %.2f -> %.2f; TV %.3f", prompt, hp[7], he[7], target,
                     dp, de, 0.5 * np.abs(hp - he).sum())
        for prompt, guidance in (("any", {"strength": 1.0, "bandwidth": 1.0}), ("7", {"strength": 3.0, "bandwidth": 2.0})):
            hist, dist = sample(erased, prompt, guidance)
            out.info("SDD + Safe Denoiser (%s), prompt %s: 7s %.3f, distance %.2f", guidance, prompt, hist[7], dist)


if __name__ == "__main__":
    main()
