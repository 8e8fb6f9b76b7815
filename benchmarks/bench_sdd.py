"""Benchmark: Erase Concept (SDD) training speed and peak memory on the digits demo model.

Prints steps per second (CPU; and CUDA when a GPU is present) and the peak memory of the process
(CPU: resident set; CUDA: ``torch.cuda.max_memory_allocated``) for a short run of the node as a
graph would call it (the digit 7 erased, prompt "any" as the anchor, 64x64 px).

Usage: python benchmarks/bench_sdd.py [--steps 40]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from harness.runtime import ComfySession  # noqa: E402
from devtools.pack_file import load_pack_file  # noqa: E402

log = load_pack_file("demo/__init__.py", "sdn_demo").console_logger("benchmarks.bench_sdd")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    args = p.parse_args()
    session = ComfySession.start(Path(tempfile.mkdtemp(prefix="bench-sdd-")))
    session.load_pack(test_nodes=False)
    import torch

    nodes = session.nodes.NODE_CLASS_MAPPINGS
    model, _ = nodes["SDN_LoadDemoModel"]().load()
    concept = nodes["SDN_DemoDigitConditioning"]().encode("7")[0]
    anchor = nodes["SDN_DemoDigitConditioning"]().encode("any")[0]
    node = nodes["SDN_EraseConceptSDD"]()
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        start = time.perf_counter()
        node.train(model, concept, anchor, args.steps, 3e-4, 0.99, 3.0, "cross-attention", 64, 64, 0)
        seconds = time.perf_counter() - start
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    log.info("digits model, %d steps on %s (%d threads): %.2f steps/s, %.1f s; peak %s memory %.0f MiB",
             args.steps, device, torch.get_num_threads(), args.steps / seconds, seconds,
             "CUDA" if device == "cuda" else "process (resident)", peak)


if __name__ == "__main__":
    main()
