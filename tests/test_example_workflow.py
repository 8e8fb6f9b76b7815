"""The shipped example workflows (``example_workflows/*.json``) load, agree with the nodes'
``INPUT_TYPES`` and run in a real ComfyUI (in-process) once the checkpoint and text encoders are
replaced by tiny test nodes (:func:`harness.workflow.substitute_tiny`) and sizes are shrunk.

Every workflow gets the structural checks.  Those made only of :data:`RUNNABLE_HERE` nodes are run
here (this module provides their negation set); a workflow with other nodes needs resources of its
own (weights, detectors) and must be run by another test module that names its file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from harness.prompts import tiny_workflow_prompt
from harness.runtime import ComfySession
from harness.sets import write_test_images
from harness.workflow import (EXAMPLE_WORKFLOWS_DIR, VIRTUAL_NODES, check_ui_workflow, example_workflows,
                              is_widget, load_ui_workflow, nodes_of_type, substitute_tiny, ui_to_api)

WORKFLOWS = example_workflows()
SD15_WORKFLOW = EXAMPLE_WORKFLOWS_DIR / "safe_denoiser_sd15.json"
SET_NAME = "nudity"  # the Load Negation Set widget value of the example workflows
IMAGE_COUNT = 3

#: What safe_denoiser_sd15.json's widgets_values must become, input by input (the control value
#: "fixed" after the seed is the frontend's and is not an input).
SD15_KSAMPLER_INPUTS = {
    "seed": 42, "steps": 25, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
    "mode": "calibrated", "strength": 1.0, "bandwidth": 1.0, "start_percent": 0.0, "end_percent": 1.0,
    "beta_threshold": 0.0, "max_restarts": 4,
}
#: Node types whose inputs this module can satisfy (checkpoint/encoders via substitute_tiny, the
#: negation set via :func:`negation_root`).
RUNNABLE_HERE = frozenset({
    "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage",
    "PreviewImage", "SDN_LoadNegationSet", "SDN_NegationSetFromImages", "SDN_SafeDenoiserPatch",
    "SDN_SafeDenoiserKSampler",
}) | VIRTUAL_NODES
GUIDANCE_INPUTS = ("mode", "strength", "bandwidth", "start_percent", "end_percent", "beta_threshold")


def node_types(path: Path) -> set[str]:
    """The node types used by a workflow file (virtual ones included)."""
    return {node["type"] for node in load_ui_workflow(path)["nodes"]}


RUNNABLE = [path for path in WORKFLOWS if node_types(path) <= RUNNABLE_HERE]


def spec_problem(spec: Any, value: Any) -> str | None:
    """Why ``value`` is not a valid value of the widget input ``spec``, or None if it is."""
    kind = spec[0]
    options: Mapping[str, Any] = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    if isinstance(kind, (list, tuple)) or kind == "COMBO":
        choices = kind if isinstance(kind, (list, tuple)) else options.get("options", [])
        return None if value in choices else f"{value!r} is not one of {list(choices)[:8]}..."
    expected = {"INT": (int,), "FLOAT": (int, float), "STRING": (str,), "BOOLEAN": (bool,)}[kind]
    if isinstance(value, bool) and kind != "BOOLEAN" or not isinstance(value, expected):
        return f"{value!r} is not a {kind}"
    if kind in ("INT", "FLOAT"):
        if not math.isfinite(value):
            return f"{value!r} is not finite"
        low, high = options.get("min", -math.inf), options.get("max", math.inf)
        if not low <= value <= high:
            return f"{value!r} is outside [{low}, {high}]"
    return None


@pytest.fixture(scope="module")
def negation_root(comfy: ComfySession, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``negation_sets`` model folder holding ``nudity/`` with a few small PNGs."""
    root = tmp_path_factory.mktemp("negation_sets_workflow")
    write_test_images(root / SET_NAME, IMAGE_COUNT)
    comfy.add_model_folder("negation_sets", root, first=True)
    return root


@pytest.fixture(scope="module")
def object_info(comfy: ComfySession, negation_root: Path) -> dict[str, dict[str, Any]]:
    """In-process ``/object_info`` (after the test set's folder is registered)."""
    return comfy.object_info()


