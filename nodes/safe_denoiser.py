"""Safe Denoiser: the model patch (sampler hooks) and the KSampler node.

The hook receives the sampler-space ``x_t``, ``sigma`` and the model's denoised estimate at every
model evaluation, asks :mod:`kernels.guidance` for the correction and returns the corrected
estimate; the sampler then steps from it, whichever sampler and scheduler it is.

Exactly one correction per model evaluation, whatever evaluates the model:

* The standard CFG path (``sampling_function``: KSampler, CFGGuider, BasicGuider) corrects in the
  pre-CFG hook, every prediction (cond and uncond) with weights computed from their CFG
  combination: the correction is affine in the denoised estimate with weights that sum to one, so
  CFG of the corrected predictions equals the corrected CFG result, and CFG++ samplers (which step
  along ``uncond_denoised``) are corrected as well.
* Everything else on current ComfyUI (a custom ``sampler_cfg_function`` such as RescaleCFG, the
  DualCFG and PerpNeg guiders, which combine more than two predictions or call the post-CFG hook
  on a partial result) is corrected by a ``predict_noise`` wrapper on the guider's final output,
  when the pre-CFG hook did not act in that evaluation.
* ComfyUI of early 2024 has neither the pre-CFG hook nor wrappers nor guiders: the post-CFG hook
  corrects the CFG result.

An ``outer_sample`` wrapper closes each run's report and warns when a run never reached the hook
(a sampler or guider that bypasses ComfyUI's model hooks): never a silent no-op.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .comfy_compat import (
    NodeInputError,
    latent_channels,
    model_object,
    percent_to_sigma,
    sampling_wrapper_types,
    show_on_node,
    supports_pre_cfg,
)
from .guidance_modes import (
    DEFAULT_MODE,
    MODES,
    Correction,
    Evaluation,
    guidance_mode,
    mode_tooltip,
    reference_threshold,
)
from .negation_set import NegationSet
from .safe_denoiser_report import GuidanceReport

__all__ = ["reference_threshold"]  # re-exported: the tests reach it through this module

log = logging.getLogger(__name__)

CATEGORY = "safe_denoiser/sampling"
WRAPPER_KEY = "safe_denoiser"
"""Key of the pack's sampling wrappers (``ModelPatcher.add_wrapper_with_key``)."""
# beta gates itself (it decays to 0 off the negation set), so the whole schedule is guided by default.
# The paper's SD window t in [780, 1000] of 1000 DDPM steps is end_percent 1 - 780/999 = 0.22.
DEFAULT_END_PERCENT = 1.0


@dataclass(frozen=True)
class GuidanceSettings:
    """User-facing parameters of the Safe Denoiser.

    ``mode`` names one of :data:`.guidance_modes.MODES`; ``strength`` and ``bandwidth`` multiply that
    mode's defaults, so 1.0 is always the default: ``eta = 1.0 * strength`` in ``calibrated`` mode and
    ``0.2 * strength`` in ``paper`` mode, with a kernel width of ``3 * bandwidth * s_t`` in both
    (``bandwidth = 1/3`` is the exact Eq. 6 kernel); in
    ``reference`` mode the constant scale is ``0.33 * strength`` and the fixed kernel sigma
    ``3.15 * bandwidth`` (the official SD1.4 nudity settings).
    """

    mode: str = DEFAULT_MODE
    strength: float = 1.0
    bandwidth: float = 1.0
    start_percent: float = 0.0
    end_percent: float = DEFAULT_END_PERCENT
    beta_threshold: float = 0.0

    def validate(self, node: str) -> None:
        if self.mode not in MODES:
            raise NodeInputError(node, f"mode '{self.mode}' is unknown; choose one of {', '.join(MODES)}.")
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise NodeInputError(node, f"strength {self.strength} must be a finite number >= 0 (0 disables).")
        if not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise NodeInputError(node, f"bandwidth {self.bandwidth} must be > 0 (1.0 is the paper's kernel).")
        if not (0.0 <= self.start_percent <= self.end_percent <= 1.0):
            raise NodeInputError(node, f"the window start {self.start_percent} / end {self.end_percent} must satisfy "
                                       "0 <= start <= end <= 1 (0 is the first, noisiest step).")
        if not (math.isfinite(self.beta_threshold) and self.beta_threshold >= 0):
            raise NodeInputError(node, f"beta_threshold {self.beta_threshold} must be >= 0.")


