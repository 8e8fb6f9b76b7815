"""Exactness and robustness of kernels/guidance.py against closed forms (pure torch; CPU, and CUDA
where a GPU is present: the ``device`` parameter)."""

from __future__ import annotations

import math

import pytest
import torch

from harness.locate import pack_file

G = pack_file("kernels/guidance.py", "sdn_kernels_guidance")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

PARAMETERISATIONS = {
    "eps_ve": lambda sigma: (1.0, sigma),  # EPS / V-prediction in ComfyUI's k-diffusion space
    "flow": lambda sigma: (1.0 - sigma, sigma),  # CONST (rectified flow)
}


def naive_posterior(x, pts, alpha, std):
    """Direct float64 posterior mean of an empirical distribution: the closed form."""
    d2 = ((x[:, None, :] - alpha[:, None, None] * pts[None]) ** 2).sum(-1)
    logk = -d2 / (2 * std[:, None] ** 2)
    w = torch.softmax(logk, 1)
    return w @ pts, torch.logsumexp(logk, 1)


def point_problem(seed, dim=48, n_points=30, n_unsafe=9, batch=6):
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n_points, dim, generator=g, dtype=torch.float64)
    unsafe, safe = pts[:n_unsafe], pts[n_unsafe:]
    return g, pts, unsafe, safe, batch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param", sorted(PARAMETERISATIONS))
@pytest.mark.parametrize("sigma", [0.3, 0.9, 3.0])
def test_eq4_with_exact_beta_gives_safe_posterior_mean(param, sigma, device):
    """Eq. 4 with beta* = sum_U k / sum_{S\\U} k equals the posterior mean over S\\U exactly.

    The identity is exact, its float64 evaluation loses about log10(1 + beta*) digits (it
    recovers E_safe from E_data - E_unsafe), so samples are drawn where beta* <= 1e6: all noise
    levels for points of S\\U, and for points of U only where the noise hides them.
    """
    g, pts, unsafe, safe, _ = point_problem(1)
    batch = 12
    a, s = PARAMETERISATIONS[param](sigma)
    std = torch.full((batch,), s, dtype=torch.float64) * torch.linspace(0.8, 1.2, batch, dtype=torch.float64)
    alpha = torch.full((batch,), a, dtype=torch.float64) if param == "eps_ve" else 1.0 - std
    x0 = pts[torch.randint(0, pts.shape[0], (batch,), generator=g)]
    x = alpha[:, None] * x0 + std[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)

    on = lambda t: t.to(device) if torch.is_tensor(t) else t  # noqa: E731  (closed forms stay on the CPU)
    data = G.kernel_posterior_mean(on(x), on(pts), on(alpha), on(std))
    neg = G.kernel_posterior_mean(on(x), on(unsafe), on(alpha), on(std), chunk=4)
    pos = G.kernel_posterior_mean(on(x), on(safe), on(alpha), on(std))
    beta_star = torch.exp(neg.log_norm - pos.log_norm)
    combined = G.safe_combine(data.mean, neg.mean, beta_star)
    assert combined.device.type == device
    combined, beta_star = combined.cpu(), beta_star.cpu()
    neg = G.KernelMean(mean=neg.mean.cpu(), log_norm=neg.log_norm.cpu())

    expected, _ = naive_posterior(x, safe, alpha, std)
    keep = beta_star <= 1e6
    assert keep.sum() >= batch // 2
    rel = (combined - expected).norm(dim=1) / expected.norm(dim=1)
    assert rel[keep].max().item() <= 1e-6
    # and the pieces themselves match their closed forms
    exp_u, exp_lse = naive_posterior(x, unsafe, alpha, std)
    assert torch.allclose(neg.mean, exp_u, rtol=1e-10, atol=1e-10)
    assert torch.allclose(neg.log_norm, exp_lse, rtol=1e-10, atol=1e-8)


