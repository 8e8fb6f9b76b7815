"""The digits bundle: weights, data and classifier of the embedded demo model (numpy only).

One ``.safetensors`` file, written by ``python -m demo.train_digits``, holds everything the demo
needs; its SHA-256 is recorded next to it (``digits_ldm.safetensors.sha256``) and checked before
use:

* ``unet.*``: a small SD1.5-family UNet (EPS) state dict; its config in the metadata
  (``unet_config``);
* ``vae.*``: a small AutoencoderKL state dict (ComfyUI's VAE config format in ``vae_config``);
* ``cond.embeddings`` ``[11, T, C]``: the cross-attention context of each class ``0..9`` and, at
  index 10, the null ("any digit") context used for classifier-free guidance;
* ``classifier.*``: a two-layer perceptron on 8x8 grey levels that measures generated digits;
* ``data.images`` ``[1797, 8, 8]`` uint8 (grey levels 0..16) and ``data.labels``: scikit-learn's
  bundled copy of the UCI *Optical Recognition of Handwritten Digits* test set (CC BY 4.0; Alpaydin
  and Kaynak), the model's training data; the negation sets are written from it.

Images are white digits on black, the 8x8 grey levels bilinearly upsampled (``align_corners=False``)
to ``RESOLUTION`` px and repeated over RGB. Nothing here imports torch or ComfyUI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from safetensors import safe_open

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent
BUNDLE_NAME = "digits_ldm.safetensors"
BUNDLE_PATH = DEMO_DIR / BUNDLE_NAME
HASH_PATH = DEMO_DIR / (BUNDLE_NAME + ".sha256")
FORMAT = "sdn_digits_ldm"
FORMAT_VERSION = "1"

RESOLUTION = 64
"""Image side in px (the VAE maps it to an 8x8x4 latent: one latent pixel per digit pixel)."""
SOURCE_SIDE = 8
GREY_LEVELS = 16
CLASSES = 10
NULL_CLASS = CLASSES
"""Index of the null context in ``cond.embeddings`` ("any digit", the unconditional branch)."""
PROMPTS = ("any",) + tuple(str(d) for d in range(CLASSES))
DEFAULT_NEGATED = 7
SET_PREFIX = "digits_"
"""Negation-set folders are named ``digits_<d>`` (``digits_7`` by default)."""


class BundleError(RuntimeError):
    """The bundle is missing, altered (hash mismatch) or not a digits bundle."""


# ------------------------------------------------------------------------------ images


def upsample_matrix(n_in: int = SOURCE_SIDE, n_out: int = RESOLUTION) -> np.ndarray:
    """``[n_out, n_in]`` 1-D bilinear interpolation weights, ``align_corners=False`` (as torch's
    ``F.interpolate(mode="bilinear")``): ``out = U @ img @ U.T``."""
    scale = n_in / n_out
    src = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0.0, None)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    mat[np.arange(n_out), lo] += 1.0 - frac
    mat[np.arange(n_out), hi] += frac
    return mat


def upsample(images8: np.ndarray, resolution: int = RESOLUTION) -> np.ndarray:
    """``[N, 8, 8]`` grey levels (0..16) -> ``[N, res, res, 3]`` float32 RGB in 0..1."""
    grey = np.asarray(images8, dtype=np.float64) / GREY_LEVELS
    mat = upsample_matrix(grey.shape[-1], resolution)
    big = np.einsum("ij,njk,lk->nil", mat, grey, mat)
    return np.repeat(np.clip(big, 0.0, 1.0)[..., None], 3, axis=-1).astype(np.float32)


def to_grey8(images: np.ndarray) -> np.ndarray:
    """IMAGE-like ``[N, H, W, C]`` (0..1, H and W multiples of 8) -> ``[N, 64]`` grey levels in
    0..1: the mean over channels, averaged over each of the 8x8 blocks (the classifier's input)."""
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[1] % SOURCE_SIDE or arr.shape[2] % SOURCE_SIDE:
        raise ValueError(f"expected [N, H, W, C] images with H, W multiples of 8, got {arr.shape}")
    n, h, w, _ = arr.shape
    grey = arr.mean(axis=-1)
    blocks = grey.reshape(n, SOURCE_SIDE, h // SOURCE_SIDE, SOURCE_SIDE, w // SOURCE_SIDE)
    return blocks.mean(axis=(2, 4)).reshape(n, SOURCE_SIDE * SOURCE_SIDE)


def to_png_array(image: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` float 0..1 -> uint8 (rounded)."""
    return np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ the bundle


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_hash(hash_path: Path = HASH_PATH) -> str:
    """The SHA-256 recorded next to the bundle (``<hex>  digits_ldm.safetensors``)."""
    try:
        text = hash_path.read_text(encoding="utf-8").split()
    except OSError as err:
        raise BundleError(f"the hash file {hash_path} is missing ({err}); re-clone the pack") from err
    if not text or len(text[0]) != 64:
        raise BundleError(f"the hash file {hash_path} holds no SHA-256; re-clone the pack")
    return text[0].lower()


def write_hash(path: Path, hash_path: Optional[Path] = None) -> str:
    """Record ``path``'s SHA-256 next to it; returns the digest."""
    digest = sha256_file(path)
    target = hash_path or path.with_name(path.name + ".sha256")
    target.write_text(f"{digest}  {path.name}\n", encoding="utf-8")
    return digest


_VERIFIED: dict[tuple, str] = {}
_VERIFIED_LOCK = threading.Lock()


def verify_bundle(path: Path = BUNDLE_PATH, hash_path: Path = HASH_PATH) -> Path:
    """``path`` if its SHA-256 equals the recorded one (memoised on size and mtime), else raise."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise BundleError(f"the demo model {path} is missing ({err}); re-clone the pack or run "
                          "`python -m demo.train_digits` to rebuild it") from err
    key = (str(path), st.st_size, st.st_mtime_ns, str(hash_path))
    with _VERIFIED_LOCK:
        if key in _VERIFIED:
            return path
    expected = recorded_hash(hash_path)
    actual = sha256_file(path)
    if actual != expected:
        raise BundleError(f"the demo model {path} has SHA-256 {actual[:16]}..., the recorded one is "
                          f"{expected[:16]}... ({hash_path.name}): the file is damaged or was replaced. "
                          "Re-clone the pack, or rebuild both with `python -m demo.train_digits`.")
    with _VERIFIED_LOCK:
        _VERIFIED[key] = expected
    return path


def read_metadata(path: Path = BUNDLE_PATH) -> dict[str, Any]:
    """The bundle's metadata with the JSON fields (``*_config``, ``training``) decoded."""
    with safe_open(str(path), framework="np") as fh:
        raw = dict(fh.metadata() or {})
    if raw.get("format") != FORMAT:
        raise BundleError(f"{path} is not a digits demo bundle (format {raw.get('format')!r})")
    meta: dict[str, Any] = dict(raw)
    for key, value in raw.items():
        if key.endswith("_config") or key in ("training", "results"):
            meta[key] = json.loads(value)
    return meta


def read_tensors(prefix: str, path: Path = BUNDLE_PATH) -> dict[str, np.ndarray]:
    """Every tensor whose key starts with ``prefix`` (prefix removed), as numpy arrays."""
    out: dict[str, np.ndarray] = {}
    with safe_open(str(path), framework="np") as fh:
        for key in fh.keys():
            if key.startswith(prefix):
                out[key[len(prefix):]] = fh.get_tensor(key)
    if not out:
        raise BundleError(f"{path} has no tensors named {prefix}*")
    return out


@dataclass(frozen=True)
class DigitsData:
    """The training digits: ``images`` ``[N, 8, 8]`` uint8 grey levels 0..16, ``labels`` ``[N]``."""

    images: np.ndarray
    labels: np.ndarray

    def of_class(self, digit: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, images)`` of one digit, in data-set order."""
        idx = np.flatnonzero(self.labels == digit)
        return idx, self.images[idx]


def load_data(path: Path = BUNDLE_PATH) -> DigitsData:
    arrays = read_tensors("data.", path)
    return DigitsData(images=arrays["images"].astype(np.uint8), labels=arrays["labels"].astype(np.int64))


# ------------------------------------------------------------------------------ classifier


@dataclass(frozen=True)
class DigitClassifier:
    """A two-layer perceptron on :func:`to_grey8` features (weights from the bundle)."""

    w1: np.ndarray  # [64, H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H, 10]
    b2: np.ndarray  # [10]

    @classmethod
    def load(cls, path: Path = BUNDLE_PATH) -> "DigitClassifier":
        t = read_tensors("classifier.", path)
        return cls(*(t[k].astype(np.float32) for k in ("w1", "b1", "w2", "b2")))

    def logits(self, grey8: np.ndarray) -> np.ndarray:
        hidden = np.maximum(np.asarray(grey8, dtype=np.float32) @ self.w1 + self.b1, 0.0)
        return hidden @ self.w2 + self.b2

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """``[N, 10]`` class probabilities of ``[N, H, W, C]`` images in 0..1."""
        z = self.logits(to_grey8(images)).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class NearestTraining:
    """Realism check: the L2 distance from a generated image to the nearest training digit, in
    :func:`to_grey8` features (64 grey levels in 0..1). The classifier alone cannot tell a digit
    from a blob (a perceptron is confident on both); this distance can. Measured on the shipped
    bundle: the plain model's samples are at about 1.0, broken ones (saturated blobs) at 2.5 and more."""

    features: np.ndarray  # [N, 64] float64

    @classmethod
    def load(cls, path: Path = BUNDLE_PATH) -> "NearestTraining":
        return cls(to_grey8(upsample(load_data(path).images)).astype(np.float64))

    def distances(self, images: np.ndarray) -> np.ndarray:
        """``[N]`` distances of ``[N, H, W, C]`` images in 0..1 (one GEMM, no N x 1797 x 64 tensor)."""
        g = to_grey8(images).astype(np.float64)
        d2 = (g * g).sum(1)[:, None] + (self.features * self.features).sum(1)[None] - 2.0 * g @ self.features.T
        return np.sqrt(np.clip(d2.min(axis=1), 0.0, None))


# ------------------------------------------------------------------------------ negation sets


def set_name(digit: int = DEFAULT_NEGATED) -> str:
    return f"{SET_PREFIX}{int(digit)}"
