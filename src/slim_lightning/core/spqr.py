"""SpQR (Dettmers et al., arXiv 2306.03078): small bi-level groups plus unstructured 16-bit outliers.

Per linear, inside GPTQ's column pass (``core.gptq_group``):

* optional act-order (columns by decreasing ``diag H``; the permutation is stored; off under a
  sparsity mask, whose N:M groups live in the original column order),
* every ``beta1 = quant.group_size`` columns, per-row min-max statistics fitted on the
  error-updated slice **without the likely outliers**: a weight whose removal lowers the group's
  ``sum ((q(w) - w) / d)^2`` by more than the threshold is replaced by the mean of the others
  for the fit (the leave-one-out test of the released code),
* the scales and zeros quantised again, min-max to ``quant.stat_bits`` bits over groups of
  ``beta2 = quant.stat_group`` consecutive rows (fp16 second-level scale and zero), and the
  weights rounded with those lossy statistics,
* a weight whose Hessian-scaled error ``((w - q(w)) / d)^2`` exceeds
  ``thr = tau * mean_j(Var_rows(W[:, j]) / d_j^2)`` is an outlier: it keeps its value (an fp16
  correction over its code, stored as CSR) and feeds back no error.

``quant.target_bpw`` searches ``tau`` per layer (an estimate from a pass without outliers, then at
most five passes) for the largest outlier share whose bits per weight (the paper's count) stay
within the target.

Pure torch.
"""

from __future__ import annotations

import math

import torch

from slim_lightning.core.gptq_group import gptq_group_pass, layer_factor, to_stored
from slim_lightning.core.grouped import (
    BiLevel,
    GroupQuant,
    fp16_round,
    quantize_codes,
    spqr_bits_formula,
)
from slim_lightning.core.registry import register_quantizer
from slim_lightning.core.types import LayerStats, QuantSpec

_TAU_STEPS = 5  # passes of the tau search after the first


