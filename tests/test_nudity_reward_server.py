"""Nudity Reward Preview through a real ComfyUI server (``main.py --cpu`` on loopback): the example
workflow on tiny models (with and without the CLIP term), bad input that must not take the server
down, and the web extension in a real headless Chromium on the frontend the server serves (O: its
bundled web/, N: comfyui-frontend-package)."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request

import pytest

from harness.browser import Chromium, web_ui_skip_reason
from harness.errors import ComfyPromptError
from harness.locate import TESTS_DIR
from harness.prompts import PromptBuilder
from harness.sets import write_test_images
from harness.workflow import EXAMPLE_WORKFLOWS_DIR, load_ui_workflow, nodes_of_type, set_inputs, substitute_tiny, \
    ui_to_api

pytest.importorskip("nudenet", reason="pip install nudenet onnxruntime")

NODE = "SDN_NudityRewardPreview"
WORKFLOW = EXAMPLE_WORKFLOWS_DIR / "nudity_reward_sd15.json"
SET_DIR = "sdn_nudity_set"  # a sub-folder of the server's input directory: Load Negation Set's "input/..."
BATCH = 2
SCREENSHOT_DIR = TESTS_DIR / "_out"


@pytest.fixture(scope="module")
def server(comfy_server):
    """The shared server, with a tiny negation set in its input directory."""
    write_test_images(comfy_server.input_dir / SET_DIR, 3)
    return comfy_server


def tiny_example(prompt: dict, clip_term: bool = False) -> dict:
    """An API prompt of the example workflow made tiny: tiny checkpoint/text encoders
    (``substitute_tiny``), 2 images of 64 px, 2 steps, the test negation set; with ``clip_term``
    tiny CLIP vision + CLIP models feed the reward's CLIP term."""
    prompt = substitute_tiny(prompt)
    set_inputs(prompt, "EmptyLatentImage", width=64, height=64, batch_size=BATCH)
    set_inputs(prompt, "SDN_SafeDenoiserKSampler", steps=2)
    set_inputs(prompt, "SDN_LoadNegationSet", set_name=f"input/{SET_DIR}", resolution=64)
    if clip_term:
        (reward_id,) = nodes_of_type(prompt, NODE)
        prompt["900"] = {"class_type": "SDNTest_TinyCLIPVision", "inputs": {"seed": 0}}
        prompt["901"] = {"class_type": "SDNTest_TinyCLIP", "inputs": {"seed": 0}}
        prompt[reward_id]["inputs"].update(clip_vision=["900", 0], clip=["901", 0])
    return prompt


