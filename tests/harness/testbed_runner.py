"""Run the testbeds of :mod:`harness.testbeds` through ComfyUI's own samplers and the pack's hook.

The denoiser handed to ``comfy.k_diffusion.sampling`` is the testbed's exact ``E[x0 | x_t]``; the
"safe" arm passes it through the pack's :class:`SafeDenoiserHook` (the same object the nodes
register), with a :class:`NegationSet` of exact samples of the unsafe part.  Import only after a
ComfyUI is importable (the ``comfy`` fixture or :class:`harness.runtime.ComfySession`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import torch

import comfy.k_diffusion.sampling as kds
import comfy.latent_formats

from .erased_files import pack_module
from .testbeds import DTYPE, Measures
from .tiny_models import flow_sampling, forward_coefficients

SAMPLERS = {"euler": kds.sample_euler, "dpmpp_2m": kds.sample_dpmpp_2m,
            "euler_ancestral": kds.sample_euler_ancestral}


class Identity16(comfy.latent_formats.LatentFormat):
    """A 16-channel latent format with scale 1 (SD3/Flux-sized latents on either ComfyUI)."""

    latent_channels = 16
    scale_factor = 1.0
    latent_rgb_factors = [[0.0, 0.0, 0.0]] * 16


def model_parts(kind: str, channels: int) -> SimpleNamespace:
    """``model_sampling`` and ``latent_format`` of an SD1.5 (EPS) or flow (CONST, shift 3) model."""
    if kind == "flow":
        sampling = flow_sampling(shift=3.0)
    else:
        import comfy.model_sampling as ms_mod

        class EPS(ms_mod.ModelSamplingDiscrete, ms_mod.EPS):
            pass

        sampling = EPS()
    latent_format = Identity16() if channels == 16 else comfy.latent_formats.SD15()
    return SimpleNamespace(model_sampling=sampling, latent_format=latent_format)


def normal_sigmas(model_sampling: Any, steps: int) -> torch.Tensor:
    """ComfyUI's "normal" scheduler: timesteps evenly spaced from sigma_max to sigma_min, then 0."""
    start = model_sampling.timestep(model_sampling.sigma_max)
    end = model_sampling.timestep(model_sampling.sigma_min)
    t = torch.linspace(float(start), float(end), steps)
    return torch.cat([torch.stack([model_sampling.sigma(ts) for ts in t]).float().reshape(-1), torch.zeros(1)])


def negation_set(session: Any, bed: Any, parts: SimpleNamespace, count: int, seed: int) -> Any:
    """A NegationSet of ``count`` exact samples of the unsafe part, stored as raw VAE latents."""
    ns = pack_module(session, "negation_set")
    gen = torch.Generator().manual_seed(seed)
    y = bed.sample(count, bed.unsafe, gen).float().reshape(-1, *bed.shape)
    raw = parts.latent_format.process_out(y.clone())
    return ns.NegationSet(raw, {"name": "testbed unsafe part", "source": "exact samples"})


