"""Image files -> the RGB picture a person sees, for every place the pack reads image files.

Pillow opens many pixel layouts ("modes"); :func:`decode_image` handles each explicitly (why not a
plain ``convert("RGB")``: docs/design-history.md):

* 8-bit layouts (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``): Pillow's
  conversion; an embedded ICC profile is converted to sRGB with LittleCMS (``PIL.ImageCms``).
* alpha (``RGBA``, ``LA``, ``PA``, palette or gray/RGB with a transparency key): composited over
  white, as a viewer on a white page shows it.
* 16-bit gray (``I;16*``) and 32-bit integer gray (``I``): scaled by the file's bit depth.
* float gray (``F``): used as is when it lies in ``0..1``; otherwise refused (no white point).
* 16-bit-per-channel RGB(A): Pillow reads it at 8 bits per channel (full range, 1/255 precision).
* animations and multi-page files: the first frame, said in the notes.
* EXIF orientation applied.

Anything else raises :class:`ImageDecodeError` naming the file and the fix.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

DECODE_VERSION = 2
"""Bumped whenever the pixels produced for some file change (caches key on it)."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")

_EIGHT_BIT = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_GRAY16 = ("I;16", "I;16L", "I;16B", "I;16N")
_FLOAT_TOLERANCE = 1e-3
_SRGB = ImageCms.createProfile("sRGB")


class ImageDecodeError(ValueError):
    """The file cannot be decoded faithfully; the message names it and says what to do."""


class UnreadableImageError(ImageDecodeError):
    """The file is not an image, or is truncated or damaged."""


@dataclass(frozen=True)
class DecodedImage:
    """``pixels``: ``[H, W, 3]`` float32 sRGB in ``0..1``; ``notes``: what decoding did beyond a
    plain read (first frame of an animation, EXIF rotation, alpha, ICC, bit depth)."""

    pixels: np.ndarray
    notes: tuple[str, ...]


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray.astype(np.float32)[..., None], 3, axis=2)


def _integer_bits(im: Image.Image) -> int | None:
    """Magnitude bits of an integer gray file's samples when the file says so: TIFF tags 258
    (BitsPerSample) and 339 (SampleFormat, 2 = signed: one bit fewer); 16 for PNG."""
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits, signed = tags[258], tags.get(339, 1)
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        signed = int(signed[0] if isinstance(signed, tuple) else signed) == 2
        return bits - 1 if signed else bits
    if im.format == "PNG":
        return 16
    return None


def _integer_gray(im: Image.Image, bits: int | None, name: str, notes: list[str]) -> np.ndarray:
    arr = np.asarray(im)
    if im.mode in _GRAY16:
        notes.append("16-bit gray scaled by 1/65535")
        return _gray_to_rgb(arr / 65535.0)
    low, high = int(arr.min()), int(arr.max())
    if low < 0:
        raise ImageDecodeError(f"'{name}' is a signed 32-bit gray image with negative values ({low}..{high}): "
                               "there is no black point. Save it as an 8- or 16-bit grayscale PNG.")
    assumed = bits is None
    if assumed:
        if high > 65535:
            raise ImageDecodeError(f"'{name}' is a 32-bit gray image ({low}..{high}) whose bit depth the file does "
                                   "not state. Save it as an 8- or 16-bit grayscale PNG.")
        bits = 16
    scale = float(2 ** bits - 1)
    if high > scale:
        raise ImageDecodeError(f"'{name}' declares {bits}-bit samples but holds values up to {high}. "
                               "Save it as an 8- or 16-bit grayscale PNG.")
    notes.append(f"integer gray scaled by 1/{int(scale)}" + (" (16-bit assumed)" if assumed else ""))
    return _gray_to_rgb(arr / scale)


