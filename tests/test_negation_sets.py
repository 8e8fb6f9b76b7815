"""Negation sets in real ComfyUI: encoding with a real (tiny) VAE, the cache, set files, bad input."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from harness.errors import ComfyPromptError
from harness.prompts import PromptBuilder


class CountingVAE:
    """Wraps a real ComfyUI VAE and counts ``encode`` calls (everything else is the VAE's own)."""

    def __init__(self, vae):
        self._vae = vae
        self.encodes = 0

    def encode(self, pixels):
        self.encodes += 1
        return self._vae.encode(pixels)

    def __getattr__(self, name):
        return getattr(self._vae, name)


def node(comfy, node_id: str):
    return comfy.nodes.NODE_CLASS_MAPPINGS[node_id]()


def write_image(path: Path, seed: int, mode: str = "RGB", size: int = 48) -> None:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size, size + 8, channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)


@pytest.fixture(scope="module")
def roots(comfy, tmp_path_factory):
    root = tmp_path_factory.mktemp("negation_sets")
    extra = tmp_path_factory.mktemp("negation_sets_extra")  # a second root, as extra_model_paths.yaml adds
    comfy.add_model_folder("negation_sets", extra)
    # the first root is where Save Negation Set writes: make it this test's folder
    comfy.folder_paths.folder_names_and_paths["negation_sets"][0].insert(0, str(root))
    return root, extra


@pytest.fixture()
def vae(comfy):
    from harness import tiny_models

    return CountingVAE(tiny_models.build_vae(0))


@pytest.fixture()
def image_set(roots, request):
    folder = roots[0] / ("imgs_" + "".join(c if c.isalnum() else "_" for c in request.node.name))
    folder.mkdir()
    write_image(folder / "a.png", 1)
    write_image(folder / "b.jpg", 2)
    write_image(folder / "c.webp", 3)
    write_image(folder / "d_gray.png", 4, "L")
    write_image(folder / "e_rgba.png", 5, "RGBA")
    return folder


def load(comfy, name, vae=None, resolution=64, max_images=0):
    return node(comfy, "SDN_LoadNegationSet").load(name, resolution, max_images, vae)


def test_folder_is_encoded_once_and_cached(comfy, image_set, vae):
    nset, info = load(comfy, image_set.name, vae)
    assert nset.latents.shape == (5, 4, 8, 8) and torch.isfinite(nset.latents).all()
    assert vae.encodes >= 1 and "5 latents" in info
    caches = list((image_set / ".negation_cache").glob("*.safetensors"))
    assert len(caches) == 1
    before = vae.encodes
    again, info2 = load(comfy, image_set.name, vae)
    assert vae.encodes == before, "a cache hit must not call the VAE"
    assert torch.equal(again.latents, nset.latents) and "cache" in info2
    # the cache holds the raw latents the VAE produced
    assert torch.equal(load_file(str(caches[0]))["latents"], nset.latents)
    assert not list((image_set / ".negation_cache").glob(".tmp-*")), "no temporary files left behind"


def test_encoding_is_reproducible_without_the_cache(comfy, image_set, vae):
    """Older ComfyUI samples the VAE posterior: encoding runs under a fixed seed."""
    first, _ = load(comfy, image_set.name, vae)
    for f in (image_set / ".negation_cache").iterdir():
        f.unlink()
    second, _ = load(comfy, image_set.name, vae)
    assert torch.equal(first.latents, second.latents)


@pytest.mark.parametrize("change", ["modify", "add", "remove", "resolution", "other_vae"])
def test_any_change_invalidates_the_cache(comfy, image_set, vae, change):
    first, _ = load(comfy, image_set.name, vae)
    calls = vae.encodes
    resolution, used_vae = 64, vae
    if change == "modify":
        write_image(image_set / "a.png", 99)
    elif change == "add":
        write_image(image_set / "f.png", 6)
    elif change == "remove":
        (image_set / "b.jpg").unlink()
    elif change == "resolution":
        resolution = 32
    else:
        from harness import tiny_models

        used_vae = CountingVAE(tiny_models.build_vae(1))
    second, _ = load(comfy, image_set.name, used_vae, resolution=resolution)
    assert used_vae.encodes > (calls if used_vae is vae else 0), "the VAE must run again"
    expected = {"add": 6, "remove": 4}.get(change, 5)
    assert second.count == expected
    if change in ("modify", "other_vae"):
        assert not torch.equal(first.latents, second.latents)
    assert len(list((image_set / ".negation_cache").glob("*.safetensors"))) == 2


