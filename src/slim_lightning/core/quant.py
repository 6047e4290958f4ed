"""Weight quantisers: SLiM-Quant (per-tensor, error-minimising alpha) and group AbsMax (RTN).

All quantisers are symmetric and uniform: ``w_hat = q * scale`` with integer
``q in [-2**(bits-1), 2**(bits-1) - 1]`` stored as int8 (see ``QuantTensor``). Scales are rounded
to fp16-representable values before ``q`` is computed, so a packed format that stores scales in
fp16 reproduces ``QuantTensor.dequantize()`` bit-exactly (bits-per-weight counts scales at 16 bits).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from slim_lightning.core.registry import QUANTIZERS, register_quantizer
from slim_lightning.core.types import QuantSpec, QuantTensor

ErrorModel = Literal["reference", "exact"]

# Bound on (candidates x grid levels) evaluated at once by the alpha search: ~8 MiB per float64
# temporary, independent of the number of histogram bins.
_SEARCH_CHUNK_ELEMS = 1 << 20


def qmax_of(bits: int) -> int:
    """Largest positive integer level ``2**(bits-1) - 1`` for a symmetric ``bits``-bit grid."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 (int8 storage), got {bits}")
    return 2 ** (bits - 1) - 1


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Rounds fp32 scales to fp16-representable values (kept in fp32), see module docstring."""
    return scale.to(torch.float32).to(torch.float16).to(torch.float32)


def _quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 ``round(w / scale)`` clamped to the grid; ``scale`` broadcasts against ``w``.

    A zero scale (all-zero group) gives q = 0 instead of NaN.
    """
    qmax = qmax_of(bits)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe).clamp_(-qmax - 1, qmax)
    return q.to(torch.int8)


