"""Load Concept-Erased Model in a real ComfyUI with tiny models: every published format, written
here from a tiny model's own (perturbed) weights, loaded through the node and checked against the
expected effective weights (as ComfyUI's own ``calculate_weight`` computes them) at strength 1
and 0.5; the base MODEL/CLIP stay untouched; bad inputs give clear errors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from harness.errors import ComfyPromptError
from harness.prompts import PromptBuilder
from harness.runtime import ComfySession

ATOL = 1e-6


@dataclass
class Env:
    comfy: ComfySession
    root: Path
    ef: ModuleType  # tests/harness/erased_files
    cc: ModuleType  # pack nodes.comfy_compat
    em: ModuleType  # pack nodes.erased_model
    fmt: ModuleType  # pack nodes.erased_formats
    loader: Any

    def load(self, name: str, model: Any, strength: float = 1.0, te: str = "auto", clip: Any = None):
        out = self.loader().load(model, name, strength, te, clip=clip)
        assert out["ui"]["text"][0] == out["result"][2]
        return out["result"]


@pytest.fixture(scope="module")
def env(comfy: ComfySession, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from harness import erased_files as ef

    root = tmp_path_factory.mktemp("concept_erased")
    comfy.add_model_folder("concept_erased", root)
    yield Env(comfy, root, ef, ef.pack_module(comfy, "comfy_compat"), ef.pack_module(comfy, "erased_model"),
              ef.pack_module(comfy, "erased_formats"), comfy.nodes.NODE_CLASS_MAPPINGS["SDN_LoadConceptErasedModel"])


@pytest.fixture(scope="module")
def tiny(comfy: ComfySession) -> dict[str, Any]:
    from harness import erasure_models
    from harness import tiny_models as tm

    return {"sd15": tm.build_model("sd15"), "sdxl": tm.build_model("sdxl"),
            "clip": erasure_models.build_text_encoder(0)}


def snapshot(cc: ModuleType, patcher: Any, keys) -> dict[str, Any]:
    return {"patches": {k: len(v) for k, v in patcher.patches.items()}, "objects": dict(patcher.object_patches),
            "weights": {k: cc.base_weight(patcher, k).clone() for k in keys}}


def assert_unchanged(cc: ModuleType, patcher: Any, before: dict[str, Any]) -> None:
    after = snapshot(cc, patcher, before["weights"])
    assert after["patches"] == before["patches"] and after["objects"] == before["objects"]
    for key, weight in before["weights"].items():
        assert torch.equal(after["weights"][key], weight), key


def assert_effective(cc: ModuleType, new: Any, base: Any, expected: dict[str, torch.Tensor], strength: float) -> None:
    """``new``'s effective weights: ``(1 - s) base + s erased`` on exactly the expected keys.

    The erased weights are first cast to the base weight's dtype (the loader's documented cast;
    O's CLIP is fp16), the blend is computed in fp32 and rounded to that dtype, as ComfyUI does.
    """
    assert set(new.patches) == set(expected), sorted(set(new.patches) ^ set(expected))[:5]
    keys, got, want = sorted(expected), [], []
    for key in keys:  # compared in one batch: hundreds of small comparisons are slow on a busy CPU
        base_w = cc.base_weight(base, key)
        blend = (1.0 - strength) * base_w.float() + strength * expected[key].to(base_w.dtype).float()
        want.append(blend.to(base_w.dtype).float().reshape(-1))
        got.append(cc.effective_weight(new, key).float().reshape(-1))
    if keys:
        errors = torch.stack([(g - w).abs().max() for g, w in zip(got, want)])
        worst = int(errors.argmax())
        assert float(errors[worst]) <= ATOL, f"{keys[worst]}: max |effective - expected| = {float(errors[worst])}"


def check_format(env: Env, name: str, model: Any, expected: dict[str, torch.Tensor], *, te: str = "auto",
                 clip: Any = None, clip_expected: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Load ``name`` at s = 1 and 0.5, check the effective weights and untouched inputs; the reports."""
    before = snapshot(env.cc, model, expected)
    clip_before = snapshot(env.cc, clip.patcher, clip_expected or {}) if clip is not None else None
    reports = []
    for strength in (1.0, 0.5):
        new_model, new_clip, report = env.load(name, model, strength, te, clip)
        assert new_model is not model
        assert_effective(env.cc, new_model, model, expected, strength)
        if clip_expected:
            assert new_clip is not clip
            assert_effective(env.cc, new_clip.patcher, clip.patcher, clip_expected, strength)
        else:
            assert new_clip is clip
        reports.append(report)
    assert_unchanged(env.cc, model, before)
    if clip is not None:
        assert_unchanged(env.cc, clip.patcher, clip_before)
    n = len(expected)
    assert f"UNet {n} in file / {n} matched / {n} patched" in reports[0] or not n, reports[0]
    assert "architecture check: ok" in reports[0]
    return reports


