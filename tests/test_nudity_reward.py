"""Nudity Reward Preview inside a real ComfyUI (in-process): real NudeNet on real photos, the JSON
round trip, censoring on synthetic detections, the reward's CLIP term with tiny real CLIP models,
bad inputs, the optional backend, sessions and execution providers."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from harness.errors import ComfyPromptError
from harness.locate import REPO_ROOT
from harness.prompts import PromptBuilder

NODE = "SDN_NudityRewardPreview"
DEFAULTS = {"model": "320n (bundled)", "inference_resolution": 0, "preset": "RECE 0.6", "threshold": 0.6,
            "unsafe_classes": "*_EXPOSED", "censor": "none", "fill_color": "#000000", "w_clip": 1.0, "w_nude": 1.0,
            "device": "auto"}
#: skimage.data photos shipped in the scikit-image wheel: two portraits and two object photos.
PORTRAITS = {"astronaut": "FACE_FEMALE", "camera": "FACE_MALE"}
OBJECTS = ("coffee", "rocket")

nudenet = pytest.importorskip("nudenet", reason="pip install nudenet onnxruntime")
skimage_data = pytest.importorskip("skimage.data", reason="pip install scikit-image")

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def node_module(comfy):
    """The pack's nodes/nudity_reward.py as ComfyUI loaded it."""
    return sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS[NODE].__module__]


@pytest.fixture(scope="module")
def detector_module(node_module):
    return sys.modules[node_module.__name__.rsplit(".", 1)[0] + ".nudenet_detector"]


@pytest.fixture(scope="module")
def photos(comfy) -> dict[str, Path]:
    """The skimage photos as PNG files in ComfyUI's input directory (for Load Image)."""
    input_dir = Path(comfy.folder_paths.get_input_directory())
    paths = {}
    for name in (*PORTRAITS, *OBJECTS):
        array = getattr(skimage_data, name)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        path = input_dir / f"sdn_photo_{name}.png"
        Image.fromarray(array[..., :3]).save(path)
        paths[name] = path
    return paths


def run_node(node_module, images, **overrides):
    """Call the node like ComfyUI does (inference mode); return (ui, result)."""
    kwargs = dict(DEFAULTS, **overrides)
    with torch.inference_mode():
        out = node_module.NudityRewardPreview().run(images, **kwargs)
    return out["ui"], out["result"]


def nudenet_reference(path: Path, model_path: str | None = None, resolution: int = 320) -> list[dict]:
    """NudeNet's own answer for an image FILE (cv2.imread, BGR): what papers measured."""
    detector = nudenet.NudeDetector(model_path=model_path, inference_resolution=resolution)
    return sorted(detector.detect(str(path)), key=lambda d: -d["score"])


def as_plain(detections: list[dict]) -> list[dict]:
    return [{"class": d["class"], "score": d["score"], "box": d["box"]} for d in detections]


# -- the node's definition ------------------------------------------------------------------------

def test_node_definition(comfy):
    info = comfy.object_info()[NODE]
    cls = comfy.nodes.NODE_CLASS_MAPPINGS[NODE]
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[NODE] == "Nudity Reward Preview"
    assert cls.CATEGORY == "safe_denoiser/evaluation" and cls.DESCRIPTION and cls.OUTPUT_NODE
    specs = {**info["input"]["required"], **info["input"]["optional"]}
    assert [n for n, spec in specs.items() if not spec[1].get("tooltip")] == []
    assert list(specs) == ["images", *DEFAULTS, "clip_vision", "clip", "prompt"]
    assert info["output"] == ["IMAGE", "FLOAT", "BOOLEAN", "FLOAT", "STRING"]
    assert len(cls.OUTPUT_TOOLTIPS) == 5 and cls.OUTPUT_IS_LIST == (False, True, True, True, False)
    assert specs["model"][0][0] == "320n (bundled)"
    assert specs["preset"][0] == ["RECE 0.6", "UnlearnDiffAtk 0.45", "custom"]
    assert specs["censor"][0] == ["none", "boxes", "blur", "pixelate", "fill"]


# -- real NudeNet on real photos ------------------------------------------------------------------

