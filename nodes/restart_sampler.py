"""Safe Denoiser Restart Sampler: any SAMPLER, with the samples the negation set claims sampled again.

Wraps the SAMPLER given to it (``KSamplerSelect``, or any ``KSAMPLER``) for SamplerCustom /
SamplerCustomAdvanced. The wrapped sampler runs unchanged; at each model evaluation the state
``x_t`` of every sample is tested against the negation set (kernels/restart.py: a kernel density
ratio against a threshold calibrated on the set itself, per noise level). A sample claimed on the
way is sampled again from fresh noise (its own latent re-noised for img2img), up to
``max_restarts`` times; samples never claimed come out exactly as without this node. Works with
every sampler, scheduler and guider, EPS, V and flow models, and composes with the Safe Denoiser
model patch (which corrects the estimates of the samples it keeps).

Noise of a restart: ``randn`` of the whole batch's shape from a CPU generator seeded with the
sampling seed and the round, rows taken for the restarted samples (deterministic for a seed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

import comfy.samplers
import comfy.utils

from ..kernels.restart import RestartThreshold, claimed, sample_with_restarts
from .calibration import DEFAULT_FALSE_ALARM, DEFAULT_RECALL, calibrated_threshold
from .comfy_compat import NodeInputError, check_interrupt, forward_coefficients, ksampler_sigmas, show_on_node
from .guidance_modes import PAPER_BANDWIDTH
from .negation_set import NegationSet
from .safe_denoiser import CATEGORY

log = logging.getLogger(__name__)

NODE = "Safe Denoiser Restart Sampler"
DEFAULT_MAX_RESTARTS = 4
RESTART_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class RestartSettings:
    """``recall``: share of the set's own noised members the test claims (per noise level);
    ``false_alarm``: share of reference-Gaussian samples it may claim; ``bandwidth``: kernel width in
    units of the paper mode's (``3 s_t``); ``max_restarts``: rounds per batch."""

    recall: float = DEFAULT_RECALL
    false_alarm: float = DEFAULT_FALSE_ALARM
    bandwidth: float = 1.0
    max_restarts: int = DEFAULT_MAX_RESTARTS

    def validate(self, node: str = NODE) -> None:
        if not 0.5 <= self.recall < 1.0:
            raise NodeInputError(node, f"recall {self.recall} must be in [0.5, 1): the share of the set's own noisy "
                                       "members the test must claim (0.95 is the default).")
        if not 0.0 < self.false_alarm <= 0.2:
            raise NodeInputError(node, f"false_alarm {self.false_alarm} must be in (0, 0.2] (0.01 is the default).")
        if not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise NodeInputError(node, f"bandwidth {self.bandwidth} must be > 0 (1.0 is the default kernel).")
        if not 0 <= self.max_restarts <= 64:
            raise NodeInputError(node, f"max_restarts {self.max_restarts} must be between 0 and 64.")


