"""Pruning scores and masks (Wanda, magnitude; N:M and unstructured). Masks are bool, True = kept.

SparseGPT chooses its mask inside its own column loop: see ``sparsegpt.py``.
"""

from __future__ import annotations

import torch

from slim_lightning.core.registry import PRUNERS, register_pruner
from slim_lightning.core.types import PrunerSpec, SparsitySpec


@register_pruner("magnitude")
def magnitude_score(w: torch.Tensor, stat: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``(d_out, d_in)`` score ``|W|``."""
    return w.detach().abs().to(torch.float32)


@register_pruner("wanda", needs_stat=True)
def wanda_score(w: torch.Tensor, stat: torch.Tensor) -> torch.Tensor:
    """Wanda score ``|W_ij| * sqrt(stat_j)``.

    Args:
        w: float ``(d_out, d_in)``.
        stat: fp32 ``(d_in,)`` mean ``x_j^2`` over the calibration tokens.

    Returns:
        fp32 ``(d_out, d_in)``.

    Raises:
        ValueError: ``stat`` is all zero (no calibration signal: every score would tie and the
            mask would be arbitrary; use ``pruner=magnitude`` deliberately instead), negative or
            non-finite. Partly zero is fine: dead inputs score 0 and are pruned first.
    """
    if stat.shape != (w.shape[1],):
        raise ValueError(
            f"wanda_score: stat shape {tuple(stat.shape)} != (d_in,) = ({w.shape[1]},)"
        )
    stat = stat.to(w.device, torch.float32)
    if not torch.isfinite(stat).all() or (stat < 0).any():
        raise ValueError("wanda_score: channel statistic has negative or non-finite entries")
    if not (stat > 0).any():
        raise ValueError(
            "wanda_score: channel statistic is all zero (no calibration signal for this layer); "
            "the Wanda mask would be arbitrary"
        )
    s = torch.sqrt(stat)
    return magnitude_score(w) * s[None, :]


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keeps the ``n`` highest-scoring entries of every ``m`` consecutive input columns per row.

    Args:
        score: float ``(d_out, d_in)``, ``d_in % m == 0``.
        n, m: ``0 < n <= m``.

    Returns:
        bool ``(d_out, d_in)`` with exactly ``n`` True per group of ``m``.
    """
    d_out, d_in = score.shape
    if not 0 < n <= m:
        raise ValueError(f"N:M sparsity needs 0 < n <= m, got {n}:{m}")
    if d_in % m != 0:
        raise ValueError(
            f"N:M sparsity needs d_in % m == 0; weight shape {tuple(score.shape)}, m={m}"
        )
    groups = score.reshape(d_out, d_in // m, m)  # (d_out, d_in/m, m)
    keep = torch.topk(groups, n, dim=-1).indices  # (d_out, d_in/m, n)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(d_out, d_in)


def unstructured_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per output row, prunes the ``round(ratio * d_in)`` lowest-scoring entries.

    Args:
        score: float ``(d_out, d_in)``.
        ratio: fraction pruned, in ``[0, 1]``.

    Returns:
        bool ``(d_out, d_in)``; every row keeps exactly ``d_in - round(ratio * d_in)``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"unstructured sparsity ratio must be in [0, 1], got {ratio}")
    d_in = score.shape[1]
    k = round(ratio * d_in)
    mask = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        drop = torch.topk(score, k, dim=1, largest=False).indices  # (d_out, k)
        mask.scatter_(1, drop, False)
    return mask


def mask_from_score(score: torch.Tensor, spec: SparsitySpec) -> torch.Tensor | None:
    """Applies ``spec`` (dense -> None, nm, unstructured) to a score matrix."""
    if spec.pattern == "dense":
        return None
    if spec.pattern == "nm":
        return nm_mask(score, spec.n, spec.m)
    if spec.pattern == "unstructured":
        return unstructured_mask(score, spec.ratio)
    raise ValueError(f"sparsity.pattern: got {spec.pattern!r}; allowed: dense, nm, unstructured")


def make_mask(
    w: torch.Tensor, stat: torch.Tensor | None, spec: SparsitySpec, pruner: PrunerSpec
) -> torch.Tensor | None:
    """Mask of ``w`` by the pruner's score (magnitude or Wanda).

    Args:
        w: float ``(d_out, d_in)``.
        stat: fp32 ``(d_in,)`` mean ``x^2`` (Wanda only).
        spec: sparsity pattern.
        pruner: ``magnitude`` or ``wanda`` (SparseGPT masks come from ``sparsegpt.sparsegpt``).

    Returns:
        bool ``(d_out, d_in)`` (True = kept) or None for the dense pattern.
    """
    if spec.pattern == "dense":
        return None
    entry = PRUNERS.get_entry(pruner.method)
    if entry.score is None:
        raise ValueError(
            f"make_mask: {pruner.method} masks are chosen by the pruner itself (registry "
            "entry with `prune`), not from a score"
        )
    if entry.needs_stat and stat is None:
        raise ValueError(f"make_mask: the {pruner.method} pruner needs the channel statistic")
    return mask_from_score(entry.score(w, stat), spec)
