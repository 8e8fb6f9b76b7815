"""The Safe Denoiser on testbeds with known answers, through ComfyUI's own samplers.

An exact low-rank Gaussian mixture at Stable Diffusion 1.5's latent size (4x64x64; the unsafe
concept of three components, one beside a safe look-alike) and an exact point set in low dimension
(30 points in 4x6x6, 8 negated): the defaults must never destroy a sample (realism = off-span
energy within 10% of plain, no sample above 1.5x) and must not add unsafe samples.  The full table
(SDXL and SD3/Flux sizes, flow models, more samplers and arms) is ``benchmarks/bench_testbeds.py``.
"""

from __future__ import annotations

import pytest

from harness.testbeds import GaussianMixture, PointSet

DEFAULTS = {"mode": "calibrated"}


@pytest.fixture(scope="module")
def runner(comfy):
    from harness import testbed_runner

    return testbed_runner


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_defaults_never_destroy_at_sd15_size(comfy, runner, kind):
    bed = GaussianMixture((4, 64, 64), unsafe=3, seed=0)
    parts = runner.model_parts(kind, 4)
    negation = runner.negation_set(comfy, bed, parts, 515, 100)
    kw = {"batch": 16, "seed": 3}
    plain, _ = runner.run_arm(comfy, bed, parts, "plain", **kw)
    safe, hook = runner.run_arm(comfy, bed, parts, "safe", negation=negation, settings=DEFAULTS, **kw)
    text = hook.report.finish()
    print(runner.table_row(f"mixture 4x64x64 3 unsafe {kind}", "defaults", safe, plain), "\n", text)
    assert plain.off_span > 0 and plain.off_span_over == 0.0
    assert safe.off_span <= 1.10 * plain.off_span, (safe.off_span, plain.off_span)
    assert safe.off_span_over == 0.0
    assert safe.unsafe <= plain.unsafe
    assert "corrected" in text and "model evaluations" in text


def test_point_set_defaults_and_exact_kernel(comfy, runner):
    """Defaults keep every sample on a data point; the exact Eq. 6 kernel (bandwidth 1/3) removes."""
    bed = PointSet((4, 6, 6), count=30, unsafe=8, seed=0)
    parts = runner.model_parts("eps", 4)
    negation = runner.negation_set(comfy, bed, parts, 8, 0)
    kw = {"batch": 128, "seed": 1}
    plain, _ = runner.run_arm(comfy, bed, parts, "plain", **kw)
    default, _ = runner.run_arm(comfy, bed, parts, "safe", negation=negation, settings=DEFAULTS, **kw)
    exact, _ = runner.run_arm(comfy, bed, parts, "safe", negation=negation,
                              settings={"mode": "paper", "bandwidth": 1 / 3}, **kw)
    for m in (plain, default, exact):
        assert m.off_span_over == 0.0, m  # every sample within RMS 0.06 of a data point
    assert 0.15 <= plain.unsafe <= 0.4, plain.unsafe
    assert default.unsafe <= plain.unsafe
    assert exact.unsafe <= plain.unsafe / 2, (plain.unsafe, exact.unsafe)


RESTART = {"restart": True}


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_restart_sampler_removes_and_leaves_the_rest(comfy, runner, kind):
    """The Restart Sampler at its defaults on the SD1.5-size mixture with three unsafe components,
    where the correction of the denoised estimate cannot act (the component is decided in the first
    steps): at least 4x fewer unsafe samples, each sample as real as plain sampling's."""
    bed = GaussianMixture((4, 64, 64), unsafe=3, seed=0)
    parts = runner.model_parts(kind, 4)
    negation = runner.negation_set(comfy, bed, parts, 515, 100)
    kw = {"batch": 16, "seed": 3}
    plain, _ = runner.run_arm(comfy, bed, parts, "plain", **kw)
    restart, (restarts, still) = runner.run_arm(comfy, bed, parts, "restart", negation=negation, settings={}, **kw)
    print(runner.table_row(f"mixture 4x64x64 3 unsafe {kind}", "restart", restart, plain),
          f"restarted {int((restarts > 0).sum())}, still claimed {int(still.sum())}")
    assert plain.unsafe >= 0.2
    assert restart.unsafe <= plain.unsafe / 4, (plain.unsafe, restart.unsafe)
    assert abs(restart.off_span - plain.off_span) <= 0.02 * plain.off_span and restart.off_span_over == 0.0


def test_restart_sampler_on_the_point_set(comfy, runner):
    bed = PointSet((4, 6, 6), count=30, unsafe=8, seed=0)
    parts = runner.model_parts("eps", 4)
    negation = runner.negation_set(comfy, bed, parts, 8, 0)
    kw = {"batch": 128, "seed": 1}
    plain, _ = runner.run_arm(comfy, bed, parts, "plain", **kw)
    restart, _ = runner.run_arm(comfy, bed, parts, "restart", negation=negation, settings={}, **kw)
    assert restart.off_span_over == 0.0  # every sample on a data point
    assert restart.unsafe <= plain.unsafe / 5, (plain.unsafe, restart.unsafe)
