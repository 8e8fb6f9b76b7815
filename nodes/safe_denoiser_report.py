"""What the Safe Denoiser did in one sampling run, for the log and the KSampler's ``report`` output.

A user who cannot run a classifier still sees whether the guidance "did nothing" (no evaluation
corrected: the negation set never came within the kernel's reach) or "pushed hard" (large ``beta``,
shifts held at the trust region).  A run starts at the first model evaluation and ends at the last
step of the schedule (when ComfyUI passes ``sample_sigmas``, as current releases do), when the noise
level rises again (a new run), or when the Safe Denoiser KSampler asks for the report.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:  # type hints only
    from .guidance_modes import GuidanceMode

log = logging.getLogger(__name__)


class GuidanceReport:
    """Per-run counters of one Safe Denoiser hook (single-threaded: ComfyUI runs one prompt at a time).

    Counted per model evaluation: whether any sample was corrected; per batch entry: whether it
    was corrected at least once; for modes that weight with ``beta`` (:meth:`beta`), the largest
    ``beta`` (before the trust region) and the largest Eq. 4 shift in units of the noise level
    ``s_t / a_t`` (RMS over the latent). The mode (a :class:`.guidance_modes.GuidanceMode`) names the
    run and writes its own part of the summary.
    """

    def __init__(self, mode: GuidanceMode):
        self.mode = mode
        self.last_summary: Optional[str] = None
        self.total_evaluations = 0  # over the hook's lifetime, never reset
        self._reset()

    def _reset(self) -> None:
        self.evaluations = 0
        self.corrected_evaluations = 0
        self.bounded_evaluations = 0
        self.sample_corrected: Optional[torch.Tensor] = None
        self.max_beta = 0.0
        self.max_beta_sigma = 0.0
        self.max_shift = 0.0
        self._sigma = 0.0
        self._last_sigma: Optional[float] = None
        self._final_sigma: Optional[float] = None

    # ---------------------------------------------------------------- events
    def evaluation(self, sigma: torch.Tensor, batch: int, sample_sigmas: Any = None) -> None:
        """A model evaluation at ``sigma`` (``[B]`` or scalar) of a batch of ``batch`` samples."""
        s = float(torch.as_tensor(sigma).detach().reshape(-1).max())
        if self.evaluations and self._last_sigma is not None and s > self._last_sigma * (1 + 1e-6):
            self.finish()  # the noise level rose: a new sampling run
        self.evaluations += 1
        self.total_evaluations += 1
        self._sigma = self._last_sigma = s
        if self.sample_corrected is None or self.sample_corrected.numel() != batch:
            self.sample_corrected = torch.zeros(batch, dtype=torch.bool)
        if isinstance(sample_sigmas, torch.Tensor):
            nonzero = sample_sigmas.detach().reshape(-1).float()
            nonzero = nonzero[nonzero > 0]
            self._final_sigma = float(nonzero.min()) if nonzero.numel() else None

    def beta(self, beta: torch.Tensor, shift: torch.Tensor, bounded: torch.Tensor) -> None:
        """Corrected where ``beta > 0``: ``beta`` ``[B]`` (before the trust region), ``shift`` ``[B]`` in
        units of ``s_t / a_t``, ``bounded`` ``[B]`` where the trust region shortened the shift."""
        corrected = (beta > 0).detach().cpu()
        self._corrected(corrected)
        if bool(corrected.any()):
            top = float(beta.max())
            if top > self.max_beta:
                self.max_beta, self.max_beta_sigma = top, self._sigma
            self.max_shift = max(self.max_shift, float(shift[corrected.to(shift.device)].max()))
        self.bounded_evaluations += int(bool(bounded.any()))

    def gate(self, gate: torch.Tensor) -> None:
        """Corrected where ``gate`` ``[B]`` (bool) is open."""
        self._corrected(gate.detach().cpu().bool())

    def _corrected(self, mask: torch.Tensor) -> None:
        self.corrected_evaluations += int(bool(mask.any()))
        if self.sample_corrected is not None and self.sample_corrected.numel() == mask.numel():
            self.sample_corrected |= mask

    def after_evaluation(self) -> None:
        """Close the run after the last step of the schedule (when the schedule is known)."""
        if self._final_sigma is not None and self._last_sigma is not None \
                and self._last_sigma <= self._final_sigma * (1 + 1e-6):
            self.finish()

    def never_called(self) -> str:
        """A sampling run ended without one model evaluation reaching the hook: log it; the text."""
        text = (f"Safe Denoiser ({self.mode.name}): a sampling run ended without the guidance being called once: the "
                "sampler or guider bypasses ComfyUI's model hooks, so nothing was corrected. Use KSampler, "
                "SamplerCustom(Advanced) with a ComfyUI guider, or the Safe Denoiser KSampler.")
        log.warning("%s", text)
        self.last_summary = text
        return text

    # ---------------------------------------------------------------- output
    def summary(self) -> str:
        """One paragraph: what was corrected, how hard, and what to change if it did nothing."""
        if self.evaluations == 0:
            return f"Safe Denoiser ({self.mode.name}): the model was never evaluated."
        n = self.evaluations
        samples = self.sample_corrected if self.sample_corrected is not None else torch.zeros(0, dtype=torch.bool)
        corrected_samples, batch = int(samples.sum()), int(samples.numel())
        head = (f"Safe Denoiser ({self.mode.name}): corrected {self.corrected_evaluations} of {n} model evaluations "
                f"({100.0 * self.corrected_evaluations / n:.0f}%) and {corrected_samples} of {batch} samples "
                f"({100.0 * corrected_samples / max(batch, 1):.0f}%)")
        if self.corrected_evaluations == 0:
            return f"{head}: it did nothing ({self.mode.idle_hint})."
        return f"{head}{self.mode.report_details(self)}."

    def finish(self) -> str:
        """Log and return the summary of the current run, then start a new one (idempotent between runs)."""
        if self.evaluations == 0:
            return self.last_summary or self.summary()
        text = self.summary()
        log.info("%s", text)
        self.last_summary = text
        self._reset()
        return text
