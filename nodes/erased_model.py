"""Apply concept-erased weights (ESD, UCE, RECE, SDD, MACE, SalUn, AdvUnlearn ...) to a base
MODEL / CLIP as weight patches on clones.

Flow: dropdown entry -> :func:`resolve` (inside ``models/concept_erased`` roots) ->
:data:`.erased_formats.CACHE` (parsed, classified state dicts) -> keys mapped into the model's
(``diffusion_model.<ldm key>``, diffusers names through ComfyUI's own
``comfy.utils.unet_to_diffusers``) and the CLIP's (``clip_l.transformer.text_model.*`` ...) key
spaces -> checks (shapes, finite values, enough matches) -> cast to the base weights' dtypes ->
``add_patches`` on ``clone()`` s.  Nothing touches the inputs until every check passed.

Strength ``s`` uses the patch recipes that behave the same on every ComfyUI version:
``add_patches({k: (w,)}, s, 1 - s)`` gives ``(1 - s) * base + s * w`` (``s = 1`` replaces);
LoRA files go through ``comfy.sd.load_lora_for_models`` with ``s`` scaling the LoRA delta.
Later patches (e.g. a LoRA loader after this node) are added on top.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

import comfy.sd
import comfy.utils
import folder_paths

from .comfy_compat import NodeInputError, check_interrupt, progress_bar
from .erased_formats import (
    CACHE,
    FILE_EXTENSIONS,
    Part,
    WeightFormatError,
    WeightSource,
    list_entries,
    receler_like,
    source_fingerprint,
)
from .paths import register_model_folder, resolve_in_roots

log = logging.getLogger(__name__)

FOLDER_NAME = "concept_erased"
NODE = "Load Concept-Erased Model"
FIX_PATH = (f"Put the file or folder into models/{FOLDER_NAME}/ (or a '{FOLDER_NAME}:' folder of "
            "extra_model_paths.yaml) and choose it from the list (refresh the browser after adding files).")
CONTEXT_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 1280: "SDXL refiner", 2048: "SDXL"}
MIN_MATCH_FRACTION = 0.5
"""Below this fraction of the file's UNet keys found in the model, the file is for another
architecture and is refused."""


DEMO_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "concept_erased")
"""The pack's own erased weights for the digits demo (``digits_sdd7.safetensors``): a read-only root
listed after the user's folders, so Save Concept-Erased Weights never writes there."""


def register_folder() -> None:
    """Register ``models/concept_erased`` (extra_model_paths.yaml entries are kept) and, last, the
    demo's folder."""
    register_model_folder(FOLDER_NAME, set(FILE_EXTENSIONS))
    paths = folder_paths.folder_names_and_paths[FOLDER_NAME][0]
    if os.path.isdir(DEMO_FOLDER) and DEMO_FOLDER not in paths:
        paths.append(DEMO_FOLDER)


def roots() -> list[str]:
    return list(folder_paths.get_folder_paths(FOLDER_NAME))


def list_names() -> list[str]:
    """Dropdown entries: weight files and diffusers/transformers folders of every root."""
    return list_entries(roots())


def resolve(name: str, node: str = NODE) -> str:
    """Absolute path of a dropdown entry; anything outside the roots is refused."""
    return resolve_in_roots(name, roots(), node, what="concept-erased weights", fix=FIX_PATH)


def fingerprint(name: str) -> str:
    """IS_CHANGED marker: size + mtime of the file or of every file of the folder."""
    try:
        return repr(source_fingerprint(resolve(name)))
    except (NodeInputError, OSError) as err:
        return f"error:{err}"


def context_family(dim: int) -> str:
    return CONTEXT_FAMILIES.get(int(dim), "unknown family")


def model_label(model: Any) -> str:
    """The model's architecture as ComfyUI names it (``SD15``, ``SDXL`` ...)."""
    config = getattr(model.model, "model_config", None)
    return type(config if config is not None else model.model).__name__


# ------------------------------------------------------------------------------ report


@dataclass
class Report:
    """The node's STRING output: one ``label: text`` line per fact."""

    title: str
    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, text: str) -> None:
        self.lines.append((label, text))

    def text(self) -> str:
        return "\n".join([self.title] + [f"{label}: {text}" for label, text in self.lines])


