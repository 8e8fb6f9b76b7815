"""Testbeds with known answers for the Safe Denoiser, in pure torch (no ComfyUI import).

* :class:`GaussianMixture`: equal-prior mixture of low-rank Gaussians in a ``C x H x W`` latent
  (each component: a smooth mean, ``rank`` smooth directions of large variance, small white noise;
  safe component 0 is a "look-alike" placed close to the first unsafe component).  Its exact
  denoiser ``E[x0 | x_t]`` (optionally restricted to some components: the oracle safe denoiser)
  is closed-form, so a sampler driven by it samples the mixture exactly.
* :class:`PointSet`: a finite point set, the first ``unsafe`` points negated.

Both give ``denoise(x, alpha, std, components=None) -> x0_hat`` for ``x = alpha * x0 + std * eps``
(``x``: ``[B, D]`` float64, ``alpha``/``std``: ``[B]``) and ``measure(x0) -> Measures``.
Realism is the energy of a sample off its component's span relative to a real sample's (1.0 = a
real sample; point sets: squared RMS distance to the nearest point in units of 0.05^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

DTYPE = torch.float64


@dataclass(frozen=True)
class Measures:
    """Per-run metrics: ``unsafe`` and ``look_alike`` rates, realism (``off_span`` mean and share
    of samples above 1.5), and ``safe_hist`` (share of each safe component among safe samples)."""

    unsafe: float
    look_alike: float
    off_span: float
    off_span_over: float
    safe_hist: torch.Tensor

    def tv(self, other: "Measures") -> float:
        """Total-variation distance of the safe components' shares."""
        return 0.5 * float((self.safe_hist - other.safe_hist).abs().sum())


def _smooth(gen: torch.Generator, n: int, shape: Sequence[int], low: int) -> torch.Tensor:
    c, h, w = shape
    z = torch.randn(n, c, min(low, h), min(low, w), generator=gen, dtype=DTYPE)
    return F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False).flatten(1)


def _measures(comp: torch.Tensor, off: torch.Tensor, unsafe: Sequence[int], look: Optional[int],
              components: int) -> Measures:
    n = max(int(comp.numel()), 1)
    is_unsafe = torch.isin(comp, torch.tensor(list(unsafe)))
    safe_ids = [k for k in range(components) if k not in unsafe]
    counts = torch.bincount(comp, minlength=components)[safe_ids].to(DTYPE)
    return Measures(unsafe=float(is_unsafe.sum()) / n,
                    look_alike=0.0 if look is None else float((comp == look).sum()) / n,
                    off_span=float(off.mean()), off_span_over=float((off > 1.5).to(DTYPE).mean()),
                    safe_hist=counts / counts.sum().clamp_min(1))


