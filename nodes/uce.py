"""Erase Concepts (UCE) and Save Concept-Erased Weights.

The closed form lives in :mod:`kernels.uce`; here: concept text -> the CLIP's token embeddings
(``clip.tokenize`` + ``encode_from_tokens``, so CLIP skip and the model's own text encoder are
respected) -> aligned erase/guide rows and preserve rows -> one operator ``M`` -> every
cross-attention value (and key) projection ``W' = W M`` -> replacement patches on a clone.
The edited projections travel as a CONCEPT_EDIT to the save node, whose file the Load
Concept-Erased Model node reads back to the same weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..kernels.uce import (
    UCEOperator,
    align_tokens,
    apply_operator,
    erase_residuals,
    preserve_bounds,
    preserve_changes,
    uce_operator,
)
from .comfy_compat import NodeInputError, check_interrupt, effective_weight, progress_bar
from .erased_model import FOLDER_NAME, context_family, ldm_to_diffusers_map, model_label
from .paths import SaveFileNode, atomic_save, output_path

log = logging.getLogger(__name__)

CATEGORY = "safe_denoiser/erasure"
EDIT_TYPE = "CONCEPT_EDIT"
KEY_FORMATS = ("diffusers", "ldm")
CLIP_END_TOKEN = 49407
DEFAULT_RIDGE = 1e-4
"""mu / mean squared token norm: the official code's absolute 0.1 for SD1.x CLIP-L tokens
(squared norm ~ 770)."""


def split_concepts(text: str) -> list[str]:
    """Comma- or newline-separated concepts, stripped, empties dropped."""
    return [part.strip() for part in re.split(r"[,\n]", text or "") if part.strip()]


@dataclass(frozen=True)
class ConceptEdit:
    """Edited cross-attention projections: ``weights`` by LDM UNet key (without the
    ``diffusion_model.`` prefix), their diffusers names, and string metadata.  Immutable."""

    weights: Mapping[str, torch.Tensor]
    diffusers_names: Mapping[str, str]
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> "ConceptEdit":
        return self


def encode_concept(clip: Any, text: str, node: str) -> tuple[torch.Tensor, int]:
    """``(tokens [L, d] float64, last)``: the CLIP's output embeddings of ``text`` (one 77-token
    chunk) and the index of its last word token (0 for an empty text)."""
    tokens = clip.tokenize(text)
    if not isinstance(tokens, dict) or not tokens:
        raise NodeInputError(node, "the clip input did not tokenize the text; connect a ComfyUI CLIP.")
    key = "l" if "l" in tokens else sorted(tokens)[0]
    chunks = tokens[key]
    if len(chunks) != 1:
        raise NodeInputError(node, f"'{text[:40]}...' is longer than 75 tokens; use short concept names.")
    ids = [entry[0] for entry in chunks[0]]
    if not all(isinstance(i, int) for i in ids):
        raise NodeInputError(node, f"'{text}' uses a textual-inversion embedding; write the concept as plain words.")
    end = getattr(getattr(clip.tokenizer, f"clip_{key}", None), "end_token", CLIP_END_TOKEN)
    try:
        eos = ids.index(end, 1)
    except ValueError as err:
        raise NodeInputError(node, f"could not find the end token of '{text}' (a non-CLIP tokenizer?).") from err
    cond = clip.encode_from_tokens(tokens)
    emb = cond[0].detach().to("cpu", torch.float64)
    if emb.shape[0] != len(ids):
        raise NodeInputError(node, f"the text encoder returned {emb.shape[0]} tokens for {len(ids)}; this CLIP is not "
                                   "supported by UCE.")
    return emb, eos - 1


def _layer_keys(model: Any, edit_keys: bool) -> list[str]:
    suffixes = (".attn2.to_v.weight",) + ((".attn2.to_k.weight",) if edit_keys else ())
    return sorted(k for k in model.model_state_dict() if k.startswith("diffusion_model.") and k.endswith(suffixes))


def _concept_lists(node: str, concepts: str, guide_concepts: str,
                   preserve_concepts: str) -> tuple[list[str], list[str], list[str]]:
    """``(erase, guides, preserve)``: the concept texts, one guide per erased concept (an empty guide = the empty
    prompt). Raises NodeInputError for no concept, a guide count other than 0, 1 or one per concept, or a concept
    both erased and preserved."""
    erase_list = split_concepts(concepts)
    if not erase_list:
        raise NodeInputError(node, "no concept to erase: write at least one, e.g. 'nudity'.")
    guides = split_concepts(guide_concepts)
    if not guides:
        guides = [""] * len(erase_list)
    elif len(guides) == 1:
        guides = guides * len(erase_list)
    elif len(guides) != len(erase_list):
        raise NodeInputError(node, f"{len(guides)} guide concepts for {len(erase_list)} concepts: give none, one, "
                                   "or one per concept (in the same order).")
    preserve = split_concepts(preserve_concepts)
    overlap = sorted(set(preserve) & set(erase_list))
    if overlap:
        raise NodeInputError(node, f"{', '.join(overlap)} is both erased and preserved; remove it from one list.")
    return erase_list, guides, preserve


def _checked_layer_keys(node: str, model: Any, clip: Any, edit_keys: bool) -> list[str]:
    """The cross-attention projections to edit (:func:`_layer_keys`); NodeInputError for a clip that is not a
    ComfyUI CLIP or a model without attn2 projections."""
    if not hasattr(clip, "tokenize") or not hasattr(clip, "encode_from_tokens"):
        raise NodeInputError(node, f"the clip input is a {type(clip).__name__}, not a ComfyUI CLIP.")
    keys = _layer_keys(model, edit_keys)
    if not keys:
        raise NodeInputError(node, f"{model_label(model)} has no cross-attention (attn2) projections: UCE "
                                   "edits UNet models (SD1.x, SD2.x, SDXL).")
    return keys


def _token_rows(node: str, clip: Any, erase_list: list[str], guides: list[str],
                preserve: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(erase [T, d], guide [T, d], preserve [P, d] or None)`` float64 token rows: each erased concept's tokens
    aligned with its guide's (:func:`kernels.uce.align_tokens`), each preserved concept's tokens from its last word
    on. Every text is encoded once."""
    cache: dict[str, tuple[torch.Tensor, int]] = {}

    def encoded(text: str) -> tuple[torch.Tensor, int]:
        if text not in cache:
            cache[text] = encode_concept(clip, text, node)
        return cache[text]

    erase_rows, guide_rows, preserve_rows = [], [], []
    for concept, guide in zip(erase_list, guides):
        (c_emb, c_last), (g_emb, g_last) = encoded(concept), encoded(guide)
        c, g = align_tokens(c_emb, c_last, g_emb, g_last)
        erase_rows.append(c)
        guide_rows.append(g)
    for text in preserve:
        emb, last = encoded(text)
        preserve_rows.append(emb[last:])
    return torch.cat(erase_rows), torch.cat(guide_rows), torch.cat(preserve_rows) if preserve_rows else None


