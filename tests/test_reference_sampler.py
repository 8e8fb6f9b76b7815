"""Safe Denoiser Reference Sampler against an independent re-implementation of the official
per-step procedure, written here in plain torch in the DDPM (VP) form the official pipeline uses
(diffusers' DDPMScheduler arithmetic), from this description (../shared/reference, section 2):

  at each of 50 DDPM steps (leading spacing: t = 981, 961, ..., 1): eps from the model at x_t;
  x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar); if 780 <= t <= 1000: kernel on x0_hat with the
  unsquared distance to the channel-normalised negation latents, k_n = exp(-||x0_hat - y_n|| /
  (2 sigma^2)), E_u = sum k_n y_n / (sum k_n + 1e-8), gate open iff sum k_n + 1e-8 > threshold -
  margin; where open: x0' = x0_hat - scale E_u, x_t <- sqrt(abar) x0' + sqrt(1 - abar) z (fresh
  z); then the DDPM step (fixed_small variance) from x_t with the OLD eps.

Same model (the exact point-set denoiser), same noise stream (the sampler's documented one): the
trajectories must agree to 1e-5 at every step, with both gate states exercised.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_safe_denoiser import COUNT, UNSAFE, tm

STEPS, BATCH, SEED = 50, 6, 7
SCALE, KSIGMA = 0.33, 3.15


def official(denoise, x_ve0, sigmas, y, threshold, margin, seed, sigma_lo):
    """The official procedure, VP form, float64 arithmetic; returns the VE states before each step
    and the final one, plus how many (step, sample) pairs had the gate open / shut in the window."""
    gen = torch.Generator().manual_seed(seed)
    yf = y.reshape(y.shape[0], -1).double()
    x_vp = x_ve0.double() / math.sqrt(1 + float(sigmas[0]) ** 2)
    states, opened, shut = [], 0, 0
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        abar, abar_prev = 1 / (1 + s * s), 1 / (1 + s_next * s_next)
        x_ve = x_vp / math.sqrt(abar)
        states.append(x_ve)
        x0 = denoise(x_ve.float(), s).double()
        eps = (x_vp - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        latents = x_vp
        if s >= sigma_lo * (1 - 1e-6):
            dist = torch.cdist(x0.reshape(x0.shape[0], -1), yf)
            k = torch.exp(-dist / (2 * KSIGMA ** 2))
            ksum = k.sum(1) + 1e-8
            unsafe_mean = (k @ yf) / ksum[:, None]
            gate = ksum > threshold - margin
            opened, shut = opened + int(gate.sum()), shut + int((~gate).sum())
            if gate.any():
                z = torch.randn(x_vp.shape, generator=gen, dtype=torch.float32).double()
                corrected = x0 - SCALE * unsafe_mean.reshape(x0.shape)
                renoised = math.sqrt(abar) * corrected + math.sqrt(1 - abar) * z
                latents = torch.where(gate.reshape(-1, 1, 1, 1), renoised, x_vp)
        pred_x0 = (latents - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        alpha_t = abar / abar_prev
        beta_t = 1 - alpha_t
        mean = (math.sqrt(abar_prev) * beta_t / (1 - abar)) * pred_x0 \
            + (math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar)) * latents
        if s_next > 0:
            variance = (1 - abar_prev) / (1 - abar) * beta_t
            mean = mean + math.sqrt(variance) * torch.randn(x_vp.shape, generator=gen, dtype=torch.float32).double()
        x_vp = mean
    states.append(x_vp / math.sqrt(1 / (1 + float(sigmas[-1]) ** 2)))
    return states, opened, shut


@pytest.mark.parametrize("margin", [1.6, 0.5])  # official: open everywhere on this toy; 0.5: mixed
def test_reference_sampler_reproduces_the_official_procedure(comfy, margin):
    import comfy.sample as comfy_sample

    rs = comfy.node_module("reference_sampler")
    safe = comfy.node_module("safe_denoiser")
    negation_set = comfy.node_module("negation_set")
    points = tm.make_point_set(seed=0, count=COUNT)
    model = tm.patch_exact_denoiser(tm.build_model("sd15", 0), points)
    ms, lf = tm.model_object(model, "model_sampling"), tm.model_object(model, "latent_format")
    nset = negation_set.NegationSet(lf.process_out(points.points[:UNSAFE].float().clone()), {"name": "toy U"})

    # the official schedule: DDPM timesteps 981, 961, ..., 1 (what ddim_uniform with 50 steps gives)
    sigmas = torch.cat([ms.sigmas[torch.arange(981, 0, -20)], torch.zeros(1)]).float()
    assert len(sigmas) == STEPS + 1
    (sampler,) = rs.SafeDenoiserReferenceSampler().get_sampler(nset, SCALE, KSIGMA, margin)
    latent = torch.zeros(BATCH, 4, 8, 8)
    noise = comfy_sample.prepare_noise(latent, SEED)
    states = []
    out = comfy_sample.sample_custom(model, noise, 1.0, sampler, sigmas, tm.build_conditioning(1, 4, "sd15"),
                                     tm.build_conditioning(1, 4, "sd15", zero=True), latent,
                                     callback=lambda step, x0, x, total: states.append(x.clone()),
                                     disable_pbar=True, seed=SEED)
    states.append(lf.process_in(out.clone()))

    prep = nset.prepared(lf, 8, 8, torch.device("cpu"), torch.float32, "reference")
    threshold = safe.reference_threshold(nset, ms, lf, 8, 8, prep.y, KSIGMA)
    y = points.points[:UNSAFE] / points.points[:UNSAFE].norm(dim=1, keepdim=True)
    sigma_lo = float(ms.sigma(torch.tensor(780.0)))
    assert sum(float(s) >= sigma_lo for s in sigmas[:-1]) == 11, "11 of the 50 steps are in the window"

    def denoise(x, sigma):
        return tm.posterior_mean(x, torch.full((x.shape[0],), sigma), points.points, ms).float()

    want, opened, shut = official(denoise, states[0], sigmas, y, threshold, margin, SEED, sigma_lo)
    print(f"[{comfy.version}] margin {margin}: gate open {opened}, shut {shut} (sample-steps in the window)")
    assert opened > 0 and (shut > 0 or margin == 1.6), (opened, shut)
    assert len(states) == len(want) == STEPS + 1
    for i, (got, ref) in enumerate(zip(states, want)):
        err = float((got.double() - ref).abs().max()) / max(1.0, float(ref.abs().max()))
        assert err <= 1e-5, f"step {i}: relative error {err:.2e}"


def test_reference_sampler_refuses_flow_models(comfy):
    import comfy.sample as comfy_sample

    rs = comfy.node_module("reference_sampler")
    negation_set = comfy.node_module("negation_set")
    model = tm.build_model("flow", 0)
    nset = negation_set.NegationSet(torch.randn(3, 4, 8, 8), {"name": "toy"})
    (sampler,) = rs.SafeDenoiserReferenceSampler().get_sampler(nset, SCALE, KSIGMA, 1.6)
    latent = torch.zeros(1, 4, 8, 8)
    with pytest.raises(Exception, match="discrete-time DDPM models"):
        comfy_sample.sample_custom(model, torch.randn_like(latent), 1.0, sampler, torch.tensor([1.0, 0.5, 0.0]),
                                   tm.build_conditioning(1, 4, "flow"), tm.build_conditioning(1, 4, "flow", zero=True),
                                   latent, disable_pbar=True, seed=0)
