"""Benchmark: NudeNet detection throughput of the Nudity Reward Preview, batch 1 vs batch 8.

Runs the pack's own detection path (``nodes/nudenet_detector.py``: the shared onnxruntime session,
the ComfyUI IMAGE -> uint8 BGR conversion, ``NudeDetector.detect_batch``) on 16 real photos from
scikit-image resized to 512x512 px, with the bundled 320n model, and prints images/second when the
images go to onnxruntime one at a time (batch 1) and eight at a time (batch 8). Needs no ComfyUI.

Usage: python benchmarks/bench_nudenet.py [--device cpu|auto] [--images 16] [--repeat 3]
       [--resolution 320] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.pack_file import load_pack_file  # noqa: E402

log = load_pack_file("demo/__init__.py", "sdn_demo").console_logger("benchmarks.bench_nudenet")

PHOTOS = ("astronaut", "camera", "coffee", "rocket", "chelsea", "immunohistochemistry")


def photo_batch(count: int, size: int = 512) -> torch.Tensor:
    """``count`` skimage photos as a ComfyUI IMAGE [count, size, size, 3] in 0..1."""
    import skimage.data
    from PIL import Image

    frames = []
    for i in range(count):
        array = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        image = Image.fromarray(array[..., :3]).resize((size, size), Image.BICUBIC)
        frames.append(np.asarray(image, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(frames))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "auto"),
                        help="cpu (default) or auto (a GPU provider when onnxruntime-gpu is installed)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="best of N timed passes")
    parser.add_argument("--resolution", type=int, default=320, help="inference resolution (320 for 320n)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    args = parser.parse_args()

    det = load_pack_file("nodes/nudenet_detector.py", "sdn_nodes.nudenet_detector")
    ort, nudenet_module = det._import_backend()
    gpu = "cuda" if args.device == "auto" else "cpu"
    providers = det.choose_providers(ort.get_available_providers(), args.device, gpu, 0)
    path = det.bundled_model_path()
    if args.threads:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
    else:
        session = det.open_session(ort, path, providers)
    detector = det.make_detector(nudenet_module, session, det.BUNDLED_MODEL, path, args.resolution)
    images = photo_batch(args.images)

    log.info(f"NudeNet 320n at {args.resolution} px, {args.images} images of 512x512, providers {detector.providers}, "
             f"{os.cpu_count()} CPU cores, onnxruntime {ort.__version__}")
    results = {}
    for batch in (1, 8):
        det.detect_images(detector, images[:batch], batch_size=batch)  # warm-up
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            found = det.detect_images(detector, images, batch_size=batch)
            best = min(best, time.perf_counter() - start)
        results[batch] = args.images / best
        log.info(f"batch {batch}: {results[batch]:6.1f} images/s ({1000 * best / args.images:5.1f} ms per image, "
                 f"{sum(len(d) for d in found)} detections)")
    log.info(f"batch 8 / batch 1: {results[8] / results[1]:.2f}x")


if __name__ == "__main__":
    main()
