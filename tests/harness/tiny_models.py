"""Tiny, deterministic, real ComfyUI models for CPU tests, and an exact analytic denoiser.

Everything is built with ComfyUI's own classes (``supported_models``, ``model_base``,
``ModelPatcher``, ``sd.VAE``), so samplers, patches and nodes see the real objects.  ComfyUI's
``ops`` layers skip weight initialisation (uninitialised memory, often NaN): every parameter is
initialised here from the seed.

Import only after a ComfyUI is importable (:class:`harness.runtime.ComfySession` or a server's
``main.py`` put it on ``sys.path``).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

import comfy.model_base
import comfy.model_patcher
import comfy.model_sampling
import comfy.sd
import comfy.supported_models

log = logging.getLogger(__name__)

FAMILIES = ("sd15", "sd15_v", "sdxl", "flow")
VAE_CHANNELS = (4, 16)
CONTEXT_DIM = 32
POOLED_DIM = 32
#: SDXL's ADM vector: the pooled text embedding plus six 256-wide size/crop embeddings.
SDXL_ADM_CHANNELS = POOLED_DIM + 6 * 256

_CPU = torch.device("cpu")
_MODEL_CACHE: dict[tuple[str, int], comfy.model_patcher.ModelPatcher] = {}
_VAE_CACHE: dict[tuple[int, int], comfy.sd.VAE] = {}


def init_weights_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Deterministically initialise every parameter of ``module`` from ``seed`` (in place).

    Matrices/kernels get N(0, gain^2 / fan_in); 1-D ``*weight`` (norm scales) get 1; biases 0.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            if param.ndim >= 2:
                fan_in = param[0].numel()
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(values * (gain / math.sqrt(fan_in)))
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"non-finite parameters after initialisation: {bad[:5]}")
    return module


def _unet_config(family: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1, "context_dim": CONTEXT_DIM, "use_spatial_transformer": True,
        "legacy": False, "use_linear_in_transformer": False, "adm_in_channels": None,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    if family == "sdxl":
        config.update(adm_in_channels=SDXL_ADM_CHANNELS, num_classes="sequential",
                      use_linear_in_transformer=True)
    return config


class FlowMatchingSampling(torch.nn.Module):
    """Test-only flow-matching ("CONST") model sampling, written from the math.

    Forward process ``x = (1 - sigma) * x0 + sigma * eps`` with ``sigma`` in (0, 1]; the network
    predicts the velocity ``v = eps - x0`` so ``x0 = x - sigma * v``.  Timesteps are
    ``t = 1000 * u`` with ``sigma = shift * u / (1 + (shift - 1) * u)``.  Attached to a tiny
    SD1.5 UNet with ``model.add_object_patch("model_sampling", FlowMatchingSampling())`` this
    makes a flow model on any ComfyUI version (O has no flow models).  Where ComfyUI has
    ``comfy.model_sampling.CONST`` (N), :func:`flow_sampling` adds it as a base class only so
    ComfyUI's ``isinstance`` dispatch (rectified-flow ancestral samplers) recognises it; every
    method used by ComfyUI is defined here.
    """

    sigma_data = 1.0
    multiplier = 1000.0

    def __init__(self, shift: float = 1.0, timesteps: int = 1000):
        super().__init__()
        self.shift = float(shift)
        u = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
        sigmas = self._shifted(u).float()
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("log_sigmas", sigmas.log())

    def _shifted(self, u: torch.Tensor) -> torch.Tensor:
        return self.shift * u / (1.0 + (self.shift - 1.0) * u)

    @staticmethod
    def _bcast(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        if sigma.ndim == 0:
            return sigma
        return sigma.reshape(sigma.shape[:1] + (1,) * (ndim - 1))

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        u = sigma / (self.shift - (self.shift - 1.0) * sigma)
        return u * self.multiplier

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return self._shifted(torch.as_tensor(timestep) / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * self.multiplier)))

    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        return model_input - model_output * self._bcast(sigma, model_output.ndim)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        s = self._bcast(sigma, noise.ndim)
        return s * noise + (1.0 - s) * latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return latent / (1.0 - self._bcast(sigma, latent.ndim))


@functools.lru_cache(maxsize=None)
def _flow_sampling_class() -> type[FlowMatchingSampling]:
    const = getattr(comfy.model_sampling, "CONST", None)
    if const is None:  # O
        return FlowMatchingSampling
    return type("FlowMatchingSamplingConst", (FlowMatchingSampling, const), {})


def flow_sampling(shift: float = 1.0) -> FlowMatchingSampling:
    """A :class:`FlowMatchingSampling`, also an instance of N's ``CONST`` marker when it exists."""
    return _flow_sampling_class()(shift)


