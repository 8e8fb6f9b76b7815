"""Unified Concept Editing in closed form (pure torch; no ComfyUI import).

Gandikota, Orgad, Belinkov, Materzynska and Bau, *Unified Concept Editing in Diffusion Models*
(WACV 2024), Eq. 7 / Sec. 3: every cross-attention key and value projection ``W`` (``[out, d]``,
``d`` = text-embedding width) is replaced by

    W' = ( sum_i v*_i c_i^T + lambda * sum_j W c_j c_j^T + mu * W )
         ( sum_i c_i c_i^T  + lambda * sum_j c_j c_j^T  + mu * I )^-1

with ``c_i`` the text-encoder output embeddings (tokens) of the concepts to erase,
``v*_i = W g_i`` the projection of the aligned guide-concept tokens ``g_i``, and ``c_j`` the
tokens of the concepts to preserve.  ``mu * (W, I)`` is the small ridge term of the official
code (``lamb * weight`` / ``lamb * eye``): it keeps ``W'`` equal to ``W`` on directions no concept
spans and makes the system invertible; here ``mu = ridge * mean_i ||c_i||^2`` so that ``ridge``
is scale-free.  ``W'`` is the minimiser of
``sum_i ||W' c_i - v*_i||^2 + lambda sum_j ||W' c_j - W c_j||^2 + mu ||W' - W||_F^2``.

With ``C`` (``[N, d]``, rows ``c_i``), ``G`` (rows ``g_i``), ``P`` (rows ``c_j``),
``S = C^T C + lambda P^T P + mu I`` and ``D = G - C``, the update is shared by every layer of
width ``d``: ``W' = W M`` with ``M = I + D^T C S^-1`` (:func:`uce_operator`).

Guarantees (used by the tests):

* erased tokens - ``W' C^T - W G^T = -W D^T (I + C R^-1 C^T)^-1`` with
  ``R = lambda P^T P + mu I``: the residual vanishes as the concept tokens leave the preserve
  span (relative to ``lambda``) and ``mu -> 0``;
* preserved tokens - for every preserve token ``p`` (a row of ``P``)
  ``||W' p - W p|| <= ||W D^T||_2 * sqrt(p^T S^-1 p) <= ||W D^T||_2 * |p| / sqrt(lambda |p|^2 + mu)
  < ||W D^T||_2 / sqrt(lambda)`` because ``C^T C <= S`` (so ``||C S^-1/2||_2 <= 1``) and
  ``lambda p p^T + mu I <= S`` (:func:`preserve_bounds`).  ``||W D^T||_2`` is the largest change
  the erasure asks of the layer, so ``lambda`` trades erasure for preservation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DTYPE = torch.float64


def _rows(x: Optional[torch.Tensor], d: int, name: str) -> torch.Tensor:
    if x is None:
        return torch.zeros(0, d, dtype=DTYPE)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{name} must be [n, {d}], got {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.detach().to("cpu", DTYPE)


@dataclass(frozen=True)
class UCEOperator:
    """``M`` (``[d, d]``) with ``W' = W M`` for every projection of input width ``d``, plus the
    quantities the guarantees are stated with (all float64, CPU)."""

    matrix: torch.Tensor
    system: torch.Tensor
    erase: torch.Tensor
    guide: torch.Tensor
    preserve: torch.Tensor
    lam: float
    mu: float
    preserve_quad: torch.Tensor
    """``p_j^T S^-1 p_j`` per preserve token (``[M]``), shared by every layer's bound."""


def uce_operator(erase: torch.Tensor, guide: torch.Tensor, preserve: Optional[torch.Tensor] = None,
                 lam: float = 1.0, ridge: float = 1e-4) -> UCEOperator:
    """The closed-form UCE operator.

    Args:
        erase: ``[N, d]`` token embeddings ``c_i`` of the concepts to erase.
        guide: ``[N, d]`` aligned token embeddings ``g_i`` of their guide concepts (targets
            ``v*_i = W g_i``).
        preserve: ``[M, d]`` token embeddings ``c_j`` of the concepts to preserve, or None.
        lam: ``lambda`` >= 0, the weight of the preserve term.
        ridge: > 0, ``mu = ridge * mean_i ||c_i||^2`` (scale-free ridge of the official code).

    Returns:
        :class:`UCEOperator` with ``matrix = M = (G^T C + lam P^T P + mu I) S^-1``.
    """
    if erase.ndim != 2 or erase.shape[0] < 1:
        raise ValueError(f"erase must be [N >= 1, d], got {list(erase.shape)}")
    d = int(erase.shape[1])
    c = _rows(erase, d, "erase")
    g = _rows(guide, d, "guide")
    p = _rows(preserve, d, "preserve")
    if g.shape[0] != c.shape[0]:
        raise ValueError(f"guide has {g.shape[0]} rows, erase {c.shape[0]}: they must be aligned")
    if lam < 0 or ridge <= 0:
        raise ValueError(f"need lam >= 0 and ridge > 0, got lam={lam}, ridge={ridge}")
    mu = float(ridge) * float(c.pow(2).sum(1).mean())
    eye = torch.eye(d, dtype=DTYPE)
    preserve_gram = float(lam) * (p.T @ p)
    system = c.T @ c + preserve_gram + mu * eye
    rhs = g.T @ c + preserve_gram + mu * eye
    # M = rhs S^-1  <=>  M^T = S^-1 rhs^T  (S is symmetric positive definite)
    matrix = torch.linalg.solve(system, rhs.T).T
    quad = (p.T * torch.linalg.solve(system, p.T)).sum(0).clamp_min(0.0) if p.shape[0] else torch.zeros(0, dtype=DTYPE)
    return UCEOperator(matrix, system, c, g, p, float(lam), mu, quad)