def test_real_nudenet_on_skimage_photos(comfy, photos):
    b = PromptBuilder()
    refs = {}
    for name, path in photos.items():
        load = b.add("LoadImage", image=path.name)
        refs[name] = b.add(NODE, images=load, **DEFAULTS)
    out = comfy.run_prompt(b.build())
    scores = {}
    for name, ref in refs.items():
        images, nudity, unsafe, reward, text = out.outputs(ref.id)
        report = json.loads(text[0])
        (image,) = report["images"]
        detections = image["detections"]
        scores[name] = [(d["class"], round(d["score"], 4)) for d in detections]
        # Scores and boxes round-trip exactly: the JSON equals NudeNet run on the PNG file itself.
        assert as_plain(detections) == nudenet_reference(photos[name]), name
        assert nudity == [image["nudity"]] and unsafe == [image["is_unsafe"]] and reward == [image["reward"]]
        assert reward == [pytest.approx(-image["nudity"])]  # no CLIP vision: r = -w_nude * nudity
        assert images[0].shape == (1, image["height"], image["width"], 3)
        rows = out[ref.id]["sdn_nudity"]
        assert rows == [{"index": 0, "nudity": image["nudity"], "unsafe": image["is_unsafe"],
                         "reward": image["reward"], "clip": None,
                         "top": [[d["class"], d["score"], d["unsafe"]] for d in detections[:3]]}]
        (preview,) = out[ref.id]["images"]
        assert (Path(comfy.folder_paths.get_temp_directory()) / preview["subfolder"] / preview["filename"]).is_file()
        assert report["preset"] == "RECE 0.6" and report["threshold"] == 0.6 and len(report["unsafe_classes"]) == 9
        assert report["providers"] == ["CPUExecutionProvider"] and report["inference_resolution"] == 320
    log.info("NudeNet 320n on skimage photos: %s", scores)
    for name, face in PORTRAITS.items():  # a face is found in each portrait, nothing unsafe
        assert any(c == face and s >= 0.5 for c, s in scores[name]), (name, scores[name])
        assert out.outputs(refs[name].id)[2] == [False]
    for name in OBJECTS:  # nothing at all in the object photos
        assert scores[name] == [] and out.outputs(refs[name].id)[1:3] == [[0.0], [False]]


def test_user_640_model_from_the_registered_folder(comfy, photos, detector_module, tmp_path_factory):
    """A 640m.onnx in models/nudenet runs at 640 px (auto); stand-in: the 320n file renamed (its input
    size is dynamic, so it runs at 640 exactly as the real 640m file would)."""
    folder = tmp_path_factory.mktemp("nudenet_models")
    bundled = Path(nudenet.__file__).with_name("320n.onnx")
    shutil.copy(bundled, folder / "640m.onnx")
    comfy.add_model_folder("nudenet", folder)
    info = comfy.object_info()[NODE]["input"]["required"]["model"][0]
    assert info[0] == "320n (bundled)" and "640m.onnx" in info
    b = PromptBuilder()
    load = b.add("LoadImage", image=photos["astronaut"].name)
    ref = b.add(NODE, images=load, **dict(DEFAULTS, model="640m.onnx"))
    report = json.loads(comfy.run_prompt(b.build()).outputs(ref.id)[4][0])
    assert report["inference_resolution"] == 640
    expected = nudenet_reference(photos["astronaut"], str(folder / "640m.onnx"), 640)
    assert as_plain(report["images"][0]["detections"]) == expected and expected
    detector = detector_module.load_detector("640m.onnx", 0, "auto")
    assert detector.resolution == 640 and detector.path == str(folder / "640m.onnx")


def test_one_session_per_model_reused(detector_module):
    a = detector_module.load_detector("320n (bundled)", 0, "auto")
    b = detector_module.load_detector("320n (bundled)", 0, "auto")
    c = detector_module.load_detector("320n (bundled)", 640, "auto")
    assert a.detector.onnx_session is b.detector.onnx_session is c.detector.onnx_session
    assert (a.resolution, c.resolution) == (320, 640) and a.providers == ("CPUExecutionProvider",)
    with pytest.raises(ValueError, match="multiple of 32"):
        detector_module.load_detector("320n (bundled)", 300, "auto")


# -- censoring and decisions on synthetic detections ----------------------------------------------

BOX_A, BOX_FACE, BOX_C, BOX_D = (10, 10, 40, 30), (70, 5, 30, 30), (20, 50, 40, 30), (80, 50, 40, 40)
SYNTHETIC = [
    [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.8, "box": list(BOX_A)},
     {"class": "FACE_FEMALE", "score": 0.9, "box": list(BOX_FACE)}],
    [{"class": "BELLY_EXPOSED", "score": 0.5, "box": list(BOX_C)},
     {"class": "FEET_EXPOSED", "score": 0.65, "box": list(BOX_D)}],
]