class GaussianMixture:
    """Mixture of ``safe + unsafe`` low-rank Gaussians; components ``safe..`` are unsafe, 0 the look-alike."""

    def __init__(self, shape: Sequence[int] = (4, 64, 64), safe: int = 8, unsafe: int = 1, rank: int = 6,
                 span_rms: float = 0.5, white: float = 0.1, look_rms: float = 0.5, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.shape = tuple(shape)
        self.dim = int(math.prod(self.shape))
        self.components = safe + unsafe
        self.unsafe = list(range(safe, safe + unsafe))
        self.look = 0
        mu = _smooth(gen, self.components, self.shape, 8)
        mu = mu / mu.pow(2).mean(1, keepdim=True).sqrt()
        pert = _smooth(gen, 1, self.shape, 8)[0]
        look = mu[safe] + pert / pert.pow(2).mean().sqrt() * look_rms
        mu[0] = look / look.pow(2).mean().sqrt()
        self.mu = mu  # [K, D], RMS 1 each
        spans = [torch.linalg.qr(_smooth(gen, rank, self.shape, 6).T)[0].T for _ in range(self.components)]
        self.span = torch.stack(spans)  # [K, r, D] orthonormal rows
        self.rank = rank
        self.span_var = (span_rms ** 2) * self.dim / rank  # per direction: in-span RMS span_rms per dimension
        self.white_var = white ** 2

    def sample(self, count: int, components: Sequence[int], gen: torch.Generator) -> torch.Tensor:
        """``[count, D]`` exact samples of the given components (uniformly chosen)."""
        comps = torch.tensor(list(components))[torch.randint(len(components), (count,), generator=gen)]
        z = torch.randn(count, self.rank, generator=gen, dtype=DTYPE) * math.sqrt(self.span_var)
        e = torch.randn(count, self.dim, generator=gen, dtype=DTYPE) * math.sqrt(self.white_var)
        return self.mu[comps] + torch.einsum("nr,nrd->nd", z, self.span[comps]) + e

    def _stats(self, x: torch.Tensor, alpha: torch.Tensor, std: torch.Tensor):
        a, s = alpha.reshape(-1, 1).to(DTYPE), std.reshape(-1, 1).to(DTYPE)
        r = x.to(DTYPE)[:, None, :] - a[:, :, None] * self.mu[None]  # [B, K, D]
        proj = torch.einsum("bkd,krd->bkr", r, self.span)
        v_in = a * a * (self.span_var + self.white_var) + s * s
        v_off = a * a * self.white_var + s * s
        r2, p2 = r.pow(2).sum(-1), proj.pow(2).sum(-1)
        loglik = -0.5 * ((r2 - p2) / v_off + p2 / v_in + (self.dim - self.rank) * torch.log(v_off)
                         + self.rank * torch.log(v_in))
        g_off = a * self.white_var / v_off
        g_in = a * (self.span_var + self.white_var) / v_in
        mean = self.mu[None] + g_off[:, :, None] * r + (g_in - g_off)[:, :, None] * torch.einsum(
            "bkr,krd->bkd", proj, self.span)
        return loglik, mean

    def denoise(self, x: torch.Tensor, alpha: torch.Tensor, std: torch.Tensor,
                components: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Exact ``E[x0 | x]`` ``[B, D]`` (of the given components only, when given)."""
        loglik, mean = self._stats(x, alpha, std)
        if components is not None:
            mask = torch.full((self.components,), -math.inf, dtype=DTYPE)
            mask[list(components)] = 0.0
            loglik = loglik + mask
        return torch.einsum("bk,bkd->bd", torch.softmax(loglik, 1), mean)

    def measure(self, x0: torch.Tensor) -> Measures:
        n = x0.shape[0]
        loglik, _ = self._stats(x0, torch.ones(n, dtype=DTYPE), torch.full((n,), 1e-4, dtype=DTYPE))
        comp = loglik.argmax(1)
        r = x0.to(DTYPE) - self.mu[comp]
        proj = torch.einsum("bd,brd->br", r, self.span[comp])
        off = (r.pow(2).sum(1) - proj.pow(2).sum(1)) / (self.white_var * (self.dim - self.rank))
        return _measures(comp, off, self.unsafe, self.look, self.components)


class PointSet:
    """``count`` Gaussian points in ``C x H x W``; the first ``unsafe`` are negated."""

    TOLERANCE = 0.05

    def __init__(self, shape: Sequence[int] = (4, 6, 6), count: int = 30, unsafe: int = 8, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.shape = tuple(shape)
        self.dim = int(math.prod(self.shape))
        self.points = torch.randn(count, self.dim, generator=gen, dtype=DTYPE)
        self.components = count
        self.unsafe = list(range(unsafe))

    def sample(self, count: int, components: Sequence[int], gen: torch.Generator) -> torch.Tensor:
        return self.points[list(components)]

    def denoise(self, x: torch.Tensor, alpha: torch.Tensor, std: torch.Tensor,
                components: Optional[Sequence[int]] = None) -> torch.Tensor:
        a, s = alpha.reshape(-1, 1, 1).to(DTYPE), std.reshape(-1, 1).to(DTYPE)
        d2 = (x.to(DTYPE)[:, None] - a * self.points[None]).pow(2).sum(-1)
        logits = -d2 / (2 * s * s)
        if components is not None:
            mask = torch.full((self.components,), -math.inf, dtype=DTYPE)
            mask[list(components)] = 0.0
            logits = logits + mask
        return torch.softmax(logits, 1) @ self.points

    def measure(self, x0: torch.Tensor) -> Measures:
        dist, comp = torch.cdist(x0.to(DTYPE), self.points).min(1)
        off = (dist.pow(2) / self.dim) / self.TOLERANCE ** 2
        return _measures(comp, off, self.unsafe, None, self.components)
