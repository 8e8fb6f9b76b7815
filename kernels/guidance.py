"""Safe-denoiser guidance math (Kim et al., "Training-Free Safe Denoisers for Safe Use of
Diffusion Models", NeurIPS 2025), in pure torch.

Notation. The sampler state is ``x_t = a_t * x0 + s_t * eps`` (``a`` = alpha, ``s`` = std: for
EPS / V-prediction models in ComfyUI's k-diffusion convention ``a = 1, s = sigma``; for flow
(CONST) models ``a = 1 - sigma, s = sigma``). ``B`` is the batch, ``N`` the size of the negation
set, ``D`` the flattened latent size (``C*H*W``).

Paper equations used here:

* Eq. 4   ``E_safe[x0|x_t] = E_data[x0|x_t] + beta(x_t) * (E_data[x0|x_t] - E_unsafe[x0|x_t])``
* Eq. 5   ``beta*(x_t) = Z_u p_unsafe,t(x_t) / (Z_s p_safe,t(x_t))``
* Eq. 6   ``w_n = softmax_n(-||x_t - a y_n||^2 / (2 s^2))``, ``E_unsafe ~= sum_n w_n y_n``
* Eq. 7   ``beta* ~= eta * beta(x_t)`` with ``beta`` built from the negation set's kernel
  density at ``x_t`` (see :func:`beta_estimate` for the dimension-free odds form used here).

Everything is computed without ever materialising a ``B x N x D`` tensor: the squared distances
come from one GEMM (``||x||^2 + a^2||y||^2 - 2a x.y``), the weights from a log-sum-exp softmax,
and the weighted mean from a second GEMM.  Over ``N`` the work is streamed in chunks with an
online softmax (running max, running normaliser, running weighted sum), so memory stays
``O(B*D + chunk*D)`` however large the set is.  Accumulation is in float32, or float64 when the
inputs are float64, whatever the storage dtype of the negation set.

This module imports nothing from ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "KernelMean",
    "DEFAULT_CHUNK",
    "compute_dtype",
    "kernel_posterior_mean",
    "log_density_ratio",
    "beta_estimate",
    "safe_combine",
    "bound_beta",
    "shift_bound",
    "ReferenceGate",
    "channel_normalise",
    "reference_kernel_mean",
    "reference_beta_threshold",
    "reference_correct",
]

DEFAULT_CHUNK = 2048
"""Negation latents processed per chunk of the online softmax."""


@dataclass(frozen=True)
class KernelMean:
    """Result of a kernel-weighted average over a negation set.

    Attributes:
        mean: ``[B, D]`` weighted mean ``sum_n w_n y_n`` (the unsafe posterior mean, Eq. 6).
        log_norm: ``[B]`` ``log sum_n k_n``, the log of the un-normalised kernel sum.
    """

    mean: torch.Tensor
    log_norm: torch.Tensor


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are promoted)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(v: torch.Tensor | float, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar or ``[B]``/``[B,1,...]`` coefficient to shape ``[B]``."""
    t = torch.as_tensor(v, dtype=dtype, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"coefficient has {t.numel()} values for a batch of {batch}")
    return t


def _streamed_softmax_mean(chunks, bsz: int, dim: int, dtype: torch.dtype, device: torch.device):
    """Online softmax over ``N`` in chunks (running max, normaliser and weighted sum).

    Args:
        chunks: iterable of ``(values [n, D], scores [B, n])`` in the compute dtype.

    Returns:
        ``(mean [B, D], max [B], sum [B])`` with ``mean = sum_n softmax(scores)_n values_n`` and
        ``log sum_n exp(score_n) = max + log(sum)``.
    """
    m = torch.full((bsz,), -math.inf, dtype=dtype, device=device)
    lsum = torch.zeros(bsz, dtype=dtype, device=device)
    acc = torch.zeros(bsz, dim, dtype=dtype, device=device)
    for values, score in chunks:
        m_new = torch.maximum(m, score.amax(1))
        rescale = torch.exp(m - m_new)  # exp(-inf) = 0 on the first chunk
        p = torch.exp(score - m_new[:, None])
        lsum = lsum * rescale + p.sum(1)
        acc = acc * rescale[:, None] + p @ values  # GEMM 2: [B, D]
        m = m_new
    return acc / lsum[:, None], m, lsum


