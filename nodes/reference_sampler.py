"""Safe Denoiser Reference Sampler: the official procedure as a ComfyUI SAMPLER (SamplerCustom).

``reference`` mode of the Safe Denoiser nodes reproduces the official *kernel arithmetic* inside
any sampler; this sampler reproduces the official *procedure* around it (kernels/reference_sampler.py):
DDPM steps, the correction only for DDPM timesteps in ``[780, 1000]``, once per step, and at each
gated step a restart from the corrected estimate with fresh noise and the pre-correction noise
prediction.  With ``ddim_uniform`` and 50 steps the schedule is the official one (DDPM timesteps
981, 961, ..., 1: diffusers' ``leading`` spacing), 11 of whose steps fall in the window.

Noise stream: one ``torch.Generator`` seeded with the sampler's seed, on the latent's device; per
step, first the restart noise (drawn when any sample's gate is open), then the DDPM step noise
(when the next sigma is > 0), each ``randn`` of the latent's shape.  The official code's extra
draws from its CUDA generator are not reproduced (they only change which noise a seed gives).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import trange

import comfy.model_sampling
import comfy.samplers

from ..kernels.guidance import ReferenceGate, reference_correct, reference_kernel_mean
from ..kernels.reference_sampler import ddpm_step, reference_restart
from .comfy_compat import NodeInputError, check_interrupt
from .guidance_modes import REFERENCE_MARGIN, REFERENCE_SCALE, REFERENCE_SIGMA, reference_threshold
from .negation_set import NegationSet
from .safe_denoiser import CATEGORY

log = logging.getLogger(__name__)

NODE = "Safe Denoiser Reference Sampler"
WINDOW_T = (780.0, 1000.0)
"""The official window in DDPM timesteps (inclusive)."""


def _base_model(model: Any) -> Any:
    """The BaseModel behind a k-diffusion sampler's model (as ComfyUI's own ``sample_lcm`` reads it)."""
    return model.inner_model.inner_model


def _check_discrete_vp(ms: Any) -> None:
    const = getattr(comfy.model_sampling, "CONST", None)  # flow sampling (absent from 2024-era ComfyUI)
    if (const is not None and isinstance(ms, const)) or not isinstance(ms, comfy.model_sampling.EPS) \
            or getattr(ms, "sigmas", None) is None:
        raise NodeInputError(NODE, f"the official procedure is defined for discrete-time DDPM models (SD1.x, SD2.x, "
                                   f"SDXL: EPS or v-prediction); this model samples with {type(ms).__name__}. Use "
                                   "the Safe Denoiser (model patch) with mode 'reference' or 'paper' instead.")


@torch.no_grad()
def sample_safe_reference(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                          callback: Any = None, disable: Any = None, *, negation: NegationSet,
                          scale: float = REFERENCE_SCALE, kernel_sigma: float = REFERENCE_SIGMA,
                          margin: float = REFERENCE_MARGIN) -> torch.Tensor:
    """k-diffusion sampler function (ComfyUI's uniform signature plus the procedure's settings).

    Args:
        model: the k-diffusion model wrapper (denoised = CFG result).
        x: ``[B, C, H, W]`` initial state at ``sigmas[0]``.
        sigmas: the schedule (use ``ddim_uniform``, 50 steps, for the official one).
        negation: the negation set; scale, kernel_sigma, margin: the official 0.33, 3.15, 1.6.

    Returns:
        The final state.
    """
    extra_args = {} if extra_args is None else extra_args
    base = _base_model(model)
    ms, lf = base.model_sampling, base.latent_format
    _check_discrete_vp(ms)
    if x.shape[1] != negation.channels:
        raise NodeInputError(NODE, f"the negation set has {negation.channels}-channel latents, the model samples "
                                   f"{x.shape[1]}-channel ones: re-encode the set with this model's VAE.")
    bsz, _, height, width = x.shape
    sigma_lo = float(ms.sigma(torch.tensor(WINDOW_T[0])))
    prep = negation.prepared(lf, height, width, x.device, torch.float32, "reference")
    gate = ReferenceGate(reference_threshold(negation, ms, lf, height, width, prep.y, kernel_sigma), margin)
    gen = torch.Generator(device=x.device).manual_seed(int(extra_args.get("seed") or 0))
    s_in = x.new_ones([bsz])
    gated_steps = 0
    for i in trange(len(sigmas) - 1, disable=disable):
        check_interrupt()
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x0_step, x_step = denoised, x
        if sigma >= sigma_lo * (1 - 1e-6):
            km = reference_kernel_mean(denoised.reshape(bsz, -1).float(), prep.y, kernel_sigma, y_sq=prep.y_sq)
            is_open = gate.open(km.log_norm)
            if bool(is_open.any()):
                gated_steps += 1
                corrected = reference_correct(denoised, km.mean, scale, is_open)
                z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                x_step, x0_step = reference_restart(x, denoised, corrected, is_open.to(x.device), sigma, z)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) if sigma_next > 0 else None
        x = ddpm_step(x_step, x0_step, sigma, sigma_next, noise)
    log.info("%s: %d of %d steps inside the official window t in [%g, %g] had an open gate (%s)", NODE, gated_steps,
             len(sigmas) - 1, WINDOW_T[0], WINDOW_T[1], negation.describe())
    return x


class SafeDenoiserReferenceSampler:
    """NEGATION_SET -> SAMPLER reproducing the official Safe Denoiser procedure."""

    DISPLAY_NAME = NODE

    DESCRIPTION = ("A SAMPLER for SamplerCustom / SamplerCustomAdvanced that reproduces the official Safe Denoiser "
                   "release step for step: DDPM steps; inside DDPM timesteps 780-1000, where the official gate is "
                   "open, the denoised estimate is corrected (x0 - 0.33 x kernel mean), re-noised to the same step "
                   "with fresh noise, and stepped with the noise prediction from before the correction. Use the "
                   "ddim_uniform scheduler with 50 steps for the official schedule. For comparing with the paper's "
                   "code; the Safe Denoiser (model patch) works with every sampler.")
    SEARCH_ALIASES = ["safe denoiser", "official", "ddpm", "nsfw", "reference sampler"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("Connect to the sampler input of SamplerCustom or SamplerCustomAdvanced.",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "negation_set": ("NEGATION_SET", {"tooltip": "Latents of the content to avoid, from Load Negation Set."}),
            "scale": ("FLOAT", {"default": REFERENCE_SCALE, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                      "The constant the official code subtracts times the kernel mean (0.33 for SD1.4 nudity)."}),
            "kernel_sigma": ("FLOAT", {"default": REFERENCE_SIGMA, "min": 0.01, "max": 100.0, "step": 0.01,
                             "tooltip": "The official fixed kernel width (3.15 for SD1.4 nudity)."}),
            "gate_margin": ("FLOAT", {"default": REFERENCE_MARGIN, "min": -1000.0, "max": 1000.0, "step": 0.1,
                            "tooltip": "The gate opens where the kernel sum exceeds the calibrated threshold minus "
                                       "this margin (official: 1.6)."}),
        }}

    def get_sampler(self, negation_set, scale, kernel_sigma, gate_margin):
        if not isinstance(negation_set, NegationSet):
            raise NodeInputError(NODE, f"negation_set must come from a Load Negation Set node, got "
                                       f"{type(negation_set).__name__}.")
        options = {"negation": negation_set, "scale": float(scale), "kernel_sigma": float(kernel_sigma),
                   "margin": float(gate_margin)}
        return (comfy.samplers.KSAMPLER(sample_safe_reference, extra_options=options),)