def _float_gray(im: Image.Image, name: str, notes: list[str]) -> np.ndarray:
    arr = np.asarray(im, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ImageDecodeError(f"'{name}' is a float image with NaN or infinite pixels. Save it as an 8- or 16-bit "
                               "PNG.")
    low, high = float(arr.min()), float(arr.max())
    if low < -_FLOAT_TOLERANCE or high > 1.0 + _FLOAT_TOLERANCE:
        raise ImageDecodeError(f"'{name}' is a float image with values in {low:g}..{high:g}, not 0..1, so which "
                               "value is white is unknown. Scale it to 0..1 or save it as an 8- or 16-bit PNG.")
    notes.append("float gray used as 0..1")
    return _gray_to_rgb(np.clip(arr, 0.0, 1.0))


def _to_srgb(im: Image.Image, name: str, notes: list[str]) -> Image.Image:
    """``RGB`` (or ``RGBA``) in sRGB; an embedded ICC profile is honoured."""
    alpha = im.getchannel("A") if im.mode == "RGBA" else None
    icc = im.info.get("icc_profile")
    base = im.convert("RGB") if im.mode in ("RGBA", "P") else im
    if icc and base.mode in ("RGB", "CMYK", "L"):
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(base, source, _SRGB, outputMode="RGB")
            notes.append(f"ICC profile ({base.mode}) converted to sRGB")
            base = converted
        except (ImageCms.PyCMSError, OSError, ValueError) as err:
            notes.append(f"ICC profile unreadable ({err}); colours read without it")
            log.warning("%s: embedded ICC profile not usable (%s); decoded without colour management", name, err)
    rgb = base.convert("RGB")
    if alpha is not None:
        rgb.putalpha(alpha)
    return rgb


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _WITH_ALPHA or (im.mode in ("P", "L", "RGB") and "transparency" in im.info)


def _eight_bit(im: Image.Image, name: str, notes: list[str]) -> np.ndarray:
    if _has_alpha(im):
        rgba = _to_srgb(im.convert("RGBA") if im.mode != "RGBA" else im, name, notes)
        arr = np.asarray(rgba, dtype=np.float32) / 255.0
        alpha = arr[..., 3:4]
        if (alpha < 1.0).any():
            notes.append("transparent pixels composited over white")
        return arr[..., :3] * alpha + (1.0 - alpha)
    if im.mode == "1":
        im = im.convert("L")
    return np.asarray(_to_srgb(im, name, notes), dtype=np.float32) / 255.0


def decode_image(path: str) -> DecodedImage:
    """Decode an image file as a person sees it.

    Args:
        path: an image file Pillow can open (PNG, JPEG, WebP, GIF, BMP, TIFF, ...).

    Returns:
        :class:`DecodedImage` with ``[H, W, 3]`` float32 pixels in ``0..1``.

    Raises:
        UnreadableImageError: the file is not an image, or is damaged.
        ImageDecodeError: its pixel layout cannot be decoded faithfully (the message names the
            file and the fix).
    """
    name = os.path.basename(path)
    notes: list[str] = []
    try:
        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1))
            if frames > 1:
                im.seek(0)
                notes.append(f"first of {frames} frames used")
            im.load()
            bits = _integer_bits(im)  # before exif_transpose, which drops the file's tags
            orientation = im.getexif().get(0x0112, 1)
            im = ImageOps.exif_transpose(im)
            if orientation not in (None, 1):
                notes.append(f"EXIF orientation {orientation} applied")
            if im.mode in _GRAY16 or im.mode == "I":
                pixels = _integer_gray(im, bits, name, notes)
            elif im.mode == "F":
                pixels = _float_gray(im, name, notes)
            elif im.mode in _EIGHT_BIT or im.mode in _WITH_ALPHA:
                pixels = _eight_bit(im, name, notes)
            else:
                raise ImageDecodeError(f"'{name}' has the pixel layout '{im.mode}', which the pack cannot decode "
                                       "faithfully. Save it as an 8-bit RGB PNG or JPEG.")
    except (UnidentifiedImageError, SyntaxError) as err:
        raise UnreadableImageError(f"'{name}' is not an image Pillow can read ({err}). Replace it with a PNG, JPEG or "
                               "WebP file.") from err
    except OSError as err:
        raise UnreadableImageError(f"'{name}' could not be read ({err}): the file is truncated or damaged. Re-export "
                               "it.") from err
    return DecodedImage(np.ascontiguousarray(pixels, dtype=np.float32), tuple(notes))