def _online_softmax_mean(
    x: torch.Tensor,
    y: torch.Tensor,
    coef_xy: torch.Tensor,
    coef_yy: torch.Tensor,
    bias: torch.Tensor,
    chunk: int,
    y_sq: Optional[torch.Tensor],
) -> KernelMean:
    """Streamed ``softmax_n(coef_xy_b * x_b.y_n - coef_yy_b * ||y_n||^2) @ Y``.

    Args:
        x: ``[B, D]`` queries in the compute dtype.
        y: ``[N, D]`` keys (= values), any floating dtype; cast chunk by chunk.
        coef_xy, coef_yy: ``[B]`` per-query coefficients of the two score terms.
        bias: ``[B]`` added to the log-normaliser (terms constant over ``n``).
        chunk: chunk length over ``N``.
        y_sq: optional precomputed ``[N]`` squared norms of ``y``.

    Returns:
        :class:`KernelMean` with ``log_norm = bias + logsumexp_n(score)``.
    """
    cdt = x.dtype

    def chunks():
        for start in range(0, y.shape[0], chunk):
            yc = y[start:start + chunk].to(device=x.device, dtype=cdt)
            ysq = (yc * yc).sum(1) if y_sq is None else y_sq[start:start + chunk].to(device=x.device, dtype=cdt)
            yield yc, coef_xy[:, None] * (x @ yc.T) - coef_yy[:, None] * ysq[None, :]  # GEMM 1: [B, n]

    mean, m, lsum = _streamed_softmax_mean(chunks(), x.shape[0], x.shape[1], cdt, x.device)
    return KernelMean(mean=mean, log_norm=bias + m + torch.log(lsum))


def kernel_posterior_mean(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: torch.Tensor | float,
    std: torch.Tensor | float,
    bandwidth: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
    y_sq: Optional[torch.Tensor] = None,
) -> KernelMean:
    """Unsafe posterior mean over a negation set (Eq. 6), streamed over ``N``.

    ``log k_n = -||x - a y_n||^2 / (2 h^2 s^2)`` and ``mean = sum_n softmax(log k)_n y_n``: the
    exact posterior mean of the empirical distribution ``{y_n}`` under the Gaussian forward
    process when the bandwidth ``h`` is 1; ``h > 1`` widens the kernel (a smoother estimate of a
    continuous unsafe distribution from finitely many samples).

    Args:
        x: ``[B, D]`` noisy sampler states ``x_t``.
        y: ``[N, D]`` negation latents in the model's sampling space (after ``process_in``).
        alpha: ``a_t``, scalar or ``[B]``.
        std: ``s_t``, scalar or ``[B]``, must be > 0.
        bandwidth: ``h`` > 0.
        chunk: negation latents per chunk of the online softmax.
        y_sq: optional ``[N]`` cache of ``||y_n||^2``.

    Returns:
        :class:`KernelMean`; ``log_norm = log sum_n k_n`` (un-normalised Gaussian kernels, without
        the ``(2 pi h^2 s^2)^{-D/2}`` factor), which makes exact posterior odds computable as
        ``exp(log_norm_U - log_norm_safe)``.
    """
    cdt = compute_dtype(x, y)
    xc = x.to(cdt)
    bsz = xc.shape[0]
    a = _per_sample(alpha, bsz, cdt, xc.device)
    s = _per_sample(std, bsz, cdt, xc.device)
    inv = 1.0 / (2.0 * (bandwidth * s) ** 2)  # 1 / (2 h^2 s^2)
    bias = -(xc * xc).sum(1) * inv
    return _online_softmax_mean(xc, y, 2.0 * a * inv, a * a * inv, bias, chunk, y_sq)


