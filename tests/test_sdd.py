"""Erase Concept (SDD) in real ComfyUI with tiny models: what is trained and what is not, the base
MODEL untouched, determinism, the erasure objective falling, Cancel keeping and resuming the run,
the saved edit round-tripping through the loader, and clear errors.  Training needs a ComfyUI whose
UNet does not add residuals in place (current releases); on the 2024-03 one the node must say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from safetensors import safe_open

from harness.locate import pack_file
from test_safe_denoiser import tm

FAST = dict(steps=8, learning_rate=3e-3, ema_decay=0.5, guidance=3.0, parameters="cross-attention", width=64,
            height=64, seed=0)


def conds():
    return tm.build_conditioning(1, 4, "sd15"), tm.build_conditioning(1, 4, "sd15", zero=True)


def run(comfy, model, **overrides):
    concept, uncond = conds()
    settings = dict(FAST, **overrides)
    out = comfy.nodes.NODE_CLASS_MAPPINGS["SDN_EraseConceptSDD"]().train(model, concept, uncond, **settings)
    return out["result"]


@pytest.fixture()
def current(comfy):
    if comfy.version != "N":
        pytest.skip("training needs a current ComfyUI (the 2024-03 UNet adds residuals in place)")


def snapshot(cc, model):
    keys = [k for k in model.model_state_dict() if k.startswith("diffusion_model.")]
    return {k: cc.base_weight(model, k).clone() for k in keys}, {k: len(v) for k, v in model.patches.items()}


def test_only_the_chosen_parameters_change_and_the_base_is_untouched(comfy, current):
    cc = comfy.node_module("comfy_compat")
    model = tm.build_model("sd15", 0)
    weights, patches = snapshot(cc, model)
    erased, edit, report = run(comfy, model)
    attn2 = {k for k in weights if ".attn2." in k}
    assert set(erased.patches) == attn2 and set("diffusion_model." + k for k in edit.weights) == attn2
    changed = [k for k in attn2 if not torch.equal(cc.effective_weight(erased, k), weights[k])]
    assert len(changed) >= len(attn2) // 2, "the cross-attention weights must move"
    after, patches_after = snapshot(cc, model)
    assert patches_after == patches and all(torch.equal(after[k], weights[k]) for k in weights)
    assert "cross-attention parameters" in report and "EMA teacher" in report


def test_the_same_seed_gives_the_same_weights(comfy, current):
    model = tm.build_model("sd15", 0)
    first, second = run(comfy, model)[1], run(comfy, model)[1]
    other = run(comfy, model, seed=1)[1]
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in first.weights)
    assert any(not torch.equal(first.weights[k], other.weights[k]) for k in first.weights)


def test_gradient_checkpointing_trains_the_same_weights(comfy, current, monkeypatch):
    """Checkpointing recomputes each layer's activations in the backward pass: on the CPU the recomputation
    repeats the same operations, so the trained weights must be bit for bit those of the plain backward,
    and the student's layers must really run under ``torch.utils.checkpoint`` (counted through a
    pass-through wrapper)."""
    model = tm.build_model("sd15", 0)
    plain = run(comfy, model, gradient_checkpointing=False)[1]
    calls = {"n": 0}
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    _, checkpointed, report = run(comfy, model, gradient_checkpointing=True)
    monkeypatch.undo()
    assert calls["n"] >= FAST["steps"] * 3, calls  # the layers of every student forward
    assert "gradient checkpointing on" in report
    assert checkpointed.weights.keys() == plain.weights.keys()
    assert all(torch.equal(checkpointed.weights[k], w) for k, w in plain.weights.items())


def erasure_gap(comfy, model) -> float:
    """Mean ||x0_hat(concept) - x0_hat(uncond)||^2 on fixed probes across noise levels: what SDD drives to 0."""
    import comfy.model_management as mm

    sdd = comfy.node_module("sdd")
    mm.load_models_gpu([model])
    ms = tm.model_object(model, "model_sampling")
    concept, uncond = conds()
    gen = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for t in (900.0, 600.0, 300.0):
            sigma = ms.sigma(torch.tensor(t)).reshape(1)
            x = torch.randn(4, 4, 8, 8, generator=gen) * float(sigma)
            inputs = [{"context": c[0][0].expand(4, -1, -1).float()} for c in (concept, uncond)]
            eps = [sdd.eps_prediction(model.model.diffusion_model, ms, x, sigma.expand(4), i) for i in inputs]
            total += float((eps[0] - eps[1]).pow(2).mean())
    return total


def test_the_erasure_objective_falls(comfy, current):
    model = tm.build_model("sd15", 0)
    erased = run(comfy, model, steps=30)[0]
    before, after = erasure_gap(comfy, model), erasure_gap(comfy, erased)
    print(f"[{comfy.version}] concept-uncond gap {before:.4g} -> {after:.4g}")
    assert after < 0.5 * before, (before, after)


def test_cancel_keeps_the_run_and_queueing_again_resumes_it(comfy, current):
    import comfy.model_management as mm
    import comfy.utils as comfy_utils

    model = tm.build_model("sd15", 0)
    uninterrupted = run(comfy, model, steps=10, seed=5)[1]
    calls = []

    def hook(value, total, preview, *args, **kwargs):
        calls.append(value)
        if value == 4:
            mm.interrupt_current_processing(True)

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(comfy, model, steps=10, seed=5)
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    erased, resumed, report = run(comfy, model, steps=10, seed=5)
    assert "resumed at step 4" in report, report
    assert all(torch.equal(resumed.weights[k], uninterrupted.weights[k]) for k in resumed.weights), \
        "a resumed run must equal an uninterrupted one"


def test_saved_edit_round_trips_through_the_loader(comfy, current, tmp_path):
    root = tmp_path / "concept_erased"
    root.mkdir()
    comfy.add_model_folder("concept_erased", root)
    cc = comfy.node_module("comfy_compat")
    model = tm.build_model("sd15", 0)
    erased, edit, _ = run(comfy, model)
    save = comfy.nodes.NODE_CLASS_MAPPINGS["SDN_SaveConceptErasedWeights"]()
    save.save(edit, "sdd_tiny", "diffusers", True)
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["SDN_LoadConceptErasedModel"]()
    loaded, _, report = loader.load(model, "sdd_tiny.safetensors", 1.0, "auto")["result"]
    assert "SDD" in report
    for key in erased.patches:
        assert torch.equal(cc.effective_weight(loaded, key), cc.effective_weight(erased, key)), key


def test_bad_inputs_give_clear_errors(comfy):
    model = tm.build_model("sd15", 0)
    cc = comfy.node_module("comfy_compat")
    weights, patches = snapshot(cc, model)
    if comfy.version != "N":
        with pytest.raises(cc.NodeInputError, match="adds residuals in place.*v0.3.64"):
            run(comfy, model)
    else:
        with pytest.raises(cc.NodeInputError, match="loss became .* learning_rate .* too high"):
            run(comfy, model, learning_rate=1e6, steps=20, ema_decay=0.0)
    with pytest.raises(cc.NodeInputError, match="steps 0 must be at least 1"):
        run(comfy, model, steps=0)
    with pytest.raises(cc.NodeInputError, match="unconditional is empty"):
        comfy.nodes.NODE_CLASS_MAPPINGS["SDN_EraseConceptSDD"]().train(model, conds()[0], [], **FAST)
    after, patches_after = snapshot(cc, model)
    assert patches_after == patches and all(torch.equal(after[k], weights[k]) for k in weights)


def test_the_node_trains_inside_a_graph(comfy, current, tmp_path):
    """ComfyUI executes nodes under torch.inference_mode(): the node must train there too, and its
    edit feeds Save Concept-Erased Weights."""
    from harness.prompts import PromptBuilder

    comfy.add_model_folder("concept_erased", tmp_path)
    b = PromptBuilder()
    model = b.add("SDNTest_TinyModel", family="sd15", seed=0)
    concept = b.add("SDNTest_TinyConditioning", seed=1, tokens=4, family="sd15", zero=False)
    uncond = b.add("SDNTest_TinyConditioning", seed=1, tokens=4, family="sd15", zero=True)
    sdd = b.add("SDN_EraseConceptSDD", model=model, concepts=concept, unconditional=uncond, **dict(FAST, steps=3))
    b.add("SDN_SaveConceptErasedWeights", edit=sdd.out(1), filename="sdd_graph", key_format="diffusers",
          overwrite=True)
    outputs = comfy.run_prompt(b.build())
    texts = [t for v in outputs.values() for t in v.get("text", [])]
    assert any("saved sdd_graph.safetensors" in t for t in texts), outputs
    written = [Path(root) / "sdd_graph.safetensors" for root in comfy.folder_paths.get_folder_paths("concept_erased")]
    (path,) = [p for p in written if p.is_file()]
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["method"].startswith("SDD") and json.loads(meta["settings"])["steps"] == 3


# ------------------------------------------------------------------------------ kernels/sdd.py (pure torch)

def _kernels():
    return pack_file("kernels/sdd.py", "sdn_kernels_sdd")


def test_ddim_schedule_and_training_timesteps():
    k = _kernels()
    schedule = k.ddim_timesteps()
    assert schedule[:3] == [981, 961, 941] and schedule[-1] == 1 and len(schedule) == 50
    gen = torch.Generator().manual_seed(0)
    draws = [k.training_timestep(schedule, 10, gen) for _ in range(2000)]
    assert set(draws) == set(range(762, 782))  # (schedule[11], schedule[10]] = (761, 781]
    assert {k.training_timestep(schedule, 49, gen) for _ in range(300)} == {0, 1}


def test_loss_ema_and_parameter_sets():
    k = _kernels()
    a, b = torch.randn(2, 3), torch.randn(2, 3, requires_grad=True)
    loss = k.sdd_loss(b, a)
    assert torch.isclose(loss, ((a - b) ** 2).mean())
    loss.backward()
    assert torch.allclose(b.grad, 2 * (b - a).detach() / 6)
    u = torch.randn(2, 3, requires_grad=True)
    k.sdd_loss(b, u).backward()
    assert u.grad is None, "the unconditional estimate is a stop-gradient target"
    teacher, student = [torch.ones(4)], [torch.zeros(4)]
    k.ema_update_(teacher, student, 0.9)
    assert torch.allclose(teacher[0], torch.full((4,), 0.9))
    name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert k.trained_parameter(name, "cross-attention") and k.trained_parameter(name.replace("attn2", "attn1"), "attention")
    assert not k.trained_parameter(name.replace("attn2", "attn1"), "cross-attention")
    assert k.trained_parameter("out.2.weight", "full") and not k.trained_parameter("out.2.weight", "attention")
    with pytest.raises(ValueError, match="not one of"):
        k.trained_parameter(name, "lora")
