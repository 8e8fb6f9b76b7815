"""Safe self-distillation (SDD; Kim et al. 2023, "Towards Safe Self-Distillation of Internet-Scale
Text-to-Image Diffusion Models", GitHub nannullna/safe-diffusion ``train_sdd.py``), the pieces that
are pure math: the DDIM schedule and training timesteps, the loss, the EMA teacher update and the
choice of trained parameters.  No ComfyUI import.

SDD's step: the EMA teacher samples ``z_t`` with DDIM (50 steps, eta 0) and CFG 3.0 from the
concept prompt, stopped after a random number ``k`` of steps; the training timestep ``t`` is uniform
in the DDPM interval that DDIM step covers; the student's noise estimate conditioned on the concept
is pulled onto its own (stop-gradient) unconditional estimate::

    loss = || eps_student(z_t, t, c) - stopgrad(eps_student(z_t, t, "")) ||^2   (mean over elements)
"""

from __future__ import annotations

import torch

__all__ = ["DDIM_STEPS", "TRAIN_STEPS", "PARAMETER_SETS", "ddim_timesteps", "training_timestep", "sdd_loss",
           "ema_update_", "trained_parameter"]

DDIM_STEPS = 50
TRAIN_STEPS = 1000
PARAMETER_SETS = ("cross-attention", "attention", "full")
"""``train_sdd.py``'s ``--finetuning_method`` xattn (default), xattn + selfattn, full."""


def ddim_timesteps(steps: int = DDIM_STEPS, train_steps: int = TRAIN_STEPS) -> list[int]:
    """diffusers' DDIM ``leading`` spacing with ``steps_offset`` 1 (SD's scheduler config):
    ``[981, 961, ..., 1]`` for 50 of 1000 steps, noisiest first."""
    ratio = train_steps // steps
    return [int(i * ratio + 1) for i in range(steps)][::-1]


def training_timestep(schedule: list[int], index: int, generator: torch.Generator) -> int:
    """A DDPM timestep uniform in ``(schedule[index + 1], schedule[index]]`` (to 0 after the last
    DDIM step): the interval DDIM step ``index`` covers."""
    high = schedule[index]
    low = schedule[index + 1] if index + 1 < len(schedule) else -1
    return int(torch.randint(low + 1, high + 1, (1,), generator=generator))


def sdd_loss(eps_concept: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """SDD's loss: mean squared error to the stop-gradient unconditional estimate (float32)."""
    return torch.nn.functional.mse_loss(eps_concept.float(), eps_uncond.detach().float())


@torch.no_grad()
def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], decay: float) -> None:
    """In place ``teacher <- decay * teacher + (1 - decay) * student`` for each pair."""
    for t, s in zip(teacher, student):
        t.lerp_(s.to(t.dtype), 1.0 - decay)


def trained_parameter(name: str, parameter_set: str) -> bool:
    """Whether the UNet parameter ``name`` (LDM names, e.g. ``input_blocks.1.1.transformer_blocks.0
    .attn2.to_k.weight``) is trained under ``parameter_set`` (:data:`PARAMETER_SETS`)."""
    if parameter_set == "full":
        return True
    if parameter_set == "attention":
        return ".attn1." in name or ".attn2." in name
    if parameter_set == "cross-attention":
        return ".attn2." in name
    raise ValueError(f"parameter set {parameter_set!r} is not one of {', '.join(PARAMETER_SETS)}")