class SafeDenoiserHook:
    """Holds the negation set and settings; its methods are the registered sampler hooks.

    Shared, never copied, by ``ModelPatcher.clone()`` (``model_options`` is deep-copied there).
    """

    node = "Safe Denoiser"

    def __init__(self, negation: NegationSet, settings: GuidanceSettings, uses_pre_cfg: bool):
        self.negation = negation
        self.settings = settings
        self.uses_pre_cfg = uses_pre_cfg
        self.mode = guidance_mode(settings.mode)
        self.report = GuidanceReport(self.mode)
        self._local = threading.local()  # the open model evaluation (predict_noise wrapper), per thread

    def __deepcopy__(self, memo: dict) -> "SafeDenoiserHook":
        return self

    # -------------------------------------------------------------- math
    def _window(self, model_sampling: Any, sigma: torch.Tensor) -> torch.Tensor:
        hi = percent_to_sigma(model_sampling, self.settings.start_percent)
        lo = percent_to_sigma(model_sampling, self.settings.end_percent)
        s = sigma.reshape(-1).to(torch.float64)
        return (s <= hi * (1 + 1e-6)) & (s >= lo * (1 - 1e-6)) & (s > 0)

    def correction(self, model: Any, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor,
                   sample_sigmas: Any = None) -> Optional[Correction]:
        """The correction for this evaluation, or None when no sample is inside the window."""
        self.report.evaluation(sigma, x.shape[0], sample_sigmas)
        try:
            return self._correction(model, x, denoised, sigma)
        finally:
            self.report.after_evaluation()

    def _correction(self, model: Any, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> Optional[Correction]:
        st = self.settings
        if st.strength == 0:
            return None
        ms = model.model_sampling
        active = self._window(ms, sigma).to(x.device)
        if active.numel() == 1 and x.shape[0] > 1:
            active = active.expand(x.shape[0])
        if not bool(active.any()):
            return None
        if x.ndim != 4:
            raise NodeInputError(self.node, f"latents of shape {list(x.shape)} are not supported (image latents "
                                            "[B, C, H, W] only; video models are not).")
        if x.shape[1] != self.negation.channels:
            raise NodeInputError(self.node, channel_mismatch(self.negation, x.shape[1]))
        bsz, _, height, width = x.shape
        storage = x.dtype if (x.device.type != "cpu" and x.dtype in (torch.float16, torch.bfloat16)) else torch.float32
        ev = Evaluation(x=x.reshape(bsz, -1), denoised=denoised.reshape(bsz, -1), sigma=sigma, active=active,
                        height=height, width=width, storage=storage, negation=self.negation, model_sampling=ms,
                        latent_format=model.latent_format, report=self.report)
        return self.mode.correction(ev, st)

    # -------------------------------------------------------------- hooks
    def _evaluation(self) -> Optional[dict]:
        """The model evaluation a ``predict_noise`` wrapper has open on this thread, if any."""
        return getattr(self._local, "evaluation", None)

    def _mark_corrected(self) -> None:
        evaluation = self._evaluation()
        if evaluation is not None:
            evaluation["corrected"] = True
        else:
            self._local.pre_cfg_done = True

    def pre_cfg(self, args: dict) -> list:
        """``sampler_pre_cfg_function``: on the standard two-prediction CFG path, correct every
        prediction with the CFG-combined weights; elsewhere stand down for the wrapper/post-CFG hook."""
        out = args["conds_out"]
        standard = len(out) <= 2 and len(args.get("conds", out)) <= 2
        if not standard or "sampler_cfg_function" in args.get("model_options", {}) or not out or out[0] is None:
            return out
        x, sigma = args["input"], args["sigma"]
        uncond = out[1] if len(out) > 1 else None
        combined = out[0] if uncond is None else uncond + (out[0] - uncond) * args["cond_scale"]
        self._mark_corrected()  # this evaluation is handled here, even where the correction is zero
        corr = self.correction(args["model"], x, combined, sigma, _sample_sigmas(args))
        if corr is None:
            return out
        return [None if o is None else corr.apply(o) for o in out]

    def post_cfg(self, args: dict) -> torch.Tensor:
        """``sampler_post_cfg_function``: correct the CFG result where neither the pre-CFG hook
        nor a ``predict_noise`` wrapper handles this evaluation (ComfyUI of early 2024)."""
        denoised = args["denoised"]
        if self._evaluation() is not None:  # the wrapper corrects the guider's final output
            return denoised
        if getattr(self._local, "pre_cfg_done", False):
            self._local.pre_cfg_done = False
            return denoised
        corr = self.correction(args["model"], args["input"], denoised, args["sigma"], _sample_sigmas(args))
        return denoised if corr is None else corr.apply(denoised)

    def predict_noise(self, executor: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``predict_noise`` wrapper: one model evaluation of any guider; corrects its final
        output unless the pre-CFG hook already corrected this evaluation."""
        x = args[0] if args else kwargs["x"]
        sigma = args[1] if len(args) > 1 else kwargs["timestep"]
        model_options = args[2] if len(args) > 2 else kwargs.get("model_options", {})
        outer = self._evaluation()
        evaluation = self._local.evaluation = {"corrected": False}
        try:
            denoised = executor(*args, **kwargs)
        finally:
            self._local.evaluation = outer
        if evaluation["corrected"]:
            return denoised
        model = executor.class_obj.inner_model
        corr = self.correction(model, x, denoised, sigma, _sample_sigmas({"model_options": model_options}))
        return denoised if corr is None else corr.apply(denoised)

    def outer_sample(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """``outer_sample`` wrapper: one sampling run; its report is logged at the end, with a
        warning if the run never reached the hook."""
        self.report.finish()  # whatever an interrupted earlier run left
        evaluations_before = self.report.total_evaluations
        try:
            return executor(*args, **kwargs)
        finally:
            if self.report.total_evaluations == evaluations_before and self.settings.strength > 0:
                show_on_node(self.report.never_called())
            self.report.finish()


def _sample_sigmas(args: dict) -> Any:
    """The run's schedule where ComfyUI passes it to hooks (current releases), else None."""
    return args.get("model_options", {}).get("transformer_options", {}).get("sample_sigmas")


def channel_mismatch(negation: NegationSet, model_channels: int) -> str:
    """The error text for a set encoded by a VAE of another latent family."""
    return (f"the negation set {negation.describe()} has {negation.channels}-channel latents but this model samples "
            f"{model_channels}-channel latents (4 = SD1.x/SDXL, 16 = SD3/Flux). Re-encode the set with the "
            "VAE of the model you sample with (Load Negation Set with that VAE connected).")


def patch_model(model: Any, negation: NegationSet, settings: GuidanceSettings, node: str) -> Any:
    """A clone of ``model`` with the Safe Denoiser hooks registered; ``model`` is not modified."""
    return patch_model_with_hook(model, negation, settings, node)[0]


def patch_model_with_hook(model: Any, negation: NegationSet, settings: GuidanceSettings,
                          node: str) -> tuple[Any, SafeDenoiserHook]:
    """:func:`patch_model`, also returning the hook (whose ``report`` tells what the guidance did)."""
    if not isinstance(negation, NegationSet):
        raise NodeInputError(node, f"negation_set must come from a Load Negation Set node, got {type(negation).__name__}.")
    settings.validate(node)
    lf = model_object(model, "latent_format")
    channels = latent_channels(lf, default=negation.channels)
    if channels != negation.channels:
        raise NodeInputError(node, channel_mismatch(negation, channels))
    patched = model.clone()
    wrapper_types = sampling_wrapper_types(patched)
    hook = SafeDenoiserHook(negation, settings, supports_pre_cfg(patched))
    if hook.uses_pre_cfg:
        patched.set_model_sampler_pre_cfg_function(hook.pre_cfg)
    patched.set_model_sampler_post_cfg_function(hook.post_cfg)
    if wrapper_types is not None:
        predict_noise, outer_sample = wrapper_types
        patched.add_wrapper_with_key(predict_noise, WRAPPER_KEY, hook.predict_noise)
        patched.add_wrapper_with_key(outer_sample, WRAPPER_KEY, hook.outer_sample)
    return patched, hook


# ------------------------------------------------------------------------------ nodes

def guidance_inputs() -> dict:
    """The guidance parameters shared by the patch node and the KSampler node."""
    return {
        "negation_set": ("NEGATION_SET", {"tooltip": "Latents of the content to avoid, from Load Negation Set."}),
        "mode": (list(MODES), {"default": DEFAULT_MODE, "tooltip": mode_tooltip("mode")}),
        "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.05, "tooltip": mode_tooltip(
                     "strength", "How hard to push away from the negation set, as a multiple of the mode's default "
                     "(1.0).", "0 disables the guidance.")}),
        "bandwidth": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 100.0, "step": 0.05, "tooltip":
                      mode_tooltip("bandwidth", "Kernel width multiplier.")}),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                          "Start of the guided part of the schedule (0 = first, noisiest step)."}),
        "end_percent": ("FLOAT", {"default": DEFAULT_END_PERCENT, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                        "End of the guided part (1.0 = the last step). The paper-mode weight fades by itself once a sample "
                        "is away from the negation set, so the whole schedule is the default. Lower it (e.g. 0.35) if corrected "
                        "images come out blurred: late corrections leave the model no steps to repair them. 0.22 is the "
                        "paper's SD window t in [780, 1000] (sigma >= 4.67)."}),
        "beta_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01, "tooltip":
                           "paper mode: skip the correction for samples whose beta(x_t) (the posterior odds) is below this value "
                           "(0 = always correct inside the window). reference mode uses the official calibrated "
                           "gate instead."}),
    }


