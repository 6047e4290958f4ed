"""SparseGPT (Frantar & Alistarh 2023) with optional joint OPTQ quantisation in the column loop.

Follows the original algorithm: H = 2/n X X^T in fp32, dead inputs neutralised, damping by a
fraction of the mean diagonal, upper Cholesky factor of H^-1, lazy batch updates over column
blocks. Quantisation is symmetric (the ``QuantTensor`` contract), per-channel or grouped; group
scales are computed when the column loop reaches the group start (as GPTQ does), from the weights
as updated so far.
"""

from __future__ import annotations

import math
import tempfile
import warnings

import torch

from slim_lightning.core.quant import _quantize_with_scale, qmax_of, round_scale
from slim_lightning.core.registry import register_pruner
from slim_lightning.core.types import LayerStats, PrunerSpec, QuantSpec, QuantTensor, SparsitySpec

_MAX_DAMP_RETRIES = 3  # damping x10 per retry: damp, 10 damp, 100 damp, 1000 damp


def hinv_cholesky(
    h: torch.Tensor, damp: float, info: dict | None = None, *, rebuild=None
) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``.

    Retries with damping x10 (up to ``_MAX_DAMP_RETRIES`` times, with a warning) when H is not
    numerically positive definite; raises RuntimeError if that still fails. The factorisations
    run in place on one working matrix (LAPACK's own storage), so the peak is two ``(d, d)``
    matrices with ``h`` kept, one with ``rebuild``.

    Args:
        h: fp32 ``(d, d)`` symmetric PSD matrix (dead diagonal entries already set to 1).
        damp: relative damping, e.g. 0.01.
        info: optional dict receiving ``damp`` (the damping used) and ``damp_retries``.
        rebuild: optional callable returning a fresh ``h``; when given, ``h`` itself becomes the
            working matrix (and the result) and a retry asks ``rebuild`` for another copy.

    Returns:
        fp32 ``(d, d)`` upper-triangular U with ``U^T U = H_damped^-1``.
    """
    mean_diag, shape = torch.diag(h).mean(), tuple(h.shape)
    status = torch.empty((), dtype=torch.int32, device=h.device)
    for attempt in range(_MAX_DAMP_RETRIES + 1):
        d = damp * 10**attempt
        if rebuild is None:
            a = h.clone()
        else:
            a, h = (h if attempt == 0 else rebuild()), None
        a.diagonal().add_(d * mean_diag)
        torch.linalg.cholesky_ex(a, out=(a, status))
        if status.item() == 0:
            torch.cholesky_inverse(a, out=a)
            torch.linalg.cholesky_ex(a, upper=True, out=(a, status))
            # (finite: checked in row blocks, no (d, d) bool matrix beside the factor)
            if status.item() == 0 and all(
                bool(torch.isfinite(a[r : r + 1024]).all()) for r in range(0, len(a), 1024)
            ):
                if attempt > 0:
                    warnings.warn(
                        f"sparsegpt: Cholesky needed damping {d:g} (asked {damp:g})", stacklevel=2
                    )
                if info is not None:
                    info.update(damp=float(d), damp_retries=float(attempt))
                return a
        del a
    raise RuntimeError(
        f"sparsegpt: Cholesky of the damped Hessian failed even with damping {d:g} "
        f"(shape {shape}); the calibration Hessian is degenerate or non-finite"
    )


def _factor(
    hessian_sum: torch.Tensor,
    scale: float,
    dead: torch.Tensor,
    damp: float,
    device: torch.device,
    consume: bool,
) -> tuple[torch.Tensor, dict]:
    """``hinv_cholesky`` of ``H = scale * hessian_sum`` with dead inputs neutralised.

    ``consume``: the factor is computed in ``hessian_sum``'s own storage (no second ``(d, d)``
    matrix; the caller gives up the sum), with a copy on disk read back only if the damping must
    be raised."""
    info: dict = {}

    def rebuild() -> torch.Tensor:
        H = hessian_sum.detach().to(device, torch.float32) * scale
        H[dead, dead] = 1.0
        return H

    if (
        not consume
        or hessian_sum.device != torch.device(device)
        or hessian_sum.dtype != torch.float32
    ):
        return hinv_cholesky(rebuild(), damp, info, rebuild=rebuild), info
    with tempfile.TemporaryFile() as backup:
        torch.save(hessian_sum, backup)

        def restore() -> torch.Tensor:
            backup.seek(0)
            H = torch.load(backup, weights_only=True).mul_(scale)
            H[dead, dead] = 1.0
            return H

        H = hessian_sum.detach().mul_(scale)
        H[dead, dead] = 1.0
        return hinv_cholesky(H, damp, info, rebuild=restore), info


#: values of the lazy-update product computed at once (larger ones in blocks of columns)
LAZY_STEP = 1 << 22


def sparsegpt(
    w: torch.Tensor,
    hessian_sum: torch.Tensor,
    n_tokens: int,
    sparsity: SparsitySpec,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    quant: QuantSpec | None = None,
    mask: torch.Tensor | None = None,
    info: dict | None = None,
    cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, QuantTensor | None]:
    """Prunes (and optionally quantises) ``w`` minimising ``||(W - W_hat) X||^2`` column by column.

    Args:
        w: float ``(d_out, d_in)``.
        hessian_sum: ``(d_in, d_in)`` sum of ``x x^T`` over ``n_tokens`` calibration tokens.
        n_tokens: number of tokens summed.
        sparsity: ``dense`` (quantise only), ``nm`` (masks per group of m columns, chosen inside
            each block; needs ``blocksize % m == 0``) or ``unstructured`` (``round(ratio * numel)``
            lowest ``w^2 / diag(H^-1)^2`` of each column block, as the original SparseGPT).
        blocksize: columns per lazy-update block.
        damp: relative diagonal damping.
        quant: when given, OPTQ quantisation with ``quant.bits``; ``quant.group_size == -1`` is
            per-channel (scales from the whole row at the start), else groups along d_in.
        mask: optional bool ``(d_out, d_in)`` fixed mask (True = kept); then only the OBS weight
            updates (and quantisation) run, e.g. for re-fitting against a new target.
        info: optional dict receiving ``damp`` / ``damp_retries`` and ``dead_inputs`` (number of
            inputs with a zero Hessian diagonal; their weight columns are set to 0, as in the
            original SparseGPT, since they never contribute on the calibration data).
        cache: optional dict (``LayerStats.cache``) keeping the inverse factor of this Hessian
            for later calls with the same Hessian, token count and damping; with its
            ``consume_hessian`` set, the factor is computed in ``hessian_sum``'s storage (which
            then no longer holds the sum: later calls must hit the cache).

    Returns:
        ``(w_new, mask, qt)``: fp32 ``(d_out, d_in)`` updated weight (exactly 0 where pruned and,
        with ``quant``, exactly ``qt.dequantize()``), bool mask (None when dense and no mask was
        given) and the QuantTensor (None without ``quant``).

    Raises:
        ValueError: bad shapes, or an all-zero Hessian (no calibration signal at all).
        RuntimeError: the damped Hessian stays non positive definite (see ``hinv_cholesky``).
    """
    W = w.detach().to(torch.float32).clone()
    d_out, d_in = W.shape
    if hessian_sum.shape != (d_in, d_in):
        raise ValueError(f"sparsegpt: hessian shape {tuple(hessian_sum.shape)} != ({d_in}, {d_in})")
    nm = sparsity.pattern == "nm" and mask is None
    if nm and (d_in % sparsity.m or blocksize % sparsity.m):
        raise ValueError(
            f"sparsegpt N:M needs d_in and blocksize divisible by m={sparsity.m}; "
            f"weight shape {tuple(W.shape)}, blocksize {blocksize}"
        )
    scale = 2.0 / max(n_tokens, 1)
    key = ("sparsegpt_hinv", float(damp), int(n_tokens), str(W.device))
    hit = None if cache is None else cache.get(key)
    if hit is None:
        if cache is not None and cache.get("consumed"):
            raise RuntimeError(
                "sparsegpt: this Hessian was factorised in place for other options (damping, "
                "token count or device); it cannot be factorised again"
            )
        dead = (torch.diag(hessian_sum).to(W.device, torch.float32) * scale) == 0
        if bool(dead.all()):
            raise ValueError(
                "sparsegpt: the calibration Hessian is all zero (this layer's inputs never "
                "fired); there is nothing to fit the weights to"
            )
        consume = cache is not None and bool(cache.get("consume_hessian"))
        hit = (*_factor(hessian_sum, scale, dead, damp, W.device, consume), dead)
        if cache is not None:  # the re-fit and the linears sharing this Hessian reuse it
            cache[key], cache["consumed"] = hit, consume
    Hinv, hinfo, dead = hit
    W[:, dead] = 0.0  # inputs that never fire: any weight there is free, zero it
    if info is not None:  # reported, not silent: the zeroed columns show up in the metrics
        info["dead_inputs"] = float(dead.sum())
        info.update(hinfo)

    pruned = torch.zeros_like(W, dtype=torch.bool) if mask is None else ~mask.to(W.device)
    if quant is not None:
        bits, qmax = quant.bits, qmax_of(quant.bits)
        g = d_in if quant.group_size == -1 else min(quant.group_size, d_in)
        scales = torch.zeros(d_out, math.ceil(d_in / g), dtype=torch.float32, device=W.device)
        q_int = torch.zeros(d_out, d_in, dtype=torch.int8, device=W.device)

    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # (d_out, count) working copy, receives in-block updates
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        hdiag = torch.diag(Hinv1)  # (count,)
        if mask is None and sparsity.pattern == "unstructured":
            tmp = W1**2 / hdiag[None, :] ** 2  # OBS saliency of removing each weight
            k = round(tmp.numel() * sparsity.ratio)
            if k > 0:
                drop = torch.topk(tmp.flatten(), k, largest=False).indices
                blk = torch.zeros(d_out * count, dtype=torch.bool, device=W.device)
                blk[drop] = True
                pruned[:, i1:i2] = blk.view(d_out, count)  # (d_out * count,) -> (d_out, count)

        for i in range(count):
            col = i1 + i
            wcol = W1[:, i]
            if nm and i % sparsity.m == 0:
                tmp = W1[:, i : i + sparsity.m] ** 2 / hdiag[None, i : i + sparsity.m] ** 2
                drop = torch.topk(tmp, sparsity.m - sparsity.n, dim=1, largest=False).indices
                pruned[:, col : col + sparsity.m].scatter_(1, drop, True)
            qcol = wcol.masked_fill(pruned[:, col], 0.0)
            if quant is not None:
                if col % g == 0:
                    grp = _current_columns(W, W1, Err1, Hinv, i1, i, col, min(col + g, d_in))
                    scales[:, col // g] = round_scale(grp.abs().amax(1) / qmax)
                s = scales[:, col // g]
                qi = _quantize_with_scale(qcol, s, bits)
                q_int[:, col] = qi
                qcol = qi.to(torch.float32) * s  # same fp32 product as QuantTensor.dequantize
            Q1[:, i] = qcol
            err = (wcol - qcol) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err

        W[:, i1:i2] = Q1
        # the lazy update of the later columns: in column blocks when its product would be
        # large (a (d_out, d_in - i2) fp32 temporary: up to 4 bytes per weight)
        step = d_in if d_out * (d_in - i2) <= LAZY_STEP else max(blocksize, LAZY_STEP // d_out)
        for c1 in range(i2, d_in, step):
            W[:, c1 : c1 + step] -= Err1 @ Hinv[i1:i2, c1 : c1 + step]

    out_mask = None if (mask is None and sparsity.pattern == "dense") else ~pruned
    qt = None
    if quant is not None:
        qt = QuantTensor(q=q_int, scale=scales, group_size=g, bits=bits)
    return W, out_mask, qt


def _current_columns(W, W1, Err1, Hinv, i1, i, a, b):
    """Columns ``[a, b)`` of the weight as updated so far (in-block part from W1, later blocks with
    the pending lazy updates of this block's first ``i`` columns applied)."""
    i2 = i1 + W1.shape[1]
    parts = [W1[:, i : i + (min(b, i2) - a)]]
    if b > i2:
        parts.append(W[:, i2:b] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:b])
    return torch.cat(parts, dim=1)


@register_pruner("sparsegpt", kind="prune", needs_hessian=True, joint_quant=True)
def prune_sparsegpt(
    w: torch.Tensor,
    stats: LayerStats,
    sparsity: SparsitySpec,
    pruner: PrunerSpec,
    joint: QuantSpec | None,
    mask: torch.Tensor | None,
    info: dict,
) -> tuple[torch.Tensor, torch.Tensor | None, QuantTensor | None]:
    """The registry's weight-updating pruner protocol for SparseGPT (+ OPTQ when ``joint``)."""
    if stats.hessian is None:
        raise ValueError("sparsegpt needs LayerStats.hessian (CompressSpec.needs_hessian)")
    return sparsegpt(
        w,
        stats.hessian.to(w.device),
        stats.n_tokens,
        sparsity,
        blocksize=pruner.blocksize,
        damp=pruner.damp,
        quant=joint,
        mask=mask,
        info=info,
        cache=stats.cache,
    )