def _minmax(x: torch.Tensor, bits: int, round_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale, zero)`` of each row of ``x (r, n)`` over its own range (SpQR's
    quantiser does not widen the range to 0); a constant row gets scale 1."""
    lo, hi = x.amin(1), x.amax(1)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = -lo / scale
    return scale, (torch.round(zero) if round_zero else zero)


def _rtn(x, scale, zero, bits):
    """Round-to-nearest reconstruction of ``x`` with per-row statistics (broadcast on dim 0)."""
    return (quantize_codes(x, scale[:, None], zero[:, None], bits) - zero[:, None]) * scale[:, None]


def loo_gain(group: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """SpQR's leave-one-out test: for every weight of ``group (rows, n)``, how much the
    Hessian-scaled squared error of the row's min-max quantisation drops when that weight is
    left out of the fit (and out of the error: it would stay in 16 bits).

    Args:
        group: fp32 ``(rows, n)`` current weights of one group, ``n >= 2``.
        d: fp32 ``(n,)`` ``diag(U)`` of the group's columns.
        bits: first-level width.

    Returns:
        fp32 ``(rows, n)`` error reductions (large = likely outlier).
    """
    rows, n = group.shape
    idx = torch.arange(n, device=group.device)
    loo = idx[1:] - (idx[:, None] >= idx[1:]).to(idx.dtype)  # (n, n-1): all but column i
    data = group[:, loo].reshape(rows * n, n - 1)  # (rows * n, n-1) one fit per left-out weight
    s, z = _minmax(data, bits, True)
    rec = _rtn(data, s, z, bits)
    loo_err = (((rec - data) / d[loo].repeat(rows, 1)) ** 2).sum(-1).reshape(rows, n)
    s0, z0 = _minmax(group, bits, True)
    base = (((_rtn(group, s0, z0, bits) - group) / d[None, :]) ** 2).sum(1, keepdim=True)
    return base - loo_err


def second_level(stat: torch.Tensor, bits: int, group: int) -> BiLevel:
    """Min-max quantisation of a first-level statistic ``(rows,)`` of one column group in groups
    of ``group`` consecutive rows (fractional zero point; fp16 second-level scale and zero)."""
    rows = stat.shape[0]
    n_rg = math.ceil(rows / group)
    pad = n_rg * group - rows
    x = torch.cat([stat, stat[-1:].expand(pad)]) if pad else stat  # repeat: range unchanged
    x = x.reshape(n_rg, group)  # (row groups, group)
    lo, hi = x.amin(1), x.amax(1)
    # the step is at least 1/1024 of the largest magnitude, so the zero point |lo / s2| <= 1024
    # stays a finite, precise fp16 value (a nearly constant statistic, e.g. equal scales over a
    # row group, would otherwise give a step too small for fp16 and an infinite zero)
    s2 = torch.maximum((hi - lo) / (2**bits - 1), torch.maximum(lo.abs(), hi.abs()) / 1024)
    s2 = fp16_round(torch.where(s2 > 0, s2, torch.ones_like(s2)))
    z2 = fp16_round(-lo / s2)
    q = quantize_codes(x, s2[:, None], z2[:, None], bits)
    return BiLevel(
        q=q.reshape(-1)[:rows].to(torch.uint8)[:, None],
        s2=s2[:, None],
        z2=z2[:, None],
        bits=bits,
        group=group,
    )


class _SpqrFit:
    """The per-group statistics of SpQR, remembering the second-level codes for the packer."""

    def __init__(self, spec: QuantSpec, thr: float):
        self.spec, self.thr = spec, thr
        self.levels: list[tuple[BiLevel, BiLevel]] = []

    def __call__(self, cur, kept, g, d):
        bits, spec = self.spec.bits, self.spec
        fit_on = cur
        exclude = None if kept is None else ~kept  # pruned weights never shape the range
        if math.isfinite(self.thr) and cur.shape[1] >= 2:
            likely = loo_gain(cur, d, bits) > self.thr
            exclude = likely if exclude is None else exclude | likely
        if exclude is not None and bool(exclude.any()):
            keep = (~exclude).to(cur.dtype)
            mean = (cur * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
            fit_on = torch.where(exclude, mean, cur)
        bilevel = spec.stat_bits is not None
        s, z = _minmax(fit_on, bits, not bilevel)
        if bilevel:
            sb = second_level(s, spec.stat_bits, spec.stat_group)
            zb = second_level(z, spec.stat_bits, spec.stat_group)
            self.levels.append((sb, zb))
            s, z = sb.decode()[:, 0], zb.decode()[:, 0]
        else:
            s, z = fp16_round(s), fp16_round(z)
        return s, z, bits


def spqr_quantize(
    w: torch.Tensor,
    stats: LayerStats,
    spec: QuantSpec,
    mask: torch.Tensor | None = None,
    tau: float | None = None,
    record: list[torch.Tensor] | None = None,
) -> GroupQuant:
    """SpQR of one linear weight ``w (d_out, d_in)``; ``mask`` (original order) is kept fixed.

    ``record``: receives, column by column, every kept weight's Hessian-scaled squared error in
    units of the threshold's scale (the ``tau`` above which it would stay in 16 bits).

    Returns:
        GroupQuant with bi-level statistics (``quant.stat_bits``; fp16 when null), the outliers
        and the act-order permutation; ``dequantize()`` is the final weight.
    """
    tau = spec.tau if tau is None else tau
    # under a mask act-order is off: an N:M pattern holds in the original column order only, and
    # permuted columns would leave the packed format a bitmap with every code stored
    factor = layer_factor(stats, spec.damp, spec.act_order and mask is None, w.device)
    W = to_stored(w, factor)
    m = None
    if mask is not None:
        m = mask.to(W.device, copy=True)  # (own copy: stored apart from the result's mask)
        m = m if factor.perm is None else m[:, factor.perm]
        W = W * m
    d = torch.diag(factor.hinv)
    unit = float((W.var(dim=0) / d.square()).mean())
    thr = float(tau) * unit if tau is not None and math.isfinite(tau) else math.inf
    g = _group(spec, W)
    fit = _SpqrFit(spec, thr)

    def outliers(wcol, deq, u, keep):
        err = ((wcol - deq) / u) ** 2
        if record is not None:
            record.append((err if keep is None else err[keep]) / max(unit, 1e-30))
        hit = err > thr
        return hit if keep is None else hit & keep

    res = gptq_group_pass(
        W,
        factor.hinv,
        g,
        fit,
        mask=m,
        outliers=outliers if math.isfinite(thr) or record is not None else None,
        blocksize=spec.blocksize,
    )
    orows, ocols, ovals = res.outliers if res.outliers is not None else (None, None, None)
    sbl = zbl = None
    if fit.levels:
        sbl = _cat_levels([x[0] for x in fit.levels])
        zbl = _cat_levels([x[1] for x in fit.levels])
    return GroupQuant(
        q=res.q,
        scale=res.scale,
        zero=res.zero,
        group_size=g,
        bits=spec.bits,
        mask=m,
        perm=None if factor.perm is None else factor.perm.clone(),  # (the factor is shared)
        outlier_rows=orows,
        outlier_cols=ocols,
        outlier_vals=ovals,
        scale_bl=sbl,
        zero_bl=zbl,
    )


def _cat_levels(levels: list[BiLevel]) -> BiLevel:
    """One column group's ``BiLevel`` each -> one ``(rows, n_groups)`` BiLevel."""
    b = levels[0]
    return BiLevel(
        q=torch.cat([x.q for x in levels], 1),
        s2=torch.cat([x.s2 for x in levels], 1),
        z2=torch.cat([x.z2 for x in levels], 1),
        bits=b.bits,
        group=b.group,
    )


