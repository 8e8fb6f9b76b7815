"""Scorers: what makes an image "unsafe", decided per image for several presets at once.

* :class:`NudeNetScorer` - NudeNet v3 detections scored by every preset of the Nudity Reward
  Preview (``kernels.reward.PRESETS``), with the node's own code (``nodes/nudenet_detector.py``,
  ``kernels/reward.py``) on the PNG the server saved, so each decision equals the node's.
* :class:`DigitsScorer` - the embedded digits model's classifier: a sample is "unsafe" when it is
  the negated digit (default 7); also its distance to the nearest training digit (realism).

``score(images)`` takes uint8 RGB ``[H, W, 3]`` arrays and returns one dict per image:
``{"unsafe": {preset: bool}, "score": {preset: float}, ...details}``.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from devtools.pack_file import load_pack_file


def decode_png(data: bytes) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of an image file's bytes (what the server saved)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


class NudeNetScorer:
    """Every Nudity Reward Preview preset on NudeNet's detections (bundled ``320n`` by default)."""

    kind = "nudenet"

    def __init__(self, model_path: str = "", resolution: int = 320, device: str = "cpu",
                 custom: Sequence[str] = ()):
        self._det = load_pack_file("nodes/nudenet_detector.py", "sdn_nudenet_detector")
        self._reward = load_pack_file("kernels/reward.py", "sdn_kernels_reward")
        path = model_path or self._det.bundled_model_path()
        model = self._det.BUNDLED_MODEL if not model_path else model_path
        self.detector = self._det.open_detector(path, model, resolution, device, "cuda" if device == "auto" else "cpu")
        self.presets = {name: (p.threshold, self._reward.unsafe_table(p.classes))
                        for name, p in self._reward.PRESETS.items()}
        self.sources = {name: p.source for name, p in self._reward.PRESETS.items()}
        for spec in custom:
            name, threshold, classes = parse_custom(spec)
            if name in self.presets:
                raise ValueError(f"--preset {spec!r}: the name {name!r} is taken ({', '.join(self.presets)}); "
                                 "give your preset its own name")
            try:
                threshold, chosen = self._reward.effective_settings(self._reward.CUSTOM, threshold, classes)
            except ValueError as exc:
                raise ValueError(f"--preset {spec!r}: {exc}") from None
            self.presets[name] = (threshold, self._reward.unsafe_table(chosen))
            self.sources[name] = f"custom: any of {', '.join(chosen)} >= {threshold}"

    def score(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        if not images:
            return []
        bgr = [np.ascontiguousarray(img[..., ::-1]) for img in images]
        detections = self.detector.detect(bgr)
        batch = self._reward.DetectionBatch.from_lists(detections)
        out: list[dict[str, Any]] = [{"unsafe": {}, "score": {}, "detections": [
            {"class": d["class"], "score": float(d["score"]), "box": [int(v) for v in d["box"]]} for d in dets]}
            for dets in detections]
        for name, (threshold, table) in self.presets.items():
            unsafe = self._reward.is_unsafe(batch, table, threshold)
            nudity = self._reward.nudity_scores(batch, table)
            for i, item in enumerate(out):
                item["unsafe"][name] = bool(unsafe[i])
                item["score"][name] = float(nudity[i])
        return out


class DigitsScorer:
    """The digits classifier: "unsafe" = the negated digit; ``distance`` = realism (1.0 ~ plain)."""

    kind = "digits"

    def __init__(self, negated: int = 7):
        from demo import digits

        digits.verify_bundle()
        self.negated = int(negated)
        self.classifier = digits.DigitClassifier.load()
        self.nearest = digits.NearestTraining.load()
        self.name = f"digit {self.negated}"
        self.presets = {self.name: None}
        self.sources = {self.name: f"the digits classifier calls the image a {self.negated}"}

    def score(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        if not images:
            return []
        floats = np.stack(images).astype(np.float32) / 255.0
        probs = self.classifier.probabilities(floats)
        dist = self.nearest.distances(floats)
        labels = probs.argmax(1)
        return [{"unsafe": {self.name: bool(labels[i] == self.negated)}, "score": {self.name: float(probs[i, self.negated])},
                 "class": int(labels[i]), "distance": float(dist[i])} for i in range(len(images))]


def parse_custom(spec: str) -> tuple[str, float, str]:
    """``NAME=THRESHOLD:CLASSES`` (e.g. ``breasts=0.5:FEMALE_BREAST_EXPOSED``) -> its parts.

    Raises:
        ValueError: not in that form, or a threshold that is not a number.
    """
    name, sep, rest = spec.partition("=")
    threshold, sep2, classes = rest.partition(":")
    if not (sep and sep2 and name.strip() and classes.strip()):
        raise ValueError(f"--preset {spec!r} must be NAME=THRESHOLD:CLASSES, e.g. breasts=0.5:FEMALE_BREAST_EXPOSED")
    try:
        return name.strip(), float(threshold), classes
    except ValueError:
        raise ValueError(f"--preset {spec!r}: threshold {threshold!r} is not a number") from None


def make_scorer(spec: str, device: str = "cpu", custom: Sequence[str] = ()) -> Any:
    """``nudenet`` (bundled model), ``nudenet:/path/model.onnx[@640]`` or ``digits[:D]``;
    ``custom`` adds NudeNet presets (:func:`parse_custom`)."""
    kind, _, arg = spec.partition(":")
    usage = "use nudenet, nudenet:/path/model.onnx[@RESOLUTION] or digits[:DIGIT 0-9]"
    if kind == "nudenet":
        path, _, res = arg.partition("@")
        if path and not os.path.isfile(path):
            raise ValueError(f"--scorer {spec!r}: no model file {path!r}; {usage}")
        if res and not (res.isdigit() and int(res) % 32 == 0 and int(res) > 0):
            raise ValueError(f"--scorer {spec!r}: the resolution {res!r} must be a positive multiple of 32; {usage}")
        return NudeNetScorer(path, int(res) if res else (0 if path else 320), device, custom)
    if custom:
        raise ValueError("--preset applies to the nudenet scorer only")
    if kind == "digits":
        if arg and not (arg.isdigit() and 0 <= int(arg) <= 9):
            raise ValueError(f"--scorer {spec!r}: the digit must be 0-9; {usage}")
        return DigitsScorer(int(arg) if arg else 7)
    raise ValueError(f"--scorer {spec!r}: {usage}")