def test_corrupt_cache_is_rebuilt(comfy, image_set, vae, caplog):
    first, _ = load(comfy, image_set.name, vae)
    cache = next((image_set / ".negation_cache").glob("*.safetensors"))
    cache.write_bytes(b"\x00garbage" * 10)
    calls = vae.encodes
    with caplog.at_level(logging.WARNING):
        second, _ = load(comfy, image_set.name, vae)
    assert vae.encodes > calls and torch.equal(first.latents, second.latents)
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert torch.equal(load_file(str(cache))["latents"], first.latents), "the cache file was rewritten"


def test_atomic_write_leaves_target_and_folder_clean_on_failure(comfy, tmp_path):
    ns = comfy.node_module("negation_set")
    target = tmp_path / "set.safetensors"
    target.mkdir()  # os.replace onto a directory fails after the temp file was written
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        ns.atomic_save({"latents": torch.zeros(1, 4, 2, 2)}, {}, str(target))
    assert (target / "keep").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.safetensors"], "temp file removed"


def test_max_images_takes_the_first_files_by_name(comfy, image_set, vae):
    nset, _ = load(comfy, image_set.name, vae, max_images=2)
    full, _ = load(comfy, image_set.name, vae)
    assert nset.count == 2 and torch.equal(nset.latents, full.latents[:2])


def test_unreadable_files_are_skipped_with_a_warning(comfy, image_set, vae, caplog):
    (image_set / "broken.png").write_bytes(b"not an image at all")
    (image_set / "notes.txt").write_text("ignored: not an image extension")
    with caplog.at_level(logging.WARNING):
        nset, _ = load(comfy, image_set.name, vae)
    assert nset.count == 5
    assert any("broken.png" in r.getMessage() for r in caplog.records)


def test_save_then_load_round_trips_without_a_vae(comfy, roots, image_set, vae):
    nset, _ = load(comfy, image_set.name, vae)
    save = node(comfy, "SDN_SaveNegationSet")
    out = save.save(nset, "shared set", False)
    path = Path(out["result"][0])
    assert path.parent == roots[0] and path.name == "shared set.safetensors"  # the first root
    loaded, _ = load(comfy, "shared set.safetensors", None)
    assert torch.equal(loaded.latents, nset.latents)
    assert loaded.meta["latent_channels"] == "4" and loaded.meta["count"] == "5"
    with pytest.raises(ValueError, match="already exists.*overwrite"):
        save.save(nset, "shared set", False)
    save.save(nset, "shared set.safetensors", True)
    for bad in ("../escape", "sub/dir", "", ".hidden"):
        with pytest.raises(ValueError, match="Save Negation Set"):
            save.save(nset, bad, True)


def test_dropdown_lists_every_root_and_input_folders(comfy, roots, image_set):
    root, extra = roots
    write_image(extra / "x.png", 1)  # a loose image is not a set
    (extra / "from_extra").mkdir(exist_ok=True)
    save_file({"latents": torch.zeros(2, 4, 8, 8)}, str(extra / "extra_set.safetensors"))
    input_sets = Path(comfy.folder_paths.get_input_directory()) / "my_input_set"
    input_sets.mkdir(parents=True, exist_ok=True)
    write_image(input_sets / "a.png", 7)
    names = comfy.nodes.NODE_CLASS_MAPPINGS["SDN_LoadNegationSet"].INPUT_TYPES()["required"]["set_name"][0]
    assert image_set.name in names and "from_extra" in names and "extra_set.safetensors" in names
    assert "input/my_input_set" in names and "x.png" not in names
    from harness import tiny_models

    nset, _ = load(comfy, "input/my_input_set", tiny_models.build_vae(0))
    assert nset.count == 1


def test_sets_from_an_image_batch(comfy, vae):
    from_images = node(comfy, "SDN_NegationSetFromImages")
    rgba = torch.rand(3, 40, 56, 4)
    nset, info = from_images.build(rgba, vae, 32, "batch")
    assert nset.latents.shape == (3, 4, 4, 4) and "batch" in info
    gray, _ = from_images.build(torch.rand(2, 64, 64, 1), vae, 0, "gray")
    assert gray.latents.shape == (2, 4, 8, 8)
    for bad, needle in ((torch.rand(0, 64, 64, 3), "empty"), (torch.full((1, 64, 64, 3), float("nan")), "NaN"),
                        (torch.rand(1, 64, 64, 2), "channels"), (torch.rand(1, 4, 4, 3), "too small")):
        with pytest.raises(ValueError, match=needle):
            from_images.build(bad, vae, 0, "bad")


