"""Helpers for the concept-erasure tests: concept-erased weight files in every published format,
written from a tiny model's own (perturbed) weights, and access to the pack's modules.

Import only after a ComfyUI is importable (uses ``comfy.utils``).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping

import safetensors.torch
import torch

import comfy.utils

UNET = "diffusion_model."


def pack_module(session: Any, name: str) -> ModuleType:
    """A module of the loaded pack's ``nodes`` package (``erased_model``, ``comfy_compat`` ...)."""
    cls = session.nodes.NODE_CLASS_MAPPINGS["SDN_LoadConceptErasedModel"]
    return importlib.import_module(cls.__module__.rsplit(".", 1)[0] + "." + name)


def diffusers_names(model: Any) -> dict[str, str]:
    """``{ldm key (no prefix): diffusers key}`` for the model's UNet weights, inverted here from
    ``comfy.utils.unet_to_diffusers`` (independently of the pack's own inverse)."""
    config = model.model.model_config.unet_config
    present = {k[len(UNET):] for k in model.model_state_dict() if k.startswith(UNET)}
    out: dict[str, str] = {}
    for diffusers, ldm in comfy.utils.unet_to_diffusers(config).items():
        if ldm in present and (ldm not in out or diffusers.startswith("add_embedding")):
            out[ldm] = diffusers
    return out


def unet_weights(model: Any, select: str = "") -> dict[str, torch.Tensor]:
    """``{model key: unpatched weight}`` of UNet weights whose key contains ``select`` (all if
    empty).  A clone loaded for sampling leaves patched weights in the shared module and the
    originals in ``model.backup`` (a tensor on O, a ``(weight, inplace)`` tuple on N)."""
    backup = getattr(model, "backup", {})
    return {k: getattr(backup[k], "weight", backup[k]) if k in backup else v
            for k, v in model.model_state_dict().items() if k.startswith(UNET) and select in k}


def perturbed(weights: Mapping[str, torch.Tensor], seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A deterministic perturbation ``w + scale * N(0, 1)`` of every tensor (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v.detach().float().cpu() + scale * torch.randn(v.shape, generator=gen)).contiguous()
            for k, v in sorted(weights.items())}


def rename(tensors: Mapping[str, torch.Tensor], names: Mapping[str, str], prefix: str = "") -> dict[str, torch.Tensor]:
    """``tensors`` keyed by model key -> keyed by ``prefix + names[key without 'diffusion_model.']``."""
    return {prefix + names[k[len(UNET):] if k.startswith(UNET) else k]: v for k, v in tensors.items()}


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                                metadata=dict(metadata) if metadata else None)
    return path


def save_pickle(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, str(path))
    return path


def diffusers_folder(folder: Path, tensors: Mapping[str, torch.Tensor], *, config: Mapping[str, Any],
                     stem: str = "diffusion_pytorch_model", fmt: str = "safetensors", shards: int = 1) -> Path:
    """A diffusers/transformers component folder: ``config.json`` + weights (optionally sharded)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config)), encoding="utf-8")
    ext = ".safetensors" if fmt == "safetensors" else ".bin"
    writer = (lambda p, t: save_safetensors(p, t)) if fmt == "safetensors" else save_pickle
    if shards == 1:
        writer(folder / f"{stem}{ext}", dict(tensors))
        return folder
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}{ext}"
        chunk = {k: tensors[k] for k in keys[i::shards]}
        writer(folder / name, chunk)
        weight_map.update({k: name for k in chunk})
    (folder / f"{stem}{ext}.index.json").write_text(json.dumps({"weight_map": weight_map}), encoding="utf-8")
    return folder


UNET_CONFIG = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.27.0"}
CLIP_CONFIG = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}


def openclip_names(te: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers CLIP-text names (``text_model.*``, ``text_projection.weight``) -> open_clip
    names as stored in SD2/SDXL checkpoints (q/k/v fused into ``in_proj``, projection transposed).
    The inverse of ComfyUI's ``clip_text_transformers_convert``."""
    out: dict[str, torch.Tensor] = {}
    t = dict(te)
    out["positional_embedding"] = t.pop("text_model.embeddings.position_embedding.weight")
    out["token_embedding.weight"] = t.pop("text_model.embeddings.token_embedding.weight")
    for y in ("weight", "bias"):
        out[f"ln_final.{y}"] = t.pop(f"text_model.final_layer_norm.{y}")
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(layers):
        src = f"text_model.encoder.layers.{i}."
        for a, b in names.items():
            for y in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{b}.{y}"] = t.pop(f"{src}{a}.{y}")
        for y in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{y}"] = torch.cat(
                [t.pop(f"{src}self_attn.{p}_proj.{y}") for p in "qkv"], 0)
    if "text_projection.weight" in t:
        out["text_projection"] = t.pop("text_projection.weight").T.contiguous()
    return out


def kohya_lora(names: Mapping[str, str], keys: Iterable[str], rank: int = 2, alpha: float = 1.0,
               seed: int = 0, model_sd: Mapping[str, torch.Tensor] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A kohya-format LoRA on linear ``keys`` (model keys) and the deltas it adds at strength 1."""
    gen = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for key in keys:
        out_dim, in_dim = model_sd[key].shape[:2]
        stem = "lora_unet_" + names[key[len(UNET):]][: -len(".weight")].replace(".", "_")
        up = 0.1 * torch.randn(out_dim, rank, generator=gen)
        down = 0.1 * torch.randn(rank, in_dim, generator=gen)
        lora[f"{stem}.lora_up.weight"], lora[f"{stem}.lora_down.weight"] = up, down
        lora[f"{stem}.alpha"] = torch.tensor(float(alpha))
        deltas[key] = (alpha / rank) * (up @ down)
    return lora, deltas


def save_with_lightning_callback(path: Path, payload: Mapping[str, Any]) -> Path:
    """``torch.save(payload + {'callbacks': {'ModelCheckpoint': <callback>}})``: real ``.ckpt``
    files carry PyTorch Lightning's ``ModelCheckpoint`` object.  Without Lightning installed, a
    stand-in module exists only while saving (pickle records the class by module path)."""
    import sys
    import types

    name = "pytorch_lightning.callbacks.model_checkpoint"
    added = [m for m in ("pytorch_lightning", "pytorch_lightning.callbacks", name) if m not in sys.modules]
    for module in added:
        sys.modules[module] = types.ModuleType(module)
    try:
        if name in added:
            sys.modules[name].ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": name})
        callback = sys.modules[name].ModelCheckpoint()
        callback.__dict__.update({"monitor": "val/loss", "best_model_score": torch.tensor(0.1)})
        return save_pickle(path, dict(payload, callbacks={"ModelCheckpoint": callback}))
    finally:
        for module in added:
            del sys.modules[module]


class Malicious:
    """Unpickling this runs ``Path(sentinel).touch()``: the payload a safe loader must not run."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


def malicious_pickle(path: Path, sentinel: Path, tensors: Mapping[str, torch.Tensor], container: str = "zip") -> Path:
    """A ``.pt`` whose state dict looks normal but carries a code-running object; ``container``:
    ``zip`` (torch.save), ``legacy`` (torch.save's pre-1.6 format) or ``raw`` (pickle.dump)."""
    import pickle

    obj = {"state_dict": dict(tensors), "payload": Malicious(os.fspath(sentinel))}
    path.parent.mkdir(parents=True, exist_ok=True)
    if container == "raw":
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    else:
        torch.save(obj, str(path), _use_new_zipfile_serialization=container == "zip")
    return path
