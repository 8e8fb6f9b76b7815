"""Test-only ComfyUI custom nodes: tiny real models, an exact analytic denoiser, and tiny
stand-ins for CheckpointLoaderSimple / CLIPTextEncode (so real workflows run on tiny models, see
:func:`harness.workflow.substitute_tiny`).

Loaded by ComfyUI like any custom node package (in-process by ``tests/harness/runtime.py``, by a
real server through a ``custom_nodes`` symlink named ``sdn_test_nodes``).  Never shipped to users:
node IDs are prefixed ``SDNTest_``.  The mappings also hold the nodes of ``reward_nodes`` (tiny CLIP
text/vision models, defective IMAGE batches) and ``erasure_nodes`` (a tiny real CLIP for the
erasure features); ``common`` has what they share.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if _TESTS_DIR not in sys.path:  # a server process: make tests/harness importable
    sys.path.append(_TESTS_DIR)

from harness import tiny_models as tm  # noqa: E402

from .common import CATEGORY, SEED, BuilderNode, display_names  # noqa: E402
from .erasure_nodes import NODE_CLASS_MAPPINGS as ERASURE_NODES  # noqa: E402
from .reward_nodes import NODE_CLASS_MAPPINGS as REWARD_NODES  # noqa: E402

POINT_SET = "SDN_POINT_SET"


class TinyModel(BuilderNode):
    """A tiny real MODEL: sd15 (EPS), sd15_v (V-prediction), sdxl, flow (CONST sampling)."""

    RETURN_TYPES = ("MODEL",)
    REQUIRED = {"family": (list(tm.FAMILIES),), "seed": SEED}
    make = staticmethod(tm.build_model)


class TinyVAE(BuilderNode):
    """A tiny real 8x VAE with 4 or 16 latent channels."""

    RETURN_TYPES = ("VAE",)
    REQUIRED = {"seed": SEED, "channels": (list(tm.VAE_CHANNELS),)}
    make = staticmethod(tm.build_vae)


class TinyConditioning(BuilderNode):
    """CONDITIONING [[cond [1, tokens, 32], {"pooled_output": [1, 32]}]]; ``zero`` = empty."""

    RETURN_TYPES = ("CONDITIONING",)
    REQUIRED = {
        "seed": SEED,
        "tokens": ("INT", {"default": 4, "min": 1, "max": 77}),
        "family": (list(tm.FAMILIES),),
        "zero": ("BOOLEAN", {"default": False}),
    }
    make = staticmethod(tm.build_conditioning)


class PointSetNode(BuilderNode):
    """A random finite point set S [count, channels, height, width] (process_in latent space)."""

    RETURN_TYPES = (POINT_SET,)
    REQUIRED = {
        "seed": SEED,
        "count": ("INT", {"default": 12, "min": 1, "max": 4096}),
        "channels": ("INT", {"default": 4, "min": 1, "max": 64}),
        "height": ("INT", {"default": 8, "min": 1, "max": 256}),
        "width": ("INT", {"default": 8, "min": 1, "max": 256}),
        "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
    }
    make = staticmethod(tm.make_point_set)


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


@dataclass(frozen=True)
class TinyClip:
    """The CLIP stand-in of :class:`TinyCheckpoint`: only what :class:`TinyTextEncode` reads."""

    family: str = "sd15"
    tokens: int = 4


def text_seed(text: str) -> int:
    """A stable 31-bit seed of ``text`` (sha256; unlike ``hash()`` it is the same in every process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


class TinyCheckpoint:
    """CheckpointLoaderSimple's outputs (MODEL, CLIP, VAE) from tiny sd15 models, no file."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {}, "optional": {"seed": SEED}}

    def load(self, seed: int = 0) -> tuple[Any, TinyClip, Any]:
        return tm.build_model("sd15", seed), TinyClip("sd15"), tm.build_vae(seed, 4)


class TinyTextEncode:
    """CLIPTextEncode's interface: CONDITIONING derived deterministically from the text.

    Seeded by :func:`text_seed`; an empty (or whitespace-only) text gives all-zero conditioning.
    Shapes as :func:`harness.tiny_models.build_conditioning` (``[1, tokens, 32]`` + pooled).
    """

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"text": ("STRING", {"multiline": True}), "clip": ("CLIP",)}}

    def encode(self, text: str, clip: TinyClip) -> tuple[Any]:
        if not isinstance(clip, TinyClip):
            raise TypeError(f"SDNTest_TinyTextEncode needs the CLIP of SDNTest_TinyCheckpoint, got "
                            f"{type(clip).__name__}")
        return (tm.build_conditioning(text_seed(text), clip.tokens, clip.family, zero=not text.strip()),)


class CountEvaluations:
    """MODEL -> the same MODEL (a clone) counting its model evaluations in ``COUNTS[label]``.

    Independent of the pack: a ``predict_noise`` wrapper where ComfyUI has wrappers (one call per
    evaluation of any guider), else a post-CFG function (older ComfyUI: every evaluation goes
    through ``sampling_function``).
    """

    COUNTS: dict[str, int] = {}
    HOOKS: dict[str, list[Any]] = {}
    """The Safe Denoiser hooks found on the MODEL (objects with a ``report``), for the tests."""
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",), "label": ("STRING", {"default": "probe"})}}

    def patch(self, model: Any, label: str) -> tuple[Any]:
        counts = self.COUNTS
        counts[label] = 0
        self.HOOKS[label] = [fn.__self__ for fn in model.model_options.get("sampler_post_cfg_function", [])
                             if hasattr(getattr(fn, "__self__", None), "report")]
        patched = model.clone()

        def count() -> None:
            counts[label] = counts.get(label, 0) + 1

        if hasattr(patched, "add_wrapper_with_key"):
            from comfy.patcher_extension import WrappersMP

            def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
                count()
                return executor(*args, **kwargs)

            patched.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "sdn_test_probe", wrapper)
        else:
            def post_cfg(args: dict) -> Any:
                count()
                return args["denoised"]

            patched.set_model_sampler_post_cfg_function(post_cfg)
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "SDNTest_CountEvaluations": CountEvaluations,
    "SDNTest_TinyModel": TinyModel,
    "SDNTest_TinyVAE": TinyVAE,
    "SDNTest_TinyConditioning": TinyConditioning,
    "SDNTest_PointSet": PointSetNode,
    "SDNTest_ExactDenoiser": ExactDenoiser,
    "SDNTest_PointStats": PointStats,
    "SDNTest_TinyCheckpoint": TinyCheckpoint,
    "SDNTest_TinyTextEncode": TinyTextEncode,
    **REWARD_NODES,
    **ERASURE_NODES,
}
NODE_DISPLAY_NAME_MAPPINGS = display_names(NODE_CLASS_MAPPINGS)