# ------------------------------------------------------------------------------ formats


def test_esd_x_diffusers_safetensors(env, tiny):
    """ESD-x (current code): only the attn2 parameters, diffusers names, .safetensors."""
    model = tiny["sd15"]
    erased = env.ef.perturbed(env.ef.unet_weights(model, ".attn2."), seed=1)
    env.ef.save_safetensors(env.root / "esd-nudity-from-nudity-esdx.safetensors",
                            env.ef.rename(erased, env.ef.diffusers_names(model)))
    reports = check_format(env, "esd-nudity-from-nudity-esdx.safetensors", model, erased)
    assert "diffusers UNet names" in reports[0] and "cross-attention only" in reports[0]
    assert "strength: 0.5 (blend" in reports[1]


def test_uce_kv_only_fp16_is_cast(env, tiny):
    """UCE / ESD-x-strict: only attn2.to_k / to_v, stored in fp16 -> cast to the model's fp32."""
    model = tiny["sd15"]
    weights = {k: v for k, v in env.ef.unet_weights(model, ".attn2.to_").items() if ".to_k." in k or ".to_v." in k}
    erased = {k: v.half() for k, v in env.ef.perturbed(weights, seed=2).items()}
    env.ef.save_safetensors(env.root / "uce" / "uce-nudity.safetensors",
                            env.ef.rename(erased, env.ef.diffusers_names(model)))
    reports = check_format(env, "uce/uce-nudity.safetensors", model, erased)
    assert "keys/values only" in reports[0] and f"{len(erased)} tensors cast float16 -> float32" in reports[0]


def test_full_ldm_checkpoint_applies_only_the_unet(env, tiny):
    """ESD 2023 'compvis' .ckpt: whole LatentDiffusion dict (UNet + VAE + text encoder + schedule
    buffers) in {'state_dict': ...} with a numpy global_step and a PyTorch Lightning callback
    object; only the UNet is applied, unless the text encoder is asked for."""
    model, clip = tiny["sd15"], tiny["clip"]
    erased = env.ef.perturbed(env.ef.unet_weights(model), seed=3)
    sd = {"model." + k: v for k, v in erased.items()}
    sd.update({"first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3), "betas": torch.rand(10),
               "model_ema.decay": torch.tensor(0.999)})
    clip_sd = clip.cond_stage_model.state_dict()
    te_erased = env.ef.perturbed({k: v for k, v in clip_sd.items() if ".text_model." in k}, seed=22)
    sd.update({k.replace("clip_l.", "cond_stage_model."): v for k, v in te_erased.items()})
    env.ef.save_with_lightning_callback(env.root / "compvis-esdu-nudity.ckpt",
                                        {"state_dict": sd, "global_step": np.int64(1000)})
    reports = check_format(env, "compvis-esdu-nudity.ckpt", model, erased, clip=clip)
    report = reports[0]
    assert "LDM checkpoint names" in report and "unwrapped {'state_dict': ...}" in report and "full UNet" in report
    assert f"{len(te_erased)} text-encoder weights not applied" in report and "VAE" in report
    assert "noise-schedule" in report and "ignored global_step, callbacks" in report
    check_format(env, "compvis-esdu-nudity.ckpt", model, erased, te="apply", clip=clip, clip_expected=te_erased)