class RestartGuide:
    """The test of one negation set with one setting: calibrated thresholds and per-state claims."""

    def __init__(self, negation: NegationSet, settings: RestartSettings, node: str = NODE):
        settings.validate(node)
        self.negation, self.settings, self.node = negation, settings, node
        self.width = PAPER_BANDWIDTH * settings.bandwidth

    def _prepared(self, latent_format: Any, x: torch.Tensor) -> Any:
        if x.ndim != 4:
            raise NodeInputError(self.node, f"latents of shape {list(x.shape)} are not supported (image latents "
                                            "[B, C, H, W] only).")
        if x.shape[1] != self.negation.channels:
            raise NodeInputError(self.node, f"the negation set has {self.negation.channels}-channel latents, the "
                                            f"model samples {x.shape[1]}-channel ones: re-encode the set with this "
                                            "model's VAE.")
        return self.negation.prepared(latent_format, x.shape[2], x.shape[3], x.device, torch.float32, "paper")

    def threshold(self, model_sampling: Any, latent_format: Any, x: torch.Tensor, sigma: float) -> RestartThreshold:
        """The calibrated test at ``sigma`` (memoised on the negation set)."""
        alpha, std = forward_coefficients(model_sampling, torch.tensor([float(sigma)]))
        return self._threshold(self._prepared(latent_format, x), float(alpha), float(std), x)

    def _threshold(self, prep: Any, alpha: float, std: float, x: torch.Tensor) -> RestartThreshold:
        st = self.settings
        return calibrated_threshold(self.negation, prep, alpha, std, self.width, x.shape[2], x.shape[3], x.device,
                                    st.recall, st.false_alarm)

    def claims(self, model_sampling: Any, latent_format: Any, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: which states the set claims at this evaluation (sigma equal across the batch)."""
        bsz = x.shape[0]
        if float(sigma.reshape(-1)[0]) <= 0:
            return torch.zeros(bsz, dtype=torch.bool)
        prep = self._prepared(latent_format, x)
        alpha, std = forward_coefficients(model_sampling, sigma.reshape(-1)[:1].cpu())  # once per evaluation
        test = self._threshold(prep, float(alpha), float(std), x)
        if not test.active:
            return torch.zeros(bsz, dtype=torch.bool)
        return claimed(x.reshape(bsz, -1).float(), prep.y, alpha.expand(bsz).to(x.device), std.expand(bsz).to(x.device),
                       self.width, prep.ref_mean, prep.ref_var, test.threshold, y_sq=prep.y_sq).cpu()


class _Claiming:
    """A k-diffusion model that records, before each evaluation, which states the guide claims.

    Every evaluation is tested, the last included: a claimed sample is sampled again only after its
    run has ended, so a late claim costs nothing more than an early one. (Measured on the exact
    mixtures: with a deterministic sampler the states heading into the set score below the set's
    own noisy copies at the noisy steps, and far above the threshold at the last ones.)"""

    def __init__(self, inner: Any, guide: RestartGuide, base: Any):
        self.inner, self.guide, self.base = inner, guide, base
        self.claimed: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        check_interrupt()  # restart runs have no progress callback, where ComfyUI checks Cancel
        found = self.guide.claims(self.base.model_sampling, self.base.latent_format, x, sigma)
        self.claimed = found if self.claimed is None else (self.claimed | found)
        return self.inner(x, sigma, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _rows(value: Any, index: torch.Tensor, batch: int) -> Any:
    """``value[index]`` for per-sample tensors of the batch; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch and batch > 1:
        return value[index.to(value.device)]
    return value


class RestartKSampler(comfy.samplers.KSAMPLER):
    """A KSAMPLER that runs another one's sampler function with restarts of the claimed samples."""

    def __init__(self, inner: Any, guide: RestartGuide):
        super().__init__(inner.sampler_function, inner.extra_options, inner.inpaint_options)
        self.guide = guide
        self.last_report = ""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        base = model_wrap.inner_model
        ms = base.model_sampling
        max_denoise = self.max_denoise(model_wrap, sigmas)
        bsz = noise.shape[0]
        seed = int(extra_args.get("seed") or 0)
        total_steps = len(sigmas) - 1
        k_callback = None if callback is None else (lambda d: callback(d["i"], d["denoised"], d["x"], total_steps))
        calls = {"n": 0}

        def run(start: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
            model_k.latent_image = _rows(latent_image, index, bsz)
            model_k.noise = _rows(noise, index, bsz)
            args = dict(extra_args)
            args["denoise_mask"] = _rows(denoise_mask, index, bsz)
            claiming = _Claiming(model_k, self.guide, base)
            first = calls["n"] == 0
            calls["n"] += 1
            out = self.sampler_function(claiming, start, sigmas, extra_args=args, callback=k_callback if first else None,
                                        disable=disable_pbar if first else True, **self.extra_options)
            found = claiming.claimed if claiming.claimed is not None else torch.zeros(start.shape[0], dtype=torch.bool)
            return out, found

        def fresh(index: torch.Tensor, round_: int) -> torch.Tensor:
            gen = torch.Generator(device="cpu").manual_seed(seed + RESTART_SEED_STRIDE * round_)
            eps = torch.randn(noise.shape, generator=gen, dtype=torch.float32)[index].to(noise.device, noise.dtype)
            latent = _rows(latent_image, index, bsz)
            return ms.noise_scaling(sigmas[0], eps, latent, max_denoise)

        start = ms.noise_scaling(sigmas[0], noise, latent_image, max_denoise)
        samples, restarts, still = sample_with_restarts(run, start, fresh, self.guide.settings.max_restarts)
        self.last_report = (f"{self.guide.node}: {int((restarts > 0).sum())} of {bsz} sample(s) restarted, {int(restarts.sum())} "
                            f"restart(s) in all; {int(still.sum())} still claimed after the last one "
                            f"(max_restarts {self.guide.settings.max_restarts}; {self.guide.negation.describe()})")
        log.info("%s", self.last_report)
        if int(still.sum()):
            show_on_node(self.last_report)
        return ms.inverse_noise_scaling(sigmas[-1], samples)


def restart_ksampler(model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive: Any,
                     negative: Any, latent: dict, denoise: float, guide: RestartGuide) -> tuple[dict, str]:
    """ComfyUI's ``common_ksampler`` with the restarts of ``guide`` around its sampler.

    The same noise (``prepare_noise`` of the seed and batch indices), sigmas (ComfyUI's KSampler's
    own), noise mask, preview callback and progress bar as KSampler, through ``sample_custom``: the
    samples never claimed are bit for bit KSampler's. Returns the LATENT and the restart report."""
    import comfy.sample
    import latent_preview  # ComfyUI's module (absolute import)

    latent_image = latent["samples"]
    if hasattr(comfy.sample, "fix_empty_latent_channels"):  # current ComfyUI (2024-03: absent)
        latent_image = comfy.sample.fix_empty_latent_channels(model, latent_image)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = ksampler_sigmas(model, steps, sampler_name, scheduler, denoise)
    sampler = RestartKSampler(comfy.samplers.sampler_object(sampler_name), guide)
    callback = latent_preview.prepare_callback(model, steps)
    samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image,
                                         noise_mask=latent.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out, sampler.last_report


class SafeDenoiserRestartSampler:
    """SAMPLER + NEGATION_SET -> SAMPLER that samples again what the negation set claims."""

    DISPLAY_NAME = NODE

    DESCRIPTION = ("Wraps any sampler for SamplerCustom / SamplerCustomAdvanced: while sampling, each image's noisy "
                   "state is tested against the negation set (a kernel density test calibrated on the set itself at "
                   "every noise level); an image the set claims is sampled again from fresh noise, up to max_restarts "
                   "times. Images it never claims come out exactly as without this node. Removes what the Safe "
                   "Denoiser's correction cannot when the content is decided in the first steps (measured on exact "
                   "models, README); combine both by feeding a Safe Denoiser-patched MODEL to SamplerCustom.")
    SEARCH_ALIASES = ["safe denoiser", "restart", "resample", "nsfw", "rejection", "safe sampler"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("Connect to the sampler input of SamplerCustom or SamplerCustomAdvanced.",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "sampler": ("SAMPLER", {"tooltip": "The sampler to run (KSamplerSelect): euler, dpmpp_2m, ... all work."}),
            "negation_set": ("NEGATION_SET", {"tooltip": "Latents of the content to avoid, from Load Negation Set "
                                                         "(encoded with this model's VAE)."}),
            "recall": ("FLOAT", {"default": DEFAULT_RECALL, "min": 0.5, "max": 0.999, "step": 0.005, "tooltip":
                       "At each noise level the test is set to claim this share of the negation set's own noisy "
                       "members (each scored without itself). Higher catches more, and restarts more harmless "
                       "images; 0.95 is the default."}),
            "max_restarts": ("INT", {"default": DEFAULT_MAX_RESTARTS, "min": 0, "max": 64, "tooltip":
                             "How many times a claimed image may be sampled again (each costs up to one more "
                             "sampling run for that image). 0 only reports the claims."}),
            "bandwidth": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 10.0, "step": 0.05, "tooltip":
                          "Kernel width relative to the default (3 x the noise level, as the Safe Denoiser's paper "
                          "mode). Lower tests against the set's members more tightly."}),
        }, "optional": {
            "false_alarm": ("FLOAT", {"default": DEFAULT_FALSE_ALARM, "min": 0.001, "max": 0.2, "step": 0.001,
                            "tooltip": "The test never claims more than this share of samples of a broad Gaussian "
                                       "fitted to the set (0.01): the floor under the threshold at every noise level."}),
        }}

    def get_sampler(self, sampler, negation_set, recall, max_restarts, bandwidth, false_alarm=DEFAULT_FALSE_ALARM):
        if not isinstance(negation_set, NegationSet):
            raise NodeInputError(NODE, f"negation_set must come from a Load Negation Set node, got "
                                       f"{type(negation_set).__name__}.")
        if not isinstance(sampler, comfy.samplers.KSAMPLER):
            raise NodeInputError(NODE, f"sampler must be a k-diffusion SAMPLER (KSamplerSelect and the samplers of "
                                       f"ComfyUI's custom-sampling nodes), got {type(sampler).__name__}.")
        guide = RestartGuide(negation_set, RestartSettings(float(recall), float(false_alarm), float(bandwidth),
                                                           int(max_restarts)))
        return (RestartKSampler(sampler, guide),)