def _counts(counter: Counter) -> str:
    return "; ".join(f"{n} {reason}" for reason, n in counter.most_common())


# ------------------------------------------------------------------------------ key maps


def unet_diffusers_map(model: Any) -> dict[str, str]:
    """``{diffusers UNet key: ldm key}`` from ComfyUI's own converter (empty for non-UNets)."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    return dict(comfy.utils.unet_to_diffusers(config)) if "num_res_blocks" in config else {}


def ldm_to_diffusers_map(model: Any) -> dict[str, str]:
    """The inverse ``{ldm key: diffusers key}`` for the keys this model has.  ``label_emb``
    maps back to ``add_embedding`` (SDXL) or ``class_embedding`` (SD2 unCLIP ...)."""
    config = model.model.model_config.unet_config
    prefer = "add_embedding" if config.get("num_classes") == "sequential" else "class_embedding"
    present = {k[len("diffusion_model."):] for k in model.model_state_dict() if k.startswith("diffusion_model.")}
    out: dict[str, str] = {}
    for diffusers, ldm in sorted(unet_diffusers_map(model).items()):
        if ldm not in present:
            continue
        if ldm not in out or diffusers.startswith(prefer):
            out[ldm] = diffusers
    return out


def clip_encoders(clip_sd: Iterable[str]) -> list[str]:
    """Prefixes of the CLIP's text encoders (``clip_l.``, ``clip_g.``, ``clip_h.`` ...)."""
    marker = "transformer.text_model."
    found = []
    for key in clip_sd:
        if marker in key:
            prefix = key[: key.index(marker)]
            if prefix not in found:
                found.append(prefix)
    return found


# ------------------------------------------------------------------------------ matching


