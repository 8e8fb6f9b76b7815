"""Safe Denoiser Restart Sampler: the calibrated test (kernels/restart.py), the restart loop, and
the node around ComfyUI's own samplers through SamplerCustom (real graphs, the digits model).

Removal on the exact testbeds is in test_testbeds.py; the full table in benchmarks/bench_testbeds.py.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from harness.locate import pack_file
from harness.prompts import PromptBuilder

R = pack_file("kernels/restart.py", "sdn_kernels.restart")


def low_rank_set(n: int = 300, dim: int = 256, rank: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=gen, dtype=torch.float64)
    span = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=torch.float64))[0].T
    return mean + 3.0 * torch.randn(n, rank, generator=gen, dtype=torch.float64) @ span \
        + 0.1 * torch.randn(n, dim, generator=gen, dtype=torch.float64)


def stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return y.mean(0), y.var(0, correction=0)


def test_threshold_claims_the_set_and_spares_the_reference() -> None:
    """At a noise level where the kernel resolves the set, fresh noisy samples of the set's own
    distribution are claimed at about ``recall`` and reference samples at about ``false_alarm``."""
    y = low_rank_set()
    fresh_unsafe = low_rank_set(500, seed=0)[300:]  # same mean and span, new members (not in the set)
    mean, var = stats(y)
    alpha, std = 1.0, 0.3  # the kernel (width 3 std = 0.9) resolves the set's span (std 3)
    test = R.restart_threshold(y, alpha, std, 3.0, mean, var, recall=0.95, false_alarm=0.01)
    assert test.active and test.threshold == max(test.recall_quantile, test.reference_quantile)
    gen = torch.Generator().manual_seed(5)
    x_unsafe = alpha * fresh_unsafe + std * torch.randn(fresh_unsafe.shape, generator=gen, dtype=torch.float64)
    x_ref = alpha * (mean + var.sqrt() * torch.randn(200, y.shape[1], generator=gen, dtype=torch.float64)) \
        + std * torch.randn(200, y.shape[1], generator=gen, dtype=torch.float64)
    hit = R.claimed(x_unsafe, y, alpha, std, 3.0, mean, var, test.threshold).double().mean()
    false = R.claimed(x_ref, y, alpha, std, 3.0, mean, var, test.threshold).double().mean()
    assert hit >= 0.85, hit
    assert false <= 0.05, false


def test_threshold_is_off_where_the_kernel_cannot_tell() -> None:
    y = low_rank_set()
    mean, var = stats(y)
    assert not R.restart_threshold(y, 0.0, 1.0, 3.0, mean, var).active  # flow at sigma = 1: pure noise
    assert not R.restart_threshold(y, 1.0, 1.0, 3.0, mean, var).active  # a kernel as wide as the set's span
    with pytest.raises(ValueError, match="recall"):
        R.restart_threshold(y, 1.0, 1.0, 3.0, mean, var, recall=1.0)


def test_leave_one_out_scores_each_member_without_itself() -> None:
    """Near-clean copies: with its own kernel a member scores far above the leave-one-out score."""
    y = low_rank_set(n=40)
    mean, var = stats(y)
    loo, kept, ref = R.calibration_log_ratios(y, 1.0, 0.05, 1.0, mean, var, queries=16)
    assert loo.shape == kept.shape == ref.shape == (16,)
    assert bool((kept > loo + 10).all())
    assert torch.equal(loo, R.calibration_log_ratios(y, 1.0, 0.05, 1.0, mean, var, queries=16)[0])  # seeded


def test_own_kernel_gain_tells_an_average_from_single_members() -> None:
    """``own_kernel_gain`` is the median of ``kept - leave_one_out`` over the calibration members: near 0
    where the kernel spans many members (wide noise), far above log 2 where each member sees only itself."""
    y = low_rank_set()
    mean, var = stats(y)
    for std in (0.05, 0.3, 2.0):
        test = R.restart_threshold(y, 1.0, std, 3.0, mean, var)
        loo, kept, _ = R.calibration_log_ratios(y, 1.0, std, 3.0, mean, var)
        assert test.own_kernel_gain == pytest.approx(float((kept - loo).median()), rel=1e-12)
    assert R.restart_threshold(y, 1.0, 0.05, 3.0, mean, var).own_kernel_gain > 10 * math.log(2)
    assert R.restart_threshold(y, 1.0, 2.0, 3.0, mean, var).own_kernel_gain < 0.1 * math.log(2)


def test_restart_loop_replaces_claimed_samples_up_to_the_cap() -> None:
    calls = []

    def run(start, index):
        calls.append(index.tolist())
        claims = start[:, 0] > 0.5  # "unsafe" = first coordinate high
        return start * 10, claims

    def fresh(index, round_):
        return torch.full((len(index), 2), 0.0 if round_ >= 2 else 1.0)

    first = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    samples, restarts, still = R.sample_with_restarts(run, first, fresh, max_restarts=3)
    assert calls == [[0, 1, 2], [1, 2], [1, 2]]  # round 1 claimed again, round 2 accepted
    assert restarts.tolist() == [0, 2, 2] and still.tolist() == [False, False, False]
    assert torch.equal(samples[0], first[0] * 10) and torch.equal(samples[1:], torch.zeros(2, 2))
    _, restarts, still = R.sample_with_restarts(run, first, lambda i, r: torch.ones(len(i), 2), max_restarts=1)
    assert restarts.tolist() == [0, 1, 1] and still.tolist() == [False, True, True]


# -- the node, through SamplerCustom ----------------------------------------------------------------

def digits_prompt(batch: int, seed: int, max_restarts: int = 4, digit: str = "any") -> tuple[dict, str, str]:
    b = PromptBuilder()
    load = b.add("SDN_LoadDemoModel")
    pos = b.add("SDN_DemoDigitConditioning", digit=digit)
    neg = b.add("SDN_DemoDigitConditioning", digit="any")
    latent = b.add("EmptyLatentImage", width=64, height=64, batch_size=batch)
    negation = b.add("SDN_LoadNegationSet", set_name="digits_7", resolution=64, max_images=0, vae=load.out(1))
    select = b.add("KSamplerSelect", sampler_name="euler")
    restart = b.add("SDN_SafeDenoiserRestartSampler", sampler=select, negation_set=negation, recall=0.95,
                    max_restarts=max_restarts, bandwidth=1.0)
    sigmas = b.add("BasicScheduler", model=load.out(0), scheduler="normal", steps=12, denoise=1.0)
    common = dict(model=load.out(0), add_noise=True, noise_seed=seed, cfg=1.0, positive=pos, negative=neg,
                  sigmas=sigmas, latent_image=latent)
    plain = b.add("SamplerCustom", sampler=select, **common)
    safe = b.add("SamplerCustom", sampler=restart, **common)
    for sampled in (plain, safe):
        b.add("PreviewImage", images=b.add("VAEDecode", samples=sampled.out(0), vae=load.out(1)))
    return b.build(), plain.id, safe.id


def test_node_restarts_only_what_the_set_claims(comfy, caplog) -> None:
    """Same seed through SamplerCustom with and without the Restart Sampler: the samples never
    restarted are bit-identical to plain sampling, the others differ, and the count matches the
    node's report; the same seed gives the same result again."""
    prompt, plain_id, safe_id = digits_prompt(batch=24, seed=11)
    with caplog.at_level(logging.INFO):
        out = comfy.run_prompt(prompt)
    plain = out.result(plain_id)[0]["samples"]
    safe = out.result(safe_id)[0]["samples"]
    (line,) = [r.getMessage() for r in caplog.records if "Restart Sampler:" in r.getMessage()]
    restarted = int(line.split("Restart Sampler: ")[1].split(" of ")[0])
    same = (plain - safe).flatten(1).abs().amax(1) == 0
    assert int((~same).sum()) == restarted, line
    assert 0 < restarted < 24
    again = comfy.run_prompt(prompt, fresh=True).result(safe_id)[0]["samples"]
    assert torch.equal(again, safe)
    zero, _, zero_id = digits_prompt(batch=24, seed=11, max_restarts=0)
    assert torch.equal(comfy.run_prompt(zero).result(zero_id)[0]["samples"], plain)  # 0 restarts: plain, reported