#: The pack's tooltips and options over ComfyUI's KSampler inputs: the same on every ComfyUI (O's KSampler
#: has no tooltips; N's are replaced so the help page and locales do not depend on the version), the
#: negative input's tooltip names the negation set, and the seed keeps its control widget on O.
KSAMPLER_OPTIONS: dict[str, dict] = {
    "model": {"tooltip": "The model used for denoising the input latent."},
    "seed": {"control_after_generate": True, "tooltip": "The random seed used for creating the noise."},
    "steps": {"tooltip": "The number of denoising steps."},
    "cfg": {"tooltip": "Classifier-free guidance scale."},
    "sampler_name": {"tooltip": "The sampling algorithm."},
    "scheduler": {"tooltip": "The noise schedule."},
    "positive": {"tooltip": "What to include in the image."},
    "negative": {"tooltip": "What to exclude from the image (text-based; the negation set acts on the image content "
                            "itself)."},
    "latent_image": {"tooltip": "The latent image to denoise."},
    "denoise": {"tooltip": "The amount of denoising (lower keeps more of the input latent)."},
}


def ksampler_inputs() -> dict:
    """ComfyUI's own KSampler inputs (``nodes.KSampler.INPUT_TYPES()["required"]``: types, defaults, ranges,
    the sampler and scheduler lists of this ComfyUI), each with :data:`KSAMPLER_OPTIONS` laid over its options."""
    import nodes as comfy_nodes  # ComfyUI's nodes.py (absolute import, not this package)

    out = {}
    for name, spec in comfy_nodes.KSampler.INPUT_TYPES()["required"].items():
        options = {**(spec[1] if len(spec) > 1 else {}), **KSAMPLER_OPTIONS.get(name, {})}
        out[name] = (spec[0], options)
    return out