@dataclass
class Matched:
    """File tensors mapped onto one target (model or CLIP) state dict."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    in_file: int = 0
    skipped: Counter = field(default_factory=Counter)
    spaces: Counter = field(default_factory=Counter)

    def put(self, target: str, file_key: str, tensor: torch.Tensor) -> None:
        if target in self.tensors:
            self.skipped["duplicates of another key"] += 1
            return
        self.tensors[target] = tensor
        self.sources[target] = file_key


def _ema_names(model_keys: Iterable[str]) -> dict[str, Optional[str]]:
    """LDM ``LitEma`` buffer name (the parameter name without dots) -> LDM UNet key; ``None``
    where two keys of the model would give the same name."""
    out: dict[str, Optional[str]] = {}
    for key in model_keys:
        if key.startswith("diffusion_model."):
            ldm = key[len("diffusion_model."):]
            flat = ldm.replace(".", "")
            out[flat] = None if flat in out else ldm
    return out


def match_unet(model: Any, parts: Iterable[Part], node: str) -> Matched:
    """File UNet keys -> ``diffusion_model.<ldm key>`` of ``model``."""
    model_keys = set(model.model_state_dict())
    dmap: Optional[dict[str, str]] = None
    ema_map: Optional[dict[str, Optional[str]]] = None
    out = Matched()
    for part in parts:
        for file_key, cls in part.classes.items():
            if cls.group != "unet" or file_key not in part.tensors:
                continue
            out.in_file += 1
            if cls.space == "diffusers":
                if dmap is None:
                    dmap = unet_diffusers_map(model)
                    if not dmap:
                        raise NodeInputError(node, "the file uses diffusers UNet names but this model is not a UNet "
                                                   f"({model_label(model)}); these weights are for SD1.x/SD2.x/"
                                                   "SDXL. Connect the matching base model.")
                ldm = dmap.get(cls.key)
                out.spaces["diffusers UNet names (converted with ComfyUI's diffusers->LDM map)"] += 1
                if ldm is None:
                    out.skipped["diffusers names with no counterpart in this UNet"] += 1
                    continue
            elif cls.space == "ema":
                if ema_map is None:
                    ema_map = _ema_names(model_keys)
                ldm = ema_map.get(cls.key.removeprefix("diffusion_model"))
                out.spaces["EMA weights (model_ema.*: the file has no other UNet weights, so the EMA copy is the "
                           "model; dots restored from this model's key names)"] += 1
                if ldm is None:
                    out.skipped["EMA names with no unique counterpart in this UNet"] += 1
                    continue
            else:
                ldm = cls.key
                label = {"model.diffusion_model.": "LDM checkpoint names (model.diffusion_model.*)",
                         "diffusion_model.": "ComfyUI names (diffusion_model.*)"}
                prefix = next((p for p in label if file_key.removeprefix("module.").startswith(p)), "")
                out.spaces[label.get(prefix, "bare LDM UNet names (input_blocks.* ...)")] += 1
            target = "diffusion_model." + ldm
            if target not in model_keys:
                out.skipped["not weights of this model"] += 1
                continue
            out.put(target, file_key, part.tensors[file_key])
    return out


def _te_prefix(hint: str, encoders: list[str], tensors: dict[str, torch.Tensor], clip_sd: dict[str, Any]) -> str:
    wanted = f"clip_{hint}." if hint else ""
    if wanted in encoders:
        return wanted
    if len(encoders) == 1:
        return encoders[0]
    votes = Counter()
    for prefix in encoders:
        for key, tensor in tensors.items():
            target = clip_sd.get(prefix + "transformer." + key)
            if target is not None and tuple(target.shape) == tuple(tensor.shape):
                votes[prefix] += 1
    return votes.most_common(1)[0][0] if votes else encoders[0]


def match_text_encoder(clip: Any, parts: Iterable[Part], node: str) -> Matched:
    """File text-encoder keys -> the CLIP's ``<encoder>transformer.<transformers key>`` keys."""
    out = Matched()
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    aliases: list[tuple[str, str, str, torch.Tensor]] = []
    for part in parts:
        openclip: dict[str, dict[str, torch.Tensor]] = {}
        for file_key, cls in part.classes.items():
            if cls.group not in ("te", "te_openclip") or file_key not in part.tensors:
                continue
            out.in_file += 1
            tensor = part.tensors[file_key]
            if cls.group == "te_openclip":
                openclip.setdefault(cls.space, {})[cls.key] = tensor
                out.spaces["open_clip names (converted with ComfyUI's converter)"] += 1
            elif cls.alias:
                aliases.append((cls.space, cls.key, file_key, tensor))
                out.spaces["AdvUnlearn alias names (embedding.*, encoder.*, final_layer_norm.*)"] += 1
            else:
                groups.setdefault(cls.space, {})[cls.key] = (file_key, tensor)
                out.spaces["transformers CLIP names (text_model.*)"] += 1
        for hint, sd in openclip.items():
            converted = comfy.utils.clip_text_transformers_convert(dict(sd), "", "")
            for key, tensor in converted.items():
                groups.setdefault(hint, {})[key] = ("open_clip:" + key, tensor)
    for hint, key, file_key, tensor in aliases:
        if not hint:  # bare alias keys belong to the encoder whose canonical keys the file has
            hint = next((h for h in sorted(groups) if key in groups[h]), hint)
        canonical = groups.setdefault(hint, {}).get(key)
        if canonical is None:
            groups[hint][key] = (file_key, tensor)
        elif torch.equal(canonical[1], tensor):
            out.skipped["alias copies of keys already in the file"] += 1
        else:
            out.skipped["alias keys that differ from their canonical key (canonical used)"] += 1
    if not groups:
        return out
    clip_sd = getattr(getattr(clip, "cond_stage_model", None), "state_dict", None)
    if clip_sd is None:
        raise NodeInputError(node, f"the clip input is a {type(clip).__name__}, not a ComfyUI CLIP, so the "
                                   "text-encoder weights cannot be applied. Connect the CLIP of your checkpoint "
                                   "loader.")
    clip_sd = clip_sd()
    encoders = clip_encoders(clip_sd)
    if not encoders:
        raise NodeInputError(node, "the connected CLIP has no CLIP-L/G/H text encoder (a T5-only model?); the file's "
                                   "text-encoder weights cannot be applied. Set text_encoder to 'ignore'.")
    for hint, entries in groups.items():
        prefix = _te_prefix(hint, encoders, {k: v[1] for k, v in entries.items()}, clip_sd)
        for key, (file_key, tensor) in entries.items():
            target = prefix + "transformer." + key
            if target not in clip_sd:
                reason = ("buffers, not CLIP weights (position_ids)" if key.endswith("position_ids")
                          else "not weights of this CLIP")
                out.skipped[reason] += 1
                continue
            out.put(target, file_key, tensor)
    return out


