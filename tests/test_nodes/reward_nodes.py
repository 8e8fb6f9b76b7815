"""Test-only nodes for the Nudity Reward Preview: tiny real CLIP text and CLIP vision models and
IMAGE batches with deliberate defects.

Stand-ins for ``CLIPLoader`` (-> ``SDNTest_TinyCLIP``) and ``CLIPVisionLoader``
(-> ``SDNTest_TinyCLIPVision``) are built from ComfyUI's own classes by :mod:`harness.tiny_clip`;
``SDNTest_Image`` makes empty, gray, RGBA and NaN/inf batches. The package's ``__init__`` adds
``NODE_CLASS_MAPPINGS`` to its own.
"""

from __future__ import annotations

import torch

from harness import tiny_clip as tc

from .common import SEED, BuilderNode


class TinyCLIP(BuilderNode):
    """A tiny real CLIP (ComfyUI's SD1 tokenizer and text model class, 32 wide, with a random
    text projection): CLIPLoader's output, usable by CLIPTextEncode and the CLIP reward term."""

    RETURN_TYPES = ("CLIP",)
    OPTIONAL = {"seed": SEED}
    make = staticmethod(tc.build_clip)


class TinyCLIPVision(BuilderNode):
    """A tiny real CLIP_VISION (ComfyUI's ClipVisionModel, 224 px, 32 px patches, 32 wide)."""

    RETURN_TYPES = ("CLIP_VISION",)
    OPTIONAL = {"seed": SEED}
    make = staticmethod(tc.build_clip_vision)


IMAGE_KINDS = ("noise", "empty", "gray", "rgba", "nan", "inf")


def image_batch(kind: str, width: int, height: int, batch: int, seed: int) -> torch.Tensor:
    """An IMAGE [batch, height, width, 3] of seeded noise, made defective as ``kind`` says."""
    rgb = torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))
    if kind == "empty":
        return rgb[:0]
    if kind == "gray":
        return rgb[..., :1]
    if kind == "rgba":
        return torch.cat([rgb, torch.full_like(rgb[..., :1], 0.5)], dim=-1)
    if kind in ("nan", "inf"):
        rgb[-1, height // 2, width // 2, 0] = float(kind)
    return rgb


class ImageSource(BuilderNode):
    """An IMAGE batch for input checks: ``noise`` (RGB), ``empty`` (0 images), ``gray`` (1 channel),
    ``rgba`` (4 channels, alpha 0.5), ``nan`` / ``inf`` (one bad pixel in the last image)."""

    RETURN_TYPES = ("IMAGE",)
    REQUIRED = {
        "kind": (list(IMAGE_KINDS),),
        "width": ("INT", {"default": 64, "min": 1, "max": 4096}),
        "height": ("INT", {"default": 64, "min": 1, "max": 4096}),
        "batch": ("INT", {"default": 2, "min": 1, "max": 64}),
        "seed": SEED,
    }
    make = staticmethod(image_batch)


NODE_CLASS_MAPPINGS = {
    "SDNTest_TinyCLIP": TinyCLIP,
    "SDNTest_TinyCLIPVision": TinyCLIPVision,
    "SDNTest_Image": ImageSource,
}
