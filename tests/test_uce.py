"""Erase Concepts (UCE): the closed form against its definition and its guarantees (pure torch),
then the node in a real ComfyUI with a tiny REAL CLIP (token embeddings from ``comfy.sd.CLIP``):
erased concepts reach their guides, preserved concepts move less than the documented bound, and
Save Concept-Erased Weights -> Load Concept-Erased Model reproduces the weights bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

from harness.locate import pack_file

U = pack_file("kernels/uce.py", "sdn_kernels_uce")

#: Erase residuals without preserve concepts on the wide tiny pair (O and N alike, README):
#: measured ~8e-4 per concept / 5e-3 per token with a ridge of 1e-7 (the tiny CLIP's tokens span
#: some directions only weakly: singular values 224 ... 0.04), ~0.1 with the default ridge.
PRECISE_RIDGE = 1e-7
ERASE_RESIDUAL_CONCEPT = 5e-3
ERASE_RESIDUAL_TOKEN = 2e-2
ERASE_RESIDUAL_DEFAULT = 0.25


def problem(seed: int, d: int = 24, n: int = 10, m: int = 8, out: int = 16):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return rnd(out, d), rnd(n, d), rnd(n, d), rnd(m, d)


# ------------------------------------------------------------------------------ kernel


@pytest.mark.parametrize("lam", [0.0, 0.5, 4.0])
def test_operator_is_the_closed_form(lam):
    """W' equals the paper's formula (explicit inverse) and minimises its objective."""
    w, c, g, p = problem(0)
    op = U.uce_operator(c, g, p, lam=lam, ridge=1e-2)
    new = U.apply_operator(w, op)
    mu = op.mu
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    v = g @ w.T  # v*_i = W g_i, rows
    mat1 = v.T @ c + lam * (w @ p.T @ p) + mu * w
    mat2 = c.T @ c + lam * p.T @ p + mu * eye
    torch.testing.assert_close(new, mat1 @ torch.inverse(mat2), rtol=1e-10, atol=1e-10)
    grad = (new @ c.T - v.T) @ c + lam * (new @ p.T - w @ p.T) @ p + mu * (new - w)
    assert float(grad.abs().max()) < 1e-9
    assert mu == pytest.approx(1e-2 * float(c.pow(2).sum(1).mean()))


def test_guarantees_hold():
    """The erase residual identity and the preserve bound of the module docstring."""
    for seed, (d, n, m) in enumerate([(24, 10, 8), (16, 30, 30), (64, 5, 3)]):
        w, c, g, p = problem(seed, d, n, m)
        for lam in (0.1, 1.0, 10.0):
            op = U.uce_operator(c, g, p, lam=lam, ridge=1e-3)
            new = U.apply_operator(w, op)
            r = lam * p.T @ p + op.mu * torch.eye(d, dtype=torch.float64)
            expected = -w @ (g - c).T @ torch.inverse(torch.eye(n, dtype=torch.float64) + c @ torch.inverse(r) @ c.T)
            torch.testing.assert_close(new @ c.T - w @ g.T, expected, rtol=1e-8, atol=1e-8)
            change = U.preserve_changes(w, new, op)
            bound, loose = U.preserve_bounds(w, op)
            assert bool((change <= bound * (1 + 1e-9)).all()) and bool((bound <= loose * (1 + 1e-9)).all())
    # more lambda -> preserved outputs move less, erased ones reach their guide less
    w, c, g, p = problem(7)
    stats = []
    for lam in (0.01, 1.0, 100.0):
        op = U.uce_operator(c, g, p, lam=lam)
        new = U.apply_operator(w, op)
        stats.append((float(U.preserve_changes(w, new, op).max()), float(U.erase_residuals(w, new, op).mean())))
    assert stats[0][0] > stats[1][0] > stats[2][0] and stats[0][1] < stats[1][1] < stats[2][1]


def test_no_preserve_reaches_guides_and_leaves_the_rest():
    w, c, g, _ = problem(3, d=32, n=6)
    op = U.uce_operator(c, g, None, ridge=1e-6)
    new = U.apply_operator(w, op)
    assert float(U.erase_residuals(w, new, op).max()) < 1e-4
    basis = torch.linalg.svd(c, full_matrices=True).Vh[6:]  # directions no erased token spans
    torch.testing.assert_close(basis @ new.T, basis @ w.T, rtol=1e-7, atol=1e-7)


def test_align_tokens_pairs_like_the_official_code():
    concept, guide = torch.arange(10.0)[:, None].repeat(1, 2), 100 + torch.arange(10.0)[:, None].repeat(1, 2)
    c, gd = U.align_tokens(concept, 3, guide, 1)  # concept "a b c", guide "x"
    assert c[:, 0].tolist() == [3, 4, 5, 6, 7, 8, 9] and gd[:, 0].tolist() == [101, 102, 103, 104, 105, 106, 107]
    c, gd = U.align_tokens(concept, 1, guide, 0)  # one-word concept, empty guide (start token on)
    assert c[:, 0].tolist() == list(range(1, 10)) and gd[:, 0].tolist() == [100 + i for i in range(9)]
    with pytest.raises(ValueError):
        U.uce_operator(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        U.uce_operator(torch.full((2, 4), float("nan")), torch.zeros(2, 4))


# ------------------------------------------------------------------------------ node


@pytest.fixture(scope="module")
def uce(comfy, tmp_path_factory) -> dict[str, Any]:
    from harness import erased_files as ef
    from harness import erasure_models as em
    from harness import tiny_models as tm

    root = tmp_path_factory.mktemp("concept_erased_uce")
    comfy.add_model_folder("concept_erased", root)
    paths = comfy.folder_paths.folder_names_and_paths["concept_erased"][0]
    paths.remove(str(root))
    paths.insert(0, str(root))  # Save Concept-Erased Weights writes into the first folder
    mapping = comfy.nodes.NODE_CLASS_MAPPINGS
    yield {"root": root, "ef": ef, "cc": ef.pack_module(comfy, "comfy_compat"), "uce": ef.pack_module(comfy, "uce"),
           # the wide pair (context 384 > the ~150 constrained tokens) for the quantitative checks
           "model": em.build_wide_unet(0), "clip": em.build_text_encoder(0, em.WIDE),
           "sdxl": tm.build_model("sdxl"), "small_clip": em.build_text_encoder(0),
           "erase": mapping["SDN_EraseConceptsUCE"], "save": mapping["SDN_SaveConceptErasedWeights"],
           "load": mapping["SDN_LoadConceptErasedModel"]}
    paths.remove(str(root))


def rows(uce_mod, clip, concepts, guides, preserve):
    """The erase/guide/preserve token rows exactly as the node builds them."""
    c_rows, g_rows, p_rows = [], [], []
    for concept, guide in zip(concepts, guides):
        (ce, cl), (ge, gl) = (uce_mod.encode_concept(clip, t, "test") for t in (concept, guide))
        c, g = U.align_tokens(ce, cl, ge, gl)
        c_rows.append(c)
        g_rows.append(g)
    for text in preserve:
        emb, last = uce_mod.encode_concept(clip, text, "test")
        p_rows.append(emb[last:])
    return torch.cat(c_rows), torch.cat(g_rows), torch.cat(p_rows) if p_rows else torch.zeros(0, c_rows[0].shape[1])


def run_uce(env, model, concepts, guides="", preserve="", lam=1.0, edit_keys=True, clip=None, ridge=None):
    extra = {} if ridge is None else {"regularization": ridge}
    out = env["erase"]().erase(model, clip or env["clip"], concepts, guides, preserve, lam, edit_keys, **extra)
    assert out["ui"]["text"][0] == out["result"][2]
    return out["result"]


def edited_keys(model, edit_keys=True):
    suffixes = (".attn2.to_v.weight", ".attn2.to_k.weight") if edit_keys else (".attn2.to_v.weight",)
    return sorted(k for k in model.model_state_dict() if k.endswith(suffixes))


def test_erased_concepts_reach_their_guides(uce):
    """Each erased concept's tokens are mapped onto its guide's outputs: per concept
    ||W' C_k^T - W G_k^T||_F / ||W (G_k - C_k)^T||_F, and per token, over every edited layer."""
    model, clip, cc = uce["model"], uce["clip"], uce["cc"]
    concepts, guide = ["nudity", "naked"], "a person wearing clothes"
    before = {k: cc.base_weight(model, k).clone() for k in edited_keys(model)}
    measured = {}
    for ridge in (PRECISE_RIDGE, None):
        new, edit, report = run_uce(uce, model, ", ".join(concepts), guide, ridge=ridge)
        assert set(new.patches) == set(before) and model.patches == {}
        worst_concept, worst_token = 0.0, 0.0
        for concept in concepts:
            c, g, _ = rows(uce["uce"], clip, [concept], [guide], [])
            for key, w in before.items():
                w, w_new = w.double(), cc.effective_weight(new, key).double()
                miss, need = c @ w_new.T - g @ w.T, g @ w.T - c @ w.T
                worst_concept = max(worst_concept, float(miss.norm() / need.norm()))
                worst_token = max(worst_token, float((miss.norm(dim=1) / need.norm(dim=1)).max()))
        measured["default" if ridge is None else ridge] = (worst_concept, worst_token)
    for key, w in before.items():
        assert torch.equal(cc.base_weight(model, key), w)  # the input model is untouched
    assert measured[PRECISE_RIDGE][0] < ERASE_RESIDUAL_CONCEPT and measured[PRECISE_RIDGE][1] < ERASE_RESIDUAL_TOKEN
    assert measured["default"][0] < ERASE_RESIDUAL_DEFAULT
    assert "erase residual" in report and json.loads(edit.metadata["concepts"]) == concepts
    print(f"\nUCE erase residuals (ridge: worst per-concept, worst per-token): {measured}")