def run_arm(session: Any, bed: Any, parts: SimpleNamespace, arm: str, *, negation: Any = None,
            settings: dict | None = None, restart: dict | None = None, sampler: str = "euler", steps: int = 20,
            batch: int = 32, seed: int = 0) -> tuple[Measures, Any]:
    """Sample ``batch`` latents with ``arm`` in {"plain", "oracle", "safe", "restart"}; return the
    measures and the hook (safe arm: its ``report`` tells what it did) or, with restarts (the Safe
    Denoiser Restart Sampler's guide and restart loop around the same sampler: the "restart" arm,
    whose ``settings`` are the restart settings, or ``restart`` settings around the safe arm, as the
    Safe Denoiser KSampler does), the ``(restarts, still_claimed)`` per sample."""
    sd = pack_module(session, "safe_denoiser")
    ms = parts.model_sampling
    hook = None
    if arm == "restart":
        arm, restart, settings = "plain", dict(settings or {}), None
    if arm == "safe":
        hook = sd.SafeDenoiserHook(negation, sd.GuidanceSettings(**(settings or {})), uses_pre_cfg=False)
    safe_components = [k for k in range(bed.components) if k not in bed.unsafe]

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        alpha, std = forward_coefficients(ms, sigma)
        flat = x.reshape(x.shape[0], -1).to(DTYPE)
        comps = safe_components if arm == "oracle" else None
        d = bed.denoise(flat, alpha.reshape(-1), std.reshape(-1), comps).to(x.dtype).reshape(x.shape)
        if hook is not None:
            corr = hook.correction(parts, x, d, sigma)
            d = d if corr is None else corr.apply(d)
        return d

    sigmas = normal_sigmas(ms, steps)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch,) + tuple(bed.shape), generator=gen)
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
    torch.manual_seed(seed + 1)  # ancestral samplers draw from the global generator
    if restart is not None:
        rs = pack_module(session, "restart_sampler")
        guide = rs.RestartGuide(negation, rs.RestartSettings(**restart))

        def run(start: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            claiming = rs._Claiming(denoiser, guide, parts)
            out = SAMPLERS[sampler](claiming, start, sigmas, disable=True)
            return out, (claiming.claimed if claiming.claimed is not None else torch.zeros(len(index), dtype=torch.bool))

        def fresh(index: torch.Tensor, round_: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed + rs.RESTART_SEED_STRIDE * round_)
            eps = torch.randn((batch,) + tuple(bed.shape), generator=g)[index]
            return ms.noise_scaling(sigmas[0], eps, torch.zeros_like(eps), max_denoise=True)

        out, restarts, still = rs.sample_with_restarts(run, x, fresh, guide.settings.max_restarts)
        hook = (restarts, still)
    else:
        out = SAMPLERS[sampler](denoiser, x, sigmas, disable=True)
    x0 = ms.inverse_noise_scaling(sigmas[-1], out) if hasattr(ms, "inverse_noise_scaling") else out
    return bed.measure(x0.reshape(batch, -1).to(DTYPE)), hook


def table_row(name: str, arm: str, m: Measures, plain: Measures) -> str:
    """One table line; the off-span ratio to plain only where plain has off-span energy (mixtures)."""
    ratio = f"{m.off_span / plain.off_span:5.2f}x plain" if plain.off_span > 1e-3 else "  n/a"
    return (f"{name:34s} {arm:14s} unsafe {m.unsafe:6.1%}  look-alike {m.look_alike:6.1%}  "
            f"off-span {m.off_span:6.3f} ({ratio}, >1.5 {m.off_span_over:5.1%})  TV {m.tv(plain):.3f}")


def arms_table(session: Any, name: str, bed: Any, parts: SimpleNamespace, arms: Sequence[tuple[str, dict]],
               **kw: Any) -> list[str]:
    """Rows for plain, oracle (unless ``oracle=False``) and each ``(label, settings)`` Safe Denoiser arm
    (``settings``: the patch's, and ``"restart": True`` or the restart settings for restarts around it)."""
    negation = negation_set(session, bed, parts, kw.pop("negation_count", 515), kw.pop("negation_seed", 100))
    oracle = kw.pop("oracle", True)
    plain, _ = run_arm(session, bed, parts, "plain", **kw)
    rows = [table_row(name, "plain", plain, plain)]
    if oracle:
        rows.append(table_row(name, "oracle", run_arm(session, bed, parts, "oracle", **kw)[0], plain))
    for label, settings in arms:
        settings = dict(settings)
        restart = settings.pop("restart", None)
        restart = ({} if restart is True else restart) if restart else None
        kind = "safe" if settings else "plain"  # restart settings alone: the Restart Sampler around plain sampling
        m, hook = run_arm(session, bed, parts, kind, negation=negation, settings=settings, restart=restart, **kw)
        rows.append(table_row(name, label, m, plain))
    return rows
