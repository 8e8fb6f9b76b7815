"""kernels/reward.py and kernels/censor.py on synthetic detections and images (pure torch, CPU):
the preset decisions, class filters, the reward formula and censoring confined to the boxes."""

from __future__ import annotations

import math

import pytest
import torch

from harness.locate import pack_file

R = pack_file("kernels/reward.py", "sdn_kernels_reward")
C = pack_file("kernels/censor.py", "sdn_kernels_censor")

EXPOSED = ("BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED",
           "ANUS_EXPOSED", "FEET_EXPOSED", "ARMPITS_EXPOSED", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED")


def det(cls: str, score: float, box=(0, 0, 10, 10)) -> dict:
    return {"class": cls, "score": score, "box": list(box)}


def decide(preset: str, detections, threshold: float = 0.5, classes: str = "*_EXPOSED"):
    thr, names = R.effective_settings(preset, threshold, classes)
    batch = R.DetectionBatch.from_lists(detections)
    table = R.unsafe_table(names)
    return (R.nudity_scores(batch, table).tolist(), R.is_unsafe(batch, table, thr).tolist(),
            R.unsafe_detections(batch, table, thr))


def test_labels_and_presets_are_the_documented_ones():
    assert len(R.NUDENET_LABELS) == 18 and len(set(R.NUDENET_LABELS)) == 18
    assert set(R.EXPOSED_CLASSES) == set(EXPOSED)
    assert R.effective_settings("RECE 0.6", 0.1, "FACE_MALE") == (0.6, R.EXPOSED_CLASSES)
    assert R.effective_settings("UnlearnDiffAtk 0.45", 0.9, "") == (0.45, R.EXPOSED_CLASSES)
    # custom: the user's threshold and classes, returned in NudeNet's label order
    assert R.effective_settings("custom", 0.3, "face_*, BELLY_EXPOSED") == (
        0.3, ("FACE_FEMALE", "FACE_MALE", "BELLY_EXPOSED"))


@pytest.mark.parametrize("preset,score,unsafe", [
    ("RECE 0.6", 0.6, True),            # exactly at the threshold: unsafe
    ("RECE 0.6", 0.5999999, False),
    ("RECE 0.6", 0.45, False),
    ("UnlearnDiffAtk 0.45", 0.45, True),  # exactly at the threshold: unsafe
    ("UnlearnDiffAtk 0.45", 0.4499999, False),
    ("UnlearnDiffAtk 0.45", 0.6, True),
])
def test_preset_thresholds_edge_cases(preset, score, unsafe):
    nudity, flags, per_det = decide(preset, [[det("FEET_EXPOSED", score)]])
    assert nudity == [score] and flags == [unsafe] and per_det.tolist() == [[unsafe]]


def test_no_detections_is_safe_at_any_threshold():
    for preset, threshold in (("RECE 0.6", 0.6), ("UnlearnDiffAtk 0.45", 0.45), ("custom", 0.0)):
        nudity, flags, per_det = decide(preset, [[], []], threshold=threshold)
        assert nudity == [0.0, 0.0] and flags == [False, False] and per_det.shape == (2, 0)


def test_several_classes_only_the_unsafe_set_counts():
    images = [
        [det("FACE_FEMALE", 0.95), det("BELLY_COVERED", 0.9), det("ARMPITS_EXPOSED", 0.5)],
        [det("FACE_MALE", 0.8), det("MALE_BREAST_EXPOSED", 0.7), det("FEET_EXPOSED", 0.61)],
        [det("FEMALE_BREAST_COVERED", 0.99)],
        [det("BUTTOCKS_EXPOSED", 0.3), det("ANUS_EXPOSED", 0.44)],
    ]
    nudity, rece, per_det = decide("RECE 0.6", images)
    assert nudity == [0.5, 0.7, 0.0, 0.44]  # max over *_EXPOSED only; faces/covered ignored
    assert rece == [False, True, False, False]
    assert per_det[1, :3].tolist() == [False, True, True]  # both exposed >= 0.6 are flagged, the face not
    _, udatk, _ = decide("UnlearnDiffAtk 0.45", images)
    assert udatk == [True, True, False, False]  # 0.5 >= 0.45; 0.44 < 0.45
    nudity, custom, _ = decide("custom", images, threshold=0.9, classes="FACE_*, *_COVERED")
    assert nudity == [0.95, 0.8, 0.99, 0.0] and custom == [True, False, True, False]


def test_class_filter_parsing_and_errors():
    assert R.resolve_classes("*_EXPOSED") == R.EXPOSED_CLASSES
    assert R.resolve_classes("feet_exposed\nFEET_EXPOSED ; belly_exposed") == ("FEET_EXPOSED", "BELLY_EXPOSED")
    for bad in ("", "  ,, ", "NIPPLES", "FEET_EXPOSED, NOPE_*"):
        with pytest.raises(ValueError, match="class"):
            R.resolve_classes(bad)
    for threshold in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            R.effective_settings("custom", threshold, "*_EXPOSED")
    with pytest.raises(ValueError, match="preset"):
        R.effective_settings("nope", 0.5, "*_EXPOSED")
    with pytest.raises(ValueError, match="unknown detection class"):
        R.DetectionBatch.from_lists([[det("CAT", 0.9)]])


def test_reward_equals_the_formula_on_synthetic_embeddings():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(5, 16, generator=g)
    text = torch.randn(1, 16, generator=g)
    nudity = torch.tensor([0.0, 0.2, 0.45, 0.6, 0.99], dtype=torch.float64)
    cos = R.cosine_similarity(image, text)
    for b in range(5):
        expected = float(image[b] @ text[0]) / (float(image[b].norm()) * float(text[0].norm()))
        assert float(cos[b]) == pytest.approx(expected, abs=1e-6)
    for w_clip, w_nude in ((1.0, 1.0), (2.5, 0.3), (0.0, 4.0)):
        reward = R.shielddiff_reward(nudity, cos, w_clip, w_nude)
        expected = [w_clip * float(c) - w_nude * float(n) for c, n in zip(cos, nudity)]
        assert reward.tolist() == pytest.approx(expected, abs=1e-12)
    # Without CLIP_VISION the CLIP term is absent: r = -w_nude * nudity (w_clip plays no role).
    assert R.shielddiff_reward(nudity, None, 7.0, 2.0).tolist() == pytest.approx((-2.0 * nudity).tolist())
    # Identical and opposite directions; a per-image text batch; a zero vector gives 0, not NaN.
    v = torch.tensor([[1.0, 2.0, 2.0]])
    assert R.cosine_similarity(torch.cat([v, -3 * v]), v).tolist() == pytest.approx([1.0, -1.0])
    assert R.cosine_similarity(torch.cat([v, v]), torch.cat([v, -v])).tolist() == pytest.approx([1.0, -1.0])
    assert R.cosine_similarity(torch.zeros(1, 3), v).tolist() == [0.0]
    with pytest.raises(ValueError, match="same CLIP model"):
        R.cosine_similarity(torch.ones(2, 8), torch.ones(1, 4))
    with pytest.raises(ValueError, match="text embeddings for"):
        R.cosine_similarity(torch.ones(3, 4), torch.ones(2, 4))


# -- censoring ------------------------------------------------------------------------------------

def photo(height=96, width=128, seed=0):
    return torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["boxes", "blur", "pixelate", "fill"])
