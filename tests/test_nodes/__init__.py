"""Test-only ComfyUI custom nodes: tiny real models and an exact analytic denoiser.

Loaded by ComfyUI like any custom node package (in-process by ``tests/harness/runtime.py``, by a
real server through a ``custom_nodes`` symlink named ``sdn_test_nodes``).  Never shipped to users:
node IDs are prefixed ``SDNTest_``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if _TESTS_DIR not in sys.path:  # a server process: make tests/harness importable
    sys.path.append(_TESTS_DIR)

from harness import tiny_models as tm  # noqa: E402

POINT_SET = "SDN_POINT_SET"
CATEGORY = "sdn_test"
_SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})


class TinyModel:
    """A tiny real MODEL: sd15 (EPS), sd15_v (V-prediction), sdxl, flow (CONST sampling)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"family": (list(tm.FAMILIES),), "seed": _SEED}}

    def build(self, family: str, seed: int) -> tuple[Any]:
        return (tm.build_model(family, seed),)


class TinyVAE:
    """A tiny real 8x VAE with 4 or 16 latent channels."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"seed": _SEED, "channels": (list(tm.VAE_CHANNELS),)}}

    def build(self, seed: int, channels: int = 4) -> tuple[Any]:
        return (tm.build_vae(seed, int(channels)),)


class TinyConditioning:
    """CONDITIONING [[cond [1, tokens, 32], {"pooled_output": [1, 32]}]]; ``zero`` = empty."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "seed": _SEED,
            "tokens": ("INT", {"default": 4, "min": 1, "max": 77}),
            "family": (list(tm.FAMILIES),),
            "zero": ("BOOLEAN", {"default": False}),
        }}

    def build(self, seed: int, tokens: int, family: str, zero: bool = False) -> tuple[Any]:
        return (tm.build_conditioning(seed, tokens, family, zero),)


class PointSetNode:
    """A random finite point set S [count, channels, height, width] (process_in latent space)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (POINT_SET,)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "seed": _SEED,
            "count": ("INT", {"default": 12, "min": 1, "max": 4096}),
            "channels": ("INT", {"default": 4, "min": 1, "max": 64}),
            "height": ("INT", {"default": 8, "min": 1, "max": 256}),
            "width": ("INT", {"default": 8, "min": 1, "max": 256}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
        }}

    def build(self, seed: int, count: int, channels: int, height: int, width: int,
              scale: float) -> tuple[Any]:
        return (tm.make_point_set(seed, count, channels, height, width, scale),)


class ExactDenoiser:
    """MODEL whose network is replaced by the exact posterior mean over a point set."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",), "points": (POINT_SET,)}}

    def patch(self, model: Any, points: tm.PointSet) -> tuple[Any]:
        return (tm.patch_exact_denoiser(model, points),)


class PointStats:
    """Output node: where LATENT samples landed relative to a point set (ui ``stats``)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "stats"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "samples": ("LATENT",),
            "points": (POINT_SET,),
            "model": ("MODEL",),
            "unsafe_count": ("INT", {"default": 0, "min": 0, "max": 4096}),
            "tolerance": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 100.0, "step": 0.001}),
        }}

    def stats(self, samples: dict[str, Any], points: tm.PointSet, model: Any, unsafe_count: int,
              tolerance: float) -> dict[str, Any]:
        latent_format = tm.model_object(model, "latent_format")
        x0 = latent_format.process_in(samples["samples"].to(points.points.dtype))
        return {"ui": {"stats": [tm.point_stats(x0, points, unsafe_count, tolerance)]}, "result": ()}


NODE_CLASS_MAPPINGS = {
    "SDNTest_TinyModel": TinyModel,
    "SDNTest_TinyVAE": TinyVAE,
    "SDNTest_TinyConditioning": TinyConditioning,
    "SDNTest_PointSet": PointSetNode,
    "SDNTest_ExactDenoiser": ExactDenoiser,
    "SDNTest_PointStats": PointStats,
}

NODE_DISPLAY_NAME_MAPPINGS = {name: name.replace("SDNTest_", "Test: ") for name in NODE_CLASS_MAPPINGS}
