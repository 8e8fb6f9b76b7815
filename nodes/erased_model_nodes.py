"""Load Concept-Erased Model: published concept-erasure weights applied to a base MODEL/CLIP."""

from __future__ import annotations

import logging

from .comfy_compat import NodeInputError, validation_message
from .erased_formats import TE_MODES
from .erased_model import FOLDER_NAME, NODE, fingerprint, list_names, load_concept_erased, resolve

log = logging.getLogger(__name__)

CATEGORY = "safe_denoiser/erasure"


class LoadConceptErasedModel:
    DISPLAY_NAME = NODE
    DESCRIPTION = (
        "Applies published concept-erasure weights (ESD, UCE, RECE, SDD, MACE, SalUn, AdvUnlearn, or your own from "
        "Save Concept-Erased Weights) to the base model you connect, without converting them by hand. Accepts "
        ".safetensors, safely loaded .pt/.ckpt/.bin pickles, diffusers UNet or pipeline folders, LDM or diffusers "
        "key names, partial files (only the trained layers) and LoRAs. The weights are applied as patches on a copy "
        "of the model (the input is untouched), so LoRA loaders placed after this node still work. The report says "
        "what was found, matched, skipped and cast.")
    SEARCH_ALIASES = ["erase concept", "unlearn", "unlearning", "ESD", "UCE", "RECE", "SDD", "MACE", "SalUn", "AdvUnlearn", "nsfw", "safe model", "concept erased"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = (
        "The base model with the erased weights applied (a patched copy).",
        "The CLIP with text-encoder edits applied (e.g. AdvUnlearn); the input CLIP when there are none, or None "
        "when no CLIP is connected.",
        "What was loaded: format and key space, keys matched / in the file / patched, keys skipped and why, dtype "
        "casts, architecture check.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model the weights were made from (e.g. SD1.4/1.5 for most "
                                               "ESD/UCE/RECE/SalUn releases, SDXL for SDXL variants)."}),
                "erased_weights": (list_names(), {"tooltip":
                    f"A file (.safetensors, .pt, .ckpt, .bin) or a diffusers folder from models/{FOLDER_NAME}/ (and "
                    f"'{FOLDER_NAME}' folders of extra_model_paths.yaml). Refresh the browser after adding files."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip":
                    "1 = use the erased weights as published; between 0 and 1 blends base and erased weights "
                    "((1 - s) x base + s x erased); 0 = the base model; above 1 extrapolates. For LoRA files it "
                    "scales the LoRA like a LoRA loader."}),
                "text_encoder": (list(TE_MODES), {"default": "auto", "tooltip":
                    "auto: apply text-encoder weights only when the file holds nothing else (AdvUnlearn); the text "
                    "encoder inside full checkpoints and pipelines is ignored. apply: also apply the text encoder of "
                    "checkpoints/pipelines (needs the clip input). ignore: never touch the CLIP."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint; needed for text-encoder edits "
                                             "(AdvUnlearn) and passed through unchanged otherwise."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, erased_weights, **kwargs):
        return fingerprint(erased_weights)

    @classmethod
    def VALIDATE_INPUTS(cls, erased_weights):
        return validation_message(resolve, erased_weights, NODE)

    def load(self, model, erased_weights, strength, text_encoder="auto", clip=None):
        if text_encoder not in TE_MODES:
            raise NodeInputError(NODE, f"text_encoder '{text_encoder}' is not one of {', '.join(TE_MODES)}.")
        new_model, new_clip, report = load_concept_erased(model, clip, erased_weights, strength, text_encoder)
        return {"ui": {"text": [report]}, "result": (new_model, new_clip, report)}
