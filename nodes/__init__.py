"""ComfyUI adapters: every node of the pack, collected per feature module."""

from __future__ import annotations

import logging

from .negation_set import register_folder
from .negation_set_nodes import LoadNegationSet, NegationSetFromImages, SaveNegationSet
from .safe_denoiser import SafeDenoiserKSampler, SafeDenoiserPatch

log = logging.getLogger(__name__)

register_folder()

# Node IDs are stable: never rename one; new behaviour gets a new ID.
NODE_CLASS_MAPPINGS = {
    "SDN_LoadNegationSet": LoadNegationSet,
    "SDN_NegationSetFromImages": NegationSetFromImages,
    "SDN_SaveNegationSet": SaveNegationSet,
    "SDN_SafeDenoiserPatch": SafeDenoiserPatch,
    "SDN_SafeDenoiserKSampler": SafeDenoiserKSampler,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SDN_LoadNegationSet": "Load Negation Set",
    "SDN_NegationSetFromImages": "Negation Set from Images",
    "SDN_SaveNegationSet": "Save Negation Set",
    "SDN_SafeDenoiserPatch": "Safe Denoiser (model patch)",
    "SDN_SafeDenoiserKSampler": "Safe Denoiser KSampler",
}
