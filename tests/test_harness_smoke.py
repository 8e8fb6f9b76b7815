"""Smoke tests of the test harness itself (in-process ComfyUI, tiny models, exact denoiser,
real server, UI-to-API workflow conversion).  Run against both ComfyUI versions."""

from __future__ import annotations

import pytest
import torch

from harness import prompts
from harness.errors import ComfyPromptError
from harness.workflow import WorkflowConversionError, ui_to_api

FAMILIES = ("sd15", "sd15_v", "sdxl", "flow")


def assert_finite(tensor: torch.Tensor, what: str) -> None:
    assert torch.isfinite(tensor).all(), f"{what} has non-finite values"


@pytest.mark.parametrize("custom_sampler", [False, True], ids=["KSampler", "SamplerCustom"])
def test_tiny_txt2img_in_process(comfy, custom_sampler):
    builder, n = prompts.tiny_txt2img(custom_sampler=custom_sampler)
    out = comfy.run_prompt(builder.build())
    assert len(out[n["preview"].id]["images"]) == 2
    latent = out.result(n["sampler"].id)[0]["samples"]
    assert latent.shape == (2, 4, 8, 8)
    assert_finite(latent, "latent")
    pixels = out.result(n["decode"].id)[0]
    assert pixels.shape == (2, 64, 64, 3)
    assert_finite(pixels, "image")
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tiny_family_samples(comfy, family):
    builder, n = prompts.tiny_txt2img(family, steps=2)
    out = comfy.run_prompt(builder.build())
    assert_finite(out.result(n["sampler"].id)[0]["samples"], f"{family} latent")


def test_validation_error_carries_comfyui_message(comfy):
    builder, n = prompts.tiny_txt2img()
    prompt = builder.build()
    prompt[n["sampler"].id]["inputs"]["sampler_name"] = "no_such_sampler"
    with pytest.raises(ComfyPromptError) as info:
        comfy.run_prompt(prompt)
    err = info.value
    assert (err.stage, err.node_id, err.class_type) == ("validation", n["sampler"].id, "KSampler")
    assert "no_such_sampler" in str(err) and "sampler_name" in str(err)


def test_execution_error_names_node_and_exception(comfy):
    """A 16-channel VAE cannot decode 4-channel latents: ComfyUI's error reaches the test."""
    builder, n = prompts.tiny_txt2img(steps=1)
    prompt = builder.build()
    prompt[n["vae"].id]["inputs"]["channels"] = 16
    with pytest.raises(ComfyPromptError) as info:
        comfy.run_prompt(prompt)
    err = info.value
    assert (err.stage, err.node_id, err.class_type) == ("execution", n["decode"].id, "VAEDecode")
    assert err.exception_type and "Error" in err.exception_type
    assert "channels" in err.message


def test_exact_denoiser_samples_land_on_the_point_set(comfy):
    count, unsafe = 12, 4
    builder, n = prompts.exact_denoiser_sampling(count=count, unsafe_count=unsafe, batch=64, steps=20)
    stats = comfy.run_prompt(builder.build())[n["stats"].id]["stats"][0]
    assert stats["n"] == 64
    assert stats["near_any"] >= 0.95
    assert 0.1 <= stats["on_u"] <= 0.6  # k / M = 1/3; loose, this checks the harness only
    assert len(set(stats["nearest_index"])) >= count // 2  # the sampler visits many points


def test_exact_denoiser_limits_and_flow_sampling(comfy):
    from harness import tiny_models as tm

    points = tm.make_point_set(seed=3, count=5, channels=4, height=2, width=2)
    flow = tm.flow_sampling()
    eps_sampling = tm.build_model("sd15").model.model_sampling
    for sampling in (eps_sampling, flow):
        x = points.points[2:3].clone()  # at tiny noise the posterior mean is the point itself
        small = torch.tensor([1e-3])
        assert torch.allclose(tm.posterior_mean(x, small, points.points, sampling), x, atol=1e-9)
    alpha, std = tm.forward_coefficients(flow, torch.tensor([0.25]))
    assert (float(alpha), float(std)) == pytest.approx((0.75, 0.25))
    sigma = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(flow.sigma(flow.timestep(sigma)), sigma)
    assert flow.percent_to_sigma(0.0) == 1.0 and flow.percent_to_sigma(1.0) == 0.0


