"""Benchmark: Erase Concept (SDD) training speed and peak memory.

Prints steps per second (CPU; and CUDA when a GPU is present) and the peak memory of the process
(CPU: resident set; CUDA: ``torch.cuda.max_memory_allocated``) for a short run of the node as a
graph would call it. ``--model digits`` (default): the digits demo model, the digit 7 erased, prompt
"any" as the anchor, 64x64 px. ``--model sd15``: a UNet of Stable Diffusion 1.5's architecture
(ComfyUI's own SD15 model class, 860M parameters, random weights: no checkpoint is needed) with
random 77x768 text conditionings, 512x512 px, batch 1: the memory an SD1.5 run needs, before any
GPU is at hand (needs a ComfyUI that can train: v0.3.64).

Usage: python benchmarks/bench_sdd.py [--steps 40] [--model digits|sd15] [--no-checkpointing]
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
    p.add_argument("--model", choices=("digits", "sd15"), default="digits",
                   help="the digits demo model, or an SD1.5-architecture UNet with random weights")
    p.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    args = p.parse_args()
    session = ComfySession.start(Path(tempfile.mkdtemp(prefix="bench-sdd-")))
    session.load_pack(test_nodes=False)
    import torch

    nodes = session.nodes.NODE_CLASS_MAPPINGS
    if args.model == "sd15":
        model, concept, anchor, size = sd15_unet(torch), *sd15_conditionings(torch), 512
    else:
        model, _ = nodes["SDN_LoadDemoModel"]().load()
        concept = nodes["SDN_DemoDigitConditioning"]().encode("7")[0]
        anchor = nodes["SDN_DemoDigitConditioning"]().encode("any")[0]
        size = 64
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    node = nodes["SDN_EraseConceptSDD"]()
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        start = time.perf_counter()
        node.train(model, concept, anchor, args.steps, 3e-4, 0.99, 3.0, "cross-attention", size, size, 0,
                   gradient_checkpointing=not args.no_checkpointing)
        seconds = time.perf_counter() - start
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    log.info("%s model, gradient checkpointing %s, %d steps on %s (%d threads): %.2f steps/s, %.1f s; peak %s "
             "memory %.0f MiB", args.model, "off" if args.no_checkpointing else "on", args.steps, device,
             torch.get_num_threads(), args.steps / seconds, seconds,
             "CUDA" if device == "cuda" else "process (resident)", peak)
    if device == "cpu":
        log.info("resident before training (runtime and the base model): %.0f MiB; the training added %.0f MiB",
                 before, peak - before)


def sd15_unet(torch):
    """A MODEL with Stable Diffusion 1.5's UNet (the published architecture, random weights)."""
    import comfy.model_patcher
    import comfy.supported_models
    from harness.tiny_models import init_weights_

    config = comfy.supported_models.SD15({
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
        "context_dim": 768, "use_spatial_transformer": True, "legacy": False, "use_linear_in_transformer": False,
        "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, 0)  # ComfyUI's layers skip initialisation: the weights would be garbage
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def sd15_conditionings(torch):
    """A concept and an anchor CONDITIONING of CLIP ViT-L's shape (77 tokens x 768), random."""
    gen = torch.Generator().manual_seed(0)
    return tuple([[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(2))


if __name__ == "__main__":
    main()
