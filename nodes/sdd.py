"""Erase Concept (SDD): safe self-distillation of the user's own model, inside the graph.

The training loop of SDD (kernels/sdd.py has the math) on ComfyUI's objects: the MODEL's UNet with
its patches applied (LoRAs, a previously loaded erased model: training resumes from those weights)
is copied twice, a float32 student (only the chosen parameters trainable) and its EMA teacher; the
teacher is the result.  Noise estimates come from the UNet through the model's own
``model_sampling`` (EPS and v-prediction alike), so every UNet model with cross-attention works
(SD1.x, SD2.x, SDXL, the digits demo).  The input MODEL is never modified: the result is a clone
with the trained weights as patches, and a :class:`ConceptEdit` that Save Concept-Erased Weights
writes and Load Concept-Erased Model reads back.

Cancel stops at the next step; what was trained so far is kept in memory and the same node with the
same inputs resumes from it (the report says so).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.utils.checkpoint

import comfy.model_management

from ..kernels.sdd import (
    DDIM_STEPS,
    PARAMETER_SETS,
    ddim_timesteps,
    ema_update_,
    sdd_loss,
    trained_parameter,
    training_timestep,
)
from .comfy_compat import NodeInputError, check_interrupt, model_object, progress_bar
from .erased_model import ldm_to_diffusers_map, model_label
from .uce import EDIT_TYPE, ConceptEdit

log = logging.getLogger(__name__)

NODE = "Erase Concept (SDD)"
CATEGORY = "safe_denoiser/erasure"
MAX_PARTIAL = 2
"""Cancelled runs kept in memory for resuming."""


@dataclass(frozen=True)
class SDDSettings:
    """The training settings; SDD's defaults for Stable Diffusion."""

    steps: int = 1500
    learning_rate: float = 1e-5
    ema_decay: float = 0.999
    guidance: float = 3.0
    parameter_set: str = "cross-attention"
    width: int = 512
    height: int = 512
    seed: int = 0
    gradient_checkpointing: bool = True

    def result_settings(self) -> dict:
        """The settings that decide the trained weights (the file's metadata, the resume key): all but
        ``gradient_checkpointing``, which changes memory and time only."""
        return {k: v for k, v in asdict(self).items() if k != "gradient_checkpointing"}

    def validate(self) -> None:
        if self.steps < 1:
            raise NodeInputError(NODE, f"steps {self.steps} must be at least 1 (SDD: 1500 for SD).")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise NodeInputError(NODE, f"learning_rate {self.learning_rate} must be > 0 (SDD: 1e-5 for SD).")
        if not 0.0 <= self.ema_decay < 1.0:
            raise NodeInputError(NODE, f"ema_decay {self.ema_decay} must be in [0, 1) (SDD: 0.999).")
        if self.parameter_set not in PARAMETER_SETS:
            raise NodeInputError(NODE, f"parameters '{self.parameter_set}' is not one of {', '.join(PARAMETER_SETS)}.")
        if self.width % 8 or self.height % 8 or min(self.width, self.height) < 8:
            raise NodeInputError(NODE, f"width x height {self.width}x{self.height} must be multiples of 8 px.")


# ------------------------------------------------------------------------------ model plumbing


def _entries(conditioning: Any, what: str) -> list[tuple[torch.Tensor, dict]]:
    if not isinstance(conditioning, list) or not conditioning:
        raise NodeInputError(NODE, f"{what} is empty or not a CONDITIONING: connect CLIP Text Encode (or Demo Digit "
                                   "Conditioning for the digits model).")
    out = []
    for entry in conditioning:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and torch.is_tensor(entry[0])):
            raise NodeInputError(NODE, f"{what} holds an entry that is not [tensor, options].")
        out.append((entry[0], dict(entry[1])))
    return out


def _model_inputs(base: Any, entry: tuple[torch.Tensor, dict], width: int, height: int,
                  device: torch.device) -> dict[str, Any]:
    """``context`` (and SDXL's ``y``) for the UNet from one CONDITIONING entry."""
    cond, options = entry
    inputs: dict[str, Any] = {"context": cond.to(device=device, dtype=torch.float32).clone()}
    adm = base.encode_adm(pooled_output=options.get("pooled_output"), width=width, height=height, crop_w=0,
                          crop_h=0, target_width=width, target_height=height, device=device, prompt_type="positive")
    if adm is not None:
        inputs["y"] = adm.to(device=device, dtype=torch.float32).clone()
    return inputs