def box_mask(boxes, height=96, width=128):
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x, y, w, h in boxes:
        mask[y:y + h, x:x + w] = True
    return mask


@pytest.mark.parametrize("censor", ["boxes", "blur", "pixelate", "fill"])
@pytest.mark.parametrize("preset", ["RECE 0.6", "UnlearnDiffAtk 0.45"])
def test_censoring_changes_only_unsafe_boxes(node_module, monkeypatch, censor, preset):
    monkeypatch.setattr(node_module, "detect_images", lambda detector, images, on_chunk=None: SYNTHETIC)
    images = torch.rand(2, 96, 128, 3, generator=torch.Generator().manual_seed(3))
    _, (out, nudity, unsafe, reward, text) = run_node(node_module, images.clone(), censor=censor, preset=preset,
                                                      fill_color="#808080")
    censored = [[BOX_A], [BOX_D] if preset == "RECE 0.6" else [BOX_C, BOX_D]]  # BELLY 0.5 only >= 0.45
    for b in range(2):
        inside = box_mask(censored[b])
        changed = (out[b] != images[b]).any(-1)
        assert not changed[~inside].any(), f"{censor}: pixels outside unsafe boxes changed (image {b})"
        for x, y, w, h in censored[b]:
            if censor == "boxes":  # an outline: the box's edge pixels are red
                edge = torch.cat([out[b, y, x:x + w], out[b, y + h - 1, x:x + w],
                                  out[b, y:y + h, x], out[b, y:y + h, x + w - 1]])
                assert torch.equal(edge, torch.tensor([1.0, 0.0, 0.0]).expand_as(edge)), f"no outline (image {b})"
            else:
                assert changed[y:y + h, x:x + w].float().mean() > 0.5, f"{censor}: box not censored (image {b})"
    assert nudity == [0.8, 0.65] and unsafe == [True, True]
    assert reward == pytest.approx([-0.8, -0.65])
    report = json.loads(text)
    flags = [[(d["class"], d["unsafe"]) for d in image["detections"]] for image in report["images"]]
    assert flags == [[("FACE_FEMALE", False), ("FEMALE_BREAST_EXPOSED", True)],  # sorted by score
                     [("FEET_EXPOSED", True), ("BELLY_EXPOSED", preset != "RECE 0.6")]]


def test_custom_classes_and_threshold(node_module, monkeypatch):
    monkeypatch.setattr(node_module, "detect_images", lambda detector, images, on_chunk=None: SYNTHETIC)
    images = torch.rand(2, 96, 128, 3, generator=torch.Generator().manual_seed(4))
    ui, (out, nudity, unsafe, _, text) = run_node(node_module, images, preset="custom", threshold=0.85,
                                                  unsafe_classes="FACE_*", censor="fill")
    assert nudity == [0.9, 0.0] and unsafe == [True, False]
    assert json.loads(text)["unsafe_classes"] == ["FACE_FEMALE", "FACE_MALE"]
    changed = (out[0] != images[0]).any(-1)
    assert torch.equal(changed, box_mask([BOX_FACE])) and torch.equal(out[1], images[1])
    assert [row["unsafe"] for row in ui["sdn_nudity"]] == [True, False]
    with pytest.raises(Exception, match="unknown NudeNet class"):
        run_node(node_module, images, preset="custom", unsafe_classes="NIPPLE")
    with pytest.raises(Exception, match="fill_color"):
        run_node(node_module, images, censor="fill", fill_color="black")


# -- the reward's CLIP term with tiny real CLIP models --------------------------------------------

def reward_with_clip_prompt(w_clip=2.0, w_nude=0.5, prompt="a photo of a cat", batch=3):
    b = PromptBuilder()
    images = b.add("SDNTest_Image", kind="noise", width=64, height=64, batch=batch, seed=5)
    vision = b.add("SDNTest_TinyCLIPVision", seed=0)
    clip = b.add("SDNTest_TinyCLIP", seed=0)
    ref = b.add(NODE, images=images, clip_vision=vision, clip=clip, prompt=prompt,
                **dict(DEFAULTS, w_clip=w_clip, w_nude=w_nude))
    return b, ref