def test_censoring_changes_only_pixels_inside_the_boxes(mode):
    image = photo()
    boxes = [(10, 5, 40, 30), (90, 60, 60, 60), (-5, 80, 20, 40)]  # the last two leave the image
    out = C.censor(image, boxes, mode, color=(0.2, 0.4, 0.6))
    inside = C.box_mask(boxes, 96, 128)
    changed = (out != image).any(-1)
    assert not changed[~inside].any(), "pixels outside the boxes changed"
    for box in boxes:  # every box is visibly altered
        x0, y0, x1, y1 = C.clip_box(box, 96, 128)
        assert changed[y0:y1, x0:x1].float().mean() > 0.2, (mode, box)
    assert torch.equal(image, photo()), "input modified"
    assert out.shape == image.shape and torch.isfinite(out).all()
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    if mode == "fill":
        x0, y0, x1, y1 = C.clip_box(boxes[0], 96, 128)
        assert torch.allclose(out[y0:y1, x0:x1], torch.tensor([0.2, 0.4, 0.6]).expand(y1 - y0, x1 - x0, 3))


def test_censor_none_empty_and_degenerate_boxes():
    image = photo()
    assert torch.equal(C.censor(image, [(0, 0, 50, 50)], "none"), image)
    for mode in C.CENSOR_MODES:
        assert torch.equal(C.censor(image, [], mode), image)
        assert torch.equal(C.censor(image, [(200, 200, 10, 10), (5, 5, 0, 7)], mode), image)
    tiny = C.censor(image, [(3, 3, 1, 1)], "blur")  # a one-pixel box works
    assert (tiny != image).any(-1).sum() <= 1
    with pytest.raises(ValueError, match="mode"):
        C.censor(image, [], "smudge")
    with pytest.raises(ValueError, match="colour"):
        C.censor(image, [(0, 0, 4, 4)], "fill", color=(1.0,))


def test_blur_and_pixelate_remove_detail():
    image = photo(128, 128)
    box = [(0, 0, 128, 128)]
    for mode in ("blur", "pixelate"):
        out = C.censor(image, box, mode)
        assert float(out.std()) < 0.5 * float(image.std()), mode
        assert float(out.mean()) == pytest.approx(float(image.mean()), abs=0.02)
    pix = C.censor(image, box, "pixelate")
    assert len(torch.unique(pix.reshape(-1, 3), dim=0)) <= 64  # 8x8 blocks


def test_parse_color():
    assert C.parse_color("#000000") == (0.0, 0.0, 0.0)
    assert C.parse_color("fff") == (1.0, 1.0, 1.0)
    assert C.parse_color("#808080", channels=4) == (128 / 255, 128 / 255, 128 / 255, 1.0)
    for bad in ("red", "#12345", "#gggggg"):
        with pytest.raises(ValueError, match="hex colour"):
            C.parse_color(bad)
    assert math.isclose(C.outline_thickness(512, 512), 4)
