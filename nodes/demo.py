"""The embedded demo: Load Demo Model (digits) and Demo Digit Conditioning.

A tiny class-conditional latent diffusion model of handwritten digits ships with the pack
(``demo/digits_ldm.safetensors``, trained by ``demo/train_digits.py``), so the Safe Denoiser can
be tried anywhere without downloading a checkpoint. The model is rebuilt from ComfyUI's own
classes (an SD1.5-family EPS UNet and an AutoencoderKL); the bundle's SHA-256 is checked first.

The demo's negation sets ``digits_0`` .. ``digits_9`` (the training images of one digit) are
built-in entries of Load Negation Set: read from the bundle and encoded in memory when a graph
uses them, never written to disk (a real folder of the same name in models/negation_sets wins).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models

from ..demo import digits
from .comfy_compat import NodeInputError
from .files import LockedLRU, file_stamp
from .negation_set import BuiltinSet, register_builtin_set

log = logging.getLogger(__name__)

__all__ = ["LoadDemoModel", "DemoDigitConditioning", "register_demo_negation_sets", "load_demo_model"]

CATEGORY = "safe_denoiser/demo"
NODE_LOAD = "Load Demo Model (digits)"
NODE_COND = "Demo Digit Conditioning"
TRY_IT = ("For trying the pack without downloading a checkpoint: a tiny model of 64x64 handwritten digits that "
          "ships with the pack and runs on a CPU in seconds.")

_CACHE = LockedLRU()
"""The model and the conditioning table, keyed by what and the bundle's :func:`.files.file_stamp`."""


def _bundle_key() -> tuple:
    return file_stamp(str(digits.BUNDLE_PATH))


def _checked_bundle(node: str) -> tuple:
    """The bundle's cache key after its hash check (:func:`demo.digits.verify_bundle`, which runs the
    SHA-256 once per file state); a clear NodeInputError if it fails."""
    try:
        key = _bundle_key()
        digits.verify_bundle()
    except (digits.BundleError, OSError) as err:
        raise NodeInputError(node, str(err)) from err
    return key


def _torch_tensors(prefix: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in digits.read_tensors(prefix).items()}


def load_demo_model(node: str = NODE_LOAD) -> tuple[Any, Any]:
    """``(ModelPatcher, comfy.sd.VAE)`` of the bundle; built once per bundle file, then shared."""
    key = ("model",) + _checked_bundle(node)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    meta = digits.read_metadata()
    unet_config = dict(meta["unet_config"])
    heads = {name: unet_config.pop(name) for name in ("num_heads", "num_head_channels")}
    model_config = comfy.supported_models.SD15(unet_config)
    # SD15 merges its own head settings (8 heads) in __init__: the bundle's replace them.
    model_config.unet_config.update(heads)
    model_config.set_inference_dtype(torch.float32, None)
    offload = comfy.model_management.unet_offload_device()
    model = model_config.get_model({}, device=offload)
    missing, unexpected = model.diffusion_model.load_state_dict(_torch_tensors("unet."), strict=False)
    if missing or unexpected:
        raise NodeInputError(node, f"the demo model's UNet weights do not fit its config (missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}); re-clone the pack.")
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=offload)
    vae = comfy.sd.VAE(sd=_torch_tensors("vae."), config=meta["vae_config"])
    result = (patcher, vae)
    _CACHE.put(key, result)
    log.info("%s: loaded %s (%s)", node, digits.BUNDLE_PATH.name, meta.get("data_source", ""))
    return result


def context_for(prompt: str, node: str = NODE_COND) -> torch.Tensor:
    """``[1, T, C]`` cross-attention context of ``any`` (the null context) or a digit ``0``..``9``."""
    if prompt not in digits.PROMPTS:
        raise NodeInputError(node, f"digit {prompt!r} is not one of {', '.join(digits.PROMPTS)}.")
    key = ("embeddings",) + _checked_bundle(node)
    table = _CACHE.get_or_build(key, lambda: _torch_tensors("cond.")["embeddings"].to(torch.float32))
    index = digits.NULL_CLASS if prompt == "any" else int(prompt)
    return table[index:index + 1].clone()


def demo_negation_images(digit: int) -> np.ndarray:
    """``[N, 64, 64, 3]`` float pixels of every training image of ``digit``, quantised to 8 bits as a
    PNG of them would be (:func:`demo.digits.to_png_array`)."""
    digits.verify_bundle()
    _, images8 = digits.load_data().of_class(int(digit))
    return np.stack([digits.to_png_array(image) for image in digits.upsample(images8)]).astype(np.float32) / 255.0


def register_demo_negation_sets() -> None:
    """Register ``digits_0`` .. ``digits_9`` as built-in negation sets (memory only)."""
    for digit in range(digits.CLASSES):
        register_builtin_set(BuiltinSet(
            name=digits.set_name(digit), images=lambda d=digit: demo_negation_images(d),
            fingerprint=lambda: ":".join(str(v) for v in _bundle_key()),
            source=f"built-in: the digits demo's training images of the digit {digit}, not written to disk"))


class LoadDemoModel:
    DISPLAY_NAME = NODE_LOAD
    DESCRIPTION = (TRY_IT + " Outputs the MODEL (an SD1.5-family EPS UNet, class-conditional through "
                   "its cross-attention) and its VAE. Use it with Demo Digit Conditioning, an Empty Latent "
                   "Image of 64x64 px and Load Negation Set 'digits_7' (the training images of the digit 7, a "
                   "built-in entry: nothing is written to disk) to watch the Safe Denoiser remove a digit.")
    SEARCH_ALIASES = ["demo", "digits", "tiny model", "try safe denoiser", "mnist"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "VAE")
    RETURN_NAMES = ("model", "vae")
    OUTPUT_TOOLTIPS = ("The demo diffusion model (64x64 px images, 8x8x4 latents; about 20 steps and cfg 3-5 work).",
                       "The demo model's VAE (for VAE Decode, and for Load Negation Set at resolution 64).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {}}

    def load(self):
        return load_demo_model()


class DemoDigitConditioning:
    DISPLAY_NAME = NODE_COND
    DESCRIPTION = (TRY_IT + " The conditioning of the demo model: the learned context of one digit, or of "
                   "'any' digit (the unconditional context; use it as the negative, and as the positive to "
                   "sample every digit).")
    SEARCH_ALIASES = ["demo", "digits", "digit prompt"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Conditioning for the demo model only (it is not text: other models cannot use it).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"digit": (list(digits.PROMPTS), {"default": "any", "tooltip":
                "The digit to draw, or 'any' for the unconditional context (all ten digits, in the training "
                "data's proportions). Connect 'any' to the sampler's negative input."})}}

    def encode(self, digit):
        return ([[context_for(str(digit)), {}]],)