def ksampler_prompt(max_restarts: int, sampler: str = "euler", denoise: float = 1.0, batch: int = 24) -> tuple[dict, str]:
    b = PromptBuilder()
    load = b.add("SDN_LoadDemoModel")
    negation = b.add("SDN_LoadNegationSet", set_name="digits_7", resolution=64, max_images=0, vae=load.out(1))
    ks = b.add("SDN_SafeDenoiserKSampler", model=load.out(0), seed=11, steps=10, cfg=1.0, sampler_name=sampler,
               scheduler="normal", positive=b.add("SDN_DemoDigitConditioning", digit="any"),
               negative=b.add("SDN_DemoDigitConditioning", digit="any"),
               latent_image=b.add("EmptyLatentImage", width=64, height=64, batch_size=batch), denoise=denoise,
               negation_set=negation, mode="paper", strength=1.0, bandwidth=1.0, start_percent=0.0, end_percent=1.0,
               beta_threshold=0.0, max_restarts=max_restarts)
    b.add("PreviewImage", images=b.add("VAEDecode", samples=ks.out(0), vae=load.out(1)))
    return b.build(), ks.id


@pytest.mark.parametrize("sampler, denoise", [("euler", 1.0), ("dpm_2", 0.8)])
def test_ksampler_restarts_only_what_the_set_claims(comfy, sampler: str, denoise: float) -> None:
    """The Safe Denoiser KSampler's restarts (default 4): with 0 it is KSampler + the correction, as
    before; with restarts, the images never claimed are bit for bit those (same noise, sigmas with
    KSampler's rules, here a sampler that drops the penultimate sigma and a partial denoise), the
    others differ, and the report says how many were restarted."""
    info = comfy.object_info()["SDN_SafeDenoiserKSampler"]["input"]["optional"]["max_restarts"]
    assert info[1]["default"] == 4 and info[1]["tooltip"]
    prompt, ks_id = ksampler_prompt(0, sampler, denoise)
    corrected, report = comfy.run_prompt(prompt).result(ks_id)
    assert "Restart" not in report
    prompt, ks_id = ksampler_prompt(4, sampler, denoise)
    restarted, report = comfy.run_prompt(prompt).result(ks_id)
    line = report.splitlines()[-1]
    assert line.startswith("Safe Denoiser KSampler: ") and "sample(s) restarted" in line, report
    count = int(line.split(": ")[1].split(" of ")[0])
    same = (corrected["samples"] - restarted["samples"]).flatten(1).abs().amax(1) == 0
    assert 0 < count < 24 and int((~same).sum()) == count, report


