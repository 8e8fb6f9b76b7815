"""ComfyUI adapters: every node of the pack, collected per feature module."""

from __future__ import annotations

import logging

from .negation_set import register_folder
from .negation_set_nodes import LoadNegationSet, NegationSetFromImages, SaveNegationSet
from .erased_model import register_folder as register_concept_erased_folder
from .erased_model_nodes import LoadConceptErasedModel
from .uce import EraseConceptsUCE, SaveConceptErasedWeights
from .sdd import EraseConceptSDD
from .nudity_reward import NudityRewardPreview, register_nudenet_folder
from .safe_denoiser import SafeDenoiserKSampler, SafeDenoiserPatch
from .reference_sampler import SafeDenoiserReferenceSampler
from .restart_sampler import SafeDenoiserRestartSampler
from .demo import DemoDigitConditioning, LoadDemoModel, register_demo_negation_sets

log = logging.getLogger(__name__)

register_folder()
register_concept_erased_folder()
register_nudenet_folder()
register_demo_negation_sets()  # in memory: nothing is written at start-up

# Node IDs are stable: never rename one; new behaviour gets a new ID.
NODE_CLASS_MAPPINGS = {
    "SDN_LoadNegationSet": LoadNegationSet,
    "SDN_NegationSetFromImages": NegationSetFromImages,
    "SDN_SaveNegationSet": SaveNegationSet,
    "SDN_SafeDenoiserPatch": SafeDenoiserPatch,
    "SDN_SafeDenoiserKSampler": SafeDenoiserKSampler,
    "SDN_NudityRewardPreview": NudityRewardPreview,
    "SDN_LoadConceptErasedModel": LoadConceptErasedModel,
    "SDN_EraseConceptsUCE": EraseConceptsUCE,
    "SDN_SaveConceptErasedWeights": SaveConceptErasedWeights,
    "SDN_LoadDemoModel": LoadDemoModel,
    "SDN_DemoDigitConditioning": DemoDigitConditioning,
    "SDN_SafeDenoiserReferenceSampler": SafeDenoiserReferenceSampler,
    "SDN_SafeDenoiserRestartSampler": SafeDenoiserRestartSampler,
    "SDN_EraseConceptSDD": EraseConceptSDD,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SDN_LoadNegationSet": "Load Negation Set",
    "SDN_NegationSetFromImages": "Negation Set from Images",
    "SDN_SaveNegationSet": "Save Negation Set",
    "SDN_SafeDenoiserPatch": "Safe Denoiser (model patch)",
    "SDN_SafeDenoiserKSampler": "Safe Denoiser KSampler",
    "SDN_NudityRewardPreview": "Nudity Reward Preview",
    "SDN_LoadConceptErasedModel": "Load Concept-Erased Model",
    "SDN_EraseConceptsUCE": "Erase Concepts (UCE)",
    "SDN_SaveConceptErasedWeights": "Save Concept-Erased Weights",
    "SDN_LoadDemoModel": "Load Demo Model (digits)",
    "SDN_DemoDigitConditioning": "Demo Digit Conditioning",
    "SDN_SafeDenoiserReferenceSampler": "Safe Denoiser Reference Sampler",
    "SDN_SafeDenoiserRestartSampler": "Safe Denoiser Restart Sampler",
    "SDN_EraseConceptSDD": "Erase Concept (SDD)",
}
