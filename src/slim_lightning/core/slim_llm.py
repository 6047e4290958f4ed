"""SliM-LLM (Huang et al., arXiv 2405.14917): salience-driven mixed precision per column group.

Per linear:

1. **Salience** of a weight ``w_ij^2 / U_jj^2`` (``U`` the upper Cholesky factor of the damped
   ``H^-1``, as SparseGPT), summed per group of ``quant.group_size`` input columns.
2. **Bit allocation (SBA)**: groups get ``N-1``, ``N`` or ``N+1`` bits with as many ``N-1`` as
   ``N+1`` groups, so the average stays ``N`` exactly (a ragged last group keeps ``N``). For
   ``p = 0, 1, ...`` the ``p`` least salient groups get ``N-1`` and the ``p`` most salient ``N+1``;
   the original weights are fake-quantised round-to-nearest and scored by
   ``KL(softmax(X W_q^T) || softmax(X W^T))`` over the output features, averaged over the
   calibration rows ``X`` (``LayerStats.samples``: the layer's real inputs); the best ``p`` wins
   (``p = 0``, the uniform allocation, included).
3. **1-bit groups**: per row ``m = mean(w)``, ``alpha = mean|w - m|``, ``w_q = sign(w - m) alpha + m``
   (stored as the affine code ``q in {0, 1}`` with scale ``2 alpha``; ``alpha`` is the L2-optimal
   magnitude for the sign pattern, the paper's ``mean|w|`` for centred groups).
4. **Quantiser calibration (SQC)**: per row of each group, 101 range factors in ``[0.9, 1.1]``
   of the min-max range, error ``sum c_ij |w_q - w|^2.4`` with ``c = quant.sqc_lambda`` on salient
   weights (salience z-score > 2 inside the group) and 1 elsewhere.
5. Inside GPTQ (``core.gptq_group``): damping ``quant.damp`` (1%), no act-order, each group's
   statistics fitted by SQC on the error-updated weights when the pass reaches it.

A fixed sparsity mask (``sparsity=2of4 quant=slim_llm``) is honoured everywhere: pruned weights
take no part in the salience, the ranges, the errors, and are 0 in the result.

Pure torch.
"""

from __future__ import annotations

import math

import torch

from slim_lightning.core.gptq_group import gptq_group_pass, layer_factor, to_stored
from slim_lightning.core.grouped import GroupQuant, fp16_round, quantize_codes
from slim_lightning.core.registry import register_quantizer
from slim_lightning.core.types import LayerStats, QuantSpec

SQC_FACTORS = torch.linspace(0.9, 1.1, 101)
SQC_NORM = 2.4
_SQC_CHUNK = 1 << 22  # factors x rows x columns evaluated at once
_KL_CHUNK = 512  # calibration rows per KL product


