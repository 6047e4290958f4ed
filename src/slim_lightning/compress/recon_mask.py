"""Mask refinement inside block reconstruction (``reconstruct.mask=refine``).

One-shot pruning fixes each linear's sparsity mask before any block output is matched; block
reconstruction then trains the kept values under that mask. Here the mask is re-derived a few
times per block (``reconstruct.mask_refines``, spread evenly over the training steps) from a
gradient-aware score in the spirit of Wanda++'s regional gradients:

    score_ij = |c_ij| * (rms(x_j) / mean_j rms(x_j) + alpha * |G_ij| / mean |G|)

``c`` is the weight each position would hold: the trained value where kept, the dense target
``W - (L R)^T`` (what the sparse part approximates) where pruned; ``x_j`` the block-input channel
RMS and ``G`` the gradient of the reconstruction loss with respect to the dense weight, both
accumulated over the training steps since the last refinement. Each group keeps as many positions
as before (N of every M for ``nm``, the row's count for ``unstructured``), so the pattern stays
valid and the number of trained values fixed: the kept values are re-gathered in place, a newly
kept position starts from its target on the grid with fresh optimiser moments.

Only linears whose kept weights train as grid values under a mask (the SLiM presets) take part;
fixed codes (SpQR, SliM-LLM) and floating-point weights keep their masks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.types import scale_groups_
from ..errors import ConfigError
from .recon_linear import ReconLinear


def check_refine(recon: Any, spec: Any) -> None:
    """``reconstruct.mask=refine`` needs what it refines: block reconstruction, a sparsity
    pattern, kept weights trained as grid values (``quant`` absmax / slim_quant), Adam's
    per-value moments. Raises ConfigError naming the key otherwise."""
    if recon.mask != "refine":
        return
    from ..core.registry import QUANTIZERS

    why = None
    if recon.mode != "block":
        why = "fixed unless reconstruct=block"
    elif spec.sparsity.pattern == "dense":
        why = "fixed with sparsity=dense (no mask to refine)"
    elif spec.quant.method == "none" or QUANTIZERS.get_entry(spec.quant.method).needs_hessian:
        why = (
            f"fixed with quant={spec.quant.method} (refine: kept weights on an absmax / "
            "slim_quant grid)"
        )
    elif recon.optimizer != "adam":
        why = (
            "fixed with reconstruct.optimizer=adam8bit (its block-quantised moments cannot "
            "follow the re-gathered values)"
        )
    if why:
        raise ConfigError("reconstruct.mask", recon.mask, why)


class MaskRefiner:
    """Accumulates the score's statistics in the views' backward and re-derives their masks.

    Args:
        views: the block's trainable linears.
        dense: each linear's dense weight (the target the sparse part approximates with the
            adapters).
        group: M of an N:M pattern (counts kept per M consecutive inputs), 0 for per-row counts.
        alpha: weight of the gradient term.
        refines: how many times to re-derive the masks over ``total_steps``.
    """

    def __init__(
        self,
        views: dict[str, ReconLinear],
        dense: dict[str, torch.Tensor],
        *,
        group: int,
        alpha: float,
        refines: int,
        total_steps: int,
    ):
        self.group, self.alpha = group, alpha
        self.views = {n: v for n, v in views.items() if v.wq is not None and v.wq.mask is not None}
        self.dense = {n: dense[n] for n in self.views}
        self.at = {round(total_steps * k / (refines + 1)) for k in range(1, refines + 1)}
        self.at.discard(0)
        self.changed = 0.0  # share of kept positions that moved, summed over refinements
        self.done = 0
        for v in self.views.values():
            q = v.wq
            q.acc = (
                torch.zeros_like(q.mask, dtype=torch.float32),
                q.mask.new_zeros(q.mask.shape[1], dtype=torch.float32),
            )

    def due(self, step: int) -> bool:
        return step in self.at

    def close(self) -> None:
        for v in self.views.values():
            v.wq.acc = None

    @torch.no_grad()
    def refine(self, opt: torch.optim.Optimizer | None) -> float:
        """Re-derives every view's mask; returns the share of kept positions that changed."""
        moved = kept = 0
        for name, v in self.views.items():
            q = v.wq
            g_abs, xsq = q.acc
            mask = q.mask
            scale = _dense_scale(q)  # (d_out, d_in): real value per grid step
            target = self.dense[name].to(scale)
            ad = v.adapters()
            if ad is not None:
                target = target - (ad[0] @ ad[1]).T
            cur = torch.zeros_like(scale).masked_scatter_(mask, q.v.detach())
            value = torch.where(mask, cur * scale, target)
            xr = xsq.sqrt()
            xr = xr / xr.mean().clamp_min(1e-30)
            g = g_abs / g_abs.mean().clamp_min(1e-30)
            score = value.abs() * (xr[None, :] + self.alpha * g)
            new = _top_per_group(score, mask, self.group)
            moved += int((new & ~mask).sum())
            kept += int(mask.sum())
            codes = torch.where(mask, cur, target / scale)  # grid units
            lo_hi = (q.lo - 0.49, q.hi + 0.49)
            codes.clamp_(*lo_hi)
            new_v = codes.masked_select(new)
            if opt is not None:
                _remap_state(opt, q.v, mask, new)
            q.v.data.copy_(new_v)
            mask.copy_(new)  # in place: the view, the result and the snapshot share it
            g_abs.zero_()
            xsq.zero_()
        share = moved / max(kept, 1)
        self.changed += share
        self.done += 1
        return share


def _dense_scale(q: Any) -> torch.Tensor:
    """``scale[i, j // group] / in_scale[j]`` as a dense ``(d_out, d_in)`` matrix."""
    ones = torch.ones(q.mask.shape, dtype=torch.float32, device=q.mask.device)
    return scale_groups_(ones, q.scale().detach(), q.group, q.in_scale)


def _top_per_group(score: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """The new mask: in every group (``group`` consecutive inputs of a row, or the whole row
    when 0) the same number of positions as ``mask`` keeps there, the highest scores."""
    d_out, d_in = score.shape
    if group and d_in % group == 0:
        s = score.reshape(d_out, d_in // group, group)
        k = mask.reshape(d_out, d_in // group, group).sum(-1, keepdim=True)
    else:
        s = score.reshape(d_out, 1, d_in)
        k = mask.sum(-1, keepdim=True).reshape(d_out, 1, 1)
    rank = s.argsort(-1, descending=True).argsort(-1)  # 0 = best
    return (rank < k).reshape(d_out, d_in)


def _remap_state(opt: torch.optim.Optimizer, p: nn.Parameter, old: torch.Tensor, new: torch.Tensor):
    """Moves ``p``'s per-value optimiser state from the ``old`` mask's order to the ``new``
    one's; newly kept values start from zero moments."""
    state = opt.state.get(p)
    if not state:
        return
    for t in state.values():
        if isinstance(t, torch.Tensor) and t.shape == p.shape:
            dense = torch.zeros(old.shape, dtype=t.dtype, device=t.device)
            dense.masked_scatter_(old, t)
            dense.masked_fill_(~old, 0)
            t.copy_(dense.masked_select(new))