def test_chunked_equals_single_pass_and_no_bxnxd():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=g, dtype=torch.float64) * 3
    y = torch.randn(1000, 64, generator=g, dtype=torch.float64)
    one = G.kernel_posterior_mean(x, y, 1.0, 2.0, chunk=10_000)
    many = G.kernel_posterior_mean(x, y, 1.0, 2.0, chunk=33)
    assert torch.allclose(one.mean, many.mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(one.log_norm, many.log_norm, rtol=1e-12, atol=1e-10)


def test_bandwidth_scales_the_kernel_std():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    y = torch.randn(20, 16, generator=g, dtype=torch.float64)
    wide = G.kernel_posterior_mean(x, y, 1.0, 0.5, bandwidth=3.0)
    same = G.kernel_posterior_mean(x, y, 1.0, 1.5)
    assert torch.allclose(wide.mean, same.mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_beta_estimate_closed_form(device):
    """beta = P / (1 - P), P = min(p_max, eta * q_t / g_t), with both densities normalised."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 12, generator=g, dtype=torch.float64)
    y = torch.randn(7, 12, generator=g, dtype=torch.float64) * 0.5
    m = torch.randn(12, generator=g, dtype=torch.float64) * 0.1
    v = torch.rand(12, generator=g, dtype=torch.float64) + 0.2
    a, s, h = 0.7, torch.tensor([0.9, 1.0, 1.1, 1.3], dtype=torch.float64), 1.5
    km = G.kernel_posterior_mean(x.to(device), y.to(device), a, s.to(device), bandwidth=h)
    km = G.KernelMean(mean=km.mean.cpu(), log_norm=km.log_norm.cpu())
    normal = torch.distributions.Normal
    log_q = torch.logsumexp(normal(a * y[None], (h * s)[:, None, None]).log_prob(x[:, None]).sum(-1), 1) - math.log(7)
    log_g = normal(a * m, torch.sqrt(a * a * v + (h * s)[:, None] ** 2)).log_prob(x).sum(-1)
    for eta in (0.1, 0.8):
        beta = G.beta_estimate(km.log_norm.to(device), x.to(device), a, s.to(device), 7, m.to(device), v.to(device),
                               bandwidth=h, eta=eta, p_max=0.9).cpu()
        p = torch.clamp(eta * torch.exp(log_q - log_g), max=0.9)
        assert torch.allclose(beta, p / (1 - p), rtol=1e-10)
    assert torch.allclose(beta, torch.full((4,), 9.0, dtype=torch.float64))  # eta = 0.8: every P at its cap
    assert torch.all(G.beta_estimate(km.log_norm, x, a, s, 7, m, v, bandwidth=h, eta=0.0) == 0)


def test_beta_estimate_level_moves_the_odds():
    """``level`` L: P = min(p_max, eta * R / e^L) per sample; L = inf gives beta 0 (the test is off there)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 12, generator=g, dtype=torch.float64)
    y = torch.randn(6, 12, generator=g, dtype=torch.float64) * 0.5
    m, v = y.mean(0), y.var(0) + 0.1
    a, s, h = 0.8, torch.tensor([0.7, 1.0, 1.4], dtype=torch.float64), 3.0
    km = G.kernel_posterior_mean(x, y, a, s, bandwidth=h)
    log_r = G.log_density_ratio(km.log_norm, x, a, s, 6, m, v, bandwidth=h)
    level = torch.tensor([2.0, -1.5, math.inf], dtype=torch.float64)
    beta = G.beta_estimate(km.log_norm, x, a, s, 6, m, v, bandwidth=h, eta=0.3, p_max=0.999, level=level)
    p = torch.clamp(0.3 * torch.exp(log_r - level), max=0.999)
    assert torch.allclose(beta, p / (1 - p), rtol=1e-10)
    assert beta[2] == 0
    scalar = G.beta_estimate(km.log_norm, x, a, s, 6, m, v, bandwidth=h, eta=0.3, p_max=0.999, level=2.0)
    shifted = G.beta_estimate(km.log_norm, x, a, s, 6, m, v, bandwidth=h, eta=0.3 * math.exp(-2.0), p_max=0.999)
    assert torch.allclose(scalar, shifted, rtol=1e-10)


@pytest.mark.parametrize("dim", [16, 1024])
def test_beta_estimate_ranks_samples_heading_into_the_set_first(dim):
    """Noisy copies of negation points score higher than noisy copies of the other points (all of
    them at low noise, on average where the noise hides the points), in any dimension; at low noise
    beta reaches its cap on the set and ~0 off it."""
    g, pts, unsafe, safe, _ = point_problem(6, dim=dim)
    m, v = pts.mean(0), pts.var(0)
    for sigma in (0.05, 0.5, 2.0, 8.0):
        clean = torch.cat([unsafe, safe[:len(unsafe)]])
        x = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
        km = G.kernel_posterior_mean(x, unsafe, 1.0, sigma)
        beta = G.beta_estimate(km.log_norm, x, 1.0, sigma, len(unsafe), m, v, eta=len(unsafe) / len(pts))
        on, off = beta[:len(unsafe)], beta[len(unsafe):]
        assert on.log().mean() > off.log().mean(), (sigma, beta)
        if sigma <= 0.5:
            assert on.min() > off.max(), (sigma, beta)
        if sigma == 0.05:
            assert torch.allclose(on, torch.full_like(on, 99.0)) and off.max() < 1e-6


def official_kernel_fast(x0, ref, sigma, eps=1e-8):
    """The official construction (Safe_Denoiser@223415b kernel_fast): cdist + repeat to D+1."""
    n, d = x0.shape
    m = ref.shape[0]
    kernel = -(torch.cdist(x0[None], ref[None])[0]).reshape(n, m, 1).repeat(1, 1, d + 1) / (2.0 * sigma ** 2)
    ones = torch.ones(m, 1, dtype=ref.dtype)
    kernel = (kernel.exp() * torch.cat((ref, ones), 1).reshape(1, -1, d + 1)).sum(1)
    denominator = kernel[:, -1:] + eps
    return kernel[:, :-1] / denominator, denominator[:, 0]


def test_reference_mode_matches_official_construction():
    g = torch.Generator().manual_seed(7)
    lat = torch.randn(40, 4, 6, 6, generator=g, dtype=torch.float64)
    ref = G.channel_normalise(lat).reshape(40, -1)
    assert torch.allclose(torch.linalg.vector_norm(G.channel_normalise(lat), dim=1), torch.ones(40, 6, 6, dtype=torch.float64))
    x0 = torch.randn(3, 144, generator=g, dtype=torch.float64) * 0.8
    for sigma in (1.0, 3.15):
        km = G.reference_kernel_mean(x0, ref, sigma, chunk=7)
        exp_mean, exp_den = official_kernel_fast(x0, ref, sigma)
        assert torch.allclose(km.mean, exp_mean, rtol=1e-6, atol=1e-9)
        assert torch.allclose(torch.exp(km.log_norm) + G.REFERENCE_EPS, exp_den, rtol=1e-6)
        out = G.reference_correct(x0, km.mean, 0.33, torch.tensor([True, False, True]))
        assert torch.allclose(out[0], x0[0] - 0.33 * exp_mean[0]) and torch.equal(out[1], x0[1])


def test_reference_threshold_matches_direct_computation():
    g = torch.Generator().manual_seed(8)
    ref = G.channel_normalise(torch.randn(25, 4, 4, 4, generator=g)).reshape(25, -1).double()
    thr = G.reference_beta_threshold(ref, 3.15, 0.999, 0.04, quantile=0.0, seed=42, chunk=6)
    gen = torch.Generator().manual_seed(42)
    noisy = torch.cat([0.999 * c + 0.04 * torch.randn(c.shape, generator=gen, dtype=torch.float32).double()
                       for c in ref.split(6)])
    direct = torch.exp(-torch.cdist(noisy, ref) / (2 * 3.15 ** 2)).sum(1) + 1e-8
    assert thr == pytest.approx(direct.min().item(), rel=1e-9)
    # calibrating on the first 12 noisy copies still sums the kernel over the whole set
    part = G.reference_beta_threshold(ref, 3.15, 0.999, 0.04, quantile=0.0, seed=42, chunk=6, max_queries=12)
    assert part == pytest.approx(direct[:12].min().item(), rel=1e-9)
    gate = G.ReferenceGate(thr, 1.6)
    assert gate.open(torch.log(torch.tensor([thr - 1.5, thr - 1.7], dtype=torch.float64))).tolist() == [True, False]


def test_huge_distances_stay_finite():
    g = torch.Generator().manual_seed(9)
    y = torch.randn(50, 256, generator=g)
    x = torch.randn(3, 256, generator=g) * 1e4
    km = G.kernel_posterior_mean(x, y, 1.0, torch.tensor([1e-3, 1.0, 1e3]))
    assert torch.isfinite(km.mean).all() and torch.isfinite(km.log_norm).all()
    beta = G.beta_estimate(km.log_norm, x, 1.0, torch.tensor([1e-3, 1.0, 1e3]), 50, y.mean(0), y.var(0))
    assert torch.isfinite(beta).all() and (beta >= 0).all()
    out = G.safe_combine(torch.zeros(3, 256), km.mean, beta)
    assert torch.isfinite(out).all()
    ref = G.reference_kernel_mean(x, G.channel_normalise(y.reshape(50, 4, 8, 8)).reshape(50, -1), 3.15)
    assert torch.isfinite(ref.mean).all() and torch.all(ref.mean == 0)  # kernel sum underflows -> no correction


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype, device):
    g = torch.Generator().manual_seed(10)
    y = torch.randn(300, 64, generator=g).to(device)
    x = (torch.randn(4, 64, generator=g) * 2).to(device)
    exact = G.kernel_posterior_mean(x.double(), y.double(), 1.0, 2.0)
    half = G.kernel_posterior_mean(x.to(dtype), y.to(dtype), 1.0, 2.0, chunk=64)
    assert half.mean.dtype == torch.float32
    assert torch.isfinite(half.mean).all()
    # errors come only from rounding the inputs to half precision
    rounded = G.kernel_posterior_mean(x.to(dtype).double(), y.to(dtype).double(), 1.0, 2.0)
    assert torch.allclose(half.mean.double(), rounded.mean, rtol=1e-4, atol=1e-4)
    assert (half.mean.double() - exact.mean).abs().max() < 0.1
    out = G.safe_combine(x.to(dtype), half.mean, torch.ones(4, device=device))
    assert out.dtype == dtype and out.device.type == device and torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_hundred_thousand_latents_chunked(device):
    g = torch.Generator().manual_seed(11)
    n, d = 100_000, 64
    y = torch.randn(n, d, generator=g).to(device)
    x = y[:4] * 1.0 + 0.01 * torch.randn(4, d, generator=g).to(device)
    km = G.kernel_posterior_mean(x, y, 1.0, 0.01, chunk=8192)
    assert torch.isfinite(km.mean).all() and torch.isfinite(km.log_norm).all()
    # at tiny noise the posterior mean snaps to the nearest latent
    assert torch.allclose(km.mean, y[:4], atol=1e-3)
    sub = G.kernel_posterior_mean(x, y, 1.0, 50.0, chunk=8192)
    assert torch.allclose(sub.mean, y.mean(0, keepdim=True).expand(4, d), atol=0.05)
    assert km.mean.device.type == device
    assert math.isfinite(float(sub.log_norm[0]))