def log_density_ratio(
    log_norm: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor | float,
    std: torch.Tensor | float,
    count: int,
    ref_mean: torch.Tensor,
    ref_var: torch.Tensor,
    bandwidth: float = 1.0,
) -> torch.Tensor:
    """``log R = log q_t(x_t) - log g_t(x_t)``: the negation set's kernel density at ``x_t`` against
    the noised diagonal Gaussian reference (the formula in :func:`beta_estimate`).

    Args:
        log_norm: ``[B]`` from :func:`kernel_posterior_mean` (same ``alpha``, ``std``, ``bandwidth``).
        x: ``[B, D]`` sampler states.
        alpha, std: forward-process coefficients, scalar or ``[B]``.
        count: ``N``, the number of kernels summed in ``log_norm``.
        ref_mean, ref_var: ``[D]`` mean and variance of the reference Gaussian.
        bandwidth: ``h``, as used for ``log_norm``.

    Returns:
        ``[B]`` float64 (the ``D/2 log(...)`` terms reach 1e5 for SD-sized latents).
    """
    cdt = torch.float64
    bsz, dim = x.shape
    a = _per_sample(alpha, bsz, cdt, log_norm.device)[:, None]
    s = _per_sample(std, bsz, cdt, log_norm.device)[:, None]
    kvar = (bandwidth * s) ** 2  # [B, 1]
    rvar = a * a * ref_var.to(device=log_norm.device, dtype=cdt)[None] + kvar  # [B, D]
    centred = x.to(device=log_norm.device, dtype=cdt) - a * ref_mean.to(device=log_norm.device, dtype=cdt)[None]
    log_g = -(centred * centred / (2.0 * rvar) + 0.5 * torch.log(rvar)).sum(1)
    log_q = log_norm.to(cdt) - math.log(count) - 0.5 * dim * torch.log(kvar[:, 0])
    return log_q - log_g


