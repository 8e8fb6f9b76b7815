"""The Safe Denoiser in real ComfyUI samplers, on a toy whose answer is known.

The tiny model's network is replaced (test-only unet wrapper) by the exact posterior mean of a
finite point set S (20 points in a 4x8x8 latent), so ComfyUI's samplers sample S exactly: plain
sampling lands on the negated subset U (the first 5 points) about |U|/|S| = 25% of the time. The
negation set holds exactly U, saved as a precomputed set and loaded with Load Negation Set.

The toy's data set is memorised (the negation set holds the very points the model produces), so
the tests use the exact Eq. 6 kernel, bandwidth 1/3 (the node's default 1.0 is 3x wider, a smoothed
density for learned models that produce unsafe images not in the set; tests/test_demo.py measures
the defaults on such a model): EXACT = bandwidth 1/3, strength 2 (eta 0.4), STRONG = strength 5.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from safetensors.torch import save_file

from harness.errors import ComfyPromptError
from harness.prompts import exact_denoiser_sampling

COUNT, UNSAFE, BATCH = 20, 5, 160
DEFAULTS = {"mode": "paper", "strength": 1.0, "bandwidth": 1.0, "start_percent": 0.0, "end_percent": 1.0,
            "beta_threshold": 0.0}
EXACT = dict(DEFAULTS, bandwidth=1.0 / 3.0, strength=2.0)
STRONG = dict(EXACT, strength=5.0)
FAMILIES = ("sd15", "sd15_v", "sdxl", "flow")


class _TinyModels:
    """``harness.tiny_models``, imported on first use (it needs ComfyUI on sys.path: the ``comfy``
    fixture puts it there)."""

    def __getattr__(self, name):
        from harness import tiny_models

        return getattr(tiny_models, name)


tm = _TinyModels()


@pytest.fixture(scope="module")
def toy_sets(comfy, tmp_path_factory):
    """``toy_<family>.safetensors``: the raw (pre-process_in) latents of U for each family."""
    root = tmp_path_factory.mktemp("negation_sets_toy")
    unsafe = tm.make_point_set(seed=0, count=COUNT).points[:UNSAFE].float()
    for family in FAMILIES:
        latent_format = tm.model_object(tm.build_model(family, 0), "latent_format")
        raw = latent_format.process_out(unsafe.clone())
        save_file({"latents": raw.contiguous()}, str(root / f"toy_{family}.safetensors"),
                  metadata={"latent_channels": "4", "source": "test point set"})
    sixteen = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    save_file({"latents": sixteen}, str(root / "toy_16ch.safetensors"))
    comfy.add_model_folder("negation_sets", root)
    return root


def toy_prompt(family="sd15", sampler="euler", scheduler="normal", cfg=1.0, guidance=None, steps=20,
               set_name=None):
    """The exact-denoiser prompt; with ``guidance`` the KSampler becomes the Safe Denoiser KSampler."""
    b, n = exact_denoiser_sampling(count=COUNT, unsafe_count=UNSAFE, batch=BATCH, steps=steps, sampler=sampler,
                                   scheduler=scheduler, family=family)
    prompt = b.build()
    node = prompt[n["sampler"].id]
    node["inputs"]["cfg"] = cfg
    if guidance is not None:
        loader = b.add("SDN_LoadNegationSet", set_name=set_name or f"toy_{family}.safetensors", resolution=512,
                       max_images=0)
        prompt = b.build()
        node = prompt[n["sampler"].id]
        node["inputs"]["cfg"] = cfg
        node["class_type"] = "SDN_SafeDenoiserKSampler"
        node["inputs"].update(guidance, negation_set=loader.out(0))
    return prompt, n


def run_stats(comfy, prompt, n):
    out = comfy.run_prompt(prompt)
    return out[n["stats"].id]["stats"][0]


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim", "uni_pc"])
def test_safe_denoiser_avoids_the_negation_set(comfy, toy_sets, sampler, cfg):
    plain = run_stats(comfy, *toy_prompt(sampler=sampler, cfg=cfg))
    default = run_stats(comfy, *toy_prompt(sampler=sampler, cfg=cfg, guidance=EXACT))
    strong = run_stats(comfy, *toy_prompt(sampler=sampler, cfg=cfg, guidance=STRONG))
    print(f"[{comfy.version}] {sampler} cfg {cfg}: on U plain {plain['on_u']:.3f} exact {default['on_u']:.3f} "
          f"strong {strong['on_u']:.3f}; near a point {min(plain['near_any'], default['near_any'], strong['near_any']):.3f}")
    assert 0.15 <= plain["on_u"] <= 0.35, plain["on_u"]
    assert default["on_u"] <= plain["on_u"] / 3, (plain["on_u"], default["on_u"])
    assert strong["on_u"] <= plain["on_u"] / 10, (plain["on_u"], strong["on_u"])
    for stats in (plain, default, strong):
        assert stats["near_any"] >= 0.95, stats["near_any"]


@pytest.mark.parametrize("family", ["sd15_v", "sdxl", "flow"])
def test_every_parameterisation_and_latent_format(comfy, toy_sets, family):
    """V-prediction, SDXL's latent scale and a flow (CONST) model: x = (1 - sigma) x0 + sigma eps."""
    plain = run_stats(comfy, *toy_prompt(family=family))
    safe = run_stats(comfy, *toy_prompt(family=family, guidance=EXACT))
    assert plain["on_u"] >= 0.15
    assert safe["on_u"] <= plain["on_u"] / 3, (family, plain["on_u"], safe["on_u"])
    assert safe["near_any"] >= 0.95