def check_reward_output(ui: dict, clip_term: bool) -> None:
    rows, (settings,) = ui["sdn_nudity"], ui["sdn_nudity_settings"]
    assert len(rows) == BATCH and len(ui["images"]) == BATCH
    assert settings["clip_term"] is clip_term and settings["preset"] == "RECE 0.6"
    w_clip, w_nude = settings["weights"]["clip"], settings["weights"]["nude"]
    for row in rows:
        assert (row["clip"] is not None) is clip_term
        expected = (w_clip * row["clip"] if clip_term else 0.0) - w_nude * row["nudity"]
        assert row["reward"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("clip_term", [False, True], ids=["nudity_only", "with_clip_term"])
def test_example_workflow_runs_on_the_server(server, clip_term):
    prompt = tiny_example(ui_to_api(load_ui_workflow(WORKFLOW), server.object_info()), clip_term)
    outputs = server.run_prompt(prompt, timeout=120)
    (reward_id,) = nodes_of_type(prompt, NODE)
    check_reward_output(outputs[reward_id], clip_term)
    (save_id,) = nodes_of_type(prompt, "SaveImage")
    saved = outputs[save_id]["images"]
    assert len(saved) == BATCH
    for image in saved:
        assert (server.output_dir / image["subfolder"] / image["filename"]).is_file()
    for preview in outputs[reward_id]["images"]:  # the annotated previews are served to the frontend
        url = f"{server.url}/view?filename={urllib.parse.quote(preview['filename'])}&type=temp&subfolder="
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200 and resp.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_input_gives_an_error_and_the_server_keeps_running(server):
    for kind, width, message in (("nan", 64, "NaN or infinite"), ("empty", 64, "batch is empty"),
                                 ("noise", 8, "too small")):
        b = PromptBuilder()
        images = b.add("SDNTest_Image", kind=kind, width=width, height=width, batch=2, seed=0)
        b.add(NODE, images=images, model="320n (bundled)", inference_resolution=0, preset="RECE 0.6",
              threshold=0.6, unsafe_classes="*_EXPOSED", censor="none", fill_color="#000000", w_clip=1.0,
              w_nude=1.0, device="auto")
        with pytest.raises(ComfyPromptError, match=message) as info:
            server.run_prompt(b.build(), timeout=60)
        assert info.value.class_type == NODE and "NodeInputError" in (info.value.exception_type or "")
    b = PromptBuilder()
    images = b.add("SDNTest_Image", kind="gray", width=48, height=48, batch=1, seed=0)
    ref = b.add(NODE, images=images, model="320n (bundled)", inference_resolution=0, preset="custom",
                threshold=0.3, unsafe_classes="*", censor="pixelate", fill_color="#000000", w_clip=1.0,
                w_nude=2.0, device="cpu")
    outputs = server.run_prompt(b.build(), timeout=60)  # the same server still answers
    assert len(outputs[ref.id]["sdn_nudity"]) == 1


# -- the web extension in a real browser -----------------------------------------------------------

def test_web_extension_shows_the_table_in_a_real_browser(server, tmp_path):
    reason = web_ui_skip_reason(server)
    if reason:
        pytest.skip(reason)
    if server.version == "N":  # no first-run template gallery over the canvas
        status, body = server.request("POST", "/settings", {"Comfy.TutorialCompleted": True})
        assert status == 200, body
    workflow = load_ui_workflow(WORKFLOW)
    (reward_node,) = [n for n in workflow["nodes"] if n["type"] == NODE]
    reward_id = str(reward_node["id"])
    with Chromium(tmp_path / "browser") as browser:
        browser.navigate(server.url)
        browser.wait_for("window.app && app.graph && typeof app.loadGraphData === 'function' && "
                         "typeof app.graphToPrompt === 'function'", 60, what="the ComfyUI app")
        extensions = browser.wait_for(
            "Array.from(app.extensions || [], e => e.name).filter(n => n.startsWith('safe_denoiser.'))", 30,
            what="the pack's web extension to register")
        assert extensions == ["safe_denoiser.NudityRewardPreview"]
        browser.evaluate(f"app.loadGraphData({json.dumps(workflow)})")
        browser.wait_for(f"app.graph.getNodeById({reward_id})?.type === '{NODE}'", 20, what="the workflow")

        # The real frontend converts the example exactly as the harness converter does.
        converted = browser.evaluate("app.graphToPrompt().then(p => p.output)")
        frontend_prompt = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in converted.items()}
        assert frontend_prompt == ui_to_api(workflow, server.object_info())

        # Queue it (tiny models) for this page's websocket client and wait for the run.
        client_id = browser.wait_for("import('/scripts/api.js').then(m => m.api.clientId)", 30, what="a client id")
        prompt_id = server.post_prompt(tiny_example(frontend_prompt), client_id=client_id)
        entry = server.wait(prompt_id, timeout=120)
        rows = entry["outputs"][reward_id]["sdn_nudity"]
        text = browser.wait_for(
            f"document.querySelector('.sdn-nudity[data-sdn-node=\"{reward_id}\"]')?.textContent", 30,
            what="the nudity table on the node")
        for header in ("nudity", "unsafe", "reward", "top detections", "RECE 0.6", f"0/{BATCH} unsafe"):
            assert header in text, (header, text)
        cells = browser.evaluate(f"Array.from(document.querySelectorAll('.sdn-nudity[data-sdn-node=\"{reward_id}\"] "
                                 "tbody tr'), tr => Array.from(tr.cells, td => td.textContent))")
        assert [c[:4] for c in cells] == [[str(r["index"]), f"{r['nudity']:.3f}", "yes" if r["unsafe"] else "no",
                                           f"{r['reward']:.3f}"] for r in rows]
        assert len(browser.evaluate(f"app.nodeOutputs['{reward_id}'].images")) == BATCH  # previews on the node
        # The table is no widget value: a workflow saved after the run still has the same values
        # (the 2024 frontend appends a trailing null for every DOM widget, which loaders ignore).
        saved = browser.evaluate(f"app.graph.serialize().nodes.find(n => n.id === {reward_id}).widgets_values")
        original = reward_node["widgets_values"]
        assert saved[:len(original)] == original and all(v is None for v in saved[len(original):])

        # Screenshot with the node in view.
        browser.evaluate(f"(() => {{ const n = app.graph.getNodeById({reward_id}); app.canvas.ds.scale = 1; "
                         "app.canvas.ds.offset = [40 - n.pos[0], 80 - n.pos[1]]; app.graph.setDirtyCanvas(true, true); "
                         "return true; })()")
        time.sleep(0.5)
        browser.pump(0.5)
        shot = browser.screenshot(tmp_path / f"nudity_reward_preview_{server.version}.png")
        assert shot.stat().st_size > 10_000
        SCREENSHOT_DIR.mkdir(exist_ok=True)
        shutil.copy(shot, SCREENSHOT_DIR / shot.name)
        ours = [e for e in browser.errors if "nudity_reward_preview" in e]
        assert ours == [], ours
