"""SLiM-LoRA: closed-form saliency-weighted low-rank adapters, and their AbsMax quantisation.

``W ~= W_c + (L R)^T`` with ``L (d_in, r)`` and ``R (r, d_out)``; the layer computes
``y = x W_c^T + (x L) R``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from slim_lightning.core import metrics
from slim_lightning.core.quant import absmax_quant
from slim_lightning.core.registry import register_adapter_method
from slim_lightning.core.types import LowRankSpec, QuantTensor


def adapter_rank(d_in: int, d_out: int, spec: LowRankSpec) -> int:
    """Adapter rank ``rank_ratio * min(d_in, d_out)``, rounded as the spec says.

    ``none`` rounds to the nearest integer; ``up`` / ``down`` round to a multiple of
    ``rank_multiple`` (the reference rounds up to 128). Clamped to ``[1, min(d_in, d_out)]``.
    """
    full = min(d_in, d_out)
    # round away float noise first so that e.g. 0.1 * 1280 = 128.00000000000003 is not rounded up
    base = round(spec.rank_ratio * full, 9)
    mult = max(1, int(spec.rank_multiple))
    if spec.rank_rounding == "none":
        r = round(base)
    elif spec.rank_rounding == "up":
        r = math.ceil(base / mult) * mult
    elif spec.rank_rounding == "down":
        r = math.floor(base / mult) * mult
    else:
        raise ValueError(
            f"lowrank.rank_rounding: got {spec.rank_rounding!r}; allowed: none, up, down"
        )
    return int(min(max(r, 1), full))


def saliency(stat: torch.Tensor, kind: Literal["sq", "abs"] = "sq") -> torch.Tensor:
    """Per-input-channel saliency ``s``: ``sqrt(stat)`` for ``sq`` (mean x^2), ``stat`` for ``abs``.

    Zero entries would make ``diag(1/s)`` singular: if any entry is zero, the smallest positive
    entry is added to every entry (the reference's shift). No silent fallback: an all-zero or
    non-finite statistic raises ValueError.

    Args:
        stat: fp32 ``(d_in,)`` non-negative channel statistic.
        kind: ``sq`` or ``abs``.

    Returns:
        fp32 ``(d_in,)`` strictly positive saliency.
    """
    stat = stat.detach().to(torch.float32)
    if not torch.isfinite(stat).all() or (stat < 0).any():
        raise ValueError("saliency: channel statistic has negative or non-finite entries")
    pos = stat[stat > 0]
    if pos.numel() == 0:
        raise ValueError("saliency: channel statistic is all zero (no calibration signal)")
    if pos.numel() < stat.numel():
        stat = stat + pos.min()
    if kind == "sq":
        return torch.sqrt(stat)
    if kind == "abs":
        return stat
    raise ValueError(f"saliency kind: got {kind!r}; allowed: sq, abs")


# exact SVD through the fp64 Gram matrix from this smaller side up, for matrices at least twice as
# long as wide (LLaMA-7B's MLP, 4096 x 11008, 2 threads: 32 s and 548 MiB of work vs gesdd's 79 s
# and 615 MiB; no gain on square ones, 4096 x 4096: 23 s / 548 MiB vs 25 s / 399 MiB)
GRAM_MIN_SIDE = 2048


def low_rank_svd(
    e: torch.Tensor,
    rank: int,
    method: Literal["exact", "randomized"] = "exact",
    oversample: int = 16,
    niter: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``e`` (``e ~= U diag(S) V^T``), computed in fp32.

    Args:
        e: float ``(m, n)``.
        rank: ``1 <= rank <= min(m, n)``.
        method: ``exact`` (the thin SVD; for a matrix whose smaller side is at least
            ``GRAM_MIN_SIDE`` and at most half the longer one, the eigendecomposition of its fp64
            Gram matrix instead, see ``_top_svd_gram``) or ``randomized`` (``torch.svd_lowrank`` with ``rank +
            oversample`` columns and ``niter`` power iterations).

    Returns:
        ``U (m, rank)``, ``S (rank,)`` descending, ``V (n, rank)``; fp32.
    """
    e = e.detach().to(torch.float32)
    full = min(e.shape)
    if not 1 <= rank <= full:
        raise ValueError(
            f"low_rank_svd: rank {rank} outside [1, {full}] for shape {tuple(e.shape)}"
        )
    if method == "exact":
        if full >= GRAM_MIN_SIDE and max(e.shape) >= 2 * full:
            return _top_svd_gram(e, rank)
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    if method == "randomized":
        q = min(full, rank + max(0, int(oversample)))
        u, s, v = torch.svd_lowrank(e, q=q, niter=niter)
        return u[:, :rank], s[:rank], v[:, :rank]
    raise ValueError(f"lowrank.svd: got {method!r}; allowed: exact, randomized")


def _top_svd_gram(
    e: torch.Tensor, rank: int, step: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``e`` from the eigendecomposition of the Gram matrix of
    its smaller side, ``A A^T`` in fp64 (``A`` = ``e`` or ``e^T``), built and projected in column
    blocks of ``step``: working memory about four ``min(m, n)^2`` fp64 matrices with LAPACK's
    (independent of the longer side; see ``GRAM_MIN_SIDE`` for measured times). fp64 keeps the
    squared spectrum exact to far below fp32's rounding for the leading triplets the adapters use;
    singular vectors equal the thin SVD's up to sign (a pair flips together: ``U S V^T`` is the
    same)."""
    tall = e.shape[0] > e.shape[1]
    a = e.T if tall else e  # (k, N), k = min(m, n)
    k, n = a.shape
    g = torch.zeros(k, k, dtype=torch.float64, device=e.device)
    for c in range(0, n, step):
        blk = a[:, c : c + step].to(torch.float64)
        g.addmm_(blk, blk.T)
    del blk
    evals = torch.empty(k, dtype=torch.float64, device=e.device)
    evecs = torch.linalg.eigh(g, out=(evals, g))[1]  # ascending; the vectors replace g
    del g
    top = torch.arange(k - 1, k - 1 - rank, -1, device=e.device)
    s = evals[top].clamp_min(0).sqrt()
    uk = evecs[:, top].contiguous()  # (k, rank) fp64: A = U S V^T
    del evecs
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    vn = torch.empty(n, rank, dtype=torch.float32, device=e.device)
    for c in range(0, n, step):
        vn[c : c + step] = (a[:, c : c + step].T.to(torch.float64) @ uk * inv).to(torch.float32)
    u, s = uk.to(torch.float32), s.to(torch.float32)
    return (vn, s, u) if tall else (u, s, vn)


def whitening(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, C^-T)`` with ``C C^T = H + damp * mean(diag H) * I`` (``C = Q sqrt(Lambda)``), so
    ``||E C||_F^2 = tr(E H E^T)``: the output error of ``E`` on the calibration inputs."""
    h = hessian.detach().to(torch.float32)
    eps = damp * float(h.diagonal().mean().clamp_min(1e-12))
    evals, q = torch.linalg.eigh(h + eps * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
    root = evals.clamp_min(eps).sqrt()
    return q * root[None, :], q / root[None, :]


def slim_lora(
    err: torch.Tensor,
    s: torch.Tensor | None,
    rank: int,
    spec: LowRankSpec,
    white: tuple[torch.Tensor, torch.Tensor] | None = None,
    consume: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form adapters minimising ``||(err - (L R)^T) diag(s)||_F`` at rank ``rank``.

    ``E = err diag(s) = U S V^T``; ``left``: ``L = diag(1/s) V_r S_r``, ``R = U_r^T``;
    ``balanced``: ``L = diag(1/s) V_r sqrt(S_r)``, ``R = sqrt(S_r) U_r^T``. ``s = None`` is the
    Naive-LoRA baseline (plain truncated SVD). ``white = (C, C^-T)`` (``whitening``) replaces
    ``diag(s)`` by ``C``: ``L = C^-T V_r S_r`` minimises ``||(err - (L R)^T) C||_F``.

    Args:
        err: float ``(d_out, d_in)`` residual ``W - W_c``.
        s: fp32 ``(d_in,)`` positive saliency (see ``saliency``) or None.
        rank: adapter rank.
        spec: uses ``svd``, ``oversample``, ``niter``, ``split``.
        consume: ``err`` (fp32) may be overwritten (no second full-size copy is made).

    Returns:
        ``L`` fp32 ``(d_in, rank)`` and ``R`` fp32 ``(rank, d_out)``.
    """
    err = err.detach().to(torch.float32)
    if white is not None:  # (lowrank.fit=whitened) the full covariance instead of diag(s)
        c, c_inv_t = (t.to(err) for t in white)
        u, sv, v = low_rank_svd(err @ c, rank, spec.svd, spec.oversample, spec.niter)
        if spec.split == "balanced":
            root = torch.sqrt(sv)
            return (c_inv_t @ (v * root[None, :])).contiguous(), (u * root[None, :]).T.contiguous()
        return (c_inv_t @ (v * sv[None, :])).contiguous(), u.T.contiguous()
    if s is not None:
        e = err.mul_(s.to(err)[None, :]) if consume else err * s.to(err)[None, :]
    else:
        e = err
    del err
    u, sv, v = low_rank_svd(e, rank, spec.svd, spec.oversample, spec.niter)
    del e
    if spec.split == "left":
        left, right = v * sv[None, :], u.T.contiguous()
    elif spec.split == "balanced":
        root = torch.sqrt(sv)
        left, right = v * root[None, :], (u * root[None, :]).T.contiguous()
    else:
        raise ValueError(f"lowrank.split: got {spec.split!r}; allowed: left, balanced")
    if s is not None:
        left = left / s.to(left)[:, None]
    return left.contiguous(), right


def adapter_in_scales(
    left: torch.Tensor, stat: torch.Tensor, power: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation RMS of each adapter matmul's input channels, for ``quantize_adapters``.

    ``x @ L`` sees input channel ``j`` with RMS ``sqrt(stat_j)``; ``(x L) @ R`` sees channel ``k``
    with RMS ``sqrt(sum_j stat_j L_jk^2)`` (diagonal estimate: input channels taken uncorrelated).
    A quantisation error in row ``j`` of ``L`` (column ``k`` of ``R^T``) reaches the output scaled by
    that RMS, so quantising in the scaled domain spends the grid where the activations are.

    Each vector is raised to ``power`` (AWQ-style migration strength: 0 = plain AbsMax, 1 = fully
    activation-scaled), normalised to max 1, floored at 2**-14 (fp16's smallest normal) and rounded
    to fp16 so a packed fp16 copy divides back exactly.

    Args:
        left: fp32 ``L (d_in, r)``.
        stat: fp32 ``(d_in,)`` mean ``x^2`` (zeros allowed).
        power: exponent applied to both RMS vectors.

    Returns:
        ``(l_in (d_in,), r_in (r,))`` fp32, positive.
    """
    stat = stat.detach().to(left.device, torch.float32).clamp_min(0)
    if not torch.isfinite(stat).all() or not (stat > 0).any():
        raise ValueError("adapter_in_scales: channel statistic is all zero or non-finite")
    l_in = torch.sqrt(stat)
    r_in = torch.sqrt(stat @ left.detach().to(torch.float32) ** 2)  # (r,)

    def norm(v: torch.Tensor) -> torch.Tensor:
        v = v / v.max() if v.max() > 0 else torch.ones_like(v)
        v = v**power
        return v.clamp_min(2.0**-14).to(torch.float16).to(torch.float32)

    return norm(l_in), norm(r_in)


def quantize_adapters(
    left: torch.Tensor,
    right: torch.Tensor,
    bits: int,
    group_size: int,
    in_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[QuantTensor, QuantTensor]:
    """AbsMax-quantises the adapters along each matmul's reduction axis.

    Args:
        left: fp32 ``L (d_in, r)``; stored as ``L^T (r, d_in)``, groups along d_in.
        right: fp32 ``R (r, d_out)``; stored as ``R^T (d_out, r)``, groups along r.
        bits, group_size: AbsMax settings (-1 = one group per row).
        in_scales: optional ``(l_in (d_in,), r_in (r,))`` from ``adapter_in_scales``: the columns
            of ``L^T`` / ``R^T`` are multiplied by them before quantisation and the QuantTensors
            carry them as ``in_scale`` (``dequantize`` divides back).

    Returns:
        ``(lora_l_q, lora_r_q)``; dequantise and transpose to get effective ``L`` and ``R``.
    """
    lt, rt = left.T.to(torch.float32), right.T.to(torch.float32)  # (r, d_in), (d_out, r)
    if in_scales is None:
        return absmax_quant(lt, bits, group_size), absmax_quant(rt, bits, group_size)
    l_in, r_in = (v.to(lt.device, torch.float32) for v in in_scales)
    lq = absmax_quant(lt * l_in[None, :], bits, group_size)
    rq = absmax_quant(rt * r_in[None, :], bits, group_size)
    lq.in_scale, rq.in_scale = l_in, r_in
    return lq, rq


def quantize_adapters_searched(
    left: torch.Tensor,
    right: torch.Tensor,
    bits: int,
    group_size: int,
    stat: torch.Tensor,
    s: torch.Tensor,
    powers: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
) -> tuple[QuantTensor, QuantTensor, float]:
    """``quantize_adapters`` with the in-scale ``power`` chosen per layer (a small AWQ-style grid).

    Each candidate is scored by the saliency-weighted error of the adapter product,
    ``||diag(s) (L R - L_q R_q)||_F``, the SLiM-LoRA objective; ``power = 0`` (plain AbsMax, stored
    without ``in_scale``) is always a candidate, so the search never does worse than it on that
    objective. Whether scaling helps depends on the layer: after a Wanda mask the residual is large
    in low-saliency channels and ``L = diag(1/s) V S`` spans a wide range (scaling wins); when the
    residual concentrates on salient channels plain AbsMax can win.

    Args:
        left, right: fp32 ``L (d_in, r)``, ``R (r, d_out)``.
        bits, group_size: AbsMax settings.
        stat: fp32 ``(d_in,)`` mean ``x^2`` (for ``adapter_in_scales``).
        s: fp32 ``(d_in,)`` positive saliency weighting the score.
        powers: candidate exponents.

    Returns:
        ``(lora_l_q, lora_r_q, power)``.
    """
    sw = s.to(left)[:, None]
    step = max(1, metrics.ROW_STEP // right.shape[1])
    whole = left.shape[0] <= step
    target = left @ right if whole else None  # (d_in, d_out)
    best = None
    for p in powers:
        scales = None if p == 0 else adapter_in_scales(left, stat, p)
        lq, rq = quantize_adapters(left, right, bits, group_size, scales)
        lqd, rqd = lq.dequantize().T, rq.dequantize().T
        if whole:
            err = float(torch.linalg.norm((target - lqd @ rqd) * sw))
        else:  # (in blocks of rows: no full-size product is held)
            err = math.sqrt(
                sum(
                    float(
                        ((left[i : i + step] @ right - lqd[i : i + step] @ rqd) * sw[i : i + step])
                        .double()
                        .square()
                        .sum()
                    )
                    for i in range(0, left.shape[0], step)
                )
            )
        if best is None or err < best[0]:
            best = (err, lq, rq, float(p))
    return best[1], best[2], best[3]


# -- adapter methods (registry): how the SVD of the residual is weighted ------------------------
@register_adapter_method("slim")
def _slim_weights(stat: torch.Tensor, kind: str) -> torch.Tensor:
    """SLiM-LoRA: the residual is decomposed in the saliency-scaled domain."""
    return saliency(stat, kind)  # type: ignore[arg-type]


@register_adapter_method("naive")
def _naive_weights(stat: torch.Tensor, kind: str) -> None:
    """Naive-LoRA: plain SVD of the residual."""
    return None


register_adapter_method("none", enabled=False)(None)