def patched_prompt(comfy, sampler_node: str, sampler="euler", cfg=1.0, extra=None):
    """Safe Denoiser (model patch) in front of KSamplerAdvanced / SamplerCustom(Advanced)."""
    b, n = exact_denoiser_sampling(count=COUNT, unsafe_count=UNSAFE, batch=BATCH, steps=20, sampler=sampler)
    loader = b.add("SDN_LoadNegationSet", set_name="toy_sd15.safetensors", resolution=512, max_images=0)
    model = b.add("SDN_SafeDenoiserPatch", model=n["exact"], negation_set=loader.out(0), **EXACT)
    if extra is not None:
        model = extra(b, model)
    prompt = b.build()
    common = {"positive": n["positive"].out(0), "negative": n["negative"].out(0), "latent_image": n["latent"].out(0)}
    if sampler_node == "KSamplerAdvanced":
        node = {"class_type": "KSamplerAdvanced", "inputs": dict(common, model=model.out(0), add_noise="enable",
                noise_seed=0, steps=20, cfg=cfg, sampler_name=sampler, scheduler="normal", start_at_step=0,
                end_at_step=10000, return_with_leftover_noise="disable")}
    elif sampler_node == "KSampler":
        node = {"class_type": "KSampler", "inputs": dict(common, model=model.out(0), seed=0, steps=20, cfg=cfg,
                sampler_name=sampler, scheduler="normal", denoise=1.0)}
    else:
        prompt["select"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}
        prompt["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": model.out(0), "scheduler": "normal",
                                                                       "steps": 20, "denoise": 1.0}}
        if sampler_node == "SamplerCustom":
            node = {"class_type": "SamplerCustom", "inputs": dict(common, model=model.out(0), add_noise=True,
                    noise_seed=0, cfg=cfg, sampler=["select", 0], sigmas=["sigmas", 0])}
        else:
            prompt["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}}
            prompt["guider"] = {"class_type": "CFGGuider", "inputs": {"model": model.out(0), "cfg": cfg,
                                "positive": common["positive"], "negative": common["negative"]}}
            node = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["guider", 0],
                    "sampler": ["select", 0], "sigmas": ["sigmas", 0], "latent_image": common["latent_image"]}}
    prompt[n["sampler"].id] = node
    return prompt, n


@pytest.mark.parametrize("sampler_node", ["KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"])
def test_model_patch_works_with_every_sampler_node(comfy, toy_sets, sampler_node):
    if sampler_node not in comfy.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip(f"{sampler_node} does not exist in this ComfyUI ({comfy.version})")
    plain = run_stats(comfy, *toy_prompt())
    safe = run_stats(comfy, *patched_prompt(comfy, sampler_node, cfg=3.0))
    assert safe["on_u"] <= plain["on_u"] / 3 and safe["near_any"] >= 0.95, safe


def test_cfg_pp_sampler_is_corrected_through_pre_cfg(comfy, toy_sets):
    """CFG++ samplers step along uncond_denoised: only the pre-CFG hook (newer ComfyUI) reaches it."""
    if "euler_cfg_pp" not in comfy.nodes.NODE_CLASS_MAPPINGS["KSampler"].INPUT_TYPES()["required"]["sampler_name"][0]:
        pytest.skip(f"no CFG++ samplers in this ComfyUI ({comfy.version})")
    plain = run_stats(comfy, *toy_prompt(sampler="euler_cfg_pp"))
    safe = run_stats(comfy, *patched_prompt(comfy, "KSampler", sampler="euler_cfg_pp", cfg=1.5))
    assert plain["on_u"] >= 0.15 and safe["on_u"] <= plain["on_u"] / 3 and safe["near_any"] >= 0.95, (plain, safe)