def test_node_refuses_bad_inputs(comfy) -> None:
    rs = comfy.node_module("restart_sampler")
    node = rs.SafeDenoiserRestartSampler()
    with pytest.raises(Exception, match="negation_set must come from a Load Negation Set"):
        node.get_sampler(None, "not a set", 0.95, 4, 1.0)
    info = comfy.object_info()["SDN_SafeDenoiserRestartSampler"]
    specs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert all(spec[1].get("tooltip") for name, spec in specs.items())
    assert math.isclose(specs["recall"][1]["default"], 0.95) and specs["max_restarts"][1]["default"] == 4


def test_example_workflow_runs(comfy) -> None:
    """example_workflows/restart_sampler_digits.json (UI format, converted as the frontend does):
    the plain and the Restart Sampler branches share the seed, so the images the sampler did not
    restart are the same pictures."""
    from harness.workflow import EXAMPLE_WORKFLOWS_DIR, check_ui_workflow, load_ui_workflow, nodes_of_type, ui_to_api

    workflow = load_ui_workflow(EXAMPLE_WORKFLOWS_DIR / "restart_sampler_digits.json")
    info = comfy.object_info()
    assert check_ui_workflow(workflow, info) == []
    prompt = ui_to_api(workflow, info)
    assert (EXAMPLE_WORKFLOWS_DIR / "restart_sampler_digits.jpg").is_file()
    samplers = nodes_of_type(prompt, "SamplerCustom")
    restart_id = next(s for s in samplers if prompt[prompt[s]["inputs"]["sampler"][0]]["class_type"]
                      == "SDN_SafeDenoiserRestartSampler")
    plain_id = next(s for s in samplers if s != restart_id)
    out = comfy.run_prompt(prompt)
    plain, safe = (out.result(i)[0]["samples"] for i in (plain_id, restart_id))
    assert plain.shape == safe.shape == (16, 4, 8, 8)
    assert int(((plain - safe).flatten(1).abs().amax(1) == 0).sum()) >= 8  # most images untouched
    for save in nodes_of_type(prompt, "SaveImage"):
        assert len(out[save]["images"]) == 16
