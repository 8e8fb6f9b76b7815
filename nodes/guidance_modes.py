"""The Safe Denoiser's guidance modes: one object per choice of the nodes' ``mode`` input.

A mode turns one model evaluation (the sampler state ``x_t``, the model's denoised estimate, the
negation set at the sample's size) into a :class:`Correction` of the denoised estimate, with the
math of :mod:`kernels.guidance`. Everything that differs between modes lives on its class: how the
negation latents are prepared for its kernel, its constants (what ``strength`` and ``bandwidth``
multiply), the correction and its application, what the run report says and the tooltip text.
The hook (:mod:`.safe_denoiser`), the negation set's prepared latents (:mod:`.negation_set`), the
report (:mod:`.safe_denoiser_report`) and the nodes' ``mode`` choices (:data:`MODES`) only ever
call this interface.

Adding a mode: one :class:`GuidanceMode` subclass and one entry in :data:`MODES` (its ``name`` is
the value saved in workflows: never rename one).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..kernels.guidance import (
    ReferenceGate,
    beta_estimate,
    bound_beta,
    channel_normalise,
    kernel_posterior_mean,
    reference_beta_threshold,
    reference_correct,
    reference_kernel_mean,
    safe_combine,
    shift_bound,
)
from .calibration import averaging_levels
from .comfy_compat import forward_coefficients, latent_format_key, percent_to_sigma

if TYPE_CHECKING:  # type hints only: these modules import this one
    from .negation_set import NegationSet
    from .safe_denoiser import GuidanceSettings
    from .safe_denoiser_report import GuidanceReport

log = logging.getLogger(__name__)

# The official implementation's SD1.4 nudity settings (Safe_Denoiser@223415b).
REFERENCE_SCALE = 0.33
REFERENCE_SIGMA = 3.15
REFERENCE_MARGIN = 1.6
REFERENCE_QUANTILE = 0.0
REFERENCE_MAX_CALIBRATION = 1024
"""Noisy negation latents used to calibrate the reference gate (all of them when fewer)."""

# paper-mode defaults, measured on the digits demo (README "Choosing the defaults"): the prior share of
# unsafe content eta (Eq. 7), the cap of the posterior probability P (beta = P / (1 - P) <= 1e4), and the
# kernel width in units of the noise std s_t (1.0 would be the exact Eq. 6 posterior of the negation set
# itself; 3.0 smooths it into a density estimate that also covers unsafe images not in the set).
PAPER_ETA = 0.2
# calibrated mode (the default, README "calibrated mode"): eta is the probability P of "unsafe" given to a state
# whose log R equals the negation set's calibrated threshold at its noise level (nodes/calibration.py;
# P = eta x R / R_threshold: strength 1 corrects in full what the set's own test claims, a state one nat below
# gets P = 1/e).
CALIBRATED_ETA = 1.0
PAPER_P_MAX = 0.9999
PAPER_BANDWIDTH = 3.0
# Trust region of the correction (not in the paper): the Eq. 4 shift of the denoised estimate is bounded to
# PAPER_SHIFT_BOUND x s_t / a_t RMS, the noise level in x0 units (kernels.guidance.shift_bound). Without it an
# estimated E_unsafe multiplied by a large beta destroys samples at low noise (README "Choosing the defaults").
PAPER_SHIFT_BOUND = 0.5


@dataclass(frozen=True)
class Evaluation:
    """One model evaluation with at least one sample inside the guided window, as a mode sees it.

    Attributes:
        x: ``[B, D]`` sampler states ``x_t`` (flattened ``[B, C, H, W]``, the model's dtype and device).
        denoised: ``[B, D]`` the model's denoised estimate (the CFG result, or one prediction).
        sigma: ``[B]`` or scalar noise level (sampler units).
        active: ``[B]`` bool on ``x``'s device, the samples inside the ``start/end_percent`` window.
        height, width: the latent size (the negation set is resized to it).
        storage: dtype of the negation latents on the device (float32, or the model's half dtype on a GPU).
        negation: the negation set.
        model_sampling, latent_format: the model's (ComfyUI objects).
        report: the hook's run report; each mode records what it did there.
    """

    x: torch.Tensor
    denoised: torch.Tensor
    sigma: torch.Tensor
    active: torch.Tensor
    height: int
    width: int
    storage: torch.dtype
    negation: NegationSet
    model_sampling: Any
    latent_format: Any
    report: GuidanceReport


@dataclass(frozen=True)
class Correction:
    """Per-sample correction of a denoised estimate, computed by ``mode`` (zero weight where inactive).

    Attributes:
        mode: the :class:`GuidanceMode` that computed it (and applies it).
        unsafe_mean: ``[B, D]`` the kernel mean of the negation set.
        weight: ``[B]`` per-sample weight, as the mode defines it (paper: ``beta``; reference: the gate, bool).
        scale: a constant factor of the mode (reference: the official scale; unused by paper).
    """

    mode: GuidanceMode
    unsafe_mean: torch.Tensor
    weight: torch.Tensor
    scale: float = 0.0

    def apply(self, denoised: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` corrected ``denoised`` (same shape and dtype)."""
        return self.mode.apply(self, denoised)


class GuidanceMode(ABC):
    """One way of correcting the denoised estimate; subclasses set every attribute and implement
    :meth:`correction` and :meth:`apply` (the other methods have defaults)."""

    name: ClassVar[str] = ""
    """The value of the nodes' ``mode`` input (saved in workflows: never rename one)."""
    tooltips: ClassVar[dict[str, str]] = {}
    """This mode's part of the ``mode``, ``strength`` and ``bandwidth`` tooltips (keys: those input names)."""
    idle_hint: ClassVar[str] = ""
    """What the run report suggests when no evaluation was corrected."""

    def kernel_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The negation latents ``[N, C, H, W]`` (sampling space, float32) as this mode's kernel reads them."""
        return latents

    @abstractmethod
    def correction(self, ev: Evaluation, settings: GuidanceSettings) -> Correction:
        """The correction of this evaluation (weights zero outside ``ev.active``), recorded in ``ev.report``."""

    @abstractmethod
    def apply(self, correction: Correction, denoised: torch.Tensor) -> torch.Tensor:
        """``correction`` applied to ``denoised`` ``[B, ...]`` (same shape and dtype)."""

    def report_details(self, report: GuidanceReport) -> str:
        """What the run summary adds after its counts when something was corrected ("" for nothing)."""
        return ""


class PaperMode(GuidanceMode):
    """Eq. 4-7 of Kim et al.: kernel on ``x_t`` with the model's own ``a_t, s_t``, weight ``beta(x_t)``
    (:func:`kernels.guidance.beta_estimate`), the Eq. 4 shift held to a trust region.

    ``eta = PAPER_ETA * strength``; kernel std ``PAPER_BANDWIDTH * bandwidth * s_t``; samples whose
    ``beta`` is below ``beta_threshold`` are not corrected.
    """

    name = "paper"
    eta: ClassVar[float] = PAPER_ETA
    tooltips: ClassVar[dict[str, str]] = {
        "mode": "Eq. 4-7 of Kim et al. (kernel on the noisy sample x_t with the model's own alpha/sigma, weight "
                "beta(x_t) = posterior odds that x_t heads into the set, against a Gaussian fitted to the set).",
        "strength": f"eta = {PAPER_ETA:g} x strength, the prior share of unwanted content in Eq. 7 (higher removes "
                    "more, and disturbs more of the other content).",
        "bandwidth": f"1.0 = kernel std {PAPER_BANDWIDTH:g}x the noise level, a smoothed density of the set that also "
                     "covers unwanted images not in it; 0.33 is the exact Gaussian posterior of Eq. 6.",
    }
    idle_hint = "raise strength or bandwidth, or check that the negation set shows the content you want to avoid"

    def levels(self, ev: Evaluation, prep: Any, alpha: torch.Tensor, std: torch.Tensor, reach: float
               ) -> torch.Tensor | float:
        """``log R`` at which ``P = eta`` (scalar or ``[B]``; ``inf``: no correction): 0 in the paper's form."""
        return 0.0

    def correction(self, ev: Evaluation, settings: GuidanceSettings) -> Correction:
        x, bsz = ev.x, ev.x.shape[0]
        prep = ev.negation.prepared(ev.latent_format, ev.height, ev.width, x.device, ev.storage, PaperMode.name)
        alpha, std = (t.to(x.device) for t in forward_coefficients(ev.model_sampling, ev.sigma.reshape(-1).expand(bsz)))
        reach = PAPER_BANDWIDTH * settings.bandwidth  # kernel std in units of s_t
        km = kernel_posterior_mean(x, prep.y, alpha, std, reach, y_sq=prep.y_sq)
        beta = beta_estimate(km.log_norm, x, alpha, std, prep.y.shape[0], prep.ref_mean, prep.ref_var, reach,
                             eta=self.eta * settings.strength, p_max=PAPER_P_MAX,
                             level=self.levels(ev, prep, alpha, std, reach))
        beta = torch.where(ev.active & (beta >= settings.beta_threshold), beta, torch.zeros_like(beta))
        noise_level = shift_bound(alpha, std, bsz).to(device=x.device, dtype=beta.dtype)  # s_t / a_t
        bounded, shift = bound_beta(ev.denoised, km.mean, beta, PAPER_SHIFT_BOUND * noise_level)
        ev.report.beta(beta, shift / noise_level.clamp_min(1e-12), bounded < beta)
        if log.isEnabledFor(logging.DEBUG):  # the lists copy from the device: only when someone reads them
            log.debug("Safe Denoiser (%s): sigma %.4g beta %s bounded %s", self.name, float(ev.sigma.reshape(-1)[0]),
                      beta.tolist(), bounded.tolist())
        return Correction(self, km.mean, bounded)

    def apply(self, correction: Correction, denoised: torch.Tensor) -> torch.Tensor:
        return safe_combine(denoised, correction.unsafe_mean, correction.weight)

    def report_details(self, report: GuidanceReport) -> str:
        return (f"; largest beta {report.max_beta:.3g} (at sigma {report.max_beta_sigma:.3g}); largest Eq. 4 shift "
                f"{report.max_shift:.3g}x the noise level, held to the trust region in {report.bounded_evaluations} "
                "evaluations")


class CalibratedMode(PaperMode):
    """The paper mode with ``beta`` measured from the negation set's own calibrated level (the default).

    Two departures from Eq. 7 (README "calibrated mode"): ``log R`` is measured from the set's calibrated
    threshold at the noise level (``P = eta`` where the set's own test starts to claim a state), and the
    noise levels where the kernel no longer averages over the set (a member's own kernel carries more than
    half of its density) are not corrected (:func:`.calibration.averaging_levels`). ``eta = CALIBRATED_ETA *
    strength``; kernel, trust region and ``beta_threshold`` as in :class:`PaperMode`.
    """

    name = "calibrated"
    eta: ClassVar[float] = CALIBRATED_ETA
    tooltips: ClassVar[dict[str, str]] = {
        "mode": "the default: Eq. 4-7 with the odds measured from the negation set's own calibrated level at each "
                "noise level, and no correction where the kernel no longer averages over the set.",
        "strength": f"eta = {CALIBRATED_ETA:g} x strength, the probability of 'unwanted' given to a sample that the "
                    "set's own calibrated test just claims at that noise level (higher also corrects samples further "
                    "from the set: more removal, more disturbance).",
        "bandwidth": "as in paper mode.",
    }

    def levels(self, ev: Evaluation, prep: Any, alpha: torch.Tensor, std: torch.Tensor, reach: float) -> torch.Tensor:
        # the memo is keyed on host floats: one copy of the [B] sigmas, not of the device's alpha and std
        host_alpha, host_std = forward_coefficients(ev.model_sampling, ev.sigma.reshape(-1).cpu().expand(alpha.shape[0]))
        return averaging_levels(ev.negation, prep, host_alpha, host_std, reach, ev.height, ev.width,
                                device=alpha.device)


class ReferenceMode(GuidanceMode):
    """The official implementation's arithmetic (Safe_Denoiser@223415b) inside any sampler: kernel on the
    denoised estimate over channel-normalised latents, fixed sigma, constant scale, calibrated gate.

    ``scale = REFERENCE_SCALE * strength``; kernel sigma ``REFERENCE_SIGMA * bandwidth``; the gate's
    threshold comes from :func:`reference_threshold` (``beta_threshold`` is not used).
    """

    name = "reference"
    tooltips: ClassVar[dict[str, str]] = {
        "mode": "the official code's arithmetic (kernel on the denoised estimate, fixed sigma "
                f"{REFERENCE_SIGMA:g}, constant scale {REFERENCE_SCALE:g}, calibrated gate) inside any sampler; for "
                "the official procedure step for step use the Safe Denoiser Reference Sampler.",
        "strength": f"scale = {REFERENCE_SCALE:g} x strength (the official value).",
        "bandwidth": f"multiplies the official fixed sigma {REFERENCE_SIGMA:g}.",
    }
    idle_hint = "the official gate never opened: paper mode adapts to your model"

    def kernel_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return channel_normalise(latents)  # L2 over channels at each pixel, as the official code does

    def correction(self, ev: Evaluation, settings: GuidanceSettings) -> Correction:
        ms, lf, negation = ev.model_sampling, ev.latent_format, ev.negation
        prep = negation.prepared(lf, ev.height, ev.width, ev.x.device, ev.storage, self)
        ksigma = REFERENCE_SIGMA * settings.bandwidth
        gate = ReferenceGate(reference_threshold(negation, ms, lf, ev.height, ev.width, prep.y, ksigma),
                             REFERENCE_MARGIN)
        km = reference_kernel_mean(ev.denoised, prep.y, ksigma, y_sq=prep.y_sq)
        is_open = gate.open(km.log_norm) & ev.active
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Safe Denoiser (reference): sigma %.4g gate %s", float(ev.sigma.reshape(-1)[0]), is_open.tolist())
        ev.report.gate(is_open)
        return Correction(self, km.mean, is_open, REFERENCE_SCALE * settings.strength)

    def apply(self, correction: Correction, denoised: torch.Tensor) -> torch.Tensor:
        return reference_correct(denoised, correction.unsafe_mean, correction.scale, correction.weight)


MODES: dict[str, GuidanceMode] = {mode.name: mode for mode in (CalibratedMode(), PaperMode(), ReferenceMode())}
"""The modes by name, in the order of the nodes' ``mode`` choices (the first is the default)."""
DEFAULT_MODE = next(iter(MODES))


def guidance_mode(mode: str | GuidanceMode) -> GuidanceMode:
    """The mode object of a name of :data:`MODES` (a mode object is returned as it is).

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(mode, GuidanceMode):
        return mode
    if mode not in MODES:
        raise ValueError(f"unknown guidance mode {mode!r}; choose one of {', '.join(MODES)}")
    return MODES[mode]


def mode_tooltip(parameter: str, head: str = "", tail: str = "") -> str:
    """A tooltip that explains ``parameter`` per mode: ``head``, then ``"<name>: <text>"`` for every mode
    in :data:`MODES` order, then ``tail``, joined by spaces."""
    parts = [head] + [f"{mode.name}: {mode.tooltips[parameter]}" for mode in MODES.values()] + [tail]
    return " ".join(part for part in parts if part)


def reference_threshold(negation: NegationSet, ms: Any, lf: Any, height: int, width: int, y: torch.Tensor,
                        ksigma: float) -> float:
    """The official calibrated gate threshold (:func:`kernels.guidance.reference_beta_threshold`
    at the smallest DDPM timestep), memoised on the negation set.

    Args:
        negation: the set; ``y`` its channel-normalised ``[N, D]`` latents at this size.
        ms, lf: the model's ``model_sampling`` and ``latent_format``.
        height, width: latent size.
        ksigma: the fixed kernel width.
    """
    sigma1 = percent_to_sigma(ms, 0.999)  # ~ the smallest DDPM timestep the official code used
    alpha, std = forward_coefficients(ms, torch.tensor([sigma1]))
    norm = math.sqrt(float(alpha) ** 2 + float(std) ** 2)  # VP form of the noisy latents
    key = ("reference_threshold", latent_format_key(lf), height, width, ksigma, round(sigma1, 8))

    def build() -> float:
        thr = reference_beta_threshold(y, ksigma, float(alpha) / norm, float(std) / norm, REFERENCE_QUANTILE,
                                       max_queries=REFERENCE_MAX_CALIBRATION)
        log.info("Safe Denoiser (reference): gate threshold %.4g (minus margin %.2g) for %s",
                 thr, REFERENCE_MARGIN, negation.describe())
        return thr

    return negation.memo(key, build)