def apply_operator(weight: torch.Tensor, op: UCEOperator) -> torch.Tensor:
    """``W' = W M`` (``[out, d]`` float64) for a projection ``weight`` of input width ``d``."""
    if weight.ndim != 2 or weight.shape[1] != op.matrix.shape[0]:
        raise ValueError(f"weight must be [out, {op.matrix.shape[0]}], got {list(weight.shape)}")
    return weight.detach().to("cpu", DTYPE) @ op.matrix


def erase_residuals(weight: torch.Tensor, edited: torch.Tensor, op: UCEOperator) -> torch.Tensor:
    """Per erased token ``||W' c_i - W g_i|| / ||W g_i - W c_i||`` (``[N]``; 0 = target reached,
    1 = unchanged).  Tokens whose target equals their output (``W g_i = W c_i``) give 0."""
    w = weight.detach().to("cpu", DTYPE)
    target = op.guide @ w.T
    before = op.erase @ w.T
    after = op.erase @ edited.to(DTYPE).T
    need = (target - before).norm(dim=1)
    miss = (after - target).norm(dim=1)
    return torch.where(need > 0, miss / need.clamp_min(torch.finfo(DTYPE).tiny), torch.zeros_like(need))


def preserve_changes(weight: torch.Tensor, edited: torch.Tensor, op: UCEOperator) -> torch.Tensor:
    """Per preserve token ``||W' p - W p||`` (``[M]``)."""
    w = weight.detach().to("cpu", DTYPE)
    return (op.preserve @ (edited.to(DTYPE) - w).T).norm(dim=1)


def preserve_bounds(weight: torch.Tensor, op: UCEOperator) -> tuple[torch.Tensor, float]:
    """``(bound [M], loose)``: ``bound_j = ||W D^T||_2 sqrt(p_j^T S^-1 p_j)`` and the
    token-independent ``loose = ||W D^T||_2 / sqrt(lambda)`` (inf when lambda = 0).

    Every preserve token satisfies ``||W' p_j - W p_j|| <= bound_j <= loose`` (module docstring).
    """
    w = weight.detach().to("cpu", DTYPE)
    wd = w @ (op.guide - op.erase).T  # [out, N]
    norm = float(torch.linalg.matrix_norm(wd, ord=2)) if wd.numel() else 0.0
    loose = norm / op.lam ** 0.5 if op.lam > 0 else float("inf")
    return norm * op.preserve_quad.sqrt(), loose


def align_tokens(concept: torch.Tensor, concept_last: int, guide: torch.Tensor,
                 guide_last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned token rows of a concept and its guide, as the official UCE code pairs them.

    Both prompts are encoded to ``[L, d]`` (``L`` = 77 for CLIP, padded with end tokens);
    ``*_last`` is the index of the prompt's last word token (0 for an empty prompt: the start
    token).  The concept's tokens from its last word to the end are paired with the guide's from
    its last word on, shifted so both runs have the same length ``L - max(concept_last, guide_last)``.

    Returns ``(c [n, d], g [n, d])``.
    """
    if concept.ndim != 2 or guide.shape != concept.shape:
        raise ValueError(f"concept and guide must both be [L, d], got {list(concept.shape)} and {list(guide.shape)}")
    length = int(concept.shape[0])
    if not (0 <= concept_last < length and 0 <= guide_last < length):
        raise ValueError(f"last-token indices {concept_last}, {guide_last} outside [0, {length})")
    far = max(concept_last, guide_last)
    c = concept[concept_last: length - (far - concept_last)]
    g = guide[guide_last: length - (far - guide_last)]
    return c, g