def test_server_runs_a_prompt(comfy_server):
    info = comfy_server.object_info()
    assert "SDNTest_TinyModel" in info and "KSampler" in info
    assert ui_to_api(UI_WORKFLOW, info) == EXPECTED_API  # the converter also reads the JSON form
    builder, n = prompts.tiny_txt2img()
    prompt_id = comfy_server.post_prompt(builder.build())
    entry = comfy_server.wait(prompt_id, timeout=60)
    assert entry["status"]["status_str"] == "success"
    images = entry["outputs"][n["preview"].id]["images"]
    assert len(images) == 2
    for image in images:  # PreviewImage writes to the server's temp directory
        assert any(comfy_server.temp_dir.rglob(image["filename"])), image

    broken = builder.build()
    broken[n["vae"].id]["inputs"]["channels"] = 16  # cannot decode 4-channel latents
    with pytest.raises(ComfyPromptError) as info:
        comfy_server.run_prompt(broken)
    assert (info.value.stage, info.value.node_id, info.value.class_type) == (
        "execution", n["decode"].id, "VAEDecode")


# -- UI -> API workflow conversion ---------------------------------------------------------------

def _node(node_id, node_type, widgets=None, inputs=(), mode=0, outputs=()):
    return {"id": node_id, "type": node_type, "mode": mode, "widgets_values": widgets,
            "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs]}


UI_WORKFLOW = {
    "nodes": [
        _node(4, "CheckpointLoaderSimple", ["tiny.safetensors"]),
        _node(11, "Reroute", None, [{"name": "", "type": "*", "link": 10}]),
        _node(6, "CLIPTextEncode", ["a cat"], [{"name": "clip", "type": "CLIP", "link": 3}]),
        _node(7, "CLIPTextEncode", ["blurry"], [{"name": "clip", "type": "CLIP", "link": 5}]),
        _node(5, "EmptyLatentImage", {"width": 512, "height": 384, "batch_size": 2}),
        _node(13, "LatentUpscaleBy", ["nearest-exact", 1.5], [{"name": "samples", "type": "LATENT", "link": 12}],
              mode=4),
        _node(10, "PrimitiveNode", [42, "fixed"]),
        _node(3, "KSampler", [156680208700286, "randomize", 20, 8, "euler", "normal", 1], [
            {"name": "model", "type": "MODEL", "link": 11},
            {"name": "positive", "type": "CONDITIONING", "link": 4},
            {"name": "negative", "type": "CONDITIONING", "link": 6},
            {"name": "latent_image", "type": "LATENT", "link": 13},
            {"name": "seed", "type": "INT", "link": 14, "widget": {"name": "seed"}},
        ]),
        _node(8, "VAEDecode", None, [{"name": "samples", "type": "LATENT", "link": 7},
                                     {"name": "vae", "type": "VAE", "link": 8}]),
        _node(9, "SaveImage", ["ComfyUI"], [{"name": "images", "type": "IMAGE", "link": 9}]),
        _node(14, "PreviewImage", None, [{"name": "images", "type": "IMAGE", "link": 15}], mode=2),
        _node(12, "Note", ["just a note"]),
    ],
    "links": [
        [10, 4, 0, 11, 0, "MODEL"], [11, 11, 0, 3, 0, "MODEL"], [3, 4, 1, 6, 0, "CLIP"],
        [5, 4, 1, 7, 0, "CLIP"], [4, 6, 0, 3, 1, "CONDITIONING"], [6, 7, 0, 3, 2, "CONDITIONING"],
        [12, 5, 0, 13, 0, "LATENT"], [13, 13, 0, 3, 3, "LATENT"], [14, 10, 0, 3, 4, "INT"],
        [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"],
        {"id": 15, "origin_id": 8, "origin_slot": 0, "target_id": 14, "target_slot": 0, "type": "IMAGE"},
    ],
}

EXPECTED_API = {
    "3": {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": 42, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 384, "batch_size": 2}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def test_workflow_converter(comfy):
    assert ui_to_api(UI_WORKFLOW, comfy.object_info()) == EXPECTED_API


def test_workflow_converter_seed_controls_and_errors(comfy):
    info = comfy.object_info()
    workflow = {"nodes": [
        _node(1, "SamplerCustom", [True, 7, "fixed", 3.5]),  # noise_seed has a control value
        _node(2, "KSamplerSelect", ["euler"]),
    ], "links": []}
    api = ui_to_api(workflow, info)
    assert api["1"]["inputs"] == {"add_noise": True, "noise_seed": 7, "cfg": 3.5}
    assert api["2"]["inputs"] == {"sampler_name": "euler"}
    # Saved before a node had a widget: the frontend keeps the widget's default (a combo: its first choice).
    short = ui_to_api({"nodes": [_node(1, "SamplerCustom", [True, 7, "fixed"]), _node(2, "KSamplerSelect", [])],
                       "links": []}, info)
    assert short["1"]["inputs"]["cfg"] == info["SamplerCustom"]["input"]["required"]["cfg"][1]["default"]
    assert short["2"]["inputs"]["sampler_name"] == info["KSamplerSelect"]["input"]["required"]["sampler_name"][0][0]
    with pytest.raises(WorkflowConversionError, match="NoSuchNode"):
        ui_to_api({"nodes": [_node(1, "NoSuchNode", [])], "links": []}, info)