def test_composes_with_a_custom_cfg_function_and_other_post_cfg_patches(comfy, toy_sets):
    """RescaleCFG sets sampler_cfg_function (a single slot): the correction then runs post-CFG."""
    plain = run_stats(comfy, *toy_prompt(cfg=3.0))

    def rescale(b, model):
        return b.add("RescaleCFG", model=model, multiplier=0.7)

    safe = run_stats(comfy, *patched_prompt(comfy, "KSampler", cfg=3.0, extra=rescale))
    assert safe["on_u"] <= plain["on_u"] / 3 and safe["near_any"] >= 0.95, safe


def pack_module(comfy, name: str):
    """A module of the pack as ComfyUI loaded it (its package name differs between versions)."""
    cls = comfy.nodes.NODE_CLASS_MAPPINGS["SDN_SafeDenoiserPatch"]
    package = cls.__module__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.{name}"]


def test_patch_leaves_the_input_model_untouched_and_composes(comfy, toy_sets):
    sd = pack_module(comfy, "safe_denoiser")
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["SDN_LoadNegationSet"]()
    nset, _ = loader.load("toy_sd15.safetensors", 512, 0)
    base = tm.patch_exact_denoiser(tm.build_model("sd15", 0), tm.make_point_set(0, COUNT))
    calls = []

    def probe(args):
        calls.append(float(args["sigma"].reshape(-1)[0]))
        return args["denoised"]

    base.set_model_sampler_post_cfg_function(probe)
    before = {k: list(v) if isinstance(v, list) else v for k, v in base.model_options.items()}
    (patched,) = comfy.nodes.NODE_CLASS_MAPPINGS["SDN_SafeDenoiserPatch"]().patch(base, negation_set=nset, **DEFAULTS)
    assert patched is not base
    assert {k: list(v) if isinstance(v, list) else v for k, v in base.model_options.items()} == before
    funcs = patched.model_options["sampler_post_cfg_function"]
    assert funcs[0] is probe and len(funcs) == 2, "the pack's hook is appended after existing ones"
    hook = funcs[1].__self__
    assert isinstance(hook, sd.SafeDenoiserHook) and hook.uses_pre_cfg == (comfy.version == "N")
    # a clone of the patched model (as every downstream node makes) shares the hook and its set
    clone = patched.clone()
    assert clone.model_options["sampler_post_cfg_function"][1].__self__ is hook
    latent = {"samples": torch.zeros(8, 4, 8, 8)}
    cond = tm.build_conditioning(1, 4, "sd15")
    comfy.nodes.common_ksampler(patched, 0, 10, 1.0, "euler", "normal", cond, cond, latent)
    report = hook.report.finish()
    assert calls and "corrected 0 of" not in report and "model evaluations" in report, report
    assert len(base.model_options["sampler_post_cfg_function"]) == 1


def test_per_sample_weights_in_a_batch(comfy, toy_sets):
    """One sample heading into U and one heading elsewhere get different weights."""
    sd = pack_module(comfy, "safe_denoiser")
    nset, _ = comfy.nodes.NODE_CLASS_MAPPINGS["SDN_LoadNegationSet"]().load("toy_sd15.safetensors", 512, 0)
    model = tm.build_model("sd15", 0)
    points = tm.make_point_set(0, COUNT).points.float()
    sigma = torch.tensor([0.3, 0.3])
    x = torch.stack([points[0], points[UNSAFE + 1]]) + 0.3 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    base_model = model.model
    ms = base_model.model_sampling
    denoised = tm.posterior_mean(x, sigma, points.double(), ms).float()
    hook = sd.SafeDenoiserHook(nset, sd.GuidanceSettings(mode="paper", bandwidth=1.0 / 3.0), uses_pre_cfg=False)
    corr = hook.correction(base_model, x, denoised, sigma)
    beta = corr.weight
    assert beta[0] > 90 and beta[1] < 1e-3, beta  # P at its cap 0.99 (beta 99) on U, ~0 elsewhere
    out = corr.apply(denoised)
    assert torch.allclose(out[1], denoised[1], atol=1e-4)
    assert torch.isfinite(out).all()