def default_num_bins(numel: int) -> int:
    """Histogram bins of the reference SLiM-Quant: ``max(512, min(numel // 1000, 20000))``."""
    return max(512, min(numel // 1000, 20000))


def alpha_errors(
    w: torch.Tensor, bits: int = 4, error_model: ErrorModel = "reference", n_bins: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected squared quantisation error E(alpha) for every histogram-bin-centre candidate.

    The |W| histogram (counts ``c_k`` at bin centres ``v_k``, range ``[min|W|, max|W|]``) stands in
    for the density f. For candidate ``alpha = v_i``: bins ``k >= i`` clip to alpha (error
    ``(v_k - alpha)^2``); bins ``k < i`` round to a level ``j * h`` of the error model's grid:

    * ``reference``: floor with step ``h = alpha / 2**bits`` (the reference code's model),
    * ``exact``: round-to-nearest with the real step ``h = alpha / (2**(bits-1) - 1)``.

    Each grid level covers a contiguous run of bins, so with prefix sums ``P0, P1, P2`` of
    ``c, c v, c v^2`` a level contributes ``S2 - 2 (j h) S1 + (j h)^2 S0``. All candidates are
    evaluated at once (chunked) in O(B * levels) time and memory, never O(B^2).

    Args:
        w: any-shape float tensor (only |w| matters).
        bits: 2..8.
        error_model: ``reference`` or ``exact``.
        n_bins: histogram bins; default ``default_num_bins(w.numel())``.

    Returns:
        ``(candidates, errors)``: fp64 ``(B,)`` bin centres and fp64 ``(B,)`` errors (unnormalised:
        counts instead of density, no ``dx``; argmin is unaffected).
    """
    qmax = qmax_of(bits)
    if error_model not in ("reference", "exact"):
        raise ValueError(f"error_model must be 'reference' or 'exact', got {error_model!r}")
    absw = w.detach().abs().flatten().to(torch.float32)
    n_bins = default_num_bins(absw.numel()) if n_bins is None else int(n_bins)
    lo, hi = absw.min().item(), absw.max().item()
    if hi <= lo:  # constant |W| (or all zeros): the only candidate is the value itself
        return torch.tensor([hi], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    counts = torch.histc(absw, bins=n_bins, min=lo, max=hi).to(torch.float64).cpu()
    dx = (hi - lo) / n_bins
    v = lo + (torch.arange(n_bins, dtype=torch.float64) + 0.5) * dx  # (B,) bin centres
    zero = torch.zeros(1, dtype=torch.float64)
    p0 = torch.cat([zero, counts.cumsum(0)])  # (B+1,) P[k] = sum over bins < k
    p1 = torch.cat([zero, (counts * v).cumsum(0)])
    p2 = torch.cat([zero, (counts * v * v).cumsum(0)])

    idx = torch.arange(n_bins)
    # clipping error of bins k >= i, all candidates at once (suffix sums)
    a = v
    errors = (p2[-1] - p2[idx]) - 2 * a * (p1[-1] - p1[idx]) + a * a * (p0[-1] - p0[idx])

    if error_model == "reference":
        n_levels, offset, step_div = 2**bits, 0.0, float(2**bits)
    else:
        n_levels, offset, step_div = qmax + 1, 0.5, float(qmax)
    levels = torch.arange(n_levels, dtype=torch.float64)  # (L,)
    chunk = max(1, _SEARCH_CHUNK_ELEMS // n_levels)
    for s in range(0, n_bins, chunk):
        ai = a[s : s + chunk, None]  # (C, 1) candidate alphas
        h = ai / step_div  # (C, 1) grid step
        centre = levels[None, :] * h  # (C, L) level values
        # level j covers [ (j - off) h, (j + 1 - off) h ) and only bins below the candidate
        cap = idx[s : s + chunk, None]
        k_lo = torch.searchsorted(v, ((levels - offset)[None, :] * h).contiguous()).clamp(max=cap)
        k_hi = torch.searchsorted(v, ((levels + 1 - offset)[None, :] * h).contiguous())
        k_hi = k_hi.clamp(max=cap)
        s0 = p0[k_hi] - p0[k_lo]  # (C, L)
        s1 = p1[k_hi] - p1[k_lo]
        s2 = p2[k_hi] - p2[k_lo]
        errors[s : s + chunk] += (s2 - 2 * centre * s1 + centre * centre * s0).sum(1)
    return v, errors


def slim_quant_alpha(
    w: torch.Tensor, bits: int = 4, error_model: ErrorModel = "reference", n_bins: int | None = None
) -> float:
    """SLiM-Quant clipping value: the bin centre with the smallest expected error (see
    ``alpha_errors``). All candidates are searched, so the reference's coarse-to-fine search defect
    (empty fine range when B is a multiple of 10 -> alpha = first bin) cannot occur.

    Args:
        w: any-shape float tensor.
        bits: 2..8.
        error_model: ``reference`` or ``exact``.
        n_bins: override the number of histogram bins (tests).

    Returns:
        alpha >= 0 as a Python float (0.0 only for an all-zero tensor).
    """
    cand, err = alpha_errors(w, bits, error_model, n_bins)
    return float(cand[torch.argmin(err)])


def quantize_per_tensor(
    w: torch.Tensor, alpha: float, bits: int, in_scale: torch.Tensor | None = None
) -> QuantTensor:
    """One scale per tensor: ``scale = alpha / (2**(bits-1) - 1)``, q clamped to the int grid.

    Args:
        w: float ``(rows, cols)``.
        alpha: clipping value (> 0; 0 maps everything to 0).
        bits: 2..8.
        in_scale: optional fp32 ``(cols,)``; columns are multiplied by it before quantisation
            (``dequantize`` divides it back).

    Returns:
        QuantTensor with scale ``(1, 1)`` and ``group_size = cols``.
    """
    w = w.detach().to(torch.float32)
    scale = round_scale(torch.tensor([[alpha / qmax_of(bits)]], device=w.device))
    ws = w if in_scale is None else w * in_scale.to(w)[None, :]
    q = _quantize_with_scale(ws, scale, bits)
    return QuantTensor(q=q, scale=scale, group_size=w.shape[1], bits=bits, in_scale=in_scale)


def outlier_channels(w: torch.Tensor, stat: torch.Tensor, ratio: float) -> torch.Tensor:
    """SLiM-Quant^O salient input channels: top ``ratio`` of ``stat_j * sum_i |W_ij|``.

    Returns:
        int64 ``(k,)`` column indices, ``k = max(1, round(ratio * d_in))`` (empty if ratio <= 0).
    """
    d_in = w.shape[1]
    if ratio <= 0:
        return torch.empty(0, dtype=torch.long, device=w.device)
    k = min(d_in, max(1, round(ratio * d_in)))
    sal = stat.to(w.device, torch.float32) * w.detach().abs().to(torch.float32).sum(0)
    return torch.topk(sal, k).indices


def slim_quant(
    w: torch.Tensor,
    bits: int = 4,
    error_model: ErrorModel = "reference",
    stat: torch.Tensor | None = None,
    outlier_ratio: float = 0.0,
    outlier_scale: float = 2.0,
) -> QuantTensor:
    """SLiM-Quant (optionally SLiM-Quant^O): per-tensor quantisation with the fitted alpha.

    Args:
        w: float ``(d_out, d_in)``.
        bits, error_model: see ``slim_quant_alpha``.
        stat: fp32 ``(d_in,)`` channel statistic (mean x^2), required when ``outlier_ratio > 0``.
        outlier_ratio: fraction of salient input channels whose columns are multiplied by
            ``outlier_scale`` before quantisation; alpha is always fitted on the unscaled W.
        outlier_scale: the multiplier ``s`` (stored in ``in_scale``; 1 for other channels).

    Returns:
        QuantTensor (scale ``(1, 1)``, ``in_scale`` set only when outliers are used).
    """
    alpha = slim_quant_alpha(w, bits, error_model)
    in_scale = None
    if outlier_ratio > 0:
        if stat is None:
            raise ValueError("slim_quant: outlier_ratio > 0 needs the channel statistic `stat`")
        cols = outlier_channels(w, stat, outlier_ratio)
        in_scale = torch.ones(w.shape[1], dtype=torch.float32, device=w.device)
        in_scale[cols] = float(outlier_scale)
    return quantize_per_tensor(w, alpha, bits, in_scale)


def absmax_quant(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> QuantTensor:
    """Group AbsMax round-to-nearest along columns (the reduction axis).

    ``scale[i, g] = max |w[i, g*G:(g+1)*G]| / (2**(bits-1) - 1)``; the last group may be shorter
    when ``cols % G != 0``; an all-zero group gets scale 0 and q 0 (no NaN).

    Args:
        w: float ``(rows, cols)``.
        bits: 2..8.
        group_size: G; -1 (or >= cols) means one group per row (per-channel).

    Returns:
        QuantTensor with scale fp32 ``(rows, ceil(cols / G))``.
    """
    w = w.detach().to(torch.float32)
    rows, cols = w.shape
    g = cols if group_size == -1 else min(int(group_size), cols)
    if g <= 0:
        raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    n_g = math.ceil(cols / g)
    wp = torch.nn.functional.pad(w, (0, n_g * g - cols)).view(rows, n_g, g)  # (rows, n_g, g)
    scale = round_scale(wp.abs().amax(-1) / qmax_of(bits))  # (rows, n_g)
    q = _quantize_with_scale(wp, scale[..., None], bits).view(rows, n_g * g)[:, :cols]
    return QuantTensor(q=q.contiguous(), scale=scale, group_size=g, bits=bits)


def fake_quant_absmax(
    w: torch.Tensor, bits: int, group_size: int, in_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """AbsMax fake quantisation along columns (the rounding of ``absmax_quant``).

    With ``in_scale`` (``(cols,)``) the columns are multiplied by it before quantisation and
    divided back after, as ``core.lowrank.quantize_adapters`` does. Returns the dequantised matrix
    in ``w``'s dtype; idempotent on values already on such a grid (scales are fp16-representable
    and ``max |q| = 2**(bits-1)-1`` in every nonzero group, so re-quantising finds the same codes).
    """
    if in_scale is None:
        return absmax_quant(w, bits, group_size).dequantize(w.dtype)
    ins = in_scale.to(w.device, torch.float32)
    qt = absmax_quant(w.to(torch.float32) * ins[None, :], bits, group_size)
    qt.in_scale = ins
    return qt.dequantize(w.dtype)


def apply_mask(qt: QuantTensor, mask: torch.Tensor | None) -> QuantTensor:
    """Zeroes ``q`` where ``mask`` (bool, True = kept) is False; returns a new QuantTensor."""
    if mask is None:
        return qt
    q = torch.where(mask.to(qt.q.device), qt.q, torch.zeros_like(qt.q))
    return QuantTensor(
        q=q, scale=qt.scale, group_size=qt.group_size, bits=qt.bits, in_scale=qt.in_scale
    )


def quantize_weight(
    w: torch.Tensor,
    spec: QuantSpec,
    *,
    stat: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    stats=None,
) -> tuple[QuantTensor | None, float]:
    """Quantises a weight with ``spec.method`` and applies ``mask`` to the integers.

    SLiM-Quant fits alpha on ``w`` as given (the dense W in the reference order); AbsMax computes
    its group maxima on ``w * mask`` because pruned entries must not widen a group's range.

    Args:
        w: float ``(d_out, d_in)``.
        spec: the QuantSpec.
        stat: fp32 ``(d_in,)`` channel statistic (SLiM-Quant^O only).
        mask: bool ``(d_out, d_in)`` kept entries, or None.
        stats: the layer's ``LayerStats``, handed to quantisers that run their own GPTQ pass
            (``Quantizer.needs_hessian``; they return a ``core.grouped.GroupQuant``).

    Returns:
        ``(QuantTensor or GroupQuant, or None for method none; alpha, tau or nan)``.
    """
    entry = QUANTIZERS.get_entry(spec.method)
    if entry.needs_hessian:
        return entry.fn(w, spec, stat, mask, stats=stats)
    return entry.fn(w, spec, stat, mask)


@register_quantizer("none")
def _quantize_none(w, spec: QuantSpec, stat, mask) -> tuple[None, float]:
    return None, math.nan


@register_quantizer("slim_quant")
def _quantize_slim(w, spec: QuantSpec, stat, mask) -> tuple[QuantTensor, float]:
    qt = slim_quant(w, spec.bits, spec.error_model, stat, spec.outlier_ratio, spec.outlier_scale)
    alpha = float(qt.scale.item()) * qmax_of(spec.bits)
    return apply_mask(qt, mask), alpha


@register_quantizer("absmax")
def _quantize_absmax(w, spec: QuantSpec, stat, mask) -> tuple[QuantTensor, float]:
    wm = w if mask is None else w * mask.to(w.device)
    return apply_mask(absmax_quant(wm, spec.bits, spec.group_size), mask), math.nan


def fake_quant(w: torch.Tensor, spec: QuantSpec, *, stat=None, mask=None) -> torch.Tensor:
    """fp32 ``(d_out, d_in)`` dequantised ``quantize_weight`` result (``w * mask`` for none)."""
    qt, _ = quantize_weight(w, spec, stat=stat, mask=mask)
    if qt is None:
        w = w.detach().to(torch.float32)
        return w if mask is None else w * mask.to(w.device)
    return qt.dequantize()