def eps_prediction(unet: torch.nn.Module, ms: Any, x: torch.Tensor, sigma: torch.Tensor,
                   inputs: dict[str, Any]) -> torch.Tensor:
    """The UNet's noise estimate ``eps = (x - x0_hat) / sigma`` at the VE state ``x``, through the
    model's ``model_sampling`` (so EPS and v-prediction models give the same quantity)."""
    s = sigma.reshape(-1).to(x)
    out = unet(ms.calculate_input(s, x), timesteps=ms.timestep(s).float(), transformer_options={}, **inputs)
    denoised = ms.calculate_denoised(s, out.float(), x)
    return (x - denoised) / s.reshape(-1, 1, 1, 1)


@torch.no_grad()
def teacher_sample(unet: torch.nn.Module, ms: Any, z: torch.Tensor, sigmas: list[float], count: int,
                   concept: dict[str, Any], uncond: dict[str, Any], guidance: float) -> torch.Tensor:
    """``count`` DDIM steps (eta 0) with CFG ``guidance`` from ``z`` at ``sigmas[0]`` (VE form:
    ``x' = x0_hat + sigma' * eps``)."""
    x = z
    for i in range(count):
        sigma = torch.tensor([sigmas[i]], device=z.device)
        eps_u = eps_prediction(unet, ms, x, sigma, uncond)
        eps_c = eps_prediction(unet, ms, x, sigma, concept)
        eps = eps_u + guidance * (eps_c - eps_u)
        x = (x - sigmas[i] * eps) + sigmas[i + 1] * eps
    return x