def test_preserved_concepts_stay_within_the_bound(uce):
    model, clip, cc = uce["model"], uce["clip"], uce["cc"]
    concepts, preserve = ["nudity"], ["a cat", "a mountain landscape"]
    c, g, p = rows(uce["uce"], clip, concepts, [""], preserve)
    measured = {}
    for lam in (1.0, 10.0):
        new, _, report = run_uce(uce, model, ",".join(concepts), "", ",".join(preserve), lam)
        op = U.uce_operator(c, g, p, lam=lam)  # the node's default ridge
        worst_ratio, worst_rel, worst_res = 0.0, 0.0, 0.0
        for key in edited_keys(model):
            w = cc.base_weight(model, key).detach().double()
            w_new = cc.effective_weight(new, key).double()
            change = (p @ (w_new - w).T).norm(dim=1)
            bound, loose = U.preserve_bounds(w, op)
            assert bool((change <= bound * (1 + 1e-6) + 1e-6).all()) and bool((bound <= loose * (1 + 1e-9)).all())
            worst_ratio = max(worst_ratio, float((change / bound).max()))
            worst_rel = max(worst_rel, float((change / (p @ w.T).norm(dim=1)).max()))
            worst_res = max(worst_res, float(U.erase_residuals(w, w_new, op).mean()))
        measured[lam] = (worst_rel, worst_ratio, worst_res)
        assert "preserve change" in report and "closed-form bound" in report
    # a larger lambda trades erasure for preservation
    assert measured[10.0][0] < measured[1.0][0] and measured[10.0][2] > measured[1.0][2]
    print(f"\nUCE tiny-CLIP measurements (lambda: worst relative preserve change, worst change/bound, "
          f"mean erase residual): {measured}")


