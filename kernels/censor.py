"""Censoring of detected regions on image tensors, in pure torch.

Images are ComfyUI IMAGE tensors ``[H, W, C]`` (one image) with values in ``0..1``; boxes are
NudeNet's ``(x, y, w, h)`` in pixels. Every operation writes only pixels inside the given boxes
(clipped to the image) and returns a new tensor; the input is never modified.

Modes:

* ``boxes``: an outline drawn on the inside edge of each box (annotation, content left visible);
* ``blur``: the box content downsampled to about 8 cells across its shorter side, smoothed and
  upsampled (a strong blur at a cost independent of the box size);
* ``pixelate``: mosaic of about 8 blocks across the longer side;
* ``fill``: a solid colour.

This module imports nothing from ComfyUI.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["CENSOR_MODES", "clip_box", "box_mask", "censor", "outline_thickness", "parse_color"]

CENSOR_MODES: tuple[str, ...] = ("none", "boxes", "blur", "pixelate", "fill")
OUTLINE_RGB = (1.0, 0.0, 0.0)


def clip_box(box: Sequence[int], height: int, width: int) -> Optional[tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` (end-exclusive) of an ``(x, y, w, h)`` box clipped to the image, or
    ``None`` when nothing of it is inside."""
    x, y, w, h = (int(v) for v in box)
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + max(0, w)), min(height, y + max(0, h))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def box_mask(boxes: Iterable[Sequence[int]], height: int, width: int) -> torch.Tensor:
    """``[H, W]`` bool: the union of the boxes (clipped to the image)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    for box in boxes:
        region = clip_box(box, height, width)
        if region is not None:
            x0, y0, x1, y1 = region
            mask[y0:y1, x0:x1] = True
    return mask


def outline_thickness(height: int, width: int) -> int:
    """Outline width in pixels: 1 px per 128 px of the shorter side, at least 2."""
    return max(2, round(min(height, width) / 128))


def parse_color(text: str, channels: int = 3) -> tuple[float, ...]:
    """``"#rrggbb"`` / ``"rrggbb"`` / ``"#rgb"`` -> ``channels`` floats in 0..1 (alpha, if any, 1).

    Raises:
        ValueError: not a hex colour.
    """
    value = text.strip().lstrip("#")
    if len(value) == 3:
        value = "".join(c * 2 for c in value)
    if len(value) != 6 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise ValueError(f"{text!r} is not a hex colour such as #000000 or #808080")
    rgb = tuple(int(value[i:i + 2], 16) / 255.0 for i in (0, 2, 4))
    return (rgb + (1.0,) * max(0, channels - 3))[:channels]


def _gaussian_1d(sigma: float, dtype: torch.dtype) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _smooth(chw: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[C, h, w]`` with replicate padding (size kept)."""
    k = _gaussian_1d(sigma, chw.dtype)
    r = k.numel() // 2
    c = chw.shape[0]
    x = chw[None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def _blur_region(region: torch.Tensor) -> torch.Tensor:
    """``[h, w, C]`` -> strongly blurred ``[h, w, C]``."""
    h, w, _ = region.shape
    chw = region.permute(2, 0, 1)
    cells = 8
    small = F.interpolate(chw[None], size=(max(1, min(h, cells * h // max(1, min(h, w)))),
                                           max(1, min(w, cells * w // max(1, min(h, w))))),
                          mode="area")[0]
    small = _smooth(small, sigma=1.0)
    big = F.interpolate(small[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return big.permute(1, 2, 0)


def _pixelate_region(region: torch.Tensor) -> torch.Tensor:
    """``[h, w, C]`` -> mosaic of about 8 blocks across the longer side."""
    h, w, _ = region.shape
    block = max(2, round(max(h, w) / 8))
    chw = region.permute(2, 0, 1)[None]
    small = F.interpolate(chw, size=(max(1, -(-h // block)), max(1, -(-w // block))), mode="area")
    big = F.interpolate(small, size=(h, w), mode="nearest")[0]
    return big.permute(1, 2, 0)


def censor(image: torch.Tensor, boxes: Iterable[Sequence[int]], mode: str,
           color: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """A copy of ``image`` ``[H, W, C]`` with every box censored by ``mode``.

    Args:
        image: ``[H, W, C]`` floating image in 0..1.
        boxes: ``(x, y, w, h)`` boxes in pixels; parts outside the image are ignored.
        mode: one of :data:`CENSOR_MODES` (``none`` returns an unchanged copy).
        color: ``C`` values for ``fill`` (``boxes`` draws :data:`OUTLINE_RGB`).

    Raises:
        ValueError: unknown mode, non-``[H, W, C]`` image, or a colour of the wrong length.
    """
    if mode not in CENSOR_MODES:
        raise ValueError(f"unknown censor mode {mode!r}; choose one of {CENSOR_MODES}")
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W, C], got shape {list(image.shape)}")
    out = image.clone()
    if mode == "none":
        return out
    height, width, channels = out.shape
    if mode == "fill":
        if len(color) != channels:
            raise ValueError(f"fill colour has {len(color)} values for a {channels}-channel image")
        fill_value = torch.tensor(list(color), dtype=out.dtype, device=out.device)
    else:
        fill_value = None
    thickness = outline_thickness(height, width)
    edge = torch.tensor((list(OUTLINE_RGB) + [1.0] * channels)[:channels], dtype=out.dtype, device=out.device)
    for box in boxes:
        region = clip_box(box, height, width)
        if region is None:
            continue
        x0, y0, x1, y1 = region
        if mode == "fill":
            out[y0:y1, x0:x1] = fill_value
        elif mode == "blur":
            out[y0:y1, x0:x1] = _blur_region(out[y0:y1, x0:x1].float()).to(out.dtype)
        elif mode == "pixelate":
            out[y0:y1, x0:x1] = _pixelate_region(out[y0:y1, x0:x1].float()).to(out.dtype)
        else:  # boxes
            t = min(thickness, (y1 - y0 + 1) // 2, (x1 - x0 + 1) // 2)
            out[y0:y0 + t, x0:x1] = edge
            out[y1 - t:y1, x0:x1] = edge
            out[y0:y1, x0:x0 + t] = edge
            out[y0:y1, x1 - t:x1] = edge
    return out
