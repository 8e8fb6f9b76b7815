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

# Each node class carries its title once, as DISPLAY_NAME (also the name its error messages use).
NODE_DISPLAY_NAME_MAPPINGS = {node_id: cls.DISPLAY_NAME for node_id, cls in NODE_CLASS_MAPPINGS.items()}