def build_model(family: str = "sd15", seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A tiny real MODEL (~1M parameters) of ``family``; cached per (family, seed), never mutate."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {FAMILIES}")
    key = (family, int(seed))
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    config_cls = comfy.supported_models.SDXL if family == "sdxl" else comfy.supported_models.SD15
    model_config = config_cls(_unet_config(family))
    # Both versions merge the class's unet_extra_config (SDXL: 64-channel heads) in __init__.
    model_config.unet_config.update(num_heads=2, num_head_channels=-1)
    model_config.set_inference_dtype(torch.float32, None)
    if family == "sd15_v":
        model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION,
                                           device=_CPU)
    else:
        model = model_config.get_model({}, device=_CPU)
    init_weights_(model.diffusion_model, seed)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=_CPU, offload_device=_CPU)
    if family == "flow":
        patcher.add_object_patch("model_sampling", flow_sampling())
    _MODEL_CACHE[key] = patcher
    log.debug("built tiny %s model (seed %d)", family, seed)
    return patcher


def vae_config(channels: int = 4) -> dict[str, Any]:
    """An 8x-downsampling AutoencoderKL config (``ch_mult`` of length 4) with ``channels`` latents."""
    return {"params": {"embed_dim": channels, "ddconfig": {
        "double_z": True, "z_channels": channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def build_vae(seed: int = 0, channels: int = 4) -> comfy.sd.VAE:
    """A tiny real VAE with ``channels`` latent channels; cached per (seed, channels)."""
    if channels not in VAE_CHANNELS:
        raise ValueError(f"tiny VAE channels must be one of {VAE_CHANNELS}, got {channels}")
    key = (int(seed), int(channels))
    if key in _VAE_CACHE:
        return _VAE_CACHE[key]
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = vae_config(channels)
    # Initialise a stand-alone module, then hand its weights to comfy.sd.VAE as its state dict
    # (so the VAE loads a complete state dict instead of warning about every missing key).
    source = AutoencoderKL(**config["params"])
    init_weights_(source, seed, gain=0.5)
    vae = comfy.sd.VAE(sd=source.state_dict(), config=config)
    vae.latent_channels = channels  # comfy.sd.VAE assumes 4 for config-built models
    _VAE_CACHE[key] = vae
    return vae


def build_conditioning(seed: int = 0, tokens: int = 4, family: str = "sd15",
                       zero: bool = False) -> list[list[Any]]:
    """CONDITIONING ``[[cond [1, tokens, 32], {"pooled_output": [1, 32]}]]`` for any family.

    SDXL needs the pooled output (its ADM input); SD1.5 ignores it.  ``zero`` gives an
    all-zero ("empty") conditioning of the same shape.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    generator = torch.Generator().manual_seed(int(seed))
    cond = torch.randn(1, tokens, CONTEXT_DIM, generator=generator)
    pooled = torch.randn(1, POOLED_DIM, generator=generator)
    if zero:
        cond, pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
    return [[cond, {"pooled_output": pooled}]]


@dataclass(frozen=True)
class PointSet:
    """A finite point set S ``[M, C, H, W]`` in a model's ``process_in`` latent space."""

    points: torch.Tensor

    def __post_init__(self) -> None:
        if self.points.ndim != 4:
            raise ValueError(f"point set must be [M, C, H, W], got shape {tuple(self.points.shape)}")

    def __len__(self) -> int:
        return int(self.points.shape[0])


def make_point_set(seed: int = 0, count: int = 12, channels: int = 4, height: int = 8,
                   width: int = 8, scale: float = 1.0) -> PointSet:
    """``count`` Gaussian points of standard deviation ``scale`` (float64), reproducible."""
    generator = torch.Generator().manual_seed(int(seed))
    points = torch.randn(count, channels, height, width, generator=generator, dtype=torch.float64)
    return PointSet(points * scale)


def forward_coefficients(model_sampling: Any, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, std)`` ``[B, 1, 1, 1]`` float64 with ``x = alpha * x0 + std * eps`` at ``sigma``."""
    s = sigma.detach().to(torch.float64).reshape(-1, 1, 1, 1)
    zeros, ones = torch.zeros_like(s), torch.ones_like(s)
    return model_sampling.noise_scaling(s, zeros, ones), model_sampling.noise_scaling(s, ones, zeros)


def posterior_mean(x: torch.Tensor, sigma: torch.Tensor, points: torch.Tensor,
                   model_sampling: Any) -> torch.Tensor:
    """E[x0 | x] for x0 uniform on ``points``: the exact denoiser of that data set (float64)."""
    if tuple(x.shape[1:]) != tuple(points.shape[1:]):
        raise ValueError(f"latent shape {tuple(x.shape[1:])} does not match the point set's "
                         f"{tuple(points.shape[1:])}")
    alpha, std = forward_coefficients(model_sampling, sigma)
    pts = points.to(device=x.device, dtype=torch.float64)
    diff = x.to(torch.float64)[:, None] - alpha[:, None] * pts[None]
    d2 = diff.pow(2).flatten(2).sum(-1)  # [B, M]
    weights = torch.softmax(-d2 / (2.0 * std.reshape(-1, 1) ** 2), dim=1)
    return torch.einsum("bm,m...->b...", weights, pts)


def exact_denoiser_wrapper(point_set: PointSet) -> Callable[[Callable[..., Any], dict[str, Any]], torch.Tensor]:
    """A ``model_function_wrapper`` returning the exact posterior mean over ``point_set``.

    The wrapper receives ``apply_model`` (bound to the BaseModel being sampled, whose
    ``model_sampling`` already has object patches applied) and ``args`` with ``input`` (x in
    sampler space) and ``timestep`` (sigma ``[B]``).  The points live in a closure, so
    ``ModelPatcher.clone()`` (which deep-copies ``model_options``) shares them.
    """
    points = point_set.points

    def wrapper(apply_model: Callable[..., Any], args: dict[str, Any]) -> torch.Tensor:
        base_model = getattr(apply_model, "__self__", None)
        if base_model is None or not hasattr(base_model, "model_sampling"):
            raise TypeError("exact denoiser: apply_model is not bound to a ComfyUI BaseModel")
        x = args["input"]
        return posterior_mean(x, args["timestep"], points, base_model.model_sampling).to(x.dtype)

    return wrapper


def patch_exact_denoiser(model: comfy.model_patcher.ModelPatcher,
                         point_set: PointSet) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` whose network is replaced by the exact denoiser of ``point_set``."""
    patched = model.clone()
    patched.set_model_unet_function_wrapper(exact_denoiser_wrapper(point_set))
    return patched


def model_object(model: comfy.model_patcher.ModelPatcher, name: str) -> Any:
    """``model_sampling`` / ``latent_format`` with object patches applied (N and O)."""
    getter = getattr(model, "get_model_object", None)
    if getter is not None:
        return getter(name)
    return model.object_patches.get(name, getattr(model.model, name))


def nearest_points(samples: torch.Tensor, point_set: PointSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (``process_in`` space): index of the nearest point and the RMS distance to it."""
    pts = point_set.points.to(torch.float64).flatten(1)
    flat = samples.to(torch.float64).flatten(1)
    if flat.shape[1] != pts.shape[1]:
        raise ValueError(f"samples of shape {tuple(samples.shape[1:])} do not match the point set's "
                         f"{tuple(point_set.points.shape[1:])}")
    dist = torch.cdist(flat, pts) / math.sqrt(pts.shape[1])
    best, index = dist.min(dim=1)
    return index, best


def point_stats(samples: torch.Tensor, point_set: PointSet, unsafe_count: int,
                tolerance: float) -> dict[str, Any]:
    """Where samples landed: fraction near any point (RMS distance <= tolerance), fraction whose
    nearest point is among the first ``unsafe_count`` ("on_u", counting near samples only)."""
    index, dist = nearest_points(samples, point_set)
    near = dist <= tolerance
    n = int(samples.shape[0])
    return {
        "n": n,
        "near_any": float(near.sum()) / n,
        "on_u": float((near & (index < unsafe_count)).sum()) / n,
        "nearest_index": [int(i) for i in index],
        "nearest_distance": [float(d) for d in dist],
    }
