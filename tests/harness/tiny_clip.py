"""Tiny, deterministic, real ComfyUI CLIP text encoders and CLIP vision models for CPU tests.

Built from ComfyUI's own classes (``comfy.sd.CLIP`` around ``sd1_clip.SD1ClipModel`` with
ComfyUI's SD1 tokenizer, and ``comfy.clip_vision.ClipVisionModel``) with tiny JSON configs
(hidden size 32, one layer), so nodes see the real objects: ``CLIPTextEncode`` works on the tiny
CLIP (its 32-wide hidden states match the tiny UNet's ``context_dim``) and
``ClipVisionModel.encode_image`` runs the real preprocessing and projection.

ComfyUI's ``ops`` layers skip weight initialisation: every parameter is initialised here from the
seed, and the text projection is made a random (not identity) matrix so that the projected and
unprojected pooled outputs differ.

Import only after a ComfyUI is importable (see :mod:`harness.tiny_models`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from typing import Any

import torch

import comfy.clip_vision
import comfy.sd
import comfy.sd1_clip

from .locate import RUNTIME_DIR
from .tiny_models import init_weights_

log = logging.getLogger(__name__)

#: Width of the tiny text and vision towers and of their shared projection space.
WIDTH = 32
PROJECTION_DIM = 32

TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": WIDTH, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 2,
    "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": PROJECTION_DIM, "torch_dtype": "float32",
    "vocab_size": 49408,
}

VISION_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": WIDTH,
    "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2,
    "num_channels": 3, "num_hidden_layers": 2, "patch_size": 32, "projection_dim": PROJECTION_DIM,
    "torch_dtype": "float32",
}

_CLIP_CACHE: dict[int, comfy.sd.CLIP] = {}
_VISION_CACHE: dict[int, comfy.clip_vision.ClipVisionModel] = {}


@functools.lru_cache(maxsize=None)
def _config_file(kind: str) -> str:
    """A JSON file holding the tiny config (O's constructors take only a file path)."""
    config = TEXT_CONFIG if kind == "text" else VISION_CONFIG
    RUNTIME_DIR.mkdir(parents=True, exist_ok=True)
    path = RUNTIME_DIR / f"tiny_clip_{kind}_config.json"
    text = json.dumps(config, indent=1, sort_keys=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        with tempfile.NamedTemporaryFile("w", dir=RUNTIME_DIR, suffix=".tmp", delete=False,
                                         encoding="utf-8") as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)  # atomic: in-process tests and a server may race here
    return str(path)


class _TinyClipTarget:
    """The ``target`` that ``comfy.sd.CLIP`` builds from: model class, tokenizer class, params."""

    def __init__(self) -> None:
        self.clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=comfy.sd1_clip.SDClipModel,
                                      textmodel_json_config=_config_file("text"))
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer
        self.params: dict[str, Any] = {}


def build_clip(seed: int = 0) -> comfy.sd.CLIP:
    """A tiny real CLIP (SD1 tokenizer, 2-layer 32-wide text tower); cached per seed."""
    key = int(seed)
    if key in _CLIP_CACHE:
        return _CLIP_CACHE[key]
    with torch.no_grad():  # O's text model writes its identity projection in place at construction
        clip = comfy.sd.CLIP(target=_TinyClipTarget())
        init_weights_(clip.cond_stage_model, seed)  # matrices (text projection included) random
    _CLIP_CACHE[key] = clip
    return clip


def build_clip_vision(seed: int = 0) -> comfy.clip_vision.ClipVisionModel:
    """A tiny real CLIP vision model (224 px, 32 px patches, 2 layers, 32-wide); cached per seed."""
    key = int(seed)
    if key in _VISION_CACHE:
        return _VISION_CACHE[key]
    with torch.no_grad():
        vision = comfy.clip_vision.ClipVisionModel(_config_file("vision"))
        init_weights_(vision.model, seed)
    _VISION_CACHE[key] = vision
    return vision