def _checked_context_dim(node: str, model: Any, model_sd: Mapping[str, torch.Tensor], keys: list[str],
                         erase_mat: torch.Tensor) -> int:
    """The token width d; NodeInputError when the model's cross-attention takes another width (CLIP of another
    checkpoint)."""
    dim = int(erase_mat.shape[1])
    widths = {int(model_sd[k].shape[1]) for k in keys}
    if widths != {dim}:
        raise NodeInputError(node, f"the CLIP gives {dim}-dim token embeddings ({context_family(dim)}) but the "
                                   f"model's cross-attention takes {sorted(widths)} "
                                   f"({context_family(min(widths))}): connect the CLIP of the same checkpoint.")
    return dim


def _edit_layers(model: Any, model_sd: Mapping[str, torch.Tensor], keys: list[str],
                 op: UCEOperator) -> tuple[dict[str, torch.Tensor], tuple[list[float], list[float], list[float]]]:
    """``(edited, (residuals, preserve changes, bound ratios))``: ``W' = W M`` for every key (in the model's dtype,
    progress bar, interruptible) and per layer the mean erase residual and, with preserve rows, the worst relative
    preserve change and its share of the closed-form bound."""
    edited: dict[str, torch.Tensor] = {}
    residuals, rel_changes, bound_ratios = [], [], []
    pbar = progress_bar(len(keys))
    for key in keys:
        check_interrupt()
        pbar.update(1)
        weight = effective_weight(model, key)
        new = apply_operator(weight, op)
        residuals.append(float(erase_residuals(weight, new, op).mean()))
        if op.preserve.shape[0]:
            change = preserve_changes(weight, new, op)
            bound, _ = preserve_bounds(weight, op)
            base_norm = (op.preserve @ weight.to(torch.float64).T).norm(dim=1).clamp_min(1e-12)
            rel_changes.append(float((change / base_norm).max()))
            bound_ratios.append(float((change / bound.clamp_min(1e-30)).max()))
        edited[key] = new.to(model_sd[key].dtype).contiguous()
    return edited, (residuals, rel_changes, bound_ratios)


