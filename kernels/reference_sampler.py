"""The official Safe Denoiser *procedure* as sampler steps, in pure torch (no ComfyUI import).

The official pipeline (GitHub MingyuKim87/Safe_Denoiser@223415b,
``models/textuals_visual/modified_safree_diffusion_pipeline_threshold_time.py`` with
``repellency/repellency_methods_threshold.py``) samples SD1.4 with 50 DDPM steps and, at each
step inside its window whose gate is open:

1. takes ``x0_hat`` from the CFG noise prediction ``eps`` (before any correction);
2. corrects it, ``x0' = x0_hat - scale * E_u`` (:func:`kernels.guidance.reference_correct`);
3. re-noises the corrected estimate to the *same* timestep with fresh noise ``z``
   (``scheduler.add_noise(x0', z, t)``), replacing the state;
4. takes the DDPM step from the re-noised state with the *old* ``eps``.

States here use ComfyUI's k-diffusion (VE) convention ``x = x0 + sigma * eps`` with
``sigma = sqrt((1 - abar) / abar)``; the DDPM (VP) state is ``x / sqrt(1 + sigma^2)``.
"""

from __future__ import annotations

import torch

__all__ = ["ddpm_step", "reference_restart"]


def ddpm_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float,
              noise: torch.Tensor | None) -> torch.Tensor:
    """One DDPM ancestral step (``fixed_small`` variance, as diffusers' ``DDPMScheduler.step``).

    In VP terms, with ``abar = 1 / (1 + sigma^2)``, ``abar' = 1 / (1 + sigma_next^2)``,
    ``a = abar / abar'`` and ``b = 1 - a``::

        x_vp' = sqrt(abar') b / (1 - abar) * x0 + sqrt(a) (1 - abar') / (1 - abar) * x_vp
                + sqrt((1 - abar') / (1 - abar) * b) * noise

    Args:
        x: ``[B, ...]`` VE state at ``sigma`` (> 0).
        x0: ``[B, ...]`` the estimate of the clean sample the step uses.
        sigma, sigma_next: VE noise levels, ``sigma > sigma_next >= 0``.
        noise: standard normal ``[B, ...]``; ignored (may be None) when ``sigma_next == 0``.

    Returns:
        ``[B, ...]`` VE state at ``sigma_next``.
    """
    abar = 1.0 / (1.0 + sigma * sigma)
    abar_next = 1.0 / (1.0 + sigma_next * sigma_next)
    alpha = abar / abar_next
    beta = 1.0 - alpha
    x_vp = x * abar ** 0.5
    out = (abar_next ** 0.5 * beta / (1.0 - abar)) * x0 + (alpha ** 0.5 * (1.0 - abar_next) / (1.0 - abar)) * x_vp
    if sigma_next > 0:
        variance = max((1.0 - abar_next) / (1.0 - abar) * beta, 1e-20)
        out = out + variance ** 0.5 * noise
    return out / abar_next ** 0.5


def reference_restart(x: torch.Tensor, denoised: torch.Tensor, corrected: torch.Tensor, gate: torch.Tensor,
                      sigma: float, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-4 of the official procedure where ``gate`` is open: re-noise and keep the old eps.

    The re-noised state is ``x' = x0' + sigma * z`` (VE form of ``add_noise(x0', z, t)``) and the
    DDPM step then reads ``x0'' = x' - sigma * eps_old`` with ``eps_old = (x - x0_hat) / sigma``,
    so the correction enters twice: through ``x0'`` and through the restarted state.

    Args:
        x: ``[B, ...]`` state at ``sigma``.
        denoised: ``[B, ...]`` ``x0_hat`` (the CFG result before the correction).
        corrected: ``[B, ...]`` ``x0'``.
        gate: ``[B]`` boolean, where the official gate is open.
        sigma: the VE noise level of ``x``.
        noise: ``[B, ...]`` fresh standard normal ``z``.

    Returns:
        ``(x_step, x0_step)``: the state and clean estimate :func:`ddpm_step` uses; unchanged
        (``x``, ``denoised``) where the gate is shut.
    """
    shape = (-1,) + (1,) * (x.ndim - 1)
    open_ = gate.reshape(shape).to(torch.bool)
    restarted = corrected + sigma * noise
    eps_old = (x - denoised) / sigma
    x_step = torch.where(open_, restarted, x)
    x0_step = torch.where(open_, restarted - sigma * eps_old, denoised)
    return x_step, x0_step