def _trainable_copy(unet: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A float32 copy of ``unet`` whose parameters and buffers are ordinary tensors (ComfyUI loads
    weights under inference mode; those cannot take part in autograd)."""
    student = copy.deepcopy(unet).to(device=device, dtype=torch.float32).train()
    with torch.no_grad():
        for module in student.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(param.detach().clone())
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = buf.detach().clone()
    return student


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _checkpoint_layers_(student: torch.nn.Module) -> int:
    """Gradient checkpointing on the student (the pack's own copy): each outermost layer that is not a
    container (the UNet calls the layers of its ``TimestepEmbedSequential`` blocks one by one: ResBlocks,
    SpatialTransformers, up/down-sampling) keeps only its inputs for the backward pass and recomputes its
    activations there (``torch.utils.checkpoint``, non-reentrant): the layers ComfyUI's own training node
    checkpoints. The gradients are the same; the activation memory drops to one layer's, for about one
    more forward pass of compute. Returns the number of layers wrapped."""
    containers = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)
    layers, stack = [], list(student.children())
    while stack:
        module = stack.pop(0)
        if isinstance(module, containers):
            stack[:0] = list(module.children())
        else:
            layers.append(module)
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)
    return len(layers)


def _probe_backward(student: torch.nn.Module, ms: Any, channels: int, inputs: dict[str, Any],
                    device: torch.device) -> None:
    """One forward and backward pass of the student at 64x64 px, without checkpointing, before it is
    checkpointed: a UNet that adds residuals in place (ComfyUI of early 2024) fails here with the node's
    clear error (:func:`_backward`), as the first step of an unchecked run does. Checkpointing's
    recomputation would not raise that error, and its gradients are not verified on such a UNet. The
    gradients of the probe are dropped; the weights are untouched."""
    z = torch.zeros(1, channels, 8, 8, device=device)
    sigma = ms.sigma(torch.tensor(500.0)).reshape(1).to(device)
    _backward(eps_prediction(student, ms, z, sigma, inputs).pow(2).mean())
    student.zero_grad(set_to_none=True)


def _backward(loss: torch.Tensor) -> None:
    try:
        loss.backward()
    except RuntimeError as err:
        if "inplace operation" not in str(err):
            raise
        raise NodeInputError(NODE, "this ComfyUI's UNet adds residuals in place (ComfyUI of early 2024), which "
                                   "autograd cannot differentiate: training needs a current ComfyUI (tested: "
                                   "v0.3.64). The input model is untouched.") from err


def _signature(model: Any, concepts: list, uncond: list, settings: SDDSettings) -> str:
    h = hashlib.sha256(json.dumps(settings.result_settings(), sort_keys=True).encode())
    h.update(str(id(model.model)).encode())
    h.update(json.dumps(sorted(str(k) for k in model.patches)).encode())
    for tensor, _ in concepts + uncond:
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


_PARTIAL: dict[str, dict[str, Any]] = {}
_PARTIAL_LOCK = threading.Lock()


# ------------------------------------------------------------------------------ training


def train_sdd(model: Any, concepts: Any, uncond: Any, settings: SDDSettings) -> tuple[Any, ConceptEdit, str]:
    """``(erased MODEL clone, edit, report)``; ``model`` is not modified.

    ComfyUI runs nodes under ``torch.inference_mode()``; training leaves it (as ComfyUI's own
    training node does) and works on clones of the weights and inputs, never on inference tensors.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train(model, concepts, uncond, settings)


def _train(model: Any, concepts: Any, uncond: Any, settings: SDDSettings) -> tuple[Any, ConceptEdit, str]:
    settings.validate()
    concept_entries, uncond_entries = _entries(concepts, "concepts"), _entries(uncond, "unconditional")
    comfy.model_management.load_models_gpu([model])
    base = model.model
    unet = getattr(base, "diffusion_model", None)
    names = [n for n, _ in unet.named_parameters()] if unet is not None else []
    if unet is None or not hasattr(unet, "input_blocks") or not any(".attn2." in n for n in names):
        raise NodeInputError(NODE, f"{model_label(model)} has no UNet cross-attention (attn2) layers (SD3 and Flux use "
                                   "joint attention): SDD is defined for UNet models (SD1.x, SD2.x, SDXL).")
    ms = model_object(model, "model_sampling")
    device = model.load_device
    signature = _signature(model, concept_entries, uncond_entries, settings)
    student = _trainable_copy(unet, device)
    teacher = copy.deepcopy(student).eval()
    trained = [n for n in names if trained_parameter(n, settings.parameter_set)]
    params = dict(student.named_parameters())
    trained_set = set(trained)
    for name, p in params.items():
        p.requires_grad_(name in trained_set)
    teacher.requires_grad_(False)
    t_params = dict(teacher.named_parameters())
    student_list, teacher_list = [params[n] for n in trained], [t_params[n] for n in trained]
    optimizer = torch.optim.AdamW(student_list, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=1e-4)
    gen = torch.Generator().manual_seed(int(settings.seed))
    start, losses = 0, []
    with _PARTIAL_LOCK:
        partial = _PARTIAL.pop(signature, None)
    if partial is not None:
        with torch.no_grad():
            for p, v in zip(student_list, partial["student"]):
                p.copy_(v)
            for p, v in zip(teacher_list, partial["teacher"]):
                p.copy_(v)
        optimizer.load_state_dict(partial["optimizer"])
        gen.set_state(partial["generator"])
        start, losses = partial["step"], partial["losses"]
        log.info("%s: resuming a cancelled run at step %d of %d", NODE, start, settings.steps)

    schedule = ddim_timesteps()
    sigmas = [float(ms.sigma(torch.tensor(float(t)))) for t in schedule] + [0.0]
    latent_channels = unet.in_channels if hasattr(unet, "in_channels") else 4
    shape = (1, latent_channels, settings.height // 8, settings.width // 8)
    uncond_inputs = _model_inputs(base, uncond_entries[0], settings.width, settings.height, device)
    concept_inputs = [_model_inputs(base, e, settings.width, settings.height, device) for e in concept_entries]
    teacher_inputs = dict(concept_inputs[0])
    teacher_inputs["context"] = torch.cat([c["context"] for c in concept_inputs], dim=1)  # all concepts joined
    if settings.gradient_checkpointing:
        _probe_backward(student, ms, latent_channels, concept_inputs[0], device)
        _checkpoint_layers_(student)  # after the teacher's copy: the teacher never runs backward
    pbar = progress_bar(settings.steps)
    pbar.update_absolute(start, settings.steps)
    t0 = time.time()
    step = start
    try:
        for step in range(start, settings.steps):
            check_interrupt()
            k = int(torch.randint(0, DDIM_STEPS, (1,), generator=gen))
            z = torch.randn(shape, generator=gen).to(device) * math.sqrt(1.0 + sigmas[0] ** 2)
            z_t = teacher_sample(teacher, ms, z, sigmas, k, teacher_inputs, uncond_inputs, settings.guidance)
            sigma = ms.sigma(torch.tensor(float(training_timestep(schedule, k, gen)))).reshape(1).to(device)
            eps_c = eps_prediction(student, ms, z_t, sigma, concept_inputs[step % len(concept_inputs)])
            with torch.no_grad():
                eps_u = eps_prediction(student, ms, z_t, sigma, uncond_inputs)
            loss = sdd_loss(eps_c, eps_u)
            if not torch.isfinite(loss):
                raise NodeInputError(NODE, f"the loss became {float(loss)} at step {step + 1}: learning_rate "
                                           f"{settings.learning_rate:g} is too high for this model; lower it. The "
                                           "input model is untouched.")
            optimizer.zero_grad(set_to_none=True)
            _backward(loss)
            torch.nn.utils.clip_grad_norm_(student_list, 1.0)
            optimizer.step()
            ema_update_(teacher_list, student_list, settings.ema_decay)
            losses.append(float(loss.detach()))
            pbar.update_absolute(step + 1, settings.steps)
            if (step + 1) % max(1, settings.steps // 10) == 0:
                log.info("%s: step %d/%d, loss %.4g (mean of the last %d: %.4g)", NODE, step + 1, settings.steps,
                         losses[-1], min(len(losses), 50), sum(losses[-50:]) / min(len(losses), 50))
    except comfy.model_management.InterruptProcessingException:
        with _PARTIAL_LOCK:
            _PARTIAL[signature] = {"step": step, "losses": losses, "optimizer": optimizer.state_dict(),
                                   "generator": gen.get_state(),
                                   "student": [p.detach().clone() for p in student_list],
                                   "teacher": [p.detach().clone() for p in teacher_list]}
            while len(_PARTIAL) > MAX_PARTIAL:
                _PARTIAL.pop(next(iter(_PARTIAL)))
        log.warning("%s: cancelled at step %d of %d; the %d steps trained so far are kept in memory: queue the "
                    "same graph again to resume", NODE, step, settings.steps, step)
        raise
    return _result(model, trained, t_params, settings, losses, start, time.time() - t0, concept_entries)


def _result(model: Any, trained: list[str], t_params: dict[str, torch.Tensor], settings: SDDSettings,
            losses: list[float], start: int, seconds: float, concepts: list) -> tuple[Any, ConceptEdit, str]:
    model_sd = model.model_state_dict()
    edited = {}
    for name in trained:
        key = "diffusion_model." + name
        edited[key] = t_params[name].detach().to(device="cpu", dtype=model_sd[key].dtype).contiguous()
    patched = model.clone()
    patched.add_patches({k: (v,) for k, v in edited.items()}, 1.0, 0.0)
    names = ldm_to_diffusers_map(model)
    bare = {k[len("diffusion_model."):]: v for k, v in edited.items()}
    meta = {"format": "concept_erased", "method": "SDD (safe self-distillation)", "version": "1",
            "concepts": json.dumps([f"conditioning {i + 1}" for i in range(len(concepts))]),
            "settings": json.dumps(settings.result_settings()), "base_model": model_label(model)}
    edit = ConceptEdit(bare, {k: names[k] for k in bare if k in names}, meta)
    count = sum(v.numel() for v in edited.values())
    total = sum(v.numel() for k, v in model_sd.items() if k.startswith("diffusion_model."))
    tenth = max(1, len(losses) // 10)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    report = "\n".join([
        f"{NODE}: {len(concepts)} concept(s), {settings.steps} steps" + (f" (resumed at step {start})" if start else ""),
        f"trained: {settings.parameter_set} parameters, {len(edited)} tensors, {count:,} of {total:,} UNet weights "
        f"({100.0 * count / max(total, 1):.1f}%); the EMA teacher (decay {settings.ema_decay:g}) is the result",
        f"loss: first {tenth} steps mean {first:.4g} -> last {tenth} steps mean {last:.4g}",
        f"AdamW lr {settings.learning_rate:g}, CFG {settings.guidance:g}, latents {settings.width}x{settings.height} px, "
        f"seed {settings.seed}, gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}; "
        f"{seconds:.1f} s ({(settings.steps - start) / max(seconds, 1e-9):.2f} steps/s)",
    ])
    log.info("%s", report.replace("\n", " | "))
    return patched, edit, report


# ------------------------------------------------------------------------------ the node


class EraseConceptSDD:
    DISPLAY_NAME = NODE
    DESCRIPTION = ("Erases a concept from your model by safe self-distillation (SDD, Kim et al. 2023): the model's "
                   "noise prediction for the concept is trained to match its own unconditional prediction on "
                   "images its EMA teacher draws of that concept, so the concept becomes as rare as it is without "
                   "a prompt. Trains a copy (the input model is untouched); outputs the erased model, the edit for "
                   "Save Concept-Erased Weights, and a report. Progress bar with Cancel; a cancelled run resumes "
                   "when queued again.")
    SEARCH_ALIASES = ["SDD", "erase concept", "unlearn", "fine-tune", "nsfw", "self-distillation", "train"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", EDIT_TYPE, "STRING")
    RETURN_NAMES = ("model", "edit", "report")
    OUTPUT_TOOLTIPS = ("The model with the concept erased (the trained weights as patches on a copy).",
                       "The trained weights, for Save Concept-Erased Weights.",
                       "Steps, parameters trained, the loss at the start and the end, time.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        d = SDDSettings()
        return {"required": {
            "model": ("MODEL", {"tooltip": "The UNet model to erase the concept from (SD1.x, SD2.x, SDXL, the digits "
                                           "demo). Not modified. Load saved SDD weights in front of it to resume."}),
            "concepts": ("CONDITIONING", {"tooltip": "The concept(s) to erase, e.g. CLIP Text Encode 'nudity'. Several "
                                                     "concepts: join them with Conditioning (Combine); one is trained "
                                                     "per step, in turn, as in SDD."}),
            "unconditional": ("CONDITIONING", {"tooltip": "The empty prompt (CLIP Text Encode with no text; for the "
                                                          "digits model Demo Digit Conditioning 'any'): the anchor the "
                                                          "concept is pulled onto."}),
            "steps": ("INT", {"default": d.steps, "min": 1, "max": 100000, "tooltip":
                      "Training steps (SDD: 1500 for SD). More steps erase more and drift more."}),
            "learning_rate": ("FLOAT", {"default": d.learning_rate, "min": 1e-8, "max": 1.0, "step": 1e-6,
                              "round": False, "tooltip": "AdamW learning rate (SDD: 1e-5 for SD). Higher erases "
                                                         "faster; too high diverges (the node stops with an error)."}),
            "ema_decay": ("FLOAT", {"default": d.ema_decay, "min": 0.0, "max": 0.99999, "step": 0.0001,
                          "tooltip": "Decay of the EMA teacher, which is the result (SDD: 0.999). Lower follows the "
                                     "student faster (use it for short runs)."}),
            "guidance": ("FLOAT", {"default": d.guidance, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip":
                         "CFG scale of the teacher's samples of the concept (SDD: 3.0)."}),
            "parameters": (list(PARAMETER_SETS), {"default": d.parameter_set, "tooltip":
                           "What is trained: cross-attention (SDD's default, about 5% of the UNet), all attention, "
                           "or the full UNet (more capacity, more drift)."}),
            "width": ("INT", {"default": d.width, "min": 8, "max": 4096, "step": 8, "tooltip":
                      "Image width of the training samples in px (512 for SD1.x, 1024 for SDXL, 64 for the digits "
                      "demo)."}),
            "height": ("INT", {"default": d.height, "min": 8, "max": 4096, "step": 8, "tooltip":
                       "Image height of the training samples in px."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "tooltip":
                     "Seed of the training noise and timesteps: the same seed gives the same weights."}),
        }, "optional": {
            "gradient_checkpointing": ("BOOLEAN", {"default": d.gradient_checkpointing, "tooltip":
                                       "Recompute each UNet layer's activations in the backward pass instead of "
                                       "keeping them: less memory for the student's backward pass, for one more "
                                       "forward pass of it per step. The trained weights are the same either way "
                                       "(bit for bit on the CPU)."}),
        }}

    def train(self, model, concepts, unconditional, steps, learning_rate, ema_decay, guidance, parameters, width,
              height, seed, gradient_checkpointing=SDDSettings.gradient_checkpointing):
        settings = SDDSettings(int(steps), float(learning_rate), float(ema_decay), float(guidance), parameters,
                               int(width), int(height), int(seed), bool(gradient_checkpointing))
        patched, edit, report = train_sdd(model, concepts, unconditional, settings)
        return {"ui": {"text": [report]}, "result": (patched, edit, report)}