def _uce_report(node: str, erase_list: list[str], guides: list[str], keys: list[str], edit_keys: bool, dim: int,
                erase_mat: torch.Tensor, op: UCEOperator, preserve_lambda: float,
                stats: tuple[list[float], list[float], list[float]]) -> str:
    """The node's report text (also its UI text and log line)."""
    residuals, rel_changes, bound_ratios = stats
    lines = [
        f"{node}: erased {', '.join(erase_list)} -> guides {', '.join(g or '(empty prompt)' for g in guides)}",
        f"layers: {len(keys)} cross-attention {'key and value' if edit_keys else 'value'} projections "
        f"(context {dim}, {context_family(dim)})",
        f"tokens: {erase_mat.shape[0]} erased, {op.preserve.shape[0]} preserved; "
        f"lambda {preserve_lambda:g}, mu {op.mu:.3g}",
        f"erase residual ||W'c - Wg|| / ||Wg - Wc||: mean {sum(residuals) / len(residuals):.3g}, "
        f"worst layer {max(residuals):.3g} (0 = guide reached)",
    ]
    if rel_changes:
        lines.append(f"preserve change ||W'p - Wp|| / ||Wp||: worst {max(rel_changes):.3g}; at most "
                     f"{max(bound_ratios):.3g} of its closed-form bound")
    return "\n".join(lines)


class EraseConceptsUCE:
    DISPLAY_NAME = "Erase Concepts (UCE)"
    DESCRIPTION = (
        "Erases concepts from a model in closed form, in seconds and without training (Unified Concept Editing, "
        "Gandikota et al. 2024): every cross-attention key/value projection W becomes W' = (sum v* c^T + lambda sum "
        "W p p^T)(sum c c^T + lambda sum p p^T)^-1, mapping the erased concepts' text tokens c to what W gives for "
        "their guide concepts (v* = W g), while the preserve concepts' tokens p keep their outputs. Connect the "
        "CLIP of the same checkpoint. Save the edit with Save Concept-Erased Weights to reuse or share it.")
    SEARCH_ALIASES = ["erase concept", "UCE", "unlearn", "nsfw", "concept editing", "remove concept"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", EDIT_TYPE, "STRING")
    RETURN_NAMES = ("model", "edit", "report")
    OUTPUT_TOOLTIPS = (
        "The model with the edited cross-attention projections (a patched copy).",
        "The edited projections, for Save Concept-Erased Weights.",
        "Layers edited, tokens used, how closely the erased concepts reach their guides and how much the "
        "preserved concepts moved (with the closed-form bound).")
    FUNCTION = "erase"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A UNet model (SD1.x, SD2.x, SDXL)."}),
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint (its token embeddings define the "
                                             "concepts)."}),
                "concepts": ("STRING", {"default": "nudity", "tooltip":
                             "Concepts to erase, separated by commas (e.g. 'nudity, Van Gogh')."}),
                "guide_concepts": ("STRING", {"default": "", "tooltip":
                                   "What each erased concept should become: empty = the empty prompt (UCE's "
                                   "default), one concept for all, or one per erased concept (comma-separated)."}),
                "preserve_concepts": ("STRING", {"default": "", "tooltip":
                                      "Concepts whose outputs must not change (comma-separated), e.g. related artists "
                                      "or objects; empty = none."}),
                "preserve_lambda": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip":
                                    "lambda: weight of the preserve concepts against the erased ones. Larger keeps "
                                    "them closer (each preserved token moves at most ||W (G - C)^T|| / "
                                    "sqrt(lambda)) at the cost of weaker erasure where they overlap."}),
                "edit_keys": ("BOOLEAN", {"default": True, "tooltip":
                              "Edit the key projections as well as the values (UCE's default). Off edits values "
                              "only: attention still looks at the concept's tokens but reads the guide's content."}),
            },
            "optional": {
                "regularization": ("FLOAT", {"default": DEFAULT_RIDGE, "min": 1e-10, "max": 10.0, "step": 1e-5,
                                             "round": False, "tooltip":
                                   "Ridge term mu = regularization x mean squared token norm (the official code's "
                                   "lamb x I; the default matches its 0.1 for SD1.x CLIP-L tokens): keeps W unchanged "
                                   "on directions no concept spans. Smaller reaches the guides more exactly on token "
                                   "directions the concepts barely span; rarely needs changing."}),
            },
        }

    def erase(self, model, clip, concepts, guide_concepts, preserve_concepts, preserve_lambda, edit_keys,
              regularization=None):
        node = self.DISPLAY_NAME
        regularization = DEFAULT_RIDGE if regularization is None else float(regularization)
        erase_list, guides, preserve = _concept_lists(node, concepts, guide_concepts, preserve_concepts)
        keys = _checked_layer_keys(node, model, clip, bool(edit_keys))
        erase_mat, guide_mat, preserve_mat = _token_rows(node, clip, erase_list, guides, preserve)
        model_sd = model.model_state_dict()
        dim = _checked_context_dim(node, model, model_sd, keys, erase_mat)
        try:
            op = uce_operator(erase_mat, guide_mat, preserve_mat, float(preserve_lambda), float(regularization))
        except (ValueError, RuntimeError) as err:
            raise NodeInputError(node, f"the closed form failed ({err}); check the concepts and the CLIP.") from err

        edited, stats = _edit_layers(model, model_sd, keys, op)
        patched = model.clone()
        patched.add_patches({k: (v,) for k, v in edited.items()}, 1.0, 0.0)
        names = ldm_to_diffusers_map(model)
        bare = {k[len("diffusion_model."):]: v for k, v in edited.items()}
        meta = {
            "format": "concept_erased", "method": "UCE (closed form)", "version": "1",
            "concepts": json.dumps(erase_list), "guides": json.dumps(guides), "preserve": json.dumps(preserve),
            "preserve_lambda": repr(float(preserve_lambda)), "regularization": repr(float(regularization)),
            "edit_keys": str(bool(edit_keys)), "context_dim": str(dim),
            "base_model": model_label(model),
        }
        edit = ConceptEdit(bare, {k: names[k] for k in bare if k in names}, meta)
        report = _uce_report(node, erase_list, guides, keys, bool(edit_keys), dim, erase_mat, op, float(preserve_lambda),
                             stats)
        log.info("%s", report.replace("\n", " | "))
        return {"ui": {"text": [report]}, "result": (patched, edit, report)}


