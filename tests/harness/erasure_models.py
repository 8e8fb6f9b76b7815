"""Tiny, deterministic, REAL ComfyUI text encoders (and a matching UNet) for the concept-erasure
tests.

``build_text_encoder(seed, hidden)`` is a ``comfy.sd.CLIP`` wrapping ``comfy.sd1_clip.SD1ClipModel``
(an ``SDClipModel`` whose ``comfy.clip_model.CLIPTextModel`` has a tiny transformer config) and
``comfy.sd1_clip.SD1Tokenizer`` (the SD1 BPE tokenizer bundled with ComfyUI), so nodes see the real
object and its real key names (``clip_l.transformer.text_model.*``).  fp32 on N (whose CPU default
is fp16), ComfyUI's fp16 default on O.

Widths: ``hidden=32`` (:data:`harness.tiny_models.CONTEXT_DIM`) conditions the tiny UNets of
:mod:`harness.tiny_models`.  UCE constrains ~75 tokens per concept (a 77-token CLIP sequence
from the last word on), so its closed form can only be exact when the embedding width exceeds the
number of constrained tokens, as in real models (768 / 1024 / 2048 for a few concepts):
``hidden=WIDE`` with :func:`build_wide_unet` (the same tiny UNet, ``context_dim=WIDE``) gives that.

(``harness.tiny_clip`` holds another tiny CLIP, with a vision tower, for the reward tests.)
Import only after a ComfyUI is importable.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import tempfile
from typing import Any

import torch

import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models

from . import tiny_models as tm

log = logging.getLogger(__name__)

WIDE = 384
LAYERS = 2
_CPU = torch.device("cpu")
_CLIP_CACHE: dict[tuple[int, int], comfy.sd.CLIP] = {}
_UNET_CACHE: dict[tuple[int, int], comfy.model_patcher.ModelPatcher] = {}


def text_config(hidden: int) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` fields read by ComfyUI's ``CLIPTextModel`` (both versions)."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "hidden_act": "quick_gelu", "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_attention_heads": 2, "num_hidden_layers": LAYERS, "max_position_embeddings": 77,
        "vocab_size": 49408, "projection_dim": hidden, "layer_norm_eps": 1e-5,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32",
    }


@functools.lru_cache(maxsize=None)
def _config_path(hidden: int) -> str:
    """The config written once per process to a temporary file (O's constructors read a path)."""
    folder = tempfile.mkdtemp(prefix="sdn-erasure-clip-")
    path = os.path.join(folder, f"clip_text_{hidden}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(text_config(hidden), fh)
    return path


class _Target:
    """What ``comfy.sd.CLIP(target=...)`` reads: ``params``, ``clip`` and ``tokenizer``."""

    def __init__(self, hidden: int):
        self.params: dict[str, Any] = {}
        self.clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=functools.partial(
            comfy.sd1_clip.SDClipModel, textmodel_json_config=_config_path(hidden)))
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer


def build_text_encoder(seed: int = 0, hidden: int = tm.CONTEXT_DIM) -> comfy.sd.CLIP:
    """A tiny real CLIP (SD1 tokenizer, 2 layers, width ``hidden``); cached, never mutate."""
    key = (int(seed), int(hidden))
    if key in _CLIP_CACHE:
        return _CLIP_CACHE[key]
    kwargs: dict[str, Any] = {}
    if "model_options" in inspect.signature(comfy.sd.CLIP.__init__).parameters:
        kwargs["model_options"] = {"dtype": torch.float32}  # N defaults to fp16 text encoders on CPU
    with torch.no_grad():  # O's CLIPTextModel writes into a parameter at construction
        clip = comfy.sd.CLIP(target=_Target(int(hidden)), embedding_directory=None, **kwargs)
    tm.init_weights_(clip.cond_stage_model, 1000 + int(seed))
    clip.cond_stage_model.eval()
    _CLIP_CACHE[key] = clip
    log.debug("built tiny CLIP (seed %d, width %d)", seed, hidden)
    return clip


def build_wide_unet(seed: int = 0, context_dim: int = WIDE) -> comfy.model_patcher.ModelPatcher:
    """The tiny SD1.5 UNet of :func:`harness.tiny_models.build_model` with a ``context_dim``-wide
    cross-attention (to pair with ``build_text_encoder(hidden=context_dim)``); cached, never mutate."""
    key = (int(seed), int(context_dim))
    if key not in _UNET_CACHE:
        model_config = comfy.supported_models.SD15(dict(tm._unet_config("sd15"), context_dim=int(context_dim)))
        model_config.unet_config.update(num_heads=2, num_head_channels=-1)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model({}, device=_CPU)
        tm.init_weights_(model.diffusion_model, seed)
        model.eval()
        _UNET_CACHE[key] = comfy.model_patcher.ModelPatcher(model, load_device=_CPU, offload_device=_CPU)
    return _UNET_CACHE[key]
