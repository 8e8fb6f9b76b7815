"""Restart guidance: sample again, from fresh noise, what the negation set claims on the way.

Not in the Safe Denoiser paper. Its Eq. 4 corrects the denoised estimate, ``E_safe = E_data +
beta (E_data - E_unsafe)``; where the component of a sample is decided while the posterior odds
``beta`` are already large (on exact Gaussian mixtures at Stable Diffusion's latent sizes, at the very
first step), that needs ``E_unsafe`` to a precision no finite negation set gives, and a bounded
correction leaves those samples where they are (README, "Choosing the defaults"). Restarting them
needs no ``E_unsafe`` at all, only a test that says "this state is heading into the set".

The test, per noise level ``(a_t, s_t)``. ``log R(x_t)`` is the kernel density ratio of
:func:`kernels.guidance.log_density_ratio` (the negation set's kernel density, width ``h s_t``,
against the noised diagonal Gaussian fitted to the set). It is calibrated on the set itself:

* recall: ``tau_u`` = the ``1 - recall`` quantile of ``log R`` over noised copies ``a y_m + s eps``
  of ``M`` members, each scored without its own kernel (leave-one-out: a new unsafe sample is not
  in the set);
* false alarms: ``tau_r`` = the ``1 - false_alarm`` quantile of ``log R`` over samples of the
  reference Gaussian;
* the state is claimed when ``log R(x_t) > max(tau_u, tau_r)``, at the noise levels where the set's
  noised copies *with* their own kernel reach ``tau_r`` at that quantile (elsewhere the kernel cannot
  tell the set from the reference, e.g. at the first flow steps where ``a_t ~ 0``; the test is off).

A claimed sample is sampled again from fresh noise (:func:`sample_with_restarts`). If the claims
were the exact event "this trajectory ends unsafe", the accepted samples would follow the safe part
exactly (rejection sampling); samples never claimed are left exactly as they are.

This module imports nothing from ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .guidance import DEFAULT_CHUNK, compute_dtype, kernel_posterior_mean, log_density_ratio

__all__ = ["RestartThreshold", "calibration_log_ratios", "restart_threshold", "claimed", "sample_with_restarts"]

CALIBRATION_QUERIES = 64
"""Noised set members and reference samples per noise level (the quantiles' sample size)."""


@dataclass(frozen=True)
class RestartThreshold:
    """The calibrated test at one noise level: ``threshold`` (``inf`` = off) and its parts."""

    threshold: float
    recall_quantile: float  # tau_u (leave-one-out)
    kept_quantile: float  # the same quantile with each member's own kernel kept
    reference_quantile: float  # tau_r
    own_kernel_gain: float = 0.0
    """Median over the calibration members of ``log(1 + k_own / sum_others k)``: how much a member's own
    kernel adds to its density (``kept - leave_one_out``); large where the kernel sees single members."""

    @property
    def active(self) -> bool:
        return math.isfinite(self.threshold)


def _log_kernel_sums(x: torch.Tensor, y: torch.Tensor, alpha: float, std: float, bandwidth: float,
                     exclude: Optional[torch.Tensor], chunk: int) -> torch.Tensor:
    """``[M]`` ``log sum_n exp(-||x_m - a y_n||^2 / (2 h^2 s^2))``, skipping ``n = exclude[m]``."""
    inv = 1.0 / (2.0 * (bandwidth * std) ** 2)
    x_sq = (x * x).sum(1)
    parts = []
    for start in range(0, y.shape[0], chunk):
        yc = y[start:start + chunk].to(device=x.device, dtype=x.dtype)
        d2 = x_sq[:, None] + alpha * alpha * (yc * yc).sum(1)[None] - 2.0 * alpha * (x @ yc.T)
        score = -d2.clamp_min(0.0) * inv
        if exclude is not None:
            cols = torch.arange(start, start + yc.shape[0], device=x.device)
            score = score.masked_fill(exclude[:, None] == cols[None], -math.inf)
        parts.append(torch.logsumexp(score, 1))
    return torch.logsumexp(torch.stack(parts, 1), 1)


def calibration_log_ratios(
    y: torch.Tensor,
    alpha: float,
    std: float,
    bandwidth: float,
    ref_mean: torch.Tensor,
    ref_var: torch.Tensor,
    queries: int = CALIBRATION_QUERIES,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log R`` of the calibration samples at one noise level.

    Args:
        y: ``[N, D]`` negation latents in the model's sampling space.
        alpha, std: ``a_t``, ``s_t`` (``std > 0``).
        bandwidth: kernel width in units of ``s_t``.
        ref_mean, ref_var: ``[D]`` the reference Gaussian (the set's per-dimension mean and variance).
        queries: ``M``; at most ``N`` set members are used.
        seed: CPU generator seed of the noise (the result is deterministic).

    Returns:
        ``(leave_one_out [M], kept [M], reference [M])`` float64: noised members scored without and
        with their own kernel, and reference samples ``a (m + sqrt(v) z) + s eps``.
    """
    cdt = torch.float64 if compute_dtype(y) == torch.float64 or y.device.type == "cpu" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n, dim = y.shape
    m = min(int(queries), n)
    index = torch.randperm(n, generator=gen)[:m]
    eps = torch.randn(m, dim, generator=gen, dtype=torch.float64).to(device=y.device, dtype=cdt)
    z = torch.randn(m, dim, generator=gen, dtype=torch.float64).to(device=y.device, dtype=cdt)
    eps_ref = torch.randn(m, dim, generator=gen, dtype=torch.float64).to(device=y.device, dtype=cdt)
    members = alpha * y[index.to(y.device)].to(cdt) + std * eps
    mean, var = ref_mean.to(device=y.device, dtype=cdt), ref_var.to(device=y.device, dtype=cdt)
    reference = alpha * (mean[None] + var.clamp_min(0).sqrt()[None] * z) + std * eps_ref
    out = []
    for x, exclude, count in ((members, index.to(y.device), n - 1), (members, None, n), (reference, None, n)):
        log_norm = _log_kernel_sums(x, y, alpha, std, bandwidth, exclude, chunk)
        out.append(log_density_ratio(log_norm, x, alpha, std, count, ref_mean, ref_var, bandwidth).cpu())
    return out[0], out[1], out[2]


def restart_threshold(
    y: torch.Tensor,
    alpha: float,
    std: float,
    bandwidth: float,
    ref_mean: torch.Tensor,
    ref_var: torch.Tensor,
    recall: float = 0.95,
    false_alarm: float = 0.01,
    queries: int = CALIBRATION_QUERIES,
    seed: int = 0,
) -> RestartThreshold:
    """The test at one noise level (module docstring); ``threshold = inf`` where it is off.

    Raises:
        ValueError: ``recall`` or ``false_alarm`` outside ``(0, 1)``, or ``std <= 0``.
    """
    if not (0.0 < recall < 1.0 and 0.0 < false_alarm < 1.0):
        raise ValueError(f"recall {recall} and false_alarm {false_alarm} must lie in (0, 1)")
    if not std > 0:
        raise ValueError(f"std {std} must be > 0")
    loo, kept, ref = calibration_log_ratios(y, alpha, std, bandwidth, ref_mean, ref_var, queries, seed)
    tau_u = float(torch.quantile(loo, 1.0 - recall))
    tau_k = float(torch.quantile(kept, 1.0 - recall))
    tau_r = float(torch.quantile(ref, 1.0 - false_alarm))
    threshold = max(tau_u, tau_r) if (tau_k >= tau_r and alpha > 0) else math.inf
    return RestartThreshold(threshold, tau_u, tau_k, tau_r, float((kept - loo).median()))


def claimed(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: torch.Tensor | float,
    std: torch.Tensor | float,
    bandwidth: float,
    ref_mean: torch.Tensor,
    ref_var: torch.Tensor,
    threshold: float,
    y_sq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[B]`` bool: ``log R(x_t) > threshold`` (all False where the threshold is ``inf``).

    Args:
        x: ``[B, D]`` sampler states; the other arguments as in :func:`restart_threshold`.
    """
    if not math.isfinite(threshold):
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    km = kernel_posterior_mean(x, y, alpha, std, bandwidth, y_sq=y_sq)
    log_r = log_density_ratio(km.log_norm, x, alpha, std, y.shape[0], ref_mean, ref_var, bandwidth)
    return (log_r > threshold).to(x.device)


def sample_with_restarts(
    run: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    first: torch.Tensor,
    fresh: Callable[[torch.Tensor, int], torch.Tensor],
    max_restarts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample a batch; sample the claimed ones again from fresh starts, up to ``max_restarts`` times.

    Args:
        run: ``run(x_start [b, ...], index [b]) -> (samples [b, ...], claimed [b] bool)``: one full
            sampling run of the samples ``index`` of the batch, and whether the test claimed them on
            the way.
        first: ``[B, ...]`` the batch's starting states.
        fresh: ``fresh(index [b], round) -> x_start [b, ...]``: new starting states (fresh noise).
        max_restarts: rounds at most (0: sample once, only report the claims).

    Returns:
        ``(samples [B, ...], restarts [B] long, still_claimed [B] bool)``; a sample still claimed
        after the last round keeps its last attempt.
    """
    bsz = first.shape[0]
    index = torch.arange(bsz)
    samples, claims = run(first, index)
    claims = claims.to("cpu").clone()
    restarts = torch.zeros(bsz, dtype=torch.long)
    for round_ in range(1, int(max_restarts) + 1):
        todo = claims.nonzero().flatten()
        if todo.numel() == 0:
            break
        again, again_claims = run(fresh(todo, round_), todo)
        samples = samples.clone()
        samples[todo.to(samples.device)] = again.to(samples.dtype)
        claims[todo] = again_claims.to("cpu")
        restarts[todo] += 1
    return samples, restarts, claims