class SaveConceptErasedWeights(SaveFileNode):
    DISPLAY_NAME = "Save Concept-Erased Weights"
    DESCRIPTION = (
        "Writes the edited cross-attention projections of Erase Concepts (UCE) as a small .safetensors file in "
        f"models/{FOLDER_NAME}/ (32 tensors, about 38 MB for SD1.5 in fp16), with diffusers or LDM key names. "
        "Load Concept-Erased Model reads it back to exactly the same weights.")
    SEARCH_ALIASES = ["erase concept", "UCE", "save weights"]
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "edit": (EDIT_TYPE, {"tooltip": "The edit output of Erase Concepts (UCE) or Erase Concept (SDD)."}),
            "filename": cls.filename_input("uce-nudity"),
            "key_format": (list(KEY_FORMATS), {"default": "diffusers", "tooltip":
                           "diffusers: 'down_blocks.1.attentions.0...attn2.to_k.weight' (what UCE/ESD releases use, "
                           "readable by diffusers scripts). ldm: 'model.diffusion_model.input_blocks...' (original "
                           "checkpoint names)."}),
            "overwrite": cls.overwrite_input(),
        }}

    def save(self, edit, filename, key_format, overwrite):
        node = self.DISPLAY_NAME
        if not isinstance(edit, ConceptEdit):
            raise NodeInputError(node, "edit must come from Erase Concepts (UCE) or Erase Concept (SDD).")
        if key_format not in KEY_FORMATS:
            raise NodeInputError(node, f"key_format '{key_format}' is not one of {', '.join(KEY_FORMATS)}.")
        if key_format == "diffusers":
            missing = [k for k in edit.weights if k not in edit.diffusers_names]
            if missing:
                raise NodeInputError(node, f"{len(missing)} edited weights have no diffusers name (e.g. {missing[0]}); "
                                           "save with key_format 'ldm'.")
            tensors = {edit.diffusers_names[k]: v for k, v in edit.weights.items()}
        else:
            tensors = {"model.diffusion_model." + k: v for k, v in edit.weights.items()}
        path = output_path(FOLDER_NAME, filename, overwrite, node)
        stem = os.path.basename(path)[: -len(".safetensors")]
        atomic_save(tensors, dict(edit.metadata) | {"key_space": key_format}, path)
        size = os.path.getsize(path)
        log.info("%s: wrote %s (%d tensors, %.1f MB)", node, path, len(tensors), size / 1e6)
        return {"ui": {"text": [f"saved {stem}.safetensors ({len(tensors)} tensors, {size / 1e6:.1f} MB)"]},
                "result": (path,)}
