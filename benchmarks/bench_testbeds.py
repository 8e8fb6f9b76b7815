"""Benchmark: the Safe Denoiser on every testbed with a known answer, one table.

Testbeds (tests/harness/testbeds.py): exact low-rank Gaussian mixtures at SD1.5 (4x64x64), SDXL
(4x128x128) and SD3/Flux (16x128x128) sizes, one and three unsafe components, EPS and flow (CONST,
shift 3) parameterisations; an exact point set (30 points in 4x6x6, 8 negated).  Arms: plain,
oracle (the exact denoiser without the unsafe part), and the arms of ARMS below.  ComfyUI's own
samplers (euler, dpmpp_2m, euler_ancestral), the pack's own hook.  The digits demo (a learned model)
is `bash demo/run.sh`.

Usage: python benchmarks/bench_testbeds.py [--quick | --testbeds points,SD1.5,SDXL,SD3/Flux] [--batch 48]
       [--arms defaults,ksampler,...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from harness.runtime import ComfySession  # noqa: E402
from harness.testbeds import GaussianMixture, PointSet  # noqa: E402
from devtools.pack_file import load_pack_file  # noqa: E402

log = load_pack_file("demo/__init__.py", "sdn_demo").console_logger("benchmarks.bench_testbeds")

ARMS = [("defaults", {"mode": "calibrated"}), ("paper", {"mode": "paper"}),
        ("bandwidth 1/3", {"mode": "paper", "bandwidth": 1 / 3}), ("reference", {"mode": "reference"}),
        ("restart", {"restart": True}), ("ksampler", {"mode": "calibrated", "restart": True})]
"""Safe Denoiser arms: the patch at its defaults (calibrated mode), the paper mode (the former default), its
exact kernel and the reference mode, the Restart Sampler at its defaults, and the Safe Denoiser KSampler at its
defaults (the patch's correction and restarts around it)."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="SD1.5 size and the point set only")
    p.add_argument("--testbeds", default="points,SD1.5,SDXL,SD3/Flux",
                   help="comma-separated testbeds to run (default: all; --quick: points,SD1.5)")
    p.add_argument("--batch", type=int, default=48, help="samples per arm at the mixture sizes")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle arm (its rows do not depend on the pack)")
    p.add_argument("--match", default="", help="only the rows whose name contains this text (e.g. '1u eps')")
    p.add_argument("--arms", default=",".join(label for label, _ in ARMS),
                   help="comma-separated arm labels to run beside plain and oracle (default: all)")
    args = p.parse_args()
    arms = [(label, settings) for label, settings in ARMS if label in args.arms.split(",")]
    session = ComfySession.start(Path(tempfile.mkdtemp(prefix="bench-testbeds-")))
    session.load_pack(test_nodes=False)
    from harness import testbed_runner as tr

    chosen = set(("points,SD1.5" if args.quick else args.testbeds).split(","))
    cases = []
    if "points" in chosen:
        cases = [("points 4x6x6 30/8", PointSet(), "eps", 4, sampler, 256, 8) for sampler in ("euler", "dpmpp_2m")]
        cases.append(("points 4x6x6 30/8", PointSet(), "flow", 4, "euler", 256, 8))
    sizes = [(shape, label) for shape, label in (((4, 64, 64), "SD1.5"), ((4, 128, 128), "SDXL"),
                                                 ((16, 128, 128), "SD3/Flux")) if label in chosen]
    for shape, label in sizes:
        for unsafe in (1, 3):
            for kind, samplers in (("eps", ("euler", "dpmpp_2m", "euler_ancestral")), ("flow", ("euler",))):
                if label != "SD1.5":
                    samplers = samplers[:1]
                for sampler in samplers:
                    cases.append((f"{label} {unsafe}u", GaussianMixture(shape, unsafe=unsafe, seed=0), kind, shape[0],
                                  sampler, args.batch, 515))
    for name, bed, kind, channels, sampler, batch, count in cases:
        if args.match and args.match not in f"{name} {kind} {sampler}":
            continue
        start = time.time()
        parts = tr.model_parts(kind, channels)
        rows = tr.arms_table(session, f"{name} {kind} {sampler}", bed, parts, arms, sampler=sampler, batch=batch,
                             oracle=not args.no_oracle, seed=3, negation_count=count)
        for row in rows:
            log.info("%s", row)
        log.info("  (%.0f s)", time.time() - start)


if __name__ == "__main__":
    main()
