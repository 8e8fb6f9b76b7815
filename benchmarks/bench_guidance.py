"""Benchmark: the streamed two-GEMM kernel against the official cdist + repeat construction.

Prints, in one run, time and peak extra memory (CPU RSS high-water mark above the inputs, or
CUDA max allocated) of:
  * the official construction (Safe_Denoiser@223415b ``kernel_fast``: a B x N x (D+1) tensor),
  * this pack's reference-mode kernel (same arithmetic, streamed),
  * this pack's paper-mode kernel (Eq. 6, streamed),
at B=4, N=515, D=4x64x64 (SD1.x at 512 px), then the paper kernel's scaling for N in
{515, 3000, 20000}.  Each measurement runs in a fresh subprocess so peaks do not mix.

Usage: python benchmarks/bench_guidance.py [--device cpu|cuda] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.pack_file import load_pack_file  # noqa: E402

log = load_pack_file("demo/__init__.py", "sdn_demo").console_logger("benchmarks.bench_guidance")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def official(x0, ref, sigma=3.15, eps=1e-8):
    import torch

    n, d = x0.shape
    m = ref.shape[0]
    kernel = -(torch.cdist(x0[None], ref[None])[0]).reshape(n, m, 1).repeat(1, 1, d + 1) / (2.0 * sigma ** 2)
    ones = torch.ones(m, 1, dtype=ref.dtype, device=ref.device)
    kernel = (kernel.exp() * torch.cat((ref, ones), 1).reshape(1, -1, d + 1)).sum(1)
    return kernel[:, :-1] / (kernel[:, -1:] + eps)


def measure(kind: str, batch: int, count: int, dim: int, device: str, repeat: int) -> dict:
    """Run one construction in this process and return timings and peak extra memory."""
    import torch

    g = load_pack_file("kernels/guidance.py", "sdn_kernels_guidance")
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(count, dim, generator=gen).to(device)
    y_sq = (y * y).sum(1)
    x = (torch.randn(batch, dim, generator=gen) * 5).to(device)
    sigma = torch.full((batch,), 5.0, device=device)

    def run():
        if kind == "official":
            return official(x, y)
        if kind == "reference":
            return g.reference_kernel_mean(x, y, 3.15, y_sq=y_sq).mean
        return g.kernel_posterior_mean(x, y, 1.0, sigma, y_sq=y_sq).mean

    run()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib("VmRSS") * 1024
        _reset_peak()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base
    return {"kind": kind, "B": batch, "N": count, "D": dim, "seconds": sorted(times)[len(times) // 2],
            "peak_extra_bytes": max(int(peak), 0)}


def _subprocess(kind, batch, count, dim, device, repeat) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps([kind, batch, count, dim, device, repeat])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        log.info(json.dumps(measure(*json.loads(args.one))))
        return

    dim, batch = 4 * 64 * 64, 4
    mib = 1024 * 1024
    log.info(f"device={args.device}  B={batch}  D={dim} (4x64x64)  median of {args.repeat} runs")
    rows = {k: _subprocess(k, batch, 515, dim, args.device, args.repeat) for k in ("official", "reference", "paper")}
    base = rows["official"]
    log.info(f"{'construction':<12} {'N':>6} {'time ms':>10} {'peak MiB':>10} {'speed-up':>9} {'memory ratio':>13}")
    for kind, r in rows.items():
        log.info(f"{kind:<12} {r['N']:>6} {r['seconds'] * 1e3:>10.2f} {r['peak_extra_bytes'] / mib:>10.1f} "
                 f"{base['seconds'] / r['seconds']:>8.1f}x {r['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):>13.4f}")
    log.info("\nscaling of the paper kernel in N (time should grow linearly, memory stay bounded):")
    log.info(f"{'N':>6} {'time ms':>10} {'ms per 1k latents':>18} {'peak MiB':>10}")
    for count in (515, 3000, 20000):
        r = _subprocess("paper", batch, count, dim, args.device, args.repeat)
        log.info(f"{count:>6} {r['seconds'] * 1e3:>10.2f} {r['seconds'] * 1e6 / count:>18.3f} {r['peak_extra_bytes'] / mib:>10.1f}")


if __name__ == "__main__":
    main()