def test_there_are_example_workflows() -> None:
    assert SD15_WORKFLOW in RUNNABLE, f"example_workflows/ holds {[p.name for p in WORKFLOWS]}"


@pytest.mark.parametrize("path", sorted(set(WORKFLOWS) - set(RUNNABLE)), ids=lambda p: p.name)
def test_other_workflows_are_run_by_their_own_tests(path: Path) -> None:
    """A workflow with nodes this module cannot feed is named by some other test module."""
    tests_dir = Path(__file__).resolve().parent
    others = [test.name for test in tests_dir.glob("test_*.py")
              if test.name != Path(__file__).name and path.name in test.read_text(encoding="utf-8")]
    extra = sorted(node_types(path) - RUNNABLE_HERE)
    assert others, f"{path.name} (nodes {extra}) is not run by any test module"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_valid_ui_json(path: Path, object_info: dict[str, dict[str, Any]]) -> None:
    workflow = load_ui_workflow(path)
    assert check_ui_workflow(workflow, object_info) == []
    types = {node["type"] for node in workflow["nodes"]} - VIRTUAL_NODES
    assert any(t.startswith("SDN_") for t in types), f"{path.name} uses none of the pack's nodes"
    assert [t for t in types if object_info[t].get("output_node")], f"{path.name} has no output node"
    assert not [node["id"] for node in workflow["nodes"] if node.get("mode", 0) != 0], "muted/bypassed nodes"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_widget_values_fit_the_inputs(path: Path, object_info: dict[str, dict[str, Any]]) -> None:
    """Every converted widget value is a valid value of its input (type, range, combo list).

    Combo membership is checked for the runnable workflows only: elsewhere file-choice combos
    (weights, sets) list files that this module does not provide.
    """
    prompt = ui_to_api(load_ui_workflow(path), object_info)
    problems = []
    for node_id, node in prompt.items():
        definition = object_info[node["class_type"]]["input"]
        specs = {**definition.get("required", {}), **definition.get("optional", {})}
        for name, value in node["inputs"].items():
            if name not in specs:
                problems.append(f"node {node_id} ({node['class_type']}): unknown input {name!r}")
            elif is_widget(specs[name]) and not isinstance(value, list):
                spec = specs[name]
                if path not in RUNNABLE and (isinstance(spec[0], (list, tuple)) or spec[0] == "COMBO"):
                    continue
                problem = spec_problem(spec, value)
                if problem and node["class_type"] != "CheckpointLoaderSimple":  # no checkpoints here
                    problems.append(f"node {node_id} ({node['class_type']}).{name}: {problem}")
    assert problems == []