def test_save_then_load_reproduces_the_weights_bit_for_bit(uce):
    model, cc = uce["model"], uce["cc"]
    for key_format in ("diffusers", "ldm"):
        new, edit, _ = run_uce(uce, model, "nudity", "", "a cat", 2.0, edit_keys=key_format == "diffusers")
        path = uce["save"]().save(edit, f"uce-{key_format}", key_format, True)["result"][0]
        assert Path(path).parent == uce["root"]
        with safetensors.safe_open(path, framework="pt") as fh:
            keys, meta = list(fh.keys()), fh.metadata()
            for key in keys:
                ldm = key[len("model.diffusion_model."):] if key_format == "ldm" else \
                    next(k for k, d in edit.diffusers_names.items() if d == key)
                assert torch.equal(fh.get_tensor(key), edit.weights[ldm])
        assert len(keys) == len(edited_keys(model, key_format == "diffusers"))
        assert all(k.startswith("down_blocks.") or k.startswith(("mid_block.", "up_blocks.")) for k in keys) \
            if key_format == "diffusers" else all(k.startswith("model.diffusion_model.") for k in keys)
        assert meta["method"].startswith("UCE") and meta["key_space"] == key_format
        loaded, _, report = uce["load"]().load(model, f"uce-{key_format}.safetensors", 1.0, "auto")["result"]
        assert set(loaded.patches) == set(new.patches)
        for key in new.patches:
            assert torch.equal(cc.effective_weight(loaded, key), cc.effective_weight(new, key)), key
        assert "made by: UCE" in report
    with pytest.raises(ValueError, match="already exists"):
        uce["save"]().save(edit, "uce-ldm", "ldm", False)
    with pytest.raises(ValueError, match="not a valid file name"):
        uce["save"]().save(edit, "../escape", "ldm", True)


