"""Benchmark: how well the Restart Sampler's test tells the concept apart on the digits model.

Samples the digits model with the prompts ``any`` and ``7`` through SamplerCustom and the Safe
Denoiser Restart Sampler at its defaults with ``max_restarts`` 0 (so every image is the plain
sample), records the test's ``log R(x_t)`` of every image at every model evaluation, classifies the
decoded images with the digits classifier, and prints per noise level: the calibrated threshold,
the share of sevens and of other digits it claims, the ROC AUC of ``log R`` between sevens and other
digits, and the recall the best threshold for that level would reach at 5 % false alarms. The last
line: the whole run's claims (any level), as the node acts on them.

The exact testbeds' answers are in bench_testbeds.py; this is the learned model, where the set (the
training sevens) and the model's own sevens differ.

Usage: python benchmarks/bench_restart_detection.py [--samples 100] [--steps 20] [--seed 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import numpy as np  # noqa: E402

from harness.prompts import PromptBuilder  # noqa: E402
from harness.runtime import ComfySession  # noqa: E402
from devtools.pack_file import load_pack_file  # noqa: E402

demo = load_pack_file("demo/__init__.py", "sdn_demo")
log = demo.console_logger("benchmarks.bench_restart_detection")


def digits_prompt(digit: str, samples: int, steps: int, seed: int) -> tuple[dict, str]:
    b = PromptBuilder()
    load = b.add("SDN_LoadDemoModel")
    negation = b.add("SDN_LoadNegationSet", set_name="digits_7", resolution=64, max_images=0, vae=load.out(1))
    restart = b.add("SDN_SafeDenoiserRestartSampler", sampler=b.add("KSamplerSelect", sampler_name="euler"),
                    negation_set=negation, recall=0.95, max_restarts=0, bandwidth=1.0)
    sampled = b.add("SamplerCustom", model=load.out(0), add_noise=True, noise_seed=seed, cfg=1.0,
                    positive=b.add("SDN_DemoDigitConditioning", digit=digit),
                    negative=b.add("SDN_DemoDigitConditioning", digit="any"), sampler=restart,
                    sigmas=b.add("BasicScheduler", model=load.out(0), scheduler="normal", steps=steps, denoise=1.0),
                    latent_image=b.add("EmptyLatentImage", width=64, height=64, batch_size=samples))
    decode = b.add("VAEDecode", samples=sampled.out(0), vae=load.out(1))
    b.add("PreviewImage", images=decode)
    return b.build(), decode.id


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=100, help="images per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args()
    session = ComfySession.start(Path(tempfile.mkdtemp(prefix="bench-restart-detection-")))
    session.load_pack(test_nodes=False)
    rs = session.node_module("restart_sampler")
    guidance = sys.modules[rs.__name__.rsplit(".", 2)[0] + ".kernels.guidance"]
    levels: list[dict] = []

    class Recording(rs._Claiming):
        """The node's claiming wrapper, also keeping every evaluation's log R and threshold."""

        def __call__(self, x, sigma, *a, **k):
            level = float(sigma.reshape(-1)[0])
            if level > 0:
                g, ms, lf = self.guide, self.base.model_sampling, self.base.latent_format
                test = g.threshold(ms, lf, x, level)
                prep = g._prepared(lf, x)
                alpha, std = rs.forward_coefficients(ms, sigma.reshape(-1)[:1].expand(x.shape[0]).cpu())
                flat = x.reshape(x.shape[0], -1).float()
                km = guidance.kernel_posterior_mean(flat, prep.y, alpha, std, g.width, y_sq=prep.y_sq)
                log_r = guidance.log_density_ratio(km.log_norm, flat, alpha, std, prep.y.shape[0], prep.ref_mean,
                                                   prep.ref_var, g.width)
                levels.append({"sigma": level, "threshold": test.threshold, "log_r": log_r.double().cpu().numpy()})
            return super().__call__(x, sigma, *a, **k)

    rs._Claiming = Recording  # this script's own session only
    classifier = load_pack_file("demo/digits.py", "sdn_demo.digits").DigitClassifier.load()
    runs = []
    for digit in ("any", "7"):
        levels.clear()
        prompt, decode_id = digits_prompt(digit, args.samples, args.steps, args.seed)
        pixels = session.run_prompt(prompt).result(decode_id)[0].cpu().numpy()
        quantised = (np.clip(pixels, 0, 1) * 255).round().astype(np.float32) / 255  # the PNG a user sees
        labels = classifier.probabilities(quantised).argmax(1)
        runs.append((labels == 7, [dict(level) for level in levels]))
        log.info("prompt %s: %d of %d images are sevens", digit, int((labels == 7).sum()), args.samples)
    is_seven = np.concatenate([r[0] for r in runs])
    claimed_any = np.zeros_like(is_seven)
    log.info("%8s %12s %8s %8s %6s %14s", "sigma", "threshold", "7s", "others", "AUC", "recall@5% FA")
    for per_level in zip(*(r[1] for r in runs)):
        log_r = np.concatenate([lv["log_r"] for lv in per_level])
        threshold = per_level[0]["threshold"]
        claims = log_r > threshold
        claimed_any |= claims
        sevens, others = log_r[is_seven], log_r[~is_seven]
        auc = float((sevens[:, None] > others[None]).mean() + 0.5 * (sevens[:, None] == others[None]).mean())
        best = float((sevens > np.quantile(others, 0.95)).mean())
        log.info("%8.3f %12.1f %7.0f%% %7.0f%% %6.3f %13.0f%%", per_level[0]["sigma"], threshold,
                 100 * claims[is_seven].mean(), 100 * claims[~is_seven].mean(), auc, 100 * best)
    log.info("claimed at any level: %.0f%% of %d sevens, %.0f%% of %d other digits", 100 * claimed_any[is_seven].mean(),
             int(is_seven.sum()), 100 * claimed_any[~is_seven].mean(), int((~is_seven).sum()))


if __name__ == "__main__":
    main()