def test_sd15_workflow_maps_widgets_to_the_ksampler_inputs(object_info: dict[str, dict[str, Any]]) -> None:
    prompt = ui_to_api(load_ui_workflow(SD15_WORKFLOW), object_info)
    (sampler_id,) = nodes_of_type(prompt, "SDN_SafeDenoiserKSampler")
    inputs = prompt[sampler_id]["inputs"]
    widgets = {name: value for name, value in inputs.items() if not isinstance(value, list)}
    assert widgets == SD15_KSAMPLER_INPUTS
    links = {name: value[0] for name, value in inputs.items() if isinstance(value, list)}
    assert {prompt[source]["class_type"] for source in links.values()} == {
        "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "SDN_LoadNegationSet"}
    assert set(links) == {"model", "positive", "negative", "latent_image", "negation_set"}
    # The example shows the documented defaults of the guidance parameters.
    required = object_info["SDN_SafeDenoiserKSampler"]["input"]["required"]
    assert {name: required[name][1]["default"] for name in GUIDANCE_INPUTS} == {
        name: inputs[name] for name in GUIDANCE_INPUTS}
    (loader_id,) = nodes_of_type(prompt, "SDN_LoadNegationSet")
    assert prompt[loader_id]["inputs"] == {"set_name": SET_NAME, "resolution": 512, "max_images": 0,
                                           "vae": [nodes_of_type(prompt, "CheckpointLoaderSimple")[0], 2]}


def test_substitute_tiny_rewrites_only_loader_and_encoders(object_info: dict[str, dict[str, Any]]) -> None:
    prompt = ui_to_api(load_ui_workflow(SD15_WORKFLOW), object_info)
    tiny = substitute_tiny(prompt)
    assert prompt != tiny and "ckpt_name" in prompt[nodes_of_type(prompt, "CheckpointLoaderSimple")[0]]["inputs"]
    for node_id, node in prompt.items():
        expected = {"CheckpointLoaderSimple": "SDNTest_TinyCheckpoint",
                    "CLIPTextEncode": "SDNTest_TinyTextEncode"}.get(node["class_type"], node["class_type"])
        assert tiny[node_id]["class_type"] == expected
        if expected == "SDNTest_TinyCheckpoint":
            assert tiny[node_id]["inputs"] == {}
        else:
            assert tiny[node_id]["inputs"] == node["inputs"]


def test_tiny_text_encode_is_deterministic(comfy: ComfySession) -> None:
    clip = comfy.nodes.NODE_CLASS_MAPPINGS["SDNTest_TinyCheckpoint"]().load()[1]
    encode = comfy.nodes.NODE_CLASS_MAPPINGS["SDNTest_TinyTextEncode"]().encode
    (cat,), (cat_again,), (dog,), (empty,) = (encode(t, clip) for t in ("a cat", "a cat", "a dog", ""))
    assert cat[0][0].shape == (1, 4, 32) and cat[0][1]["pooled_output"].shape == (1, 32)
    assert torch.equal(cat[0][0], cat_again[0][0]) and not torch.equal(cat[0][0], dog[0][0])
    assert not empty[0][0].any() and not empty[0][1]["pooled_output"].any()


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
def test_workflow_runs_on_tiny_models(path: Path, comfy: ComfySession, negation_root: Path,
                                      object_info: dict[str, dict[str, Any]]) -> None:
    prompt = tiny_workflow_prompt(load_ui_workflow(path), object_info)
    out = comfy.run_prompt(prompt)
    (loader_id,) = nodes_of_type(prompt, "SDN_LoadNegationSet")
    negation, info = out.result(loader_id)
    assert negation.latents.shape == (IMAGE_COUNT, 4, 8, 8) and torch.isfinite(negation.latents).all()
    assert SET_NAME in info and str(IMAGE_COUNT) in info
    assert list((negation_root / SET_NAME / ".negation_cache").glob("*.safetensors")), "no cache written"
    (decode_id,) = nodes_of_type(prompt, "VAEDecode")
    pixels = out.result(decode_id)[0]
    assert pixels.shape == (1, 64, 64, 3) and torch.isfinite(pixels).all()
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    (save_id,) = nodes_of_type(prompt, "SaveImage")
    images = out[save_id]["images"]
    assert len(images) == 1
    output_dir = Path(comfy.folder_paths.get_output_directory())
    for image in images:
        file = output_dir / image["subfolder"] / image["filename"]
        assert image["type"] == "output" and file.is_file(), image
        with Image.open(file) as saved:
            assert saved.size == (64, 64)
            assert np.isfinite(np.asarray(saved, dtype=np.float32)).all()


@pytest.mark.parametrize("path", example_workflows(), ids=lambda p: p.name)
def test_comfy_cli_converts_every_example_workflow_like_the_pack(path: Path,
                                                                 object_info: dict[str, dict[str, Any]]) -> None:
    """Parity with comfy-cli's maintained converter (`comfy run` and other API clients use it): on
    every shipped workflow it gives the pack's prompt. The pack keeps its own converter because
    comfy-cli 1.23 departs from the frontend elsewhere (tests/test_harness_smoke.py's workflow: a
    PrimitiveNode's value feeding a widget is ignored, missing widget values are filled with
    defaults and unknown node types pass silently)."""
    from comfy_cli.workflow_to_api import convert_ui_to_api

    workflow = load_ui_workflow(path)
    theirs = convert_ui_to_api(workflow, object_info)
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in theirs.items()} == \
        ui_to_api(workflow, object_info)
