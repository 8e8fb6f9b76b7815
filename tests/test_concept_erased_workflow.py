"""The concept-erased example workflow (``example_workflows/concept_erased_sd15.json``, UI format):
converted to an API prompt, run on tiny models in-process and through a real ``main.py --cpu``
server whose ``concept_erased`` folder comes from ``extra_model_paths.yaml``; plus the erasure
nodes' definitions as the frontend sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from harness.errors import ComfyPromptError
from harness.prompts import tiny_workflow_prompt
from harness.runtime import ComfySession
from harness.workflow import EXAMPLE_WORKFLOWS_DIR, check_ui_workflow, load_ui_workflow, nodes_of_type, ui_to_api

WORKFLOW = EXAMPLE_WORKFLOWS_DIR / "concept_erased_sd15.json"
WEIGHTS = "esd-nudity-from-nudity-esdx.safetensors"  # the loader's widget value in the workflow
NODES = {"SDN_LoadConceptErasedModel": "Load Concept-Erased Model", "SDN_EraseConceptsUCE": "Erase Concepts (UCE)",
         "SDN_SaveConceptErasedWeights": "Save Concept-Erased Weights"}


def write_esd_x(root: Path) -> dict[str, torch.Tensor]:
    """An ESD-x style file (attn2 only, diffusers names) from the tiny SD1.5 model, as the example
    workflow names it; returns the erased weights by model key."""
    from harness import erased_files as ef
    from harness import tiny_models as tm

    model = tm.build_model("sd15", 0)  # what SDNTest_TinyCheckpoint loads
    erased = ef.perturbed(ef.unet_weights(model, ".attn2."), seed=31, scale=0.2)
    ef.save_safetensors(root / WEIGHTS, ef.rename(erased, ef.diffusers_names(model)))
    return erased


@pytest.fixture(scope="module")
def erased_root(comfy: ComfySession, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """A ``concept_erased`` folder, first in the lookup order, holding the workflow's weights."""
    root = tmp_path_factory.mktemp("concept_erased_workflow")
    erased = write_esd_x(root)
    comfy.add_model_folder("concept_erased", root)
    paths = comfy.folder_paths.folder_names_and_paths["concept_erased"][0]
    paths.remove(str(root))
    paths.insert(0, str(root))
    yield root, erased
    paths.remove(str(root))


def test_workflow_is_well_formed(comfy: ComfySession, erased_root) -> None:
    info = comfy.object_info()
    workflow = load_ui_workflow(WORKFLOW)
    assert check_ui_workflow(workflow, info) == []
    prompt = ui_to_api(workflow, info)
    (loader,) = nodes_of_type(prompt, "SDN_LoadConceptErasedModel")
    (ckpt,) = nodes_of_type(prompt, "CheckpointLoaderSimple")
    (sampler,) = nodes_of_type(prompt, "KSampler")
    assert prompt[loader]["inputs"] == {"model": [ckpt, 0], "clip": [ckpt, 1], "erased_weights": WEIGHTS,
                                        "strength": 1.0, "text_encoder": "auto"}
    assert prompt[sampler]["inputs"]["model"] == [loader, 0]
    assert {prompt[n]["inputs"]["clip"][0] for n in nodes_of_type(prompt, "CLIPTextEncode")} == {loader}


def test_workflow_runs_on_tiny_models(comfy: ComfySession, erased_root) -> None:
    from harness import erased_files as ef

    _, erased = erased_root
    cc = ef.pack_module(comfy, "comfy_compat")
    prompt = tiny_workflow_prompt(load_ui_workflow(WORKFLOW), comfy.object_info())
    (loader,) = nodes_of_type(prompt, "SDN_LoadConceptErasedModel")
    (sampler,) = nodes_of_type(prompt, "KSampler")
    out = comfy.run_prompt(prompt)
    model, clip, report = out.result(loader)
    assert f"UNet {len(erased)} in file / {len(erased)} matched / {len(erased)} patched" in report
    assert set(model.patches) == set(erased)
    for key, weight in erased.items():
        assert torch.equal(cc.effective_weight(model, key), weight)
    base_model, base_clip, _ = out.result(nodes_of_type(prompt, "SDNTest_TinyCheckpoint")[0])
    assert clip is base_clip and base_model.patches == {}  # no text-encoder weights: CLIP passed through
    erased_latent = out.result(sampler)[0]["samples"]
    (save,) = nodes_of_type(prompt, "SaveImage")
    assert len(out[save]["images"]) == 1
    # strength 0 samples exactly like the base model; strength 1 differs
    prompt[loader]["inputs"]["strength"] = 0.0
    base_latent = comfy.run_prompt(prompt).result(sampler)[0]["samples"]
    prompt[sampler]["inputs"]["model"] = prompt[loader]["inputs"]["model"]
    direct = comfy.run_prompt(prompt).result(sampler)[0]["samples"]
    assert torch.equal(base_latent, direct)
    assert not torch.allclose(erased_latent, direct) and torch.isfinite(erased_latent).all()


def test_on_a_server_with_extra_model_paths(comfy_server_factory: Any, tmp_path_factory) -> None:
    """Node definitions as the frontend sees them, the dropdown filled from extra_model_paths.yaml,
    the workflow through POST /prompt, and a bad path refused at validation."""
    root = tmp_path_factory.mktemp("server_concept_erased")
    write_esd_x(root)
    server = comfy_server_factory(extra_model_paths={"concept_erased": root})
    info = server.object_info()
    for node_id, name in NODES.items():
        node = info[node_id]
        assert node["display_name"] == name and node["category"] == "safe_denoiser/erasure"
        assert len(node["description"]) > 40
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{input_name} has no tooltip"
        if server.version == "N":
            assert len(node["output_tooltips"]) == len(node["output"]) and all(node["output_tooltips"])
    spec = info["SDN_LoadConceptErasedModel"]["input"]["required"]["erased_weights"]
    choices = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    assert WEIGHTS in choices
    prompt = tiny_workflow_prompt(load_ui_workflow(WORKFLOW), info)
    entry = server.wait(server.post_prompt(prompt), timeout=120)
    assert entry["status"]["status_str"] == "success"
    (loader,) = nodes_of_type(prompt, "SDN_LoadConceptErasedModel")
    assert "35 matched" in entry["outputs"][loader]["text"][0]
    prompt[loader]["inputs"]["erased_weights"] = "../../etc/passwd"
    error = server.prompt_error(prompt)
    assert isinstance(error, ComfyPromptError) and "refused" in str(error), error
    # VALIDATE_INPUTS takes only erased_weights: N files its failure under that input alone
    # (with **kwargs it would flag every input of the node).
    reasons = error.details["node_errors"][loader]["errors"]
    assert sorted({reason["extra_info"]["input_name"] for reason in reasons}) == ["erased_weights"], reasons
