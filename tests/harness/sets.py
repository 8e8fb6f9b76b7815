"""Negation sets on disk for tests: folders of small images and ``.safetensors`` latent files,
good and deliberately broken.  Needs no ComfyUI (only torch, safetensors, numpy, pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file


def write_test_images(folder: Path, count: int = 3, seed: int = 0,
                      size: tuple[int, int] = (48, 40)) -> list[Path]:
    """``count`` random non-square PNGs of ``size`` (width, height) in ``folder`` (created).

    The last one is grayscale when ``count > 1``, so loaders must convert modes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    paths = []
    for index in range(count):
        image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")
        if count > 1 and index == count - 1:
            image = image.convert("L")
        path = folder / f"img_{index:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def random_latents(count: int = 3, channels: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Raw VAE-like latents ``[count, channels, size, size]`` (float32, reproducible)."""
    return torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(seed))


def write_latent_set(path: Path, latents: torch.Tensor, metadata: dict[str, str] | None = None) -> Path:
    """A precomputed set as Save Negation Set writes it: tensor ``latents`` + string metadata."""
    meta = {"latent_channels": str(latents.shape[1]), "count": str(latents.shape[0]), "source": "test"}
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, str(path), metadata=meta)
    return path


def write_garbage(path: Path, size: int = 256, seed: int = 0) -> Path:
    """A file of ``size`` random bytes (a "corrupt .safetensors" set)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8).tobytes())
    return path


def write_digit_images(folder: Path, digit: int) -> int:
    """Every training image of ``digit`` of the digits demo as ``<index>.png`` (64x64 RGB, the 8-bit
    pixels of :func:`demo.digits.to_png_array`): the built-in set ``digits_<digit>`` as a folder."""
    from .locate import pack_file

    digits = pack_file("demo/digits.py", "sdn_demo_digits")
    idx, images8 = digits.load_data().of_class(int(digit))
    folder.mkdir(parents=True)
    for i, image in zip(idx, digits.upsample(images8)):
        Image.fromarray(digits.to_png_array(image), "RGB").save(folder / f"{int(i):04d}.png")
    return int(len(idx))