def test_calibrated_beta_is_measured_from_the_sets_level(comfy, toy_sets):
    """calibrated mode (the default): beta = P / (1 - P), P = min(p_max, eta R / R_t), R_t the set's calibrated
    threshold at that noise level, only where the kernel averages over the set (own-kernel gain <= log 2);
    elsewhere no correction at all, where the paper mode corrects."""
    sd, gm, cal, cc = (pack_module(comfy, m) for m in ("safe_denoiser", "guidance_modes", "calibration", "comfy_compat"))
    G = sys.modules[sd.__name__.rsplit(".", 2)[0] + ".kernels.guidance"]
    gen = torch.Generator().manual_seed(4)
    span = torch.linalg.qr(torch.randn(256, 4, generator=gen))[0].T  # a low-rank set of 300 latents in 4x8x8
    latents = (3.0 * torch.randn(300, 4, generator=gen) @ span + 0.1 * torch.randn(300, 256, generator=gen))
    model = tm.build_model("sd15", 0).model
    ms, lf = model.model_sampling, model.latent_format
    nset = sd.NegationSet(lf.process_out(latents.reshape(300, 4, 8, 8)), {"source": "test low-rank set"})
    prep = nset.prepared(lf, 8, 8, torch.device("cpu"), torch.float32, "paper")
    fresh = (3.0 * torch.randn(2, 4, generator=gen) @ span + 0.1 * torch.randn(2, 256, generator=gen)).reshape(2, 4, 8, 8)
    far = 3.0 * torch.randn(2, 4, 8, 8, generator=gen)  # two states nowhere near the set
    seen = {"averaging": 0, "single": 0}
    for sigma_value in (0.05, 0.4, 0.5, 0.6):  # the set's members see only themselves at 0.05 and 0.4
        sigma = torch.full((4,), sigma_value)
        x = torch.cat([fresh, far]) + sigma_value * torch.randn(4, 4, 8, 8, generator=gen)
        flat = x.reshape(4, -1)
        alpha, std = (t.float() for t in cc.forward_coefficients(ms, sigma))
        test = cal.calibrated_threshold(nset, prep, float(alpha[0]), float(std[0]), 3.0, 8, 8, "cpu")
        km = G.kernel_posterior_mean(flat, prep.y, alpha, std, 3.0, y_sq=prep.y_sq)
        averaging = test.active and test.own_kernel_gain <= math.log(2)
        expected = G.beta_estimate(km.log_norm, flat, alpha, std, 300, prep.ref_mean, prep.ref_var, 3.0, eta=1.0,
                                   p_max=gm.PAPER_P_MAX, level=test.threshold if averaging else math.inf)
        expected = G.bound_beta(flat, km.mean, expected, 0.5 * G.shift_bound(alpha, std, 4))[0]
        hook = sd.SafeDenoiserHook(nset, sd.GuidanceSettings(), uses_pre_cfg=False)
        corr = hook.correction(model, x, x, sigma)  # denoised = x: any estimate works for the weights
        assert torch.allclose(corr.weight.float(), expected.float(), rtol=1e-4, atol=1e-6), (sigma_value, corr.weight)
        seen["averaging" if averaging else "single"] += 1
        if not averaging:
            assert bool((corr.weight == 0).all())
            paper = sd.SafeDenoiserHook(nset, sd.GuidanceSettings(mode="paper"), uses_pre_cfg=False)
            assert bool((paper.correction(model, x, x, sigma).weight > 0).any())  # the paper mode would correct here
        else:
            assert float(corr.weight[:2].min()) > 100 * float(corr.weight[2:].max())  # far from the set: ~untouched
    assert seen["averaging"] and seen["single"], seen


def test_reference_mode_runs_in_every_sampler_and_its_gate_opens(comfy, toy_sets):
    """reference mode reproduces the official arithmetic; with a wide kernel its gate opens on the toy."""
    wide = dict(DEFAULTS, mode="reference", bandwidth=4.0, strength=3.0, end_percent=0.5)
    plain = run_stats(comfy, *toy_prompt())
    ref = run_stats(comfy, *toy_prompt(guidance=wide))
    assert ref["near_any"] >= 0.95
    assert ref["nearest_index"] != plain["nearest_index"], "the correction changed the trajectories"


def test_channel_mismatch_is_refused_with_a_clear_message(comfy, toy_sets):
    prompt, _ = toy_prompt(guidance=DEFAULTS, set_name="toy_16ch.safetensors")
    with pytest.raises(ComfyPromptError) as info:
        comfy.run_prompt(prompt)
    msg = str(info.value)
    assert "Safe Denoiser KSampler" in msg and "16-channel" in msg and "Re-encode" in msg


@pytest.mark.parametrize("bad, needle", [({"start_percent": 0.6, "end_percent": 0.2}, "window"),
                                         ({"bandwidth": float("nan")}, "bandwidth")])
def test_bad_guidance_settings_are_refused(comfy, toy_sets, bad, needle):
    nset, _ = comfy.nodes.NODE_CLASS_MAPPINGS["SDN_LoadNegationSet"]().load("toy_sd15.safetensors", 512, 0)
    patch = comfy.nodes.NODE_CLASS_MAPPINGS["SDN_SafeDenoiserPatch"]()
    with pytest.raises(ValueError) as info:
        patch.patch(tm.build_model("sd15", 0), negation_set=nset, **dict(DEFAULTS, **bad))
    assert "Safe Denoiser (model patch)" in str(info.value) and needle in str(info.value)