def settings_from(kwargs: dict) -> GuidanceSettings:
    return GuidanceSettings(mode=kwargs["mode"], strength=float(kwargs["strength"]), bandwidth=float(kwargs["bandwidth"]),
                            start_percent=float(kwargs["start_percent"]), end_percent=float(kwargs["end_percent"]),
                            beta_threshold=float(kwargs["beta_threshold"]))


class SafeDenoiserPatch:
    """MODEL + NEGATION_SET -> MODEL with the Safe Denoiser hooks (works with any sampler node)."""

    DISPLAY_NAME = "Safe Denoiser (model patch)"

    DESCRIPTION = ("Makes any sampler avoid the content of a negation set (training-free safe denoiser, Kim et al. "
                   "NeurIPS 2025): at every step the model's denoised estimate is corrected with a kernel-weighted "
                   "average of the negation latents. Connect the output MODEL to KSampler, KSamplerAdvanced, "
                   "SamplerCustom or SamplerCustomAdvanced.")
    SEARCH_ALIASES = ["safe", "nsfw", "nudity", "safe denoiser", "negative image", "avoid content", "safety guidance"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the Safe Denoiser applied at every sampling step.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL", {"tooltip": "The diffusion model to make safe (not modified: a patched copy is returned)."}),
                             **guidance_inputs()}}

    def patch(self, model, **kwargs):
        return (patch_model(model, kwargs.pop("negation_set"), settings_from(kwargs), self.DISPLAY_NAME),)