def ema_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM ``LitEma`` buffers: ``model_ema.`` + the DiffusionWrapper parameter name
    (``diffusion_model.<key>``, as ``weights`` is keyed) without dots."""
    return {"model_ema." + k.replace(".", ""): v for k, v in weights.items()}


def test_ema_only_checkpoint_loads_the_ema_weights(env, tiny):
    """A checkpoint holding only the EMA copy (LDM ``LitEma`` names, dots removed) is the model:
    the dots are restored against the model's keys and the report says the EMA weights were used.
    Next to regular UNet weights the EMA copy stays ignored."""
    model = tiny["sd15"]
    erased = env.ef.perturbed(env.ef.unet_weights(model), seed=31)
    sd = ema_names(erased) | {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(500),
                              "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3)}
    env.ef.save_safetensors(env.root / "sdd-ema-only.safetensors", sd)
    report = check_format(env, "sdd-ema-only.safetensors", model, erased)[0]
    assert "EMA weights (model_ema.*" in report and "the EMA copy is the model" in report, report

    regular = env.ef.perturbed(env.ef.unet_weights(model), seed=32)
    both = {"model." + k: v for k, v in regular.items()} | ema_names(erased)
    env.ef.save_safetensors(env.root / "sdd-with-ema.safetensors", both)
    report = check_format(env, "sdd-with-ema.safetensors", model, regular)[0]
    assert "EMA copy (the trained weights are used)" in report and "EMA weights (model_ema" not in report, report


def test_full_diffusers_unet_pickle_wrapped(env, tiny):
    """Old UCE / RECE / SalUn: full diffusers unet.state_dict() as .pt, RECE-style wrapped."""
    model = tiny["sd15"]
    erased = env.ef.perturbed(env.ef.unet_weights(model), seed=4)
    names = env.ef.diffusers_names(model)
    env.ef.save_pickle(env.root / "diffusers-nudity-ESDu1-UNET.pt", env.ef.rename(erased, names))
    env.ef.save_pickle(env.root / "rece-nudity.pt", {"state_dict": env.ef.rename(erased, names), "epoch": 3})
    for name in ("diffusers-nudity-ESDu1-UNET.pt", "rece-nudity.pt"):
        report = check_format(env, name, model, erased)[0]
        assert "pickle, loaded safely" in report and "full UNet" in report


def test_bare_ldm_and_comfy_names(env, tiny):
    model = tiny["sd15"]
    erased = env.ef.perturbed(env.ef.unet_weights(model, "middle_block"), seed=5)
    env.ef.save_pickle(env.root / "bare.bin", {k[len("diffusion_model."):]: v for k, v in erased.items()})
    env.ef.save_safetensors(env.root / "comfy.safetensors", erased)
    assert "bare LDM UNet names" in check_format(env, "bare.bin", model, erased)[0]
    assert "ComfyUI names" in check_format(env, "comfy.safetensors", model, erased)[0]


@pytest.mark.parametrize("shards", [1, 2])
def test_diffusers_unet_folder(env, tiny, shards):
    """SDD: a diffusers UNet folder (attn2 trained), also sharded."""
    model = tiny["sd15"]
    erased = env.ef.perturbed(env.ef.unet_weights(model, ".attn2."), seed=6)
    folder = env.root / f"sdd-nudity-{shards}"
    env.ef.diffusers_folder(folder, env.ef.rename(erased, env.ef.diffusers_names(model)),
                            config=env.ef.UNET_CONFIG, shards=shards)
    report = check_format(env, folder.name, model, erased)[0]
    assert "diffusers UNet folder" in report


def test_diffusers_pipeline_folder(env, tiny):
    """MACE / SDD pipelines: unet/ (as .bin) + text_encoder/; the text encoder only on 'apply'."""
    model, clip = tiny["sd15"], tiny["clip"]
    erased = env.ef.perturbed(env.ef.unet_weights(model, ".attn2."), seed=7)
    clip_sd = clip.cond_stage_model.state_dict()
    te_keys = [k for k in clip_sd if ".encoder.layers.1." in k]
    te_erased = env.ef.perturbed({k: clip_sd[k] for k in te_keys}, seed=8)
    pipe = env.root / "mace-nudity"
    env.ef.diffusers_folder(pipe / "unet", env.ef.rename(erased, env.ef.diffusers_names(model)),
                            config=env.ef.UNET_CONFIG, fmt="bin")
    te_file = {k[len("clip_l.transformer."):]: v for k, v in te_erased.items()}
    te_file["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    env.ef.diffusers_folder(pipe / "text_encoder", te_file, config=env.ef.CLIP_CONFIG, stem="model")
    (pipe / "model_index.json").write_text("{}", encoding="utf-8")
    (pipe / "vae").mkdir()
    auto = check_format(env, "mace-nudity", model, erased, clip=clip)[0]
    assert "diffusers pipeline folder" in auto and "text_encoder/ not applied" in auto and "vae" in auto
    applied = check_format(env, "mace-nudity", model, erased, te="apply", clip=clip, clip_expected=te_erased)[0]
    assert f"text encoder {len(te_file)} in file / {len(te_erased)} matched / {len(te_erased)} patched" in applied
    assert "position_ids" in applied


def test_advunlearn_text_encoder(env, tiny):
    """AdvUnlearn: TEXT ENCODER only, 'text_encoder.' prefix + alias copies; and an HF folder."""
    model, clip = tiny["sd15"], tiny["clip"]
    clip_sd = clip.cond_stage_model.state_dict()
    keys = [k for k in clip_sd if ".text_model." in k]
    te_erased = env.ef.perturbed({k: clip_sd[k] for k in keys}, seed=9)
    names = {k: k[len("clip_l.transformer."):] for k in keys}
    sd = {"text_encoder." + names[k]: v for k, v in te_erased.items()}
    aliases = 0
    for k, v in te_erased.items():  # alias copies of the sub-modules, as AdvUnlearn saves them
        name = names[k]
        for canonical, alias in (("text_model.embeddings.", "embedding."), ("text_model.encoder.", "encoder."),
                                 ("text_model.final_layer_norm.", "final_layer_norm.")):
            if name.startswith(canonical):
                sd[alias + name[len(canonical):]] = v
                aliases += 1
    env.ef.save_pickle(env.root / "TextEncoder-nudity-AdvUnlearn.pt", sd)
    report = check_format(env, "TextEncoder-nudity-AdvUnlearn.pt", model, {}, clip=clip, clip_expected=te_erased)[0]
    assert f"{aliases} alias copies of keys already in the file" in report
    # only the alias copies: still applied (to the same keys)
    env.ef.save_safetensors(env.root / "aliases-only.safetensors",
                            {k: v for k, v in sd.items() if not k.startswith("text_encoder.")})
    check_format(env, "aliases-only.safetensors", model, {}, clip=clip, clip_expected=te_erased)
    env.ef.diffusers_folder(env.root / "AdvUnlearn-hf", {names[k]: v for k, v in te_erased.items()},
                            config=env.ef.CLIP_CONFIG, stem="model")
    assert "CLIP text-encoder folder" in check_format(env, "AdvUnlearn-hf", model, {}, clip=clip,
                                                      clip_expected=te_erased)[0]
    with pytest.raises(ValueError, match="connect the CLIP"):
        env.load("TextEncoder-nudity-AdvUnlearn.pt", model)


def test_open_clip_text_encoder_of_a_checkpoint(env, tiny):
    """SD2-style checkpoints store the text encoder in open_clip names: converted with ComfyUI's
    converter when the text encoder is asked for."""
    model, clip = tiny["sd15"], tiny["clip"]
    clip_sd = clip.cond_stage_model.state_dict()
    te = {k[len("clip_l.transformer."):]: v for k, v in clip_sd.items() if k.startswith("clip_l.transformer.")}
    te_erased = env.ef.perturbed(te, seed=10)
    unet = env.ef.perturbed(env.ef.unet_weights(model, "output_blocks.3."), seed=11)
    sd = {"model." + k: v for k, v in unet.items()}
    sd.update({"cond_stage_model.model." + k: v for k, v in env.ef.openclip_names(te_erased, 2).items()})
    env.ef.save_safetensors(env.root / "sd2-style.safetensors", sd)
    expected = {"clip_l.transformer." + k: v for k, v in te_erased.items()}
    report = check_format(env, "sd2-style.safetensors", model, unet, te="apply", clip=clip, clip_expected=expected)[0]
    assert "open_clip names" in report


def test_lora_file_through_comfy_loader(env, tiny):
    model = tiny["sd15"]
    model_sd = model.model_state_dict()
    keys = sorted(k for k in model_sd if ".attn2.to_k." in k or ".attn2.to_v." in k)
    lora, deltas = env.ef.kohya_lora(env.ef.diffusers_names(model), keys, model_sd=model_sd)
    env.ef.save_safetensors(env.root / "erase-lora.safetensors", lora)
    before = snapshot(env.cc, model, keys)
    for strength in (1.0, 0.5):
        new, _, report = env.load("erase-lora.safetensors", model, strength)
        assert set(new.patches) == set(keys)
        for key in keys:
            want = env.cc.base_weight(model, key).float() + strength * deltas[key]
            torch.testing.assert_close(env.cc.effective_weight(new, key), want, rtol=0, atol=ATOL)
        assert "LoRA" in report and f"{len(keys)} UNet weights" in report
    assert_unchanged(env.cc, model, before)


def test_sdxl_and_conversion_round_trip(env, tiny):
    """The diffusers <-> LDM maps are bijective on the tiny SD1.5 and SDXL UNets, and a full
    diffusers SDXL UNet lands on every weight."""
    for family in ("sd15", "sdxl"):
        model = tiny[family]
        keys = {k[len("diffusion_model."):] for k in env.ef.unet_weights(model)}
        inverse = env.em.ldm_to_diffusers_map(model)
        forward = env.em.unet_diffusers_map(model)
        assert set(inverse) == keys and len(set(inverse.values())) == len(keys)
        assert all(forward[d] == ldm for ldm, d in inverse.items())
        assert inverse == env.ef.diffusers_names(model)
    golden = {"conv_in.weight": "input_blocks.0.0.weight",
              "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight":
                  "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
              "down_blocks.1.attentions.0.proj_in.weight": "input_blocks.3.1.proj_in.weight",
              "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight":
                  "middle_block.1.transformer_blocks.0.attn2.to_v.weight",
              "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight":
                  "output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"}
    forward = env.em.unet_diffusers_map(tiny["sd15"])
    assert {d: forward[d] for d in golden} == golden
    assert env.em.ldm_to_diffusers_map(tiny["sdxl"])["label_emb.0.0.weight"] == "add_embedding.linear_1.weight"
    model = tiny["sdxl"]
    erased = env.ef.perturbed(env.ef.unet_weights(model), seed=12)
    env.ef.save_safetensors(env.root / "esd-sdxl-full.safetensors",
                            env.ef.rename(erased, env.ef.diffusers_names(model)))
    check_format(env, "esd-sdxl-full.safetensors", model, erased)


# ------------------------------------------------------------------------------ composition, cache


def test_patch_model_matches_effective_weights_and_loras_compose(env, tiny):
    model = tiny["sd15"]
    model_sd = model.model_state_dict()
    erased = env.ef.perturbed(env.ef.unet_weights(model, ".attn2."), seed=13)
    env.ef.save_safetensors(env.root / "compose.safetensors", env.ef.rename(erased, env.ef.diffusers_names(model)))
    new, _, _ = env.load("compose.safetensors", model, 0.5)
    keys = sorted(k for k in erased if ".to_k." in k)
    lora, deltas = env.ef.kohya_lora(env.ef.diffusers_names(model), keys, model_sd=model_sd, seed=14)
    import comfy.sd

    with_lora, _ = comfy.sd.load_lora_for_models(new, None, lora, 1.0, 0.0)  # a LoRA loader after the node
    for key in keys:
        want = 0.5 * env.cc.base_weight(model, key).float() + 0.5 * erased[key] + deltas[key]
        torch.testing.assert_close(env.cc.effective_weight(with_lora, key), want, rtol=0, atol=ATOL)
    # ComfyUI's own weight patching puts exactly these weights into the module.  (Other tests may
    # have sampled with a clone that is still loaded, patched in place: unload it first, as
    # ComfyUI does before loading another clone.)
    import comfy.model_management

    comfy.model_management.unload_all_models()
    key = keys[0]
    original = env.cc.base_weight(model, key).clone()
    with_lora.patch_model()
    try:
        live = dict(with_lora.model.named_parameters())[key].detach().clone()
        assert torch.equal(env.cc.base_weight(with_lora, key), original)
    finally:
        with_lora.unpatch_model()
    torch.testing.assert_close(live, env.cc.effective_weight(with_lora, key), rtol=0, atol=ATOL)
    assert torch.equal(dict(model.model.named_parameters())[key], original)


def test_parsed_files_are_cached_by_path_mtime_size(env, tiny):
    model = tiny["sd15"]
    erased = env.ef.perturbed(env.ef.unet_weights(model, ".attn2.to_v."), seed=15)
    path = env.ef.save_safetensors(env.root / "cached.safetensors",
                                   env.ef.rename(erased, env.ef.diffusers_names(model)))
    assert "cache: miss" in env.load("cached.safetensors", model)[2]
    hits = env.fmt.CACHE.hits
    assert "cache: hit" in env.load("cached.safetensors", model, 0.3)[2] and env.fmt.CACHE.hits == hits + 1
    changed = env.ef.perturbed(env.ef.unet_weights(model, ".attn2.to_v."), seed=16)
    env.ef.save_safetensors(path, env.ef.rename(changed, env.ef.diffusers_names(model)))
    os.utime(path, ns=(1, 2))
    new, _, report = env.load("cached.safetensors", model)
    assert "cache: miss" in report
    assert_effective(env.cc, new, model, changed, 1.0)
    cache = env.fmt.SourceCache(budget=lambda: 1)  # bounded: nothing larger than the budget is kept
    cache.get(str(path), "auto")
    assert len(cache) == 0


# ------------------------------------------------------------------------------ bad input


def expect_error(env: Env, name: str, model: Any, match: str, **kwargs: Any) -> str:
    before = snapshot(env.cc, model, [])
    with pytest.raises(ValueError, match=match) as info:
        env.load(name, model, **kwargs)
    message = str(info.value)
    assert message.startswith("Load Concept-Erased Model:"), message
    assert_unchanged(env.cc, model, before)
    return message


@pytest.mark.parametrize("container", ["zip", "legacy", "raw"])
def test_malicious_pickle_is_refused_and_never_runs(env, tiny, tmp_path, container):
    """A state dict carrying an object whose __reduce__ creates a file: refused, never run (the
    torch.save zip format, the legacy torch.save format, and a plain pickle.dump)."""
    model = tiny["sd15"]
    sentinel = tmp_path / "pwned"
    erased = env.ef.perturbed(env.ef.unet_weights(model, ".attn2.to_v."), seed=17)
    name = f"evil-{container}.pt"
    env.ef.malicious_pickle(env.root / name, sentinel, erased, container)
    message = expect_error(env, name, model, "refused")
    assert "not executed" in message and ("pathlib" in message or container != "zip")
    assert not sentinel.exists()


def test_bad_files(env, tiny):
    model, sdxl = tiny["sd15"], tiny["sdxl"]
    names = env.ef.diffusers_names(model)
    attn = env.ef.unet_weights(model, ".attn2.")
    # zero matching keys
    env.ef.save_safetensors(env.root / "nomatch.safetensors", {"input_blocks.99.1.proj_in.weight": torch.zeros(2, 2)})
    expect_error(env, "nomatch.safetensors", model, "none of its 1 UNet keys matches")
    # SD1.x weights on SDXL: other shapes
    full = env.ef.rename(env.ef.perturbed(env.ef.unet_weights(model), seed=18), names)
    env.ef.save_safetensors(env.root / "sd15-full.safetensors", full)
    expect_error(env, "sd15-full.safetensors", sdxl, "wrong base model")
    # a wider text context (SD2's 1024 on a 768 model; here 48 on the tiny 32)
    wide = {names[k[len("diffusion_model."):]]: torch.zeros(v.shape[0], 48) for k, v in attn.items()
            if ".to_k." in k}
    env.ef.save_safetensors(env.root / "wide-context.safetensors", wide)
    message = expect_error(env, "wide-context.safetensors", model, "48-dim text embeddings")
    assert "takes 32" in message
    assert [env.em.context_family(d) for d in (768, 1024, 2048)] == ["SD1.x", "SD2.x", "SDXL"]
    # NaN / inf
    broken = env.ef.perturbed(attn, seed=19)
    next(iter(broken.values()))[0, 0] = float("nan")
    env.ef.save_safetensors(env.root / "nan.safetensors", env.ef.rename(broken, names))
    expect_error(env, "nan.safetensors", model, "NaN or infinite")
    # fp32 values that overflow the model's fp16? (tiny model is fp32: inf directly)
    broken = env.ef.perturbed(attn, seed=20)
    next(iter(broken.values()))[0, 0] = float("inf")
    env.ef.save_pickle(env.root / "inf.pt", env.ef.rename(broken, names))
    expect_error(env, "inf.pt", model, "NaN or infinite")
    # corrupt / truncated
    good = env.ef.save_safetensors(env.root / "good.safetensors",
                                   env.ef.rename(env.ef.perturbed(attn), names)).read_bytes()
    (env.root / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    expect_error(env, "truncated.safetensors", model, "corrupt or truncated")
    pickled = env.ef.save_pickle(env.root / "good.pt", env.ef.rename(env.ef.perturbed(attn), names)).read_bytes()
    (env.root / "truncated.pt").write_bytes(pickled[: len(pickled) // 2])
    expect_error(env, "truncated.pt", model, "corrupt, truncated")
    (env.root / "empty.ckpt").write_bytes(b"")
    expect_error(env, "empty.ckpt", model, "empty")
    # unknown formats
    (env.root / "noise.bin").write_bytes(bytes(range(256)) * 4)
    expect_error(env, "noise.bin", model, "unknown format")
    env.ef.save_safetensors(env.root / "vae-only.safetensors", {"foo.bar": torch.zeros(2), "baz": torch.ones(1)})
    expect_error(env, "vae-only.safetensors", model, "unknown format")
    (env.root / "not-a-model").mkdir(exist_ok=True)
    (env.root / "not-a-model" / "readme.txt").write_text("hi", encoding="utf-8")
    expect_error(env, "not-a-model", model, "unknown format")
    env.ef.save_pickle(env.root / "receler-eraser_weights.pt", {"unet.down.eraser.lora_a": torch.zeros(2, 2)})
    expect_error(env, "receler-eraser_weights.pt", model, "Receler")


def test_paths_outside_the_roots_are_refused(env, tiny, tmp_path):
    model = tiny["sd15"]
    outside = tmp_path / "outside.safetensors"
    env.ef.save_safetensors(outside, env.ef.rename(env.ef.perturbed(env.ef.unet_weights(model, ".attn2.to_v.")),
                                                   env.ef.diffusers_names(model)))
    expect_error(env, "../outside.safetensors", model, "absolute paths and '..' are refused")
    expect_error(env, str(outside), model, "refused")
    link = env.root / "link.safetensors"
    if not link.exists():
        link.symlink_to(outside)
    expect_error(env, "link.safetensors", model, "resolves outside")
    expect_error(env, "missing.safetensors", model, "was not found")
    assert "link.safetensors" not in env.em.list_names()


def test_dropdown_validation_and_graph(env, tiny, comfy):
    """The dropdown lists files and folders (not a folder's inner files); validation refuses a
    path outside the roots before anything runs; a graph runs the node."""
    model = tiny["sd15"]
    erased = env.ef.perturbed(env.ef.unet_weights(model, ".attn2."), seed=21)
    env.ef.diffusers_folder(env.root / "graph-sdd", env.ef.rename(erased, env.ef.diffusers_names(model)),
                            config=env.ef.UNET_CONFIG)
    names = env.em.list_names()
    assert "graph-sdd" in names and not any(n.startswith("graph-sdd/") for n in names)
    b = PromptBuilder()
    base = b.add("SDNTest_TinyModel", family="sd15", seed=0)
    loader = b.add("SDN_LoadConceptErasedModel", model=base, erased_weights="../escape.safetensors", strength=1.0,
                   text_encoder="auto")
    pos = b.add("SDNTest_TinyConditioning", seed=1, tokens=4, family="sd15", zero=False)
    neg = b.add("SDNTest_TinyConditioning", seed=1, tokens=4, family="sd15", zero=True)
    latent = b.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampler = b.add("KSampler", model=loader, seed=0, steps=2, cfg=3.0, sampler_name="euler", scheduler="normal",
                    positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    decode = b.add("VAEDecode", samples=sampler, vae=b.add("SDNTest_TinyVAE", seed=0, channels=4))
    b.add("PreviewImage", images=decode)
    prompt = b.build()
    with pytest.raises(ComfyPromptError, match="refused"):
        comfy.run_prompt(prompt)
    prompt[loader.id]["inputs"]["erased_weights"] = "graph-sdd"
    out = comfy.run_prompt(prompt)
    new_model, clip, report = out.result(loader.id)
    assert clip is None and "diffusers UNet folder" in report
    assert_effective(env.cc, new_model, model, erased, 1.0)
    assert torch.isfinite(out.result(sampler.id)[0]["samples"]).all()
