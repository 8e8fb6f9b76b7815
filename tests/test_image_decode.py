"""Image files of every mode Pillow opens decode to the picture a person sees (issue: 16-bit gray
was read almost white).  The expected pixels are written from each format's definition, not from
the decoder; the last tests go through Load Negation Set with a real (tiny) VAE."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

SIZE = 32
RAMP16 = np.tile(np.linspace(0, 65535, SIZE).round().astype(np.uint16), (SIZE, 1))  # left black -> right white
RAMP = RAMP16 / 65535.0


@pytest.fixture(scope="module")
def dec(comfy):
    return comfy.node_module("image_decode")


def gray3(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


def png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB (3 channels) or RGBA (4) PNG, written from the PNG specification
    (Pillow cannot write these)."""
    h, w, c = pixels.shape
    color_type = {3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_16_bit_gray_png_is_the_ramp_not_white(dec, tmp_path):
    path = tmp_path / "ramp16.png"
    Image.fromarray(RAMP16).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    out = dec.decode_image(str(path))
    np.testing.assert_allclose(out.pixels, gray3(RAMP), atol=1e-6)
    assert any("1/65535" in n for n in out.notes)


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
def test_integer_gray_tiff_uses_the_files_bit_depth(dec, tmp_path, dtype):
    """int32 (SampleFormat 2: full scale 2^31 - 1) and 16-bit TIFFs both read as the ramp."""
    path = tmp_path / "ramp.tif"
    full = 2 ** 31 - 1 if dtype == np.int32 else 65535
    Image.fromarray((RAMP * full).round().astype(dtype)).save(path)
    np.testing.assert_allclose(dec.decode_image(str(path)).pixels, gray3(RAMP), atol=1e-6)


def test_float_gray_in_0_1_is_used_and_out_of_range_is_refused(dec, tmp_path):
    good, bad = tmp_path / "unit.tif", tmp_path / "byte_scaled.tif"
    Image.fromarray(RAMP.astype(np.float32)).save(good)
    Image.fromarray((RAMP * 255).astype(np.float32)).save(bad)
    np.testing.assert_allclose(dec.decode_image(str(good)).pixels, gray3(RAMP), atol=1e-6)
    with pytest.raises(dec.ImageDecodeError, match=r"byte_scaled\.tif.*0\.\.255.*Scale it to 0\.\.1"):
        dec.decode_image(str(bad))


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_per_channel_rgb_and_rgba(dec, tmp_path, channels):
    rgb = np.stack([RAMP16, RAMP16[:, ::-1], RAMP16.T], -1)
    alpha = np.full((SIZE, SIZE, 1), 65535, np.uint16)
    alpha[: SIZE // 2] = 0  # top half fully transparent
    pixels = np.concatenate([rgb, alpha], -1) if channels == 4 else rgb
    png16(tmp_path / "rgb16.png", pixels)
    want = rgb / 65535.0
    if channels == 4:
        want[: SIZE // 2] = 1.0  # composited over white
    np.testing.assert_allclose(dec.decode_image(str(tmp_path / "rgb16.png")).pixels, want, atol=1 / 255 + 1e-6)


def test_gray_with_alpha_is_composited_over_white(dec, tmp_path):
    gray = (RAMP * 255).round().astype(np.uint8)
    alpha = np.tile(np.linspace(0, 255, SIZE).round().astype(np.uint8)[:, None], (1, SIZE))  # transparent on top
    Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]).save(tmp_path / "la.png")
    a = alpha / 255.0
    want = gray / 255.0 * a + (1 - a)
    out = dec.decode_image(str(tmp_path / "la.png"))
    np.testing.assert_allclose(out.pixels, gray3(want), atol=1e-6)
    assert any("over white" in n for n in out.notes)


def test_palette_with_a_transparent_index(dec, tmp_path):
    index = np.zeros((SIZE, SIZE), np.uint8)
    index[:, SIZE // 2:] = 1
    im = Image.fromarray(index, "P")
    im.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)  # index 0 is black in the palette but transparent
    im.save(tmp_path / "p.png", transparency=0)
    out = dec.decode_image(str(tmp_path / "p.png")).pixels
    np.testing.assert_allclose(out[:, : SIZE // 2], 1.0)
    np.testing.assert_allclose(out[:, SIZE // 2:], np.broadcast_to(np.array([200, 30, 40]) / 255.0, (SIZE, SIZE // 2, 3)),
                               atol=1e-6)


def test_one_bit(dec, tmp_path):
    bits = (np.indices((SIZE, SIZE)).sum(0) % 2).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bits.png")
    np.testing.assert_array_equal(dec.decode_image(str(tmp_path / "bits.png")).pixels, gray3(bits.astype(np.float32)))


def test_cmyk_and_ycbcr_jpeg_look_like_the_rgb_they_came_from(dec, tmp_path):
    rgb = np.stack([(RAMP * 255), (RAMP[:, ::-1] * 200), np.full_like(RAMP, 90)], -1).round().astype(np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("YCbCr").save(tmp_path / "ycbcr.jpg", quality=95)
    for name in ("cmyk.jpg", "ycbcr.jpg"):
        out = dec.decode_image(str(tmp_path / name)).pixels
        assert np.abs(out - rgb / 255.0).mean() < 0.02, name


def test_icc_profile_is_applied_and_a_broken_one_is_reported(dec, tmp_path):
    """An sRGB-tagged file goes through LittleCMS unchanged; a damaged profile is said in the
    notes and the pixels are read without it."""
    rgb = np.stack([(RAMP * 255)] * 3, -1).round().astype(np.uint8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(rgb).save(tmp_path / "tagged.png", icc_profile=srgb)
    Image.fromarray(rgb).save(tmp_path / "broken.png", icc_profile=b"not a profile")
    out = dec.decode_image(str(tmp_path / "tagged.png"))
    assert any("ICC profile (RGB) converted to sRGB" in n for n in out.notes)
    np.testing.assert_allclose(out.pixels, rgb / 255.0, atol=2 / 255)
    broken = dec.decode_image(str(tmp_path / "broken.png"))
    assert any("ICC profile unreadable" in n for n in broken.notes)
    np.testing.assert_allclose(broken.pixels, rgb / 255.0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["gif", "webp", "tiff"])
def test_animations_and_multi_page_files_use_the_first_frame(dec, tmp_path, fmt):
    frames = [Image.new("RGB", (SIZE, SIZE), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / f"anim.{fmt}"
    frames[0].save(path, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "webp" else {}))
    out = dec.decode_image(str(path))
    np.testing.assert_allclose(out.pixels.reshape(-1, 3).mean(0), [1.0, 0.0, 0.0], atol=0.01)
    assert "first of 3 frames used" in out.notes


def test_exif_orientation(dec, tmp_path):
    im = Image.new("RGB", (40, 20), "white")
    im.paste((0, 0, 0), (0, 0, 10, 20))  # black stripe on the left
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = dec.decode_image(str(tmp_path / "rotated.jpg"))
    assert out.pixels.shape == (40, 20, 3)
    assert out.pixels[:8].mean() < 0.1 and out.pixels[12:].mean() > 0.9  # the stripe is now on top
    assert any("orientation 6" in n for n in out.notes)


def test_unreadable_and_unfaithful_files_are_told_apart(dec, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(dec.UnreadableImageError, match="junk.png"):
        dec.decode_image(str(tmp_path / "junk.png"))
    Image.fromarray(np.full((4, 4), -5, np.int32)).save(tmp_path / "negative.tif")
    with pytest.raises(dec.ImageDecodeError, match=r"negative\.tif.*no black point") as err:
        dec.decode_image(str(tmp_path / "negative.tif"))
    assert not isinstance(err.value, dec.UnreadableImageError)


# ------------------------------------------------------------------------------ through the node


def test_negation_folder_encodes_16_bit_gray_like_its_8_bit_twin(comfy, tmp_path):
    """The issue's case: a 16-bit gradient in a negation folder must encode like the same picture
    at 8 bits (before: 98% of pixels clipped to white, latents off by up to 0.63-0.86)."""
    from harness import tiny_models

    negation = comfy.node_module("negation_set")
    vae = tiny_models.build_vae(0)
    ramp8 = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (64, 1))
    sets = {}  # 16-bit value v * 257 is exactly the 8-bit value v: the same picture, so the same latents
    for label, array in (("16", ramp8.astype(np.uint16) * 257), ("8", ramp8)):
        folder = tmp_path / f"set{label}"
        folder.mkdir()
        Image.fromarray(array).save(folder / "ramp.png")
        sets[label] = negation.load_image_folder(str(folder), vae, 64, 0, "test", f"set{label}")
    gap = float((sets["16"].latents - sets["8"].latents).abs().max())
    spread = float(sets["8"].latents.abs().max())
    assert gap <= 1e-4 * spread, (gap, spread)
    assert "16-bit" not in sets["8"].describe() and "1/65535" in sets["16"].describe()


def test_negation_folder_refuses_an_unfaithful_file_by_name(comfy, tmp_path):
    from harness import tiny_models

    negation = comfy.node_module("negation_set")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    Image.fromarray(np.full((8, 8), 300.0, np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(Exception, match=r"Load Negation Set.*hdr\.tif.*0\.\.1") as err:
        negation.load_image_folder(str(tmp_path), tiny_models.build_vae(0), 64, 0, "Load Negation Set", "mixed")
    assert type(err.value).__name__ == "NodeInputError"