# ------------------------------------------------------------------------------ checks


def _shape_error(node: str, what: str, mismatches: list[tuple[str, tuple, tuple]]) -> NodeInputError:
    ctx = [(f[-1], m[-1]) for k, f, m in mismatches if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    examples = "; ".join(f"{k}: file {list(f)} vs model {list(m)}" for k, f, m in mismatches[:3])
    if ctx and ctx[0][0] != ctx[0][1]:
        file_ctx, model_ctx = ctx[0]
        return NodeInputError(node, f"wrong base model: the file's cross-attention takes {file_ctx}-dim text "
                                    f"embeddings ({context_family(file_ctx)}) but this {what}'s takes {model_ctx} "
                                    f"({context_family(model_ctx)}). Connect the base model the weights were made "
                                    f"from. ({len(mismatches)} shape mismatches, e.g. {examples})")
    return NodeInputError(node, f"wrong base model: {len(mismatches)} tensors have other shapes than this {what}'s "
                                f"(e.g. {examples}), e.g. SD1.x weights on SDXL. Connect the base model the weights "
                                "were made from.")


def check_and_cast(matched: Matched, target_sd: dict[str, torch.Tensor], node: str, what: str,
                   casts: Counter, pbar: Any = None) -> dict[str, torch.Tensor]:
    """Shape + finiteness checks, then a cast of every tensor to its target's dtype (a full UNet is
    ~1000 tensors: progress on ``pbar``, Cancel honoured).

    Raises :class:`NodeInputError` on any shape mismatch (with an architecture diagnosis) or a
    NaN/inf value (also one created by the cast, e.g. fp32 values beyond the fp16 range).
    """
    mismatches = [(t, tuple(v.shape), tuple(target_sd[t].shape)) for t, v in matched.tensors.items()
                  if tuple(v.shape) != tuple(target_sd[t].shape)]
    if mismatches:
        raise _shape_error(node, what, mismatches)
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for target, tensor in matched.tensors.items():
        check_interrupt()
        if pbar is not None:
            pbar.update(1)
        base = target_sd[target]
        if not tensor.is_floating_point():
            raise NodeInputError(node, f"{matched.sources[target]} holds {tensor.dtype} values, not weights; the file "
                                       "is not a weights file for this model.")
        if not torch.isfinite(tensor).all():
            bad.append(matched.sources[target])
            continue
        if tensor.dtype != base.dtype:
            casts[f"{str(tensor.dtype).replace('torch.', '')} -> {str(base.dtype).replace('torch.', '')}"] += 1
            cast = tensor.to(base.dtype)
            if not torch.isfinite(cast).all():
                bad.append(f"{matched.sources[target]} (overflows {base.dtype})")
                continue
            tensor = cast
        out[target] = tensor.detach().to("cpu").contiguous()
    if bad:
        raise NodeInputError(node, f"{len(bad)} tensors contain NaN or infinite values (e.g. {', '.join(bad[:3])}): "
                                   "the weights are broken (a diverged training run or a bad conversion). Use another "
                                   "file.")
    return out


def _content(targets: Iterable[str], model_keys: int) -> str:
    keys = list(targets)
    if all(".attn2.to_k." in k or ".attn2.to_v." in k for k in keys):
        style = "cross-attention keys/values only (UCE / ESD-x-strict style)"
    elif all(".attn2." in k for k in keys):
        style = "cross-attention only (ESD-x / SDD style)"
    elif len(keys) >= 0.9 * model_keys:
        style = "full UNet"
    else:
        style = "partial UNet"
    return f"{style}: {len(keys)} of the model's {model_keys} UNet weights"


def _strength_text(strength: float) -> str:
    if strength == 0:
        return "0 (nothing applied: the base weights are kept)"
    if strength == 1:
        return "1 (the erased weights replace the base weights)"
    if strength < 1:
        return f"{strength:g} (blend: {1 - strength:.3g} x base + {strength:.3g} x erased)"
    return f"{strength:g} (extrapolates past the erased weights: base + {strength:.3g} x (erased - base))"


# ------------------------------------------------------------------------------ LoRA files


def _patch_shapes(value: Any) -> Optional[tuple]:
    """``(up, down)`` of a LoRA patch (O: ``("lora", (up, down, ...))``; N: an adapter with
    ``.weights``), or None for other patch kinds."""
    weights = getattr(value, "weights", None)
    if weights is None and isinstance(value, tuple) and len(value) == 2 and value[0] == "lora":
        weights = value[1]
    if weights is None or len(weights) < 2 or not all(isinstance(w, torch.Tensor) for w in weights[:2]):
        return None
    return weights[0], weights[1]


def _new_patches(before: Any, after: Any) -> dict[str, Any]:
    old = before.patches if before is not None else {}
    return {k: v[-1][1] for k, v in after.patches.items() if len(v) > len(old.get(k, []))}


def _check_lora(new: dict[str, Any], target_sd: dict[str, torch.Tensor], node: str, what: str) -> None:
    mismatches = []
    for key, value in new.items():
        pair = _patch_shapes(value)
        if pair is None or key not in target_sd:
            continue
        up, down = pair
        weight = target_sd[key]
        if up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel():
            mismatches.append((key, (up.shape[0], down[0].numel()), (weight.shape[0], weight[0].numel())))
    if mismatches:
        raise _shape_error(node, what, mismatches)


def apply_lora(model: Any, clip: Any, source: WeightSource, strength: float, te_mode: str, node: str,
               report: Report) -> tuple[Any, Any]:
    """LoRA-format files: ComfyUI's own loader on clones; ``strength`` scales the delta."""
    lora: dict[str, torch.Tensor] = {}
    for part in source.parts:
        lora.update(part.tensors)
    modules = {k.split(".lora")[0].split(".alpha")[0].split(".hada")[0].split(".lokr")[0] for k in lora}
    use_clip = clip if te_mode != "ignore" and hasattr(clip, "cond_stage_model") else None
    new_model, new_clip = comfy.sd.load_lora_for_models(model, use_clip, lora, strength, strength if use_clip else 0.0)
    unet_new = _new_patches(model, new_model)
    clip_new = _new_patches(clip.patcher, new_clip.patcher) if use_clip is not None else {}
    _check_lora(unet_new, model.model_state_dict(), node, "model")
    if use_clip is not None:
        _check_lora(clip_new, use_clip.cond_stage_model.state_dict(), node, "CLIP")
    if not unet_new and not clip_new:
        raise NodeInputError(node, f"none of the {len(modules)} LoRA modules in the file matches this model"
                                   f"{' or CLIP' if use_clip is not None else ''} (wrong base model, or a text-encoder "
                                   "LoRA without a CLIP connected).")
    report.add("format", f"LoRA ({source.kind}); applied with ComfyUI's LoRA loader, strength scales the LoRA delta")
    report.add("keys", f"{len(lora)} tensors / {len(modules)} LoRA modules in the file; {len(unet_new)} UNet weights "
                       f"and {len(clip_new)} CLIP weights patched; "
                       f"{max(0, len(modules) - len(unet_new) - len(clip_new))} modules not matched")
    report.add("architecture check", "ok (LoRA ranks fit the base weights)")
    return new_model, (new_clip if use_clip is not None else clip)


# ------------------------------------------------------------------------------ main entry


@dataclass(frozen=True)
class _Plan:
    """What a parsed file holds (key groups) and whether its text-encoder weights are applied."""

    groups: Counter
    want_te: bool

    @property
    def total(self) -> int:
        return sum(self.groups.values())

    @property
    def te_in_file(self) -> int:
        return self.groups["te"] + self.groups["te_openclip"]


def load_concept_erased(model: Any, clip: Any, name: str, strength: float, te_mode: str,
                        node: str = NODE) -> tuple[Any, Any, str]:
    """``(model', clip', report)``: ``name`` applied to clones of ``model`` / ``clip``.

    The inputs are never modified; on any error nothing is returned but the error.
    """
    strength = float(strength)
    if not torch.isfinite(torch.tensor(strength)):
        raise NodeInputError(node, f"strength {strength} is not a number; use 0..2 (1 = replace).")
    path = resolve(name, node)
    try:
        source, cached = CACHE.get(path, te_mode)
    except WeightFormatError as err:
        raise NodeInputError(node, f"{name}: {err}") from err
    report = Report(f"{node}: {name}")
    groups = _key_groups(source, name, node)
    if groups["lora"]:
        new_model, new_clip = apply_lora(model, clip, source, strength, te_mode, node, report)
        report.add("strength", f"{strength:g}")
        report.add("cache", "hit" if cached else "miss (file read)")
        return new_model, new_clip, report.text()
    plan = _plan(source, groups, name, te_mode, clip, node)
    unet, te = _matched_weights(model, clip, source, plan, name, node)
    casts: Counter = Counter()
    pbar = progress_bar(len(unet.tensors) + len(te.tensors))
    model_sd = model.model_state_dict()
    unet_patches = check_and_cast(unet, model_sd, node, "model", casts, pbar)
    te_patches = (check_and_cast(te, clip.cond_stage_model.state_dict(), node, "CLIP", casts, pbar)
                  if te.tensors else {})

    new_model, new_clip = model.clone(), clip
    patched_unet, patched_te = [], []
    if strength != 0:
        if unet_patches:
            patched_unet = new_model.add_patches({k: (v,) for k, v in unet_patches.items()}, strength, 1.0 - strength)
        if te_patches:
            new_clip = clip.clone()
            patched_te = new_clip.add_patches({k: (v,) for k, v in te_patches.items()}, strength, 1.0 - strength)

    unet_keys = sum(1 for k in model_sd if k.startswith("diffusion_model."))
    _fill_report(report, source, plan, te_mode, unet, te, (len(patched_unet), len(patched_te)), unet_keys, casts)
    report.add("strength", _strength_text(strength))
    report.add("cache", "hit (parsed file reused)" if cached else "miss (file read)")
    text = report.text()
    log.info("%s", text.replace("\n", " | "))
    return new_model, new_clip, text


def _key_groups(source: WeightSource, name: str, node: str) -> Counter:
    """How many of the file's keys fall in each group (``unet``, ``te``, ``te_openclip``, ``lora``, ``ignored``,
    ``unknown``); NodeInputError for Receler adapters, which are not model weights."""
    if receler_like(source.parts):
        raise NodeInputError(node, f"{name} looks like Receler 'eraser' adapters: they are extra modules injected into "
                                   "the UNet, not weights of the base model, and are not supported. Use a method that "
                                   "publishes model weights (ESD, UCE, RECE, SDD, MACE, SalUn, AdvUnlearn).")
    return Counter(cls.group for part in source.parts for cls in part.classes.values())


def _plan(source: WeightSource, groups: Counter, name: str, te_mode: str, clip: Any, node: str) -> _Plan:
    """Whether the text-encoder weights are applied (``te_mode`` apply, or auto without UNet weights);
    NodeInputError for a file with neither UNet nor text-encoder weights, text-encoder weights to apply without a
    CLIP, or only text-encoder weights with ``te_mode`` ignore."""
    plan = _Plan(groups, te_mode == "apply" or (te_mode == "auto" and not groups["unet"]))
    if not groups["unet"] and not plan.te_in_file:
        examples = ", ".join(list(source.parts[0].classes)[:4]) if source.parts else ""
        raise NodeInputError(node, f"{name}: unknown format: none of its {plan.total} keys is a UNet, text-encoder or "
                                   f"LoRA weight (e.g. {examples or 'no keys at all'}). Supported: ESD/UCE/RECE/SDD/"
                                   "MACE/SalUn UNet weights (LDM or diffusers names), AdvUnlearn text encoders and "
                                   "LoRAs.")
    if plan.want_te and plan.te_in_file and clip is None:
        raise NodeInputError(node, f"{name} holds text-encoder weights (e.g. AdvUnlearn): connect the CLIP of your "
                                   "checkpoint loader to the clip input, or set text_encoder to 'ignore'.")
    if not plan.want_te and plan.te_in_file and not groups["unet"]:
        raise NodeInputError(node, f"{name} holds only text-encoder weights and text_encoder is '{te_mode}'. Set it to "
                                   "'auto' or 'apply' and connect the CLIP.")
    return plan


def _matched_weights(model: Any, clip: Any, source: WeightSource, plan: _Plan, name: str,
                     node: str) -> tuple[Matched, Matched]:
    """``(unet, text encoder)``: the file's tensors under the model's and the CLIP's keys; NodeInputError when none
    or too few (below :data:`MIN_MATCH_FRACTION`) of the file's UNet keys, or none of its text-encoder keys, match."""
    unet = match_unet(model, source.parts, node)
    te = match_text_encoder(clip, source.parts, node) if plan.want_te and plan.te_in_file else Matched()
    if unet.in_file and not unet.tensors:
        raise NodeInputError(node, f"{name}: none of its {unet.in_file} UNet keys matches this model "
                                   f"({model_label(model)}): wrong base model or architecture. "
                                   f"({_counts(unet.skipped)})")
    if unet.in_file and len(unet.tensors) < MIN_MATCH_FRACTION * unet.in_file:
        raise NodeInputError(node, f"{name}: only {len(unet.tensors)} of its {unet.in_file} UNet keys exist in this "
                                   f"model ({model_label(model)}): the weights are for another architecture. Connect "
                                   "the base model they were made from.")
    if te.in_file and not te.tensors:
        raise NodeInputError(node, f"{name}: none of its {te.in_file} text-encoder keys matches the connected CLIP: "
                                   f"wrong base model. ({_counts(te.skipped)})")
    return unet, te


def _fill_report(report: Report, source: WeightSource, plan: _Plan, te_mode: str, unet: Matched, te: Matched,
                 patched: tuple[int, int], unet_keys: int, casts: Counter) -> None:
    """The report lines of a weight file applied: format, key spaces, keys matched and patched (``patched`` =
    UNet, text-encoder patches added), content, skipped keys, casts, the architecture check."""
    containers = "; ".join(sorted({p.container for p in source.parts}))
    notes = [n for p in source.parts for n in p.notes] + list(source.notes)
    report.add("format", f"{source.kind} ({containers})" + (f"; {'; '.join(notes)}" if notes else ""))
    report.add("key space", _counts(unet.spaces + te.spaces) or "none")
    if source.metadata.get("format") == "concept_erased":
        meta = source.metadata
        report.add("made by", f"{meta.get('method', '?')} (concepts: {meta.get('concepts', '?')}, "
                              f"guides: {meta.get('guides', '?')}, preserve: {meta.get('preserve', '?')})")
    report.add("keys", f"{plan.total} in the file; UNet {unet.in_file} in file / {len(unet.tensors)} matched / "
                       f"{patched[0]} patched; text encoder {te.in_file} in file / {len(te.tensors)} matched / "
                       f"{patched[1]} patched")
    if unet.tensors:
        report.add("content", _content(unet.tensors, unet_keys))
    skipped = unet.skipped + te.skipped
    ignored = Counter(cls.reason for part in source.parts for cls in part.classes.values() if cls.group == "ignored")
    ignored["unknown keys"] = plan.groups["unknown"]
    if plan.te_in_file and not plan.want_te:
        ignored[f"text-encoder weights not applied (text_encoder = {te_mode}; choose 'apply' to use them)"] = \
            plan.te_in_file
    report.add("skipped", _counts(+(skipped + ignored)) or "none")
    report.add("dtype", ", ".join(f"{n} tensors cast {what}" for what, n in casts.items()) or "no casts needed")
    ctx = [(tuple(unet.tensors[k].shape)[-1]) for k in unet.tensors if k.endswith("attn2.to_k.weight")]
    report.add("architecture check", f"ok ({len(unet.tensors) + len(te.tensors)} matched tensors have the base "
                                     f"weights' shapes" + (f"; cross-attention context {ctx[0]}, "
                                                            f"{context_family(ctx[0])}" if ctx else "") + ")")
