"""The negation set's calibrated test at one noise level, memoised on the set.

Shared by the Safe Denoiser's weight ``beta`` (calibrated mode: ``log R`` is measured from the
test's threshold, so ``P = eta`` exactly where the test starts to claim, and only where the kernel
averages over the set) and by the Restart Sampler (a state above the threshold is claimed). The
threshold is :func:`kernels.restart.restart_threshold`: the larger of the set's own noisy members'
``1 - recall`` quantile of ``log R`` (each scored without its own kernel) and the reference
Gaussian's ``1 - false_alarm`` quantile; ``inf`` where the kernel cannot tell the two apart (the
first steps of flow models).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..kernels.restart import RestartThreshold, restart_threshold

DEFAULT_RECALL = 0.95
DEFAULT_FALSE_ALARM = 0.01


def calibrated_threshold(negation: Any, prep: Any, alpha: float, std: float, width: float, height: int, pixels: int,
                         device: torch.device | str, recall: float = DEFAULT_RECALL,
                         false_alarm: float = DEFAULT_FALSE_ALARM) -> RestartThreshold:
    """The test of ``negation`` at ``(alpha, std)``, computed once per set, size and setting.

    Args:
        negation: the :class:`~nodes.negation_set.NegationSet` (its ``memo`` keeps the result).
        prep: its ``prepared(..., "paper")`` latents (``y``, ``ref_mean``, ``ref_var``) at this size.
        alpha, std: ``a_t``, ``s_t`` of the noise level (``std > 0``).
        width: kernel width in units of ``s_t`` (the paper mode's ``3 x bandwidth``).
        height, pixels: the latent's height and width (part of the memo key).
        device: where the latents live (part of the memo key).
        recall, false_alarm: the calibration targets.
    """
    key = ("restart", round(alpha, 9), round(std, 9), width, recall, false_alarm, height, pixels, str(device))
    return negation.memo(key, lambda: restart_threshold(prep.y, alpha, std, width, prep.ref_mean, prep.ref_var,
                                                        recall, false_alarm))


def averaging_levels(negation: Any, prep: Any, alpha: torch.Tensor, std: torch.Tensor, width: float, height: int,
                     pixels: int, max_own_gain: float = math.log(2.0),
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``[B]`` float64: the threshold of :func:`calibrated_threshold` at each sample's ``(a_t, s_t)`` where the
    kernel still averages over the set, ``inf`` elsewhere (and where the test is off).

    "Averages": a set member's own kernel adds at most ``max_own_gain`` nats to its density (median over the
    calibration members; ``log 2``: the other members carry at least half of it). Below that noise level the
    kernel mean of Eq. 6 is the nearest member, not an estimate of ``E_unsafe``.

    Args:
        alpha, std: ``[B]`` tensors of ``a_t``, ``s_t`` (on the CPU: they are read as floats).
        device: where ``prep`` lives and the result goes (default: ``alpha``'s device).
        the others: as :func:`calibrated_threshold`.
    """
    device = alpha.device if device is None else torch.device(device)

    def level(a: float, s: float) -> float:
        if not s > 0:
            return math.inf
        test = calibrated_threshold(negation, prep, a, s, width, height, pixels, device)
        return test.threshold if test.own_kernel_gain <= max_own_gain else math.inf

    pairs = [(float(a), float(s)) for a, s in zip(alpha.reshape(-1).tolist(), std.reshape(-1).tolist())]
    levels = {pair: level(*pair) for pair in set(pairs)}
    return torch.tensor([levels[pair] for pair in pairs], dtype=torch.float64, device=device)