def test_reward_equals_the_formula_with_tiny_clip(comfy):
    from harness import tiny_clip as tc

    b, ref = reward_with_clip_prompt()
    out = comfy.run_prompt(b.build())
    _, nudity, unsafe, reward, text = out.outputs(ref.id)
    report = json.loads(text[0])
    assert report["clip_term"] is True and report["clip_warning"] is None
    images = comfy.nodes.NODE_CLASS_MAPPINGS["SDNTest_Image"]().build("noise", 64, 64, 3, 5)[0]
    vision, clip = tc.build_clip_vision(0), tc.build_clip(0)  # the graph's own (cached) objects
    with torch.inference_mode():
        image_embeds = vision.encode_image(images)["image_embeds"].double()
        _, text_embed = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True)
    cos = torch.nn.functional.cosine_similarity(image_embeds, text_embed.double(), dim=-1)
    assert [i["clip_similarity"] for i in report["images"]] == pytest.approx(cos.tolist(), abs=1e-5)
    expected = [2.0 * float(c) - 0.5 * n for c, n in zip(cos, nudity)]
    assert reward == pytest.approx(expected, abs=1e-5)
    assert [row["clip"] for row in out[ref.id]["sdn_nudity"]] == pytest.approx(cos.tolist(), abs=1e-5)
    assert len(set(round(float(c), 6) for c in cos)) == 3  # three images, three similarities

    # Without CLIP_VISION the term is absent (a connected CLIP alone is ignored).
    prompt = b.build()
    del prompt[ref.id]["inputs"]["clip_vision"]
    out = comfy.run_prompt(prompt)
    report = json.loads(out.outputs(ref.id)[4][0])
    assert report["clip_term"] is False and all(i["clip_similarity"] is None for i in report["images"])
    assert out.outputs(ref.id)[3] == pytest.approx([-0.5 * n for n in out.outputs(ref.id)[1]])


def test_clip_term_errors_and_identity_projection_warning(comfy, node_module):
    from harness import tiny_clip as tc

    b, ref = reward_with_clip_prompt(prompt="  ")
    with pytest.raises(ComfyPromptError, match="prompt is empty"):
        comfy.run_prompt(b.build())
    b, ref = reward_with_clip_prompt()
    prompt = b.build()
    del prompt[ref.id]["inputs"]["clip"]
    with pytest.raises(ComfyPromptError, match="clip_vision is connected but clip is not"):
        comfy.run_prompt(prompt)

    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    wrong = SimpleNamespace(encode_image=lambda x: {"image_embeds": torch.ones(x.shape[0], 7)})
    with pytest.raises(Exception, match="same CLIP model"):
        run_node(node_module, images, clip_vision=wrong, clip=tc.build_clip(0), prompt="a cat")

    # A text tower without a real projection (ComfyUI's identity placeholder) is flagged.
    clip = tc.build_clip(7)
    assert node_module.text_projection_state(clip) is True
    with torch.no_grad():
        for name, param in clip.cond_stage_model.named_parameters():
            if name.endswith("text_projection.weight"):
                param.copy_(torch.eye(param.shape[0]))
    assert node_module.text_projection_state(clip) is False
    ui, result = run_node(node_module, images, clip_vision=tc.build_clip_vision(0), clip=clip, prompt="a cat")
    assert "text projection" in json.loads(result[4])["clip_warning"]
    assert "text projection" in ui["sdn_nudity_settings"][0]["clip_warning"]


# -- bad input -------------------------------------------------------------------------------------

def bad_image_prompt(kind, width=64, height=64, batch=2):
    b = PromptBuilder()
    images = b.add("SDNTest_Image", kind=kind, width=width, height=height, batch=batch, seed=1)
    ref = b.add(NODE, images=images, **DEFAULTS)
    return b.build(), ref


@pytest.mark.parametrize("kind,width,message", [
    ("empty", 64, "batch is empty"),
    ("noise", 16, "too small"),
    ("nan", 64, r"image\(s\) \[1\].*NaN or infinite"),
    ("inf", 64, r"image\(s\) \[1\].*NaN or infinite"),
])
def test_bad_images_give_clear_errors(comfy, kind, width, message):
    prompt, ref = bad_image_prompt(kind, width=width)
    with pytest.raises(ComfyPromptError, match=message) as info:
        comfy.run_prompt(prompt)
    assert info.value.node_id == ref.id and "NodeInputError" in (info.value.exception_type or "")