def binary_stats(x: torch.Tensor, kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit ``(scale, zero)`` of each row of ``x (rows, n)``: codes ``{0, 1}`` decode to
    ``m -/+ alpha`` (``scale = 2 alpha``, ``zero = 1/2 - m / scale``), fp16-representable."""
    k = torch.ones_like(x) if kept is None else kept.to(x.dtype)
    cnt = k.sum(1).clamp_min(1)
    m = (x * k).sum(1) / cnt
    alpha = ((x - m[:, None]).abs() * k).sum(1) / cnt
    scale = fp16_round(2 * alpha)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, fp16_round(0.5 - m / scale)


def sqc_stats(
    x: torch.Tensor,
    bits: int,
    kept: torch.Tensor | None,
    salient: torch.Tensor | None,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SQC: per row of ``x (rows, n)`` the range factor in ``SQC_FACTORS`` minimising
    ``sum c |w_q - w|^2.4`` (``c = lam`` on ``salient`` weights, 1 elsewhere, 0 where pruned);
    ``(scale, zero)`` fp32 ``(rows,)``, fp16-representable scale, integer zero."""
    if bits == 1:
        return binary_stats(x, kept)
    maxq = 2**bits - 1
    lo, hi = _kept_range(x, kept)
    c = torch.ones_like(x)
    if salient is not None and lam != 1.0:
        c = torch.where(salient, torch.full_like(x, lam), c)
    if kept is not None:
        c = c * kept.to(x.dtype)
    f = SQC_FACTORS.to(x.device)
    rows, n = x.shape
    step = max(1, _SQC_CHUNK // (f.numel() * n))
    scale = torch.empty(rows, device=x.device)
    zero = torch.empty(rows, device=x.device)
    for r0 in range(0, rows, step):
        sl = slice(r0, r0 + step)
        s = fp16_round((f[:, None] * (hi[sl] - lo[sl])[None, :]) / maxq)  # (F, r)
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-f[:, None] * lo[sl][None, :] / s)
        q = quantize_codes(x[sl][None], s[..., None], z[..., None], bits)
        err = (((q - z[..., None]) * s[..., None] - x[sl][None]).abs() ** SQC_NORM * c[sl]).sum(-1)
        best = err.argmin(0)  # (r,) the first minimum: ties keep the smaller range
        ar = torch.arange(best.numel(), device=x.device)
        scale[sl], zero[sl] = s[best, ar], z[best, ar]
    return scale, zero


def fake_quant_groups(
    w: torch.Tensor, widths: torch.Tensor, group_size: int, kept: torch.Tensor | None
) -> torch.Tensor:
    """Round-to-nearest (min-max; 1-bit: binary) of every column group of ``w`` at its width."""
    out = torch.empty_like(w)
    for g, b in enumerate(widths.tolist()):
        sl = slice(g * group_size, min((g + 1) * group_size, w.shape[1]))
        x = w[:, sl]
        k = None if kept is None else kept[:, sl]
        if b == 1:
            s, z = binary_stats(x, k)
        else:
            s, z = _minmax_int(x, b, k)
        v = (quantize_codes(x, s[:, None], z[:, None], b) - z[:, None]) * s[:, None]
        out[:, sl] = v if k is None else v * k
    return out


def _kept_range(x: torch.Tensor, kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(min, max)`` over the kept weights of ``x (rows, n)``, widened to include 0
    (GPTQ's quantiser); a row with nothing kept gives ``(0, 0)``."""
    if kept is None:
        return x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    lo = torch.where(kept, x, float("inf")).amin(1).clamp(max=0)
    hi = torch.where(kept, x, float("-inf")).amax(1).clamp(min=0)
    return torch.where(torch.isfinite(lo), lo, 0.0), torch.where(torch.isfinite(hi), hi, 0.0)


def _minmax_int(x, bits, kept):
    """Plain min-max statistics over the kept weights (range including 0, integer zero)."""
    lo, hi = _kept_range(x, kept)
    s = fp16_round((hi - lo) / (2**bits - 1))
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s, torch.round(-lo / s)


def allocations(n_groups: int, full: int, bits: int, order: torch.Tensor) -> list[torch.Tensor]:
    """Every SBA candidate: ``p = 0 .. full // 2`` of the ``full`` whole groups (ascending
    salience ``order``) moved to ``bits - 1`` / ``bits + 1``; groups past ``full`` keep ``bits``."""
    out = []
    for p in range(full // 2 + 1):
        wd = torch.full((n_groups,), bits, dtype=torch.int64)
        if p:
            wd[order[:p]] = bits - 1
            wd[order[full - p :]] = bits + 1
        out.append(wd)
    return out


def layer_kl(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """Mean over the rows of ``x (n, d_in)`` of ``KL(softmax(x W_q^T) || softmax(x W^T))``."""
    total = 0.0
    for s in range(0, x.shape[0], _KL_CHUNK):
        xs = x[s : s + _KL_CHUNK]
        lq = torch.log_softmax(xs @ wq.T, dim=-1)
        lp = torch.log_softmax(xs @ w.T, dim=-1)
        total += float((lq.exp() * (lq - lp)).sum())
    return total / max(1, x.shape[0])


def salience_bits(
    w: torch.Tensor,
    d: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """SBA: the widths ``(n_groups,)`` int64 with the smallest layer-output KL, and every
    candidate's KL (``p = 0, 1, ...``)."""
    rows, cols = w.shape
    n_groups = math.ceil(cols / group_size)
    full = cols // group_size
    sal = (w.square() / d.square()[None, :]).sum(0)  # (cols,)
    gsal = sal[: full * group_size].reshape(full, group_size).sum(1)  # (full,)
    order = torch.argsort(gsal, stable=True)
    kls = []
    cands = allocations(n_groups, full, bits, order)
    for wd in cands:
        kls.append(layer_kl(x, w, fake_quant_groups(w, wd, group_size, kept)))
    best = min(range(len(kls)), key=lambda i: kls[i])
    return cands[best], kls


class _SqcFit:
    def __init__(self, widths: torch.Tensor, lam: float):
        self.widths, self.lam = widths, lam

    def __call__(self, cur, kept, g, d):
        b = int(self.widths[g])
        sal = cur.square() / d.square()[None, :]
        if kept is not None:
            sal = sal * kept
        z = (sal - sal.mean()) / sal.std().clamp_min(1e-30)
        s, zero = sqc_stats(cur, b, kept, z > 2, self.lam)
        return s, zero, b


def slim_llm_quantize(
    w: torch.Tensor, stats: LayerStats, spec: QuantSpec, mask: torch.Tensor | None = None
) -> tuple[GroupQuant, list[float]]:
    """SliM-LLM of one linear weight ``w (d_out, d_in)``; ``mask`` kept fixed.

    Returns:
        ``(GroupQuant with per-group widths, the SBA candidates' KL values)``.
    """
    if stats.samples is None or stats.samples.numel() == 0:
        raise ValueError(
            "quant.method=slim_llm scores bit allocations on the layer's real calibration "
            "inputs (LayerStats.samples), which this compression path did not collect"
        )
    factor = layer_factor(stats, spec.damp, False, w.device)
    W = to_stored(w, factor)
    m = None if mask is None else mask.to(W.device, copy=True)  # (own copy: stored apart)
    if m is not None:
        W = W * m
    d = torch.diag(factor.hinv)
    g = spec.group_size if spec.group_size > 0 else W.shape[1]
    x = stats.samples.to(W.device, torch.float32)
    widths, kls = salience_bits(W, d, x, spec.bits, g, m)
    res = gptq_group_pass(
        W, factor.hinv, g, _SqcFit(widths, spec.sqc_lambda), mask=m, blocksize=spec.blocksize
    )
    gq = GroupQuant(
        q=res.q,
        scale=res.scale,
        zero=res.zero,
        group_size=g,
        bits=spec.bits,
        group_bits=res.bits.to(torch.int8),
        mask=m,
    )
    return gq, kls


@register_quantizer("slim_llm", needs_hessian=True, needs_samples=True)
def _quantize_slim_llm(w, spec: QuantSpec, stat, mask, stats: LayerStats | None = None):
    if stats is None:
        raise ValueError("quant.method=slim_llm needs the layer's calibration statistics")
    gq, _ = slim_llm_quantize(w, stats, spec, mask)
    return gq, math.nan