DEFAULT_KSAMPLER_RESTARTS = 4
"""The KSampler node's restarts: the correction plus the Restart Sampler's test (README's table)."""


class SafeDenoiserKSampler:
    """KSampler with the Safe Denoiser built in (the correction, and restarts of what the set claims)."""

    DISPLAY_NAME = "Safe Denoiser KSampler"

    DESCRIPTION = ("A KSampler that steers generation away from a negation set (training-free safe denoiser, "
                   "Kim et al. NeurIPS 2025). Same inputs as KSampler plus the negation set and the guidance "
                   "parameters; works with every sampler and scheduler and with EPS, v-prediction and flow models.")
    SEARCH_ALIASES = ["safe", "nsfw", "nudity", "safe ksampler", "negative image", "avoid content", "safety guidance"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("LATENT", "report")
    OUTPUT_TOOLTIPS = ("The denoised latent.",
                       "What the guidance did in this run: the share of model evaluations and of samples corrected, the "
                       "largest beta and the largest correction relative to the noise level. 'did nothing' means the "
                       "negation set never came within reach.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {**ksampler_inputs(), **guidance_inputs()}, "optional": {
            "max_restarts": ("INT", {"default": DEFAULT_KSAMPLER_RESTARTS, "min": 0, "max": 64, "tooltip":
                             "Images the negation set still claims while sampling are sampled again from fresh noise, "
                             "up to this many times (the Safe Denoiser Restart Sampler's test at its defaults; images "
                             "never claimed are unchanged). The correction alone cannot remove content that the first "
                             "steps already decide (README, 'Restart Sampler'). 0 = the correction only, as in the "
                             "paper."}),
        }}

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               max_restarts=DEFAULT_KSAMPLER_RESTARTS, **kwargs):
        import nodes as comfy_nodes  # ComfyUI's nodes.py (absolute import, not this package)

        negation = kwargs.pop("negation_set")
        patched, hook = patch_model_with_hook(model, negation, settings_from(kwargs), self.DISPLAY_NAME)
        if int(max_restarts) <= 0:
            (latent,) = comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive,
                                                    negative, latent_image, denoise=denoise)
            return latent, hook.report.finish()
        from . import restart_sampler  # imports this module: not at the top

        guide = restart_sampler.RestartGuide(negation, restart_sampler.RestartSettings(max_restarts=int(max_restarts)),
                                             self.DISPLAY_NAME)
        latent, restarts = restart_sampler.restart_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive,
                                                            negative, latent_image, denoise, guide)
        return latent, hook.report.finish() + "\n" + restarts