def test_bound_beta_keeps_the_direction_and_caps_the_length():
    """bound_beta: beta * min(1, max_rms / rms(beta * (d - E_u))), closed form."""
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    eu = torch.randn(3, 256, generator=gen, dtype=torch.float64)
    beta = torch.tensor([0.0, 0.5, 50.0], dtype=torch.float64)
    bound = torch.tensor([1.0, 10.0, 0.25], dtype=torch.float64)
    bounded, rms = G.bound_beta(d, eu, beta, bound)
    diff_rms = (d.reshape(3, -1) - eu).pow(2).mean(1).sqrt()
    assert torch.allclose(rms, beta * diff_rms)
    assert bounded[0] == 0 and bounded[1] == beta[1]  # inside the region: unchanged
    assert torch.isclose(bounded[2], 0.25 / diff_rms[2])  # outside: shift RMS equals the bound
    shift = G.safe_combine(d, eu, bounded) - d
    assert torch.isclose(shift[2].pow(2).mean().sqrt(), torch.tensor(0.25, dtype=torch.float64))
    assert torch.allclose(G.shift_bound(torch.tensor([1.0, 0.5]), torch.tensor([2.0, 0.5]), 2, 0.5),
                          torch.tensor([1.0, 0.5], dtype=torch.float64))