def test_uce_on_sdxl_and_bad_input(uce):
    new, edit, report = run_uce(uce, uce["sdxl"], "nudity", clip=uce["small_clip"])
    assert set(new.patches) == set(edited_keys(uce["sdxl"])) and "SDXL" not in report.split("\n")[0]
    assert all(name.startswith(("down_blocks", "mid_block", "up_blocks")) for name in edit.diffusers_names.values())
    with pytest.raises(ValueError, match="no concept to erase"):
        run_uce(uce, uce["model"], " , ")
    with pytest.raises(ValueError, match="2 guide concepts for 3 concepts"):
        run_uce(uce, uce["model"], "a, b, c", "x, y")
    with pytest.raises(ValueError, match="both erased and preserved"):
        run_uce(uce, uce["model"], "nudity", "", "nudity")
    with pytest.raises(ValueError, match="not a ComfyUI CLIP"):
        uce["erase"]().erase(uce["model"], object(), "nudity", "", "", 1.0, True)
    with pytest.raises(ValueError, match="longer than 75 tokens"):
        run_uce(uce, uce["model"], " ".join(["word"] * 80))
    with pytest.raises(ValueError, match="connect the CLIP of the same checkpoint"):
        run_uce(uce, uce["model"], "nudity", clip=uce["small_clip"])  # 32-dim tokens, 384-wide model


def test_uce_graph(comfy, uce):
    """In a prompt: tiny model + tiny real CLIP -> Erase Concepts -> Save -> KSampler."""
    from harness.prompts import PromptBuilder

    b = PromptBuilder()
    model = b.add("SDNTest_TinyModel", family="sd15", seed=0)
    clip = b.add("SDNTest_ErasureCLIP", seed=0, hidden=32)
    erase = b.add("SDN_EraseConceptsUCE", model=model, clip=clip, concepts="nudity", guide_concepts="",
                  preserve_concepts="a cat", preserve_lambda=1.0, edit_keys=True)
    b.add("SDN_SaveConceptErasedWeights", edit=erase.out(1), filename="uce-graph", key_format="diffusers",
          overwrite=True)
    pos = b.add("CLIPTextEncode", text="a photo", clip=clip)
    neg = b.add("CLIPTextEncode", text="", clip=clip)
    latent = b.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampler = b.add("KSampler", model=erase, seed=0, steps=2, cfg=3.0, sampler_name="euler", scheduler="normal",
                    positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    b.add("PreviewImage", images=b.add("VAEDecode", samples=sampler, vae=b.add("SDNTest_TinyVAE", seed=0, channels=4)))
    out = comfy.run_prompt(b.build())
    assert (uce["root"] / "uce-graph.safetensors").is_file()
    assert torch.isfinite(out.result(sampler.id)[0]["samples"]).all()
