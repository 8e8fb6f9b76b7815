"""Nodes that build, load and save NEGATION_SET objects."""

from __future__ import annotations

import logging
import os

from .comfy_compat import NodeInputError, rgb_image_batch, validation_message
from .negation_set import (
    FOLDER_NAME,
    NegationSet,
    atomic_save,
    builtin_set,
    encode_batches,
    fingerprint_entry,
    list_set_names,
    load_builtin_set,
    load_image_folder,
    read_set_file,
    resize_images,
    resolve_set,
    set_metadata,
    vae_fingerprint,
)
from .paths import SaveFileNode, output_path

log = logging.getLogger(__name__)

CATEGORY = "safe_denoiser/negation"
SET_TOOLTIP = ("A folder of images (PNG/JPG/WebP) or a precomputed .safetensors set from models/negation_sets/, or a "
               "sub-folder of ComfyUI's input directory (input/...). Images are encoded once and cached in the folder.")


class NegationSetSource:
    """The outputs of the nodes that make a negation set."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("NEGATION_SET", "STRING")
    RETURN_NAMES = ("negation_set", "info")
    OUTPUT_TOOLTIPS = ("The negation set for the Safe Denoiser nodes.",
                       "A one-line summary of the set: name, number of latents, latent shape, source.")


class LoadNegationSet(NegationSetSource):
    DISPLAY_NAME = "Load Negation Set"
    SEARCH_ALIASES = ["negative image", "negation set", "nsfw", "unsafe images", "safe denoiser"]
    DESCRIPTION = ("Loads a negation set: latents of images whose content the Safe Denoiser should avoid. A folder of "
                   "images is encoded with the connected VAE (batched, with progress) and cached next to the images, "
                   "so later runs skip the VAE; a .safetensors set (from Save Negation Set) needs no VAE.")
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
        return fingerprint_entry(set_name, cls.DISPLAY_NAME)

    @classmethod
    def VALIDATE_INPUTS(cls, set_name):
        if builtin_set(set_name) is not None:
            return True
        return validation_message(resolve_set, set_name, cls.DISPLAY_NAME)

    def load(self, set_name, resolution, max_images, vae=None):
        node = self.DISPLAY_NAME
        builtin = builtin_set(set_name)
        path = "" if builtin is not None else resolve_set(set_name, node)
        if builtin is not None:
            nset = load_builtin_set(builtin, vae, int(resolution), int(max_images), node)
        elif os.path.isdir(path):
            nset = load_image_folder(path, vae, int(resolution), int(max_images), node, set_name)
        elif path.lower().endswith(".safetensors"):
            nset = read_set_file(path, node)
            if max_images > 0 and nset.count > max_images:
                nset = NegationSet(nset.latents[:max_images], dict(nset.meta, count=max_images))
        else:
            raise NodeInputError(node, f"'{set_name}' is neither a folder of images nor a .safetensors set.")
        log.info("%s: %s", node, nset.describe())
        return (nset, nset.describe())


class NegationSetFromImages(NegationSetSource):
    DISPLAY_NAME = "Negation Set from Images"
    SEARCH_ALIASES = ["negative image", "negation set", "images to avoid"]
    DESCRIPTION = ("Builds a negation set from an IMAGE batch already in the graph (e.g. Load Image outputs) and a "
                   "VAE. Not cached: for large sets use a folder with Load Negation Set.")
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
        node = self.DISPLAY_NAME
        images = rgb_image_batch(images, node, 8, "the VAE needs at least 8x8 pixels.")
        if resolution > 0:
            images = resize_images(images, int(resolution))
        latents = encode_batches(vae, images.clamp(0, 1).split(4), images.shape[0])
        nset = NegationSet(latents, {"name": name or "from_images", "source": "images", "images": int(images.shape[0]),
                                     "encode_resolution": int(resolution), "vae": vae_fingerprint(vae)[:16]})
        return (nset, nset.describe())


class SaveNegationSet(SaveFileNode):
    DISPLAY_NAME = "Save Negation Set"
    DESCRIPTION = ("Writes a negation set as a .safetensors file of latents into models/negation_sets/, so it can be "
                   "shared without the images and loaded with Load Negation Set without a VAE.")
    SEARCH_ALIASES = ["negation set", "save latents"]
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "negation_set": ("NEGATION_SET", {"tooltip": "The set to save."}),
            "filename": cls.filename_input("my_negation_set"),
            "overwrite": cls.overwrite_input(),
        }}

    def save(self, negation_set, filename, overwrite):
        node = self.DISPLAY_NAME
        if not isinstance(negation_set, NegationSet):
            raise NodeInputError(node, "negation_set must come from a negation set node.")
        path = output_path(FOLDER_NAME, filename, overwrite, node)
        stem = os.path.basename(path)[: -len(".safetensors")]
        atomic_save({"latents": negation_set.latents}, set_metadata(negation_set) | {"name": stem}, path)
        log.info("%s: wrote %s (%s)", node, path, negation_set.describe())
        return {"ui": {"text": [f"saved {stem}.safetensors ({negation_set.count} latents)"]}, "result": (path,)}
