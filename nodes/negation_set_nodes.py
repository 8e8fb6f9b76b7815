"""Nodes that build, load and save NEGATION_SET objects."""

from __future__ import annotations

import logging
import os
import re

import torch

import folder_paths

from .comfy_compat import NodeInputError
from .negation_set import (
    FOLDER_NAME,
    NegationSet,
    atomic_save,
    encode_batches,
    fingerprint_entry,
    list_set_names,
    load_image_folder,
    read_set_file,
    resize_images,
    resolve_set,
    set_metadata,
    set_roots,
    vae_fingerprint,
)

log = logging.getLogger(__name__)

CATEGORY = "safe_denoiser/negation"
SET_TOOLTIP = ("A folder of images (PNG/JPG/WebP) or a precomputed .safetensors set from models/negation_sets/, or a "
               "sub-folder of ComfyUI's input directory (input/...). Images are encoded once and cached in the folder.")


def describe(nset: NegationSet) -> str:
    _, c, h, w = nset.latents.shape
    return f"{nset.name}: {nset.count} latents {c}x{h}x{w} ({nset.meta.get('source', '?')})"


class LoadNegationSet:
    DESCRIPTION = ("Loads a negation set: latents of images whose content the Safe Denoiser should avoid. A folder of "
                   "images is encoded with the connected VAE (batched, with progress) and cached next to the images, "
                   "so later runs skip the VAE; a .safetensors set (from Save Negation Set) needs no VAE.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("NEGATION_SET", "STRING")
    RETURN_NAMES = ("negation_set", "info")
    OUTPUT_TOOLTIPS = ("The negation set for the Safe Denoiser nodes.", "A one-line summary of what was loaded.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "set_name": (list_set_names(), {"tooltip": SET_TOOLTIP}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip":
                               "Images are centre-cropped to a square and resized to this size before encoding "
                               "(512 for SD1.x as in the paper, 1024 for SDXL/SD3/Flux). At sampling time the latents "
                               "are resized to the generated latent's size if it differs."}),
                "max_images": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip":
                               "Use at most this many images (the first ones by file name); 0 = all."}),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "The VAE of the model you sample with. Required for image folders; not "
                                           "used for .safetensors sets."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, set_name, **kwargs):
        return fingerprint_entry(set_name)

    @classmethod
    def VALIDATE_INPUTS(cls, set_name):
        try:
            resolve_set(set_name, "Load Negation Set")
        except NodeInputError as err:
            return str(err)
        return True

    def load(self, set_name, resolution, max_images, vae=None):
        node = "Load Negation Set"
        path = resolve_set(set_name, node)
        if os.path.isdir(path):
            nset = load_image_folder(path, vae, int(resolution), int(max_images), node, set_name)
        elif path.lower().endswith(".safetensors"):
            nset = read_set_file(path, node)
            if max_images > 0 and nset.count > max_images:
                nset = NegationSet(nset.latents[:max_images], dict(nset.meta, count=max_images))
        else:
            raise NodeInputError(node, f"'{set_name}' is neither a folder of images nor a .safetensors set.")
        log.info("%s: %s", node, describe(nset))
        return (nset, describe(nset))


class NegationSetFromImages:
    DESCRIPTION = ("Builds a negation set from an IMAGE batch already in the graph (e.g. Load Image outputs) and a "
                   "VAE. Not cached: for large sets use a folder with Load Negation Set.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("NEGATION_SET", "STRING")
    RETURN_NAMES = ("negation_set", "info")
    OUTPUT_TOOLTIPS = ("The negation set for the Safe Denoiser nodes.", "A one-line summary.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Images of the content to avoid (any batch size; grayscale and RGBA are "
                                            "converted to RGB)."}),
            "vae": ("VAE", {"tooltip": "The VAE of the model you sample with."}),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip":
                           "Centre-crop and resize to this square size before encoding; 0 keeps the images' size."}),
            "name": ("STRING", {"default": "from_images", "tooltip": "A name shown in logs and stored when saved."}),
        }}

    def build(self, images, vae, resolution, name):
        node = "Negation Set from Images"
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
            shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise NodeInputError(node, f"expected a non-empty IMAGE batch [B, H, W, C], got {shape}.")
        if not torch.isfinite(images).all():
            raise NodeInputError(node, "the images contain NaN or infinite pixels; fix the node that produced them.")
        channels = images.shape[-1]
        if channels == 1:
            images = images.expand(-1, -1, -1, 3)
        elif channels == 4:
            images = images[..., :3]
        elif channels != 3:
            raise NodeInputError(node, f"images have {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")
        if min(images.shape[1:3]) < 8:
            raise NodeInputError(node, f"images of {images.shape[2]}x{images.shape[1]} px are too small to encode "
                                       "(at least 8x8).")
        if resolution > 0:
            images = resize_images(images.float(), int(resolution))
        latents = encode_batches(vae, images.float().clamp(0, 1).split(4), images.shape[0])
        nset = NegationSet(latents, {"name": name or "from_images", "source": "images", "images": int(images.shape[0]),
                                     "encode_resolution": int(resolution), "vae": vae_fingerprint(vae)[:16]})
        return (nset, describe(nset))


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")


class SaveNegationSet:
    DESCRIPTION = ("Writes a negation set as a .safetensors file of latents into models/negation_sets/, so it can be "
                   "shared without the images and loaded with Load Negation Set without a VAE.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the file was written.",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "negation_set": ("NEGATION_SET", {"tooltip": "The set to save."}),
            "filename": ("STRING", {"default": "my_negation_set", "tooltip":
                         "File name (letters, digits, '.', '_', '-', spaces; no folders). '.safetensors' is added."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of the same name."}),
        }}

    def save(self, negation_set, filename, overwrite):
        node = "Save Negation Set"
        if not isinstance(negation_set, NegationSet):
            raise NodeInputError(node, "negation_set must come from a negation set node.")
        stem = filename.strip()
        if stem.lower().endswith(".safetensors"):
            stem = stem[: -len(".safetensors")]
        if not _SAFE_NAME.match(stem) or ".." in stem:
            raise NodeInputError(node, f"'{filename}' is not a valid file name: use letters, digits, '.', '_', '-' "
                                       "and spaces, without folders.")
        roots = set_roots()
        root = roots[0] if roots else os.path.join(folder_paths.models_dir, FOLDER_NAME)
        path = os.path.join(root, stem + ".safetensors")
        if os.path.exists(path) and not overwrite:
            raise NodeInputError(node, f"{path} already exists. Choose another filename or enable overwrite.")
        atomic_save({"latents": negation_set.latents}, set_metadata(negation_set) | {"name": stem}, path)
        log.info("%s: wrote %s (%s)", node, path, describe(negation_set))
        return {"ui": {"text": [f"saved {stem}.safetensors ({negation_set.count} latents)"]}, "result": (path,)}
