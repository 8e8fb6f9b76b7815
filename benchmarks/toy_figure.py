"""Draw docs/toy_classes.png: what the Safe Denoiser does, on a toy with an exact denoiser.

Ten classes of points in a 4x8x8 latent space (D = 256, like the tiny test models); the model is
replaced by the exact posterior mean of 1500 training points (so plain sampling reproduces the
class frequencies); the negation set is 60 *other* samples of class 7. Bars: class frequencies of
1000 Euler samples (25 Karras steps, SD1.x sigmas), plain and with the paper-mode Safe Denoiser at
the node's defaults (strength 1 = eta 4, bandwidth 1, window 0 -> 0.22). Pure torch + Pillow.

Usage: python benchmarks/toy_figure.py [out.png]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sdn_kernels_guidance", ROOT / "kernels" / "guidance.py")
G = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = G
spec.loader.exec_module(G)


def karras(n: int, smin: float = 0.0292, smax: float = 14.61, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.cat([(smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho, torch.zeros(1, dtype=torch.float64)])


def sample(data: torch.Tensor, neg: torch.Tensor | None, n: int, steps: int = 25, seed: int = 0) -> torch.Tensor:
    sig = karras(steps)
    x = torch.randn(n, data.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sig[0]
    end_sigma = 4.67  # percent 0.22 on the SD1.x schedule
    for i in range(steps):
        s = sig[i]
        den = G.kernel_posterior_mean(x, data, 1.0, s).mean
        if neg is not None and s >= end_sigma:
            km = G.kernel_posterior_mean(x, neg, 1.0, s)
            beta = G.beta_estimate(km.log_norm, x, den, 1.0, s, eta=4.0)  # the node's default
            den = G.safe_combine(den, km.mean, beta)
        x = x + (x - den) / s * (sig[i + 1] - s)
    return x


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "toy_classes.png"
    g = torch.Generator().manual_seed(1)
    dim, classes, tau = 256, 10, 0.5
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(150)
    data = centres[labels] + tau * torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    neg = centres[7] + tau * torch.randn(60, dim, generator=g, dtype=torch.float64)
    hists = []
    for negation in (None, neg):
        x = sample(data, negation, 1000)
        cls = torch.cdist(x, centres).argmin(1)
        hists.append(torch.bincount(cls, minlength=classes).double() / len(cls))

    w, h = 900, 380
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    base, top, left, slot = h - 40, 50, 60, 80
    scale = (base - top) / 0.2
    draw.text((left, 10), "Class frequencies of 1000 samples (exact toy denoiser, negation set = 60 samples of class 7)", fill=(0, 0, 0))
    draw.text((left, 28), f"plain (grey): class 7 = {hists[0][7]:.1%}     Safe Denoiser, defaults (blue): class 7 = {hists[1][7]:.1%}", fill=(0, 0, 0))
    for frac in (0.05, 0.1, 0.15, 0.2):
        y = base - frac * scale
        draw.line([left - 5, y, w - 20, y], fill=(230, 230, 230))
        draw.text((10, y - 6), f"{frac:.0%}", fill=(90, 90, 90))
    for k in range(classes):
        x0 = left + k * slot + 10
        for j, (hist, colour) in enumerate(zip(hists, ((170, 170, 170), (30, 90, 200)))):
            bx = x0 + j * 26
            draw.rectangle([bx, base - hist[k].item() * scale, bx + 22, base], fill=colour)
        draw.text((x0 + 18, base + 8), str(k), fill=(200, 30, 30) if k == 7 else (0, 0, 0))
    draw.line([left - 5, base, w - 20, base], fill=(0, 0, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


if __name__ == "__main__":
    main()