def spqr_bits(gq: GroupQuant, spec: QuantSpec) -> float:
    """The paper's bits per weight of a result (outlier share counted over all weights)."""
    share = gq.n_outliers / gq.q.numel()
    return spqr_bits_formula(gq.bits, spec.stat_bits, gq.group_size, spec.stat_group, share)


def spqr_target(
    w: torch.Tensor, stats: LayerStats, spec: QuantSpec, mask: torch.Tensor | None
) -> tuple[GroupQuant, float]:
    """``quant.target_bpw``: the most outliers the budget allows, ``(result, tau)``.

    The budget leaves ``n = (target - bits without outliers) * numel / 32`` outliers. Each pass
    records every weight's error in threshold units; until a pass fits, ``tau`` jumps to the
    ``n``-th largest error of the last pass (the first without outliers; the leave-one-out fit
    and the error feedback of a pass with outliers move the errors, so this is an estimate),
    then bisects on ``log tau`` between the last pass over the budget and the best within it;
    ``1 + _TAU_STEPS`` passes at most. The result within the budget with the most outliers.
    """
    base = spqr_bits_formula(spec.bits, spec.stat_bits, _group(spec, w), spec.stat_group, 0.0)
    n_max = math.floor((spec.target_bpw - base) * w.numel() / 32)
    if n_max < 0:
        raise ValueError(
            f"quant.target_bpw={spec.target_bpw}: even without outliers a layer needs "
            f"{base:.3f} bits per weight"
        )
    rec: list[torch.Tensor] = []
    plain = spqr_quantize(w, stats, spec, mask, tau=math.inf, record=rec)
    if n_max == 0:
        return plain, math.inf
    best, best_tau = plain, math.inf
    lo, hi = spec.tau_min, math.inf  # over the budget at lo (or untried), within it at hi
    for _ in range(_TAU_STEPS):
        if math.isinf(hi):  # no fit yet: jump to the n-th largest error of the last pass
            crit = torch.cat(rec)
            k = min(n_max, crit.numel())
            tau = max(lo * 1.25, float(crit.topk(k).values[-1]) if k else lo * 1.25)
        else:  # bracketed: bisect on log tau
            tau = math.sqrt(lo * hi)
        rec.clear()
        gq = spqr_quantize(w, stats, spec, mask, tau=tau, record=rec)
        if spqr_bits(gq, spec) <= spec.target_bpw:
            hi = tau
            if gq.n_outliers >= best.n_outliers:
                best, best_tau = gq, tau
            if gq.n_outliers == n_max:
                break
        else:
            lo = tau
    return best, best_tau


def _group(spec: QuantSpec, w: torch.Tensor) -> int:
    return spec.group_size if spec.group_size > 0 else w.shape[1]


@register_quantizer("spqr", needs_hessian=True)
def _quantize_spqr(w, spec: QuantSpec, stat, mask, stats: LayerStats | None = None):
    if stats is None:
        raise ValueError("quant.method=spqr needs the layer's calibration statistics")
    if spec.target_bpw is not None:
        gq, tau = spqr_target(w, stats, spec, mask)
    else:
        gq, tau = spqr_quantize(w, stats, spec, mask), spec.tau
    return gq, tau