# ------------------------------------------------------------------------------ bad input


def write_set(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def bad_sets(roots):
    root = roots[0]
    (root / "empty_folder").mkdir()
    junk = root / "only_junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"\x89PNG but not really")
    (junk / "b.jpg").write_bytes(b"")
    nan = torch.zeros(2, 4, 8, 8)
    nan[1, 2, 3, 4] = float("nan")
    write_set(root / "nan.safetensors", {"latents": nan})
    write_set(root / "wrong_name.safetensors", {"samples": torch.zeros(2, 4, 8, 8)})
    write_set(root / "flat.safetensors", {"latents": torch.zeros(2, 256)})
    write_set(root / "lying.safetensors", {"latents": torch.zeros(2, 4, 8, 8)}, {"latent_channels": "16"})
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    outside = root.parent / "outside_set"
    outside.mkdir(exist_ok=True)
    write_image(outside / "a.png", 1)
    link = root / "sneaky_link"
    if not link.exists():
        os.symlink(outside, link)
    return root


@pytest.mark.parametrize("name, needle", [
    ("empty_folder", "holds no images"),
    ("only_junk", "could be read as an image"),
    ("nan.safetensors", "NaN"),
    ("wrong_name.safetensors", "no tensor named 'latents'"),
    ("flat.safetensors", "[N, C, H, W]"),
    ("lying.safetensors", "declares 16 latent channels"),
    ("corrupt.safetensors", "corrupt"),
    ("sneaky_link", "outside"),
    ("../outside_set", "'..'"),
    ("/etc", "absolute"),
    ("no_such_set", "was not found"),
])
def test_bad_sets_give_clear_errors(comfy, bad_sets, vae, name, needle):
    with pytest.raises(ValueError) as info:
        load(comfy, name, vae)
    msg = str(info.value)
    assert msg.startswith("Load Negation Set:") and needle in msg, msg
    assert vae.encodes == 0 or name == "only_junk"


def test_folder_without_vae_says_to_connect_one(comfy, image_set):
    with pytest.raises(ValueError, match="connect the VAE"):
        load(comfy, image_set.name, None)


def test_escaping_names_are_refused_at_validation_in_a_graph(comfy, bad_sets):
    b = PromptBuilder()
    loader = b.add("SDN_LoadNegationSet", set_name="../outside_set", resolution=64, max_images=0)
    b.add("SDN_SaveNegationSet", negation_set=loader.out(0), filename="never", overwrite=False)
    with pytest.raises(ComfyPromptError) as info:
        comfy.run_prompt(b.build())
    assert info.value.stage == "validation" and "Load Negation Set" in str(info.value)
    assert not (bad_sets / "never.safetensors").exists()


def test_set_loaded_in_a_graph_feeds_the_sampler(comfy, image_set):
    b = PromptBuilder()
    vae = b.add("SDNTest_TinyVAE", seed=0, channels=4)
    loader = b.add("SDN_LoadNegationSet", set_name=image_set.name, resolution=64, max_images=0, vae=vae)
    model = b.add("SDNTest_TinyModel", family="sd15", seed=0)
    patched = b.add("SDN_SafeDenoiserPatch", model=model, negation_set=loader.out(0), mode="paper", strength=1.0,
                    bandwidth=1.0, start_percent=0.0, end_percent=0.5, beta_threshold=0.0)
    cond = b.add("SDNTest_TinyConditioning", seed=1, tokens=4, family="sd15", zero=False)
    latent = b.add("EmptyLatentImage", width=64, height=64, batch_size=2)
    sampler = b.add("KSampler", model=patched, seed=0, steps=4, cfg=2.0, sampler_name="euler", scheduler="normal",
                    positive=cond, negative=cond, latent_image=latent, denoise=1.0)
    b.add("PreviewImage", images=b.add("VAEDecode", samples=sampler, vae=vae))
    out = comfy.run_prompt(b.build())
    assert torch.isfinite(out.result(sampler.id)[0]["samples"]).all()
    assert "5 latents" in out.result(loader.id)[1]
