"""The Safe Denoiser under every guider and every way a sampler evaluates the model.

On the exact point-set toy of tests/test_safe_denoiser.py (20 points in 4x8x8, the first 5
negated; the network ignores the conditioning, so every CFG combination is the same exact
denoiser): Safe Denoiser (model patch) -> [RescaleCFG] -> a test probe that counts model
evaluations independently of the pack (a ``predict_noise`` wrapper, or a post-CFG function on
ComfyUI of early 2024) -> a sampler node.  For each case the correction must be computed exactly
once per model evaluation (the hook's count equals the probe's) and must move the samples off
the negated points as it does with CFGGuider (the issue: DualCFGGuider left the output
bit-identical to plain sampling, the correction computed zero times).
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from harness.prompts import exact_denoiser_sampling
from test_safe_denoiser import BATCH, COUNT, EXACT, UNSAFE, tm, toy_sets  # noqa: F401  (toy_sets: a fixture)

STEPS = 20


def probe_class(comfy):
    return comfy.nodes.NODE_CLASS_MAPPINGS["SDNTest_CountEvaluations"]


def build(comfy, case: dict, guided: bool, label: str):
    """The prompt for one case; ``case``: ``node`` (KSampler / KSamplerAdvanced split / a guider
    class), ``sampler``, ``cfg``, ``rescale`` (RescaleCFG in front), ``inputs`` (guider inputs)."""
    b, n = exact_denoiser_sampling(count=COUNT, unsafe_count=UNSAFE, batch=BATCH, steps=STEPS,
                                   sampler=case.get("sampler", "euler"))
    model = n["exact"]
    if guided:
        loader = b.add("SDN_LoadNegationSet", set_name="toy_sd15.safetensors", resolution=512, max_images=0)
        model = b.add("SDN_SafeDenoiserPatch", model=model, negation_set=loader.out(0), **EXACT)
    if case.get("rescale"):
        model = b.add("RescaleCFG", model=model, multiplier=0.7)
    model = b.add("SDNTest_CountEvaluations", model=model, label=label)
    prompt = b.build()
    pos, neg, latent = n["positive"].out(0), n["negative"].out(0), n["latent"].out(0)
    cfg, sampler = case.get("cfg", 3.0), case.get("sampler", "euler")
    node = case["node"]
    if node == "KSampler":
        prompt[n["sampler"].id] = {"class_type": "KSampler", "inputs": {
            "model": model.out(0), "seed": 0, "steps": STEPS, "cfg": cfg, "sampler_name": sampler,
            "scheduler": "normal", "positive": pos, "negative": neg, "latent_image": latent, "denoise": 1.0}}
    elif node == "KSamplerAdvanced split":
        common = {"model": model.out(0), "noise_seed": 0, "steps": STEPS, "cfg": cfg, "sampler_name": sampler,
                  "scheduler": "normal", "positive": pos, "negative": neg}
        prompt["first_half"] = {"class_type": "KSamplerAdvanced", "inputs": dict(
            common, add_noise="enable", latent_image=latent, start_at_step=0, end_at_step=STEPS // 2,
            return_with_leftover_noise="enable")}
        prompt[n["sampler"].id] = {"class_type": "KSamplerAdvanced", "inputs": dict(
            common, add_noise="disable", latent_image=["first_half", 0], start_at_step=STEPS // 2,
            end_at_step=10000, return_with_leftover_noise="disable")}
    else:
        conds = {"positive": pos, "negative": neg, "cond1": pos, "cond2": neg, "conditioning": pos,
                 "empty_conditioning": neg}
        inputs = {k: conds.get(v, v) if isinstance(v, str) else v for k, v in case["inputs"].items()}
        prompt["guider"] = {"class_type": node, "inputs": dict(inputs, model=model.out(0))}
        prompt["select"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}
        prompt["sigmas"] = {"class_type": "BasicScheduler", "inputs": {
            "model": model.out(0), "scheduler": "normal", "steps": STEPS, "denoise": 1.0}}
        prompt["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}}
        prompt[n["sampler"].id] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
            "latent_image": latent}}
    return prompt, n


CASES = {
    "CFGGuider": {"node": "CFGGuider", "inputs": {"cfg": 3.0, "positive": "positive", "negative": "negative"}},
    "BasicGuider": {"node": "BasicGuider", "inputs": {"conditioning": "conditioning"}},
    "DualCFGGuider regular": {"node": "DualCFGGuider", "inputs": {
        "cond1": "cond1", "cond2": "cond2", "negative": "negative", "cfg_conds": 3.0, "cfg_cond2_negative": 2.0,
        "style": "regular"}},
    "DualCFGGuider nested": {"node": "DualCFGGuider", "inputs": {
        "cond1": "cond1", "cond2": "cond2", "negative": "negative", "cfg_conds": 3.0, "cfg_cond2_negative": 2.0,
        "style": "nested"}},
    # the toy ignores the conditioning, so PerpNeg's positive - empty is 0 and its projection divides by
    # zero (NaN for plain sampling too): only the count is checkable on this toy
    "PerpNegGuider": {"node": "PerpNegGuider", "count_only": True, "inputs": {
        "positive": "positive", "negative": "negative", "empty_conditioning": "empty_conditioning", "cfg": 3.0,
        "neg_scale": 1.0}},
    "RescaleCFG (custom cfg function)": {"node": "KSampler", "rescale": True},
    "CFG++ sampler": {"node": "KSampler", "sampler": "euler_cfg_pp", "cfg": 1.5},
    "heun": {"node": "KSampler", "sampler": "heun"},
    "dpmpp_2s_ancestral": {"node": "KSampler", "sampler": "dpmpp_2s_ancestral"},
    "dpmpp_sde": {"node": "KSampler", "sampler": "dpmpp_sde"},
    "KSamplerAdvanced split": {"node": "KSamplerAdvanced split"},
}


def available(comfy, case: dict) -> bool:
    mappings = comfy.nodes.NODE_CLASS_MAPPINGS
    node = case["node"].split()[0]
    if node not in mappings or (case.get("rescale") and "RescaleCFG" not in mappings):
        return False
    import comfy.samplers as comfy_samplers

    return case.get("sampler", "euler") in comfy_samplers.KSampler.SAMPLERS


@pytest.mark.parametrize("name", list(CASES))
def test_corrected_exactly_once_per_evaluation_and_it_removes(comfy, toy_sets, name, caplog):  # noqa: F811
    case = CASES[name]
    if not available(comfy, case):
        pytest.skip(f"{name} does not exist in this ComfyUI ({comfy.version})")
    probe = probe_class(comfy)
    plain_out = comfy.run_prompt(build(comfy, case, False, "plain")[0], fresh=True)
    prompt, n = build(comfy, case, True, "guided")
    with caplog.at_level(logging.WARNING):
        guided_out = comfy.run_prompt(prompt, fresh=True)
    plain, guided = plain_out[n["stats"].id]["stats"][0], guided_out[n["stats"].id]["stats"][0]
    (hook,) = probe.HOOKS["guided"]
    evaluations = probe.COUNTS["guided"]
    print(f"[{comfy.version}] {name}: {evaluations} evaluations, hook {hook.report.total_evaluations}; "
          f"on U {plain['on_u']:.3f} -> {guided['on_u']:.3f}")
    assert evaluations >= STEPS - 1 and probe.COUNTS["plain"] == evaluations
    assert hook.report.total_evaluations == evaluations, "the correction must run exactly once per evaluation"
    assert not [r for r in caplog.records if "without the guidance being called" in r.getMessage()]
    if case.get("count_only"):
        return
    assert plain["on_u"] >= 0.15
    assert guided["on_u"] <= plain["on_u"] / 3, (plain["on_u"], guided["on_u"])
    assert guided["near_any"] >= 0.95, guided["near_any"]


def test_a_run_that_never_reaches_the_hook_is_reported(comfy, toy_sets, caplog):  # noqa: F811
    """A guider that bypasses ComfyUI's hooks (calls the model without sampling_function or
    predict_noise): the run ends with a warning in the log, not silently."""
    if comfy.version != "N":
        pytest.skip("guiders and sampling wrappers exist only in current ComfyUI")
    import comfy.samplers as samplers

    safe = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["SDN_SafeDenoiserPatch"].__module__]

    class RawGuider(samplers.CFGGuider):
        def outer_predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
            out = samplers.calc_cond_batch(self.inner_model, [self.conds.get("positive")], x, timestep, model_options)
            return out[0]

    points = tm.make_point_set(seed=0, count=COUNT)
    model = tm.patch_exact_denoiser(tm.build_model("sd15", 0), points)
    nset = sys.modules[safe.__name__.rsplit(".", 1)[0] + ".negation_set"].NegationSet(
        points.points[:UNSAFE].float(), {"name": "toy"})
    patched, hook = safe.patch_model_with_hook(model, nset, safe.settings_from(EXACT), "test")
    guider = RawGuider(patched)
    guider.set_conds(tm.build_conditioning(1, 4, "sd15"), tm.build_conditioning(1, 4, "sd15", zero=True))
    guider.set_cfg(1.0)
    sigmas = patched.get_model_object("model_sampling").sigma_max * torch.linspace(1, 0, 5)
    sampler = samplers.sampler_object("euler")
    with caplog.at_level(logging.WARNING):
        guider.sample(torch.randn(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), sampler, sigmas, seed=0)
    assert hook.report.total_evaluations == 0
    assert any("without the guidance being called once" in r.getMessage() for r in caplog.records)
    assert "without the guidance being called once" in hook.report.finish()