def test_gray_and_rgba_images_are_scored_as_rgb(comfy):
    results, outputs = {}, {}
    for kind in ("noise", "gray", "rgba"):
        prompt, ref = bad_image_prompt(kind, batch=2)
        images, _, _, _, text = comfy.run_prompt(prompt).outputs(ref.id)
        outputs[kind] = images[0]
        assert outputs[kind].shape == (2, 64, 64, 3)
        results[kind] = json.loads(text[0])["images"]
    assert results["rgba"] == results["noise"] and torch.equal(outputs["rgba"], outputs["noise"])  # alpha dropped
    gray = outputs["gray"]  # the one channel repeated
    assert torch.equal(gray[..., 0], gray[..., 1]) and torch.equal(gray[..., 1], gray[..., 2])


# -- progress, interrupts, the optional backend, providers ----------------------------------------

def test_progress_bar_and_interrupt(node_module, monkeypatch):
    import comfy.model_management as mm
    from harness import tiny_clip as tc

    updates = []
    monkeypatch.setattr(node_module, "progress_bar", lambda total: SimpleNamespace(
        update=lambda n: updates.append((total, n))))
    images = torch.rand(10, 48, 48, 3, generator=torch.Generator().manual_seed(2))
    run_node(node_module, images, clip_vision=tc.build_clip_vision(0), clip=tc.build_clip(0), prompt="x")
    assert {t for t, _ in updates} == {20} and sum(n for _, n in updates) == 20  # 10 detections + 10 CLIP
    assert len(updates) == 4  # two chunks of 8 + 2 for each stage

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(node_module, images)
    finally:
        mm.interrupt_current_processing(False)


def test_pack_loads_without_nudenet_and_the_node_says_what_to_install(comfy, monkeypatch, caplog):
    """A second copy of the pack imported with nudenet/onnxruntime/cv2 unavailable."""
    for name in ("nudenet", "nudenet.nudenet", "onnxruntime", "cv2"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    name = "sdn_pack_without_nudenet"
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    try:
        with caplog.at_level(logging.WARNING):
            spec.loader.exec_module(module)
        assert "SDN_NudityRewardPreview" in module.NODE_CLASS_MAPPINGS
        assert any("pip install nudenet onnxruntime" in r.getMessage() for r in caplog.records)
        images = torch.rand(1, 64, 64, 3)
        with pytest.raises(ValueError, match=r"pip install nudenet onnxruntime \(or onnxruntime-gpu") as info:
            module.NODE_CLASS_MAPPINGS[NODE]().run(images, **DEFAULTS)
        assert type(info.value).__name__ == "NodeInputError" and "Nudity Reward Preview" in str(info.value)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_provider_choice(detector_module):
    choose = detector_module.choose_providers
    cuda = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose(cuda, "auto", "cuda", 1) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert choose(cuda, "cpu", "cuda", 0) == ["CPUExecutionProvider"]
    assert choose(cuda, "auto", "cpu", None) == ["CPUExecutionProvider"]  # ComfyUI --cpu
    assert choose(["CoreMLExecutionProvider", "CPUExecutionProvider"], "auto", "mps") == [
        "CoreMLExecutionProvider", "CPUExecutionProvider"]
    assert choose(["AzureExecutionProvider", "CPUExecutionProvider"], "auto", "cuda") == ["CPUExecutionProvider"]


def test_gpu_provider_is_really_passed_and_falls_back(detector_module, monkeypatch, caplog):
    """NudeNet 3.4.2 ignores `providers`: the pack builds the session itself with them."""
    import comfy.model_management as mm

    created = []

    class FakeSession:
        def __init__(self, path, providers):
            created.append([p[0] if isinstance(p, tuple) else p for p in providers])
            if created[-1][0] == "CUDAExecutionProvider" and len(created) == 1:
                raise RuntimeError("CUDA provider failed to load (libcudnn missing)")
            self.providers = created[-1]

        def get_providers(self):
            return self.providers

        def get_inputs(self):
            return [SimpleNamespace(name="images", shape=["batch", 3, "height", "width"])]

    real_ort, real_nudenet = detector_module._import_backend()
    fake_ort = SimpleNamespace(InferenceSession=FakeSession,
                               get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(detector_module, "_import_backend", lambda: (fake_ort, real_nudenet))
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(detector_module, "_sessions", type(detector_module._sessions)())
    with caplog.at_level(logging.WARNING):
        detector = detector_module.load_detector("320n (bundled)", 0, "auto")
    assert created == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]
    assert detector.providers == ("CPUExecutionProvider",) and "using the CPU" in caplog.text
    created.clear()
    detector = detector_module.load_detector("320n (bundled)", 0, "cpu")
    assert created == [["CPUExecutionProvider"]]
