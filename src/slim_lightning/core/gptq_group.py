"""The GPTQ column pass shared by the asymmetric group quantisers (``core.spqr``, ``core.slim_llm``).

GPTQ (Frantar et al. 2023) over the columns of ``W`` in a stored order: lazy batch updates over
``blocksize`` columns, per-group statistics fitted when the loop reaches the group's first column
on the weights as updated so far, each column rounded with its group's statistics and its error
``(w - q) / U_jj`` spread over the later columns through the upper Cholesky factor ``U`` of the
damped ``H^-1``. A fixed sparsity mask is honoured (pruned weights become 0 and their error is
compensated, as SparseGPT with a fixed mask); an optional per-column hook marks 16-bit outliers
(SpQR), which keep their updated value exactly and feed back no error.

Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slim_lightning.core.grouped import fp16_round, quantize_codes
from slim_lightning.core.sparsegpt import _current_columns, hinv_cholesky
from slim_lightning.core.types import LayerStats


@dataclass
class Factor:
    """The damped inverse-Hessian factor of one layer in a stored column order.

    Attributes:
        hinv: fp32 ``(d, d)`` upper ``U`` with ``U^T U = (H_perm + damp)^-1``.
        perm: int64 ``(d,)`` stored column -> original column, or None (identity).
        dead: bool ``(d,)`` inputs (original order) that never fired; their columns are zeroed.
        info: ``damp`` / ``damp_retries`` / ``dead_inputs``.
    """

    hinv: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    info: dict


def layer_factor(stats: LayerStats, damp: float, act_order: bool, device: torch.device) -> Factor:
    """``H = 2/N sum x x^T``, dead inputs neutralised, optionally permuted by decreasing
    ``diag(H)`` (act-order), damped by ``damp * mean(diag H)``; cached in ``stats.cache`` per
    (damp, act_order) for the re-fit and the linears that share the Hessian.

    Raises:
        ValueError: no Hessian, or an all-zero Hessian.
    """
    if stats.hessian is None:
        raise ValueError("this quantiser needs LayerStats.hessian (CompressSpec.needs_hessian)")
    key = ("gptq_group_factor", float(damp), bool(act_order), str(device))
    hit = stats.cache.get(key)
    if hit is not None:
        return hit
    h = stats.hessian.detach().to(device, torch.float32) * (2.0 / max(stats.n_tokens, 1))
    dead = torch.diag(h) == 0
    if bool(dead.all()):
        raise ValueError(
            "the calibration Hessian is all zero (this layer's inputs never fired); there is "
            "nothing to fit the weights to"
        )
    h[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        h = h[perm][:, perm]
    info: dict = {}
    hinv = hinv_cholesky(h, damp, info, rebuild=lambda: h.clone())
    info["dead_inputs"] = float(dead.sum())
    out = Factor(hinv=hinv, perm=perm, dead=dead, info=info)
    stats.cache[key] = out
    return out


# fit(block_columns (rows, n) fp32 current weights, kept (rows, n) bool | None, group index,
#     diag(U) of those columns (n,)) -> (scale (rows,), zero (rows,), bits)
FitFn = Callable[[torch.Tensor, torch.Tensor | None, int, torch.Tensor], tuple]
# outliers(column (rows,) current weight, its dequantised value (rows,), U_jj, kept) -> bool (rows,)
OutlierFn = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor | None], torch.Tensor]


@dataclass
class PassResult:
    """What ``gptq_group_pass`` returns (all in the stored column order).

    Attributes:
        q: uint8 ``(rows, cols)`` codes (0 where pruned).
        scale, zero: fp32 ``(rows, n_groups)`` as used to round (decoded statistics).
        bits: int64 ``(n_groups,)`` width of every group.
        weight: fp32 ``(rows, cols)`` the final weight: dequantised codes, 0 where pruned,
            the exact 16-bit value at outliers.
        outliers: ``(rows, cols, values)`` int64, int64, fp32 ``(nnz,)`` sorted by row then
            column: each value is the fp16-representable correction added to the code's
            decoded value; None without outliers.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: torch.Tensor
    weight: torch.Tensor
    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def gptq_group_pass(
    w: torch.Tensor,
    hinv: torch.Tensor,
    group_size: int,
    fit: FitFn,
    *,
    mask: torch.Tensor | None = None,
    outliers: OutlierFn | None = None,
    blocksize: int = 128,
) -> PassResult:
    """GPTQ over the columns of ``w`` (already in the stored order, dead columns zeroed).

    Args:
        w: fp32 ``(rows, cols)``.
        hinv: fp32 ``(cols, cols)`` upper factor in the same order (``layer_factor``).
        group_size: columns per statistics group (the last may be shorter).
        fit: the group statistics (see ``FitFn``), called at each group's first column.
        mask: bool ``(rows, cols)`` kept weights (stored order) or None.
        outliers: optional per-column outlier rule (see ``OutlierFn``); an outlier keeps its
            current value as an fp16-representable correction over its code.
        blocksize: columns per lazy-update block.
    """
    W = w.detach().to(torch.float32).clone()
    rows, cols = W.shape
    n_groups = math.ceil(cols / group_size)
    q_all = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(rows, n_groups, dtype=torch.float32, device=W.device)
    zeros = torch.zeros_like(scales)
    widths = torch.zeros(n_groups, dtype=torch.int64)
    found: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (column, rows, corrections)
    diag = torch.diag(hinv)
    s = z = None
    bits = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        H1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g, end = col // group_size, min(col + group_size, cols)
                cur = _current_columns(W, W1, Err1, hinv, i1, i, col, end)
                kept = None if mask is None else mask[:, col:end]
                s, z, bits = fit(cur, kept, g, diag[col:end])
                scales[:, g], zeros[:, g], widths[g] = s, z, int(bits)
            wcol = W1[:, i]
            code = quantize_codes(wcol, _safe(s), z, bits)
            deq = (code - z) * s  # the decode's fp32 operations (core.grouped)
            keep = None if mask is None else mask[:, col]
            if keep is not None:
                code = code.masked_fill(~keep, 0.0)
                deq = deq.masked_fill(~keep, 0.0)
            if outliers is not None:
                hit = outliers(wcol, deq, float(H1[i, i]), keep)
                if bool(hit.any()):
                    # the stored correction is fp16; the kept value is code + correction
                    r = torch.nonzero(hit).squeeze(1)
                    corr = fp16_round(wcol[r] - deq[r])
                    deq = deq.index_put((r,), deq[r] + corr)
                    found.append((col, r, corr))
            q_all[:, col] = code.to(torch.uint8)
            Q1[:, i] = deq
            err = (wcol - deq) / H1[i, i]
            W1[:, i:] -= err[:, None] * H1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
    return PassResult(q_all, scales, zeros, widths, W, _sorted_outliers(found, cols))


def _safe(s: torch.Tensor) -> torch.Tensor:
    """A scale usable as a divisor (a zero scale rounds everything to the zero point)."""
    return torch.where(s > 0, s, torch.ones_like(s))


def to_stored(w: torch.Tensor, factor: Factor) -> torch.Tensor:
    """fp32 ``w`` with dead columns zeroed, in the factor's stored column order."""
    W = w.detach().to(torch.float32).clone()
    W[:, factor.dead.to(W.device)] = 0.0
    return W if factor.perm is None else W[:, factor.perm]


def _sorted_outliers(found: list, cols: int):
    """The outliers found column by column, sorted by row then column (CSR order)."""
    if not found:
        return None
    r = torch.cat([x[1] for x in found])
    c = torch.cat([torch.full_like(x[1], x[0]) for x in found])
    v = torch.cat([x[2] for x in found])
    order = torch.argsort(r * cols + c)
    return r[order], c[order], v[order]