def beta_estimate(
    log_norm: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor | float,
    std: torch.Tensor | float,
    count: int,
    ref_mean: torch.Tensor,
    ref_var: torch.Tensor,
    bandwidth: float = 1.0,
    eta: float = 1.0,
    p_max: float = 0.99,
    level: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Practical ``beta(x_t)`` of Eq. 4-5 (the posterior odds of "unsafe"), dimension-free.

    Eq. 5 is an odds ratio, ``beta* = Z_u p_u,t(x_t) / (Z_s p_s,t(x_t)) = P / (1 - P)`` with
    ``P = Z_u p_u,t(x_t) / p_t(x_t)`` the posterior probability that ``x_t`` comes from the unsafe
    part.  Following Eq. 7, ``p_u,t`` is the negation set's kernel density
    ``q_t(x_t) = (1/N) sum_n N(x_t; a y_n, h^2 s^2 I)`` and ``Z_u`` becomes the constant ``eta``.
    The data density ``p_t`` is unknown; it is replaced by the noised diagonal Gaussian with the
    data's per-dimension mean ``m`` and variance ``v`` (estimated on the negation set),
    ``g_t(x_t) = N(x_t; a m, diag(a^2 v + h^2 s^2))``::

        log R = log q_t(x_t) - log g_t(x_t)
              = log sum_n k_n - log N - D/2 log(h^2 s^2)
                + sum_d [ (x_d - a m_d)^2 / (2 r_d) + 1/2 log r_d ],   r_d = a^2 v_d + h^2 s^2
        P     = min(p_max, eta * R / exp(level)),      beta = P / (1 - P)

    with ``k_n = exp(-||x_t - a y_n||^2 / (2 h^2 s^2))`` (``log sum_n k_n`` is the ``log_norm`` of
    :func:`kernel_posterior_mean`).  The ``(2 pi)^{-D/2}`` factors cancel and both densities see
    the same noise, so ``R`` stays O(1) in any dimension.  ``p_max`` caps the odds (0.99:
    ``beta <= 99``).  At low noise the Gaussian reference over-estimates ``p_t`` away from the
    negation latents, so ``beta`` decays to 0 unless ``x_t`` is within the kernel's reach of the
    set: the estimate gates itself, and a step window is optional.  Why this estimator and not
    others: docs/design-history.md, "The Safe Denoiser's beta".

    Args:
        log_norm: ``[B]`` from :func:`kernel_posterior_mean` (same ``alpha``, ``std``, ``bandwidth``).
        x: ``[B, D]`` sampler states.
        alpha, std: forward-process coefficients, scalar or ``[B]``.
        count: ``N``, the size of the negation set.
        ref_mean, ref_var: ``[D]`` mean ``m`` and variance ``v >= 0`` of the reference Gaussian.
        bandwidth: ``h``, as used for ``log_norm``.
        eta: the prior weight ``Z_u`` of Eq. 7 (0 disables).
        p_max: cap of ``P``, in ``[0, 1)``.
        level: scalar or ``[B]`` ``log R`` at which ``P = eta`` (0: the reference Gaussian's own
            density; the Safe Denoiser passes the negation set's calibrated threshold at this noise
            level, :func:`kernels.restart.restart_threshold`). ``inf`` gives ``beta = 0``.

    Returns:
        ``[B]`` ``beta`` in ``[0, p_max / (1 - p_max)]`` (0 where an input is not finite), in the
        dtype of ``log_norm``.
    """
    log_r = log_density_ratio(log_norm, x, alpha, std, count, ref_mean, ref_var, bandwidth)
    shifted = log_r - _per_sample(level, log_r.shape[0], log_r.dtype, log_r.device)  # -inf where level is inf
    p = (eta * torch.exp(shifted.clamp(max=80.0))).clamp(max=p_max)
    beta = p / (1.0 - p)
    beta = torch.where(torch.isfinite(beta), beta, torch.zeros_like(beta))
    return beta.to(log_norm.dtype)


def safe_combine(denoised: torch.Tensor, unsafe_mean: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``E_safe = E_data + beta * (E_data - E_unsafe)``.

    Args:
        denoised: ``[B, ...]`` ``E_data[x0|x_t]``.
        unsafe_mean: ``[B, ...]`` or ``[B, D]`` ``E_unsafe[x0|x_t]`` (reshaped to ``denoised``).
        beta: ``[B]`` per-sample weight.

    Returns:
        ``[B, ...]`` in the dtype of ``denoised`` (the arithmetic runs in ``beta``'s dtype).
    """
    cdt = beta.dtype
    shape = (-1,) + (1,) * (denoised.ndim - 1)
    d = denoised.to(cdt)
    out = d + beta.reshape(shape) * (d - unsafe_mean.to(cdt).reshape(denoised.shape))
    return out.to(denoised.dtype)


def bound_beta(
    denoised: torch.Tensor,
    unsafe_mean: torch.Tensor,
    beta: torch.Tensor,
    max_rms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink ``beta`` so that Eq. 4's shift stays inside a trust region.

    The shift of :func:`safe_combine` is ``delta = beta * (E_data - E_unsafe)``; its
    root-mean-square over the latent is ``rms = beta * rms(E_data - E_unsafe)``.  The returned
    weight is ``beta * min(1, max_rms / rms)``: the same direction, a length of at most
    ``max_rms``.  Because it is a weight, the bounded correction stays affine in the denoised
    estimate (CFG of corrected predictions = corrected CFG result).

    Args:
        denoised: ``[B, ...]`` ``E_data[x0|x_t]`` (the CFG result).
        unsafe_mean: ``[B, D]`` ``E_unsafe[x0|x_t]``.
        beta: ``[B]`` Eq. 4 weight (float32 or float64).
        max_rms: ``[B]`` bound of the shift's RMS in latent units (:func:`shift_bound`).

    Returns:
        ``(beta_bounded, rms)``, both ``[B]`` in ``beta``'s dtype: the weight to use and the RMS of
        the unbounded shift.
    """
    cdt = beta.dtype
    bsz = denoised.shape[0]
    diff = denoised.reshape(bsz, -1).to(cdt) - unsafe_mean.reshape(bsz, -1).to(device=denoised.device, dtype=cdt)
    rms = beta * diff.pow(2).mean(1).sqrt()
    bound = torch.as_tensor(max_rms, dtype=cdt, device=beta.device).reshape(-1).expand(bsz)
    factor = torch.where(rms > bound, bound / rms.clamp_min(torch.finfo(cdt).tiny), torch.ones_like(rms))
    return beta * factor, rms


def shift_bound(alpha: torch.Tensor | float, std: torch.Tensor | float, batch: int, kappa: float = 1.0) -> torch.Tensor:
    """Trust region of the paper-mode correction: ``kappa * s_t / a_t`` per sample (RMS, latent units).

    Not in the paper.  ``s_t / a_t`` is the noise level in the units of ``x0``: the posterior
    uncertainty of ``x0`` given ``x_t`` is at most that much per dimension, so a shift of the
    denoised estimate within it is one that later steps can still absorb, while Eq. 4 with an
    estimated ``E_unsafe`` and a large ``beta`` can ask for shifts many times the data's own scale
    at low noise (measured on exact Gaussian mixtures at SD sizes: off-span energy 10-50x a real
    sample's without the bound, within a few percent of plain with it; README "Choosing the
    defaults").

    Returns:
        ``[B]`` float64 bounds (0 where ``a_t`` is 0).
    """
    a = _per_sample(alpha, batch, torch.float64, torch.device("cpu"))
    s = _per_sample(std, batch, torch.float64, torch.device("cpu"))
    return torch.where(a > 0, kappa * s / a.clamp_min(1e-12), torch.zeros_like(a))


# --------------------------------------------------------------------------------------------
# "reference" mode: the arithmetic of the official implementation (Safe_Denoiser@223415b,
# repellency/repellency_methods_threshold.py, kernel_fast), batched and streamed.
# --------------------------------------------------------------------------------------------

REFERENCE_EPS = 1e-8
"""The ``epsilon`` the official code adds to the kernel sum."""


def channel_normalise(latents: torch.Tensor) -> torch.Tensor:
    """L2-normalise ``[N, C, H, W]`` latents over channels at each pixel (official ``project``)."""
    return latents / torch.linalg.vector_norm(latents, dim=1, keepdim=True)


def _reference_logk(x0: torch.Tensor, y: torch.Tensor, sigma: float, y_sq: Optional[torch.Tensor], chunk: int):
    """Yield ``(chunk_values, log k)`` for ``k_n = exp(-||x0 - y_n|| / (2 sigma^2))``."""
    x_sq = (x0 * x0).sum(1)
    for start in range(0, y.shape[0], chunk):
        yc = y[start:start + chunk].to(device=x0.device, dtype=x0.dtype)
        ysq = (yc * yc).sum(1) if y_sq is None else y_sq[start:start + chunk].to(device=x0.device, dtype=x0.dtype)
        d2 = (x_sq[:, None] + ysq[None, :] - 2.0 * (x0 @ yc.T)).clamp_min(0.0)
        yield yc, -torch.sqrt(d2) / (2.0 * sigma * sigma)


def reference_kernel_mean(
    x0: torch.Tensor,
    y: torch.Tensor,
    sigma: float,
    chunk: int = DEFAULT_CHUNK,
    y_sq: Optional[torch.Tensor] = None,
) -> KernelMean:
    """Official kernel on the denoised estimate: unsquared distance, fixed ``sigma``.

    ``k_n = exp(-||x0_hat - y_n|| / (2 sigma^2))``, ``mean = sum_n k_n y_n / (sum_n k_n + 1e-8)``
    (note: divided by the kernel sum plus epsilon, not a pure softmax).

    Args:
        x0: ``[B, D]`` denoised estimates ``x0_hat``.
        y: ``[N, D]`` channel-normalised negation latents.
        sigma: fixed kernel width (official: 3.15 for SD nudity).

    Returns:
        :class:`KernelMean` whose ``log_norm`` is ``log sum_n k_n`` (so the gate value is
        ``exp(log_norm) + 1e-8``).
    """
    cdt = compute_dtype(x0, y)
    xc = x0.to(cdt)
    bsz, dim = xc.shape
    mean, m, lsum = _streamed_softmax_mean(_reference_logk(xc, y, sigma, y_sq, chunk), bsz, dim, cdt, xc.device)
    log_norm = m + torch.log(lsum)
    ksum = torch.exp(log_norm)
    mean = mean * (ksum / (ksum + REFERENCE_EPS))[:, None]
    return KernelMean(mean=mean, log_norm=log_norm)


@dataclass(frozen=True)
class ReferenceGate:
    """The official gate: correct iff ``sum_n k_n + 1e-8 > threshold - margin``."""

    threshold: float
    margin: float = 1.6

    def open(self, log_norm: torch.Tensor) -> torch.Tensor:
        """``[B]`` boolean: where the correction applies."""
        return torch.exp(log_norm) + REFERENCE_EPS > (self.threshold - self.margin)


def reference_beta_threshold(
    y: torch.Tensor,
    sigma: float,
    noise_alpha: float,
    noise_std: float,
    quantile: float = 0.0,
    seed: int = 42,
    chunk: int = DEFAULT_CHUNK,
    max_queries: Optional[int] = None,
) -> float:
    """Official ``beta_threshold``: the ``quantile`` of ``sum_n k(x_m, y_n) + 1e-8`` over noisy
    copies ``x_m = noise_alpha * y_m + noise_std * eps`` of the negation latents themselves
    (official: DDPM ``add_noise`` at the smallest sampling timestep, seed 42, quantile 0).

    Args:
        y: ``[N, D]`` channel-normalised negation latents.
        sigma: the kernel width used at sampling time.
        noise_alpha, noise_std: VP coefficients of the near-clean noise level.
        quantile: in ``[0, 1]``.
        seed: generator seed for the noise.
        max_queries: use noisy copies of only the first ``max_queries`` latents (the kernel sums
            still run over the whole set); ``None`` uses all of them, as the official code does.

    Returns:
        The threshold as a Python float.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cdt = compute_dtype(y)
    vals = []
    n_queries = y.shape[0] if max_queries is None else min(max_queries, y.shape[0])
    for start in range(0, n_queries, chunk):
        yc = y[start:min(start + chunk, n_queries)].to(cdt)
        noise = torch.randn(yc.shape, generator=gen, dtype=torch.float32).to(device=yc.device, dtype=cdt)
        noisy = noise_alpha * yc + noise_std * noise
        lse = torch.full((yc.shape[0],), -math.inf, dtype=cdt, device=yc.device)
        for _, logk in _reference_logk(noisy, y, sigma, None, chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(logk, 1))
        vals.append(torch.exp(lse) + REFERENCE_EPS)
    return float(torch.quantile(torch.cat(vals).to(torch.float64), quantile))


def reference_correct(denoised: torch.Tensor, unsafe_mean: torch.Tensor, scale: float, gate: torch.Tensor) -> torch.Tensor:
    """Official update ``x0_hat' = x0_hat - scale * E_u`` where the gate is open.

    Args:
        denoised: ``[B, ...]`` ``x0_hat``.
        unsafe_mean: ``[B, D]`` from :func:`reference_kernel_mean`.
        scale: the constant that replaces ``eta * beta`` (official: 0.33).
        gate: ``[B]`` boolean from :meth:`ReferenceGate.open`.
    """
    shape = (-1,) + (1,) * (denoised.ndim - 1)
    delta = scale * unsafe_mean.reshape(denoised.shape).to(denoised.dtype)
    return denoised - gate.reshape(shape).to(denoised.dtype) * delta
