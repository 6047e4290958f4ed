"""``compress_linear``: the one place that fixes the order of operations of one-shot compression.

stats -> mask -> quantise -> adapters -> re-fit (-> more rounds) -> adapter quantisation.

Reference order (all defaults): the Wanda mask is chosen on the full-precision W; W^Q =
SLiM-Quant(W) with alpha fitted on dense W; W^C = mask * W^Q; SLiM-LoRA adapters from W - W^C; the
sparse part is re-fitted, W_final = SLiM-Quant(mask * (W - (L R)^T)) with a fresh alpha; then the
adapters are AbsMax-quantised along each matmul's reduction axis.
"""

from __future__ import annotations

import math

import torch

from slim_lightning.core.grouped import GroupQuant
from slim_lightning.core.lowrank import (
    adapter_rank,
    quantize_adapters,
    quantize_adapters_searched,
    saliency,
    slim_lora,
    whitening,
)
from slim_lightning.core.metrics import weighted_rel_error
from slim_lightning.core.prune import make_mask
from slim_lightning.core.quant import apply_mask, quantize_weight
from slim_lightning.core.registry import ADAPTERS, PRUNERS, QUANTIZERS
from slim_lightning.core.types import (
    CompressedLinear,
    CompressSpec,
    LayerStats,
    QuantTensor,
    SparsitySpec,
)


def bits_per_weight(
    d_out: int,
    d_in: int,
    *,
    weight_bits: int | None,
    sparsity: SparsitySpec,
    n_kept: int | None = None,
    n_weight_scales: int = 0,
    in_scale: bool = False,
    rank: int = 0,
    adapter_bits: int | None = None,
    adapter_group_size: int = 128,
    adapter_in_scale: bool = False,
) -> float:
    """Storage bits per dense weight of a compressed ``(d_out, d_in)`` linear.

    Accounting rules: kept values at ``weight_bits`` (16 when unquantised); sparsity metadata
    ``ceil(log2 m)`` bits per kept value for N:M (2:4 -> 2 bits per kept value = 1 bit per weight),
    for unstructured the cheaper of a 1-bit-per-weight bitmap and 16-bit column indices per kept
    value, nothing for dense; every scale at 16 bits (weight scales, SLiM-Quant^O ``in_scale``,
    adapter group scales, adapter ``in_scale`` vectors); adapters ``rank * (d_in + d_out)`` values
    at ``adapter_bits`` (16 when unquantised), L^T grouped along d_in and R^T along r.

    Args:
        d_out, d_in: weight shape.
        weight_bits: bits of each kept value, or None for fp16.
        sparsity: the pattern (gives the metadata rule and, without ``n_kept``, the density).
        n_kept: actual number of kept weights (defaults to ``density * d_out * d_in``).
        n_weight_scales: number of weight scales (1 per tensor, d_out * groups for AbsMax).
        in_scale: whether a per-input-channel ``in_scale`` vector is stored.
        rank: adapter rank (0 = no adapters).
        adapter_bits: adapter value bits or None for fp16.
        adapter_group_size: AbsMax group size of the adapters (-1 = one group per row).
        adapter_in_scale: whether the quantised adapters carry ``in_scale`` vectors
            (``d_in`` for L^T and ``rank`` for R^T, fp16).

    Returns:
        bits per dense weight (16.0 for an uncompressed fp16 layer).
    """
    numel = d_out * d_in
    kept = round(numel * sparsity.density) if n_kept is None else int(n_kept)
    total = kept * (16 if weight_bits is None else weight_bits)
    if sparsity.pattern == "nm":
        total += kept * math.ceil(math.log2(sparsity.m))
    elif sparsity.pattern == "unstructured":
        total += min(numel, 16 * kept)
    total += 16 * n_weight_scales + (16 * d_in if in_scale else 0)
    if rank > 0:
        n_ad = rank * (d_in + d_out)
        if adapter_bits is None:
            total += 16 * n_ad
        else:
            g_l = d_in if adapter_group_size == -1 else min(adapter_group_size, d_in)
            g_r = rank if adapter_group_size == -1 else min(adapter_group_size, rank)
            n_scales = rank * math.ceil(d_in / g_l) + d_out * math.ceil(rank / g_r)
            total += adapter_bits * n_ad + 16 * n_scales
            if adapter_in_scale:
                total += 16 * (d_in + rank)
    return total / numel


def _sparse_part(
    w: torch.Tensor,
    stats: LayerStats,
    stat: torch.Tensor,
    spec: CompressSpec,
    mask: torch.Tensor | None,
    info: dict,
    *,
    refit: bool,
) -> tuple[torch.Tensor, QuantTensor | None, torch.Tensor | None, float]:
    """Sparse, quantised approximation of the target ``w`` (fp32 ``(d_out, d_in)``).

    First call (``refit=False``): chooses the mask. Re-fit (``refit=True``): keeps ``mask`` and
    quantises ``mask * w`` afresh (SLiM-Quant fits a new alpha on it); with the SparseGPT pruner the
    re-fit reruns its OBS updates (and OPTQ when joint) with the mask fixed, so the sparse part
    keeps compensating through the Hessian.

    Returns:
        ``(w_c, qt, mask, alpha)``: fp32 dense ``w_c`` (exactly 0 where pruned), its QuantTensor
        or None, the bool mask or None, the SLiM-Quant alpha or nan.
    """
    q, sp, pr = spec.quant, spec.sparsity, spec.pruner
    alpha = math.nan
    entry = PRUNERS.get_entry(pr.method)
    if entry.prune is not None:  # prunes and updates the kept weights itself (SparseGPT/OBS)
        if pr.order == "quant_then_mask":
            raise ValueError(
                f"pruner.order=quant_then_mask is not supported with {pr.method} (its "
                "weight updates leave the grid); use pruner.joint_quant instead"
            )
        if pr.joint_quant and q.method == "none":
            raise ValueError(
                "pruner.joint_quant needs quant.method absmax or slim_quant (OPTQ "
                "uses quant.bits and quant.group_size)"
            )
        # a quantiser with its own GPTQ pass (spqr, slim_llm) quantises after the pruner's OBS
        # updates with the mask fixed; joint OPTQ is for the symmetric grid
        own_pass = QUANTIZERS.get_entry(q.method).needs_hessian
        joint = q if pr.joint_quant and not own_pass else None
        if sp.pattern == "dense" and joint is None:
            base, new_mask = w, None
        else:
            base, new_mask, qt = entry.prune(w, stats, sp, pr, joint, mask, info)
            if joint is not None:
                return base, qt, new_mask, alpha
        mask = new_mask if mask is None else mask
        qt, alpha = quantize_weight(base, q, stat=stat, mask=mask, stats=stats)
    elif refit or pr.order == "mask_then_quant":
        if not refit:
            mask = make_mask(w, stat, sp, pr)
        base = w if mask is None else w * mask
        # the re-fit's alpha is fitted on the masked target (reference); the first alpha on dense W
        qt, alpha = quantize_weight(base if refit else w, q, stat=stat, mask=mask, stats=stats)
    else:  # quant_then_mask: the score sees the quantised values
        qt, alpha = quantize_weight(w, q, stat=stat, stats=stats)
        base = w if qt is None else qt.dequantize()
        mask = make_mask(base, stat, sp, pr)
        qt = None if qt is None else apply_mask(qt, mask)
    if qt is not None:
        return qt.dequantize(), qt, mask, alpha
    return (base if mask is None else base * mask), None, mask, alpha


def compress_linear(
    weight: torch.Tensor, stats: LayerStats, spec: CompressSpec
) -> CompressedLinear:
    """Compresses one linear layer's weight according to ``spec``.

    Args:
        weight: float ``(d_out, d_in)`` (any float dtype/device; work is done in fp32 there).
        stats: calibration statistics of the layer input (``hessian`` needed for sparsegpt).
        spec: the full compression spec.

    Returns:
        CompressedLinear whose ``effective_weight()`` is what the compressed layer computes, with
        metrics: ``sparsity``, ``rank``, ``adapter_params``, ``alpha`` (last SLiM-Quant alpha or
        nan), ``alpha_initial``, ``err_before_adapters`` (sparse part alone), ``err_after_adapters``
        (final sparse part + unquantised adapters), ``err_after_adapters_norefit`` (first sparse
        part + first adapters), ``err_final`` (everything quantised), ``bits_per_weight``,
        ``refit_rounds``, ``damp`` / ``damp_retries`` / ``dead_inputs`` (sparsegpt),
        ``adapter_in_scale_power`` (``lowrank.quant_in_scale``: the chosen power, 0 = plain AbsMax)
        and ``err_uniform_weights`` (1.0 when the statistic was all zero and errors are unweighted;
        only the magnitude pruner with naive or no adapters accepts such a layer, Wanda, SparseGPT
        and SLiM-LoRA raise ValueError).
    """
    W = weight.detach().to(torch.float32)
    d_out, d_in = W.shape
    sp, lr = spec.sparsity, spec.lowrank
    stat = stats.channel_stat("sq").to(W.device)
    metrics: dict[str, float] = {}
    try:
        s_err = saliency(stat, "sq")
        metrics["err_uniform_weights"] = 0.0
    except ValueError:  # dead input: errors cannot be weighted; say so in the metrics
        s_err = torch.ones_like(stat)
        metrics["err_uniform_weights"] = 1.0

    if spec.is_identity:  # the `dense` method: weight returned unchanged
        metrics.update(
            sparsity=0.0,
            rank=0.0,
            adapter_params=0.0,
            alpha=math.nan,
            alpha_initial=math.nan,
            err_before_adapters=0.0,
            err_after_adapters=0.0,
            err_after_adapters_norefit=0.0,
            err_final=0.0,
            bits_per_weight=16.0,
            refit_rounds=0.0,
        )
        return CompressedLinear(weight=W.clone(), metrics=metrics)

    info: dict = {}
    w_c, qt, mask, alpha = _sparse_part(W, stats, stat, spec, None, info, refit=False)
    metrics["alpha_initial"] = alpha
    metrics["err_before_adapters"] = weighted_rel_error(W, w_c, s_err)

    left = right = lq = rq = None
    rank, rounds = 0, 0
    ref = W  # what the final errors are measured against
    if ADAPTERS.get_entry(lr.method).enabled:
        rank = adapter_rank(d_in, d_out, lr)
        s_lr = ADAPTERS.get_entry(lr.method).weights(
            stats.channel_stat(lr.stat).to(W.device), lr.stat
        )
        # lowrank.alternate: the first rounds re-pick the mask on W - L R (mask=None)
        n_rounds = lr.alternate + (max(1, lr.refit_rounds) if lr.refit else 1)
        white = None
        if lr.fit == "whitened":
            if stats.hessian is None:
                raise ValueError(
                    "lowrank.fit=whitened needs the layer's input Hessian (a SparseGPT pruner "
                    "collects it); use lowrank.fit=diag"
                )
            white = whitening(stats.hessian.to(W.device), lr.fit_damp)

        def quant_ad(left, right):
            if not lr.quant_in_scale:
                return quantize_adapters(left, right, lr.quant_bits, lr.quant_group_size)
            lq, rq, p = quantize_adapters_searched(
                left, right, lr.quant_bits, lr.quant_group_size, stat, s_err
            )
            metrics["adapter_in_scale_power"] = p
            return lq, rq

        # a large layer holds neither its fp32 weight (rebuilt exactly from the 16-bit one
        # given) nor its sparse part (from its codes) while the adapters are fitted, nor the
        # weight while the pruner re-fits
        large = W.numel() > ROW_STEP
        again = large and W.data_ptr() != weight.data_ptr()
        for k in range(n_rounds):
            refits = k < lr.alternate or lr.refit  # (the sparse part is replaced this round)
            if W is None:  # (dropped by the last round's re-fit)
                W = weight.detach().to(torch.float32)
            resid = W - w_c
            rebuild = large and type(qt) is QuantTensor
            if rebuild:
                w_c = None
            if again:
                W = None
            left, right = slim_lora(resid, s_lr, rank, lr, white, consume=True)
            del resid
            if rebuild and (k == 0 or not refits):
                w_c = qt.dequantize()
            if again:
                W = weight.detach().to(torch.float32)
            if k == 0:
                metrics["err_after_adapters_norefit"] = weighted_rel_error(
                    W, w_c, s_err, left, right
                )
            if refits:
                w_c = qt = None  # (replaced: not held beside the new ones)
            l_eff, r_eff = left, right
            if lr.quant_bits is not None and lr.quant_before_refit:
                # the re-fit then compensates the adapters' quantisation error as well
                lq, rq = quant_ad(left, right)
                l_eff, r_eff = lq.dequantize().T, rq.dequantize().T
            if refits:
                target = W - (l_eff @ r_eff).T
                if again:
                    W = None
                if k < lr.alternate:  # the pruner chooses the mask afresh for W - L R
                    mask = None
                    w_c, qt, mask, alpha = _sparse_part(
                        target, stats, stat, spec, None, info, refit=False
                    )
                else:
                    w_c, qt, _, alpha = _sparse_part(
                        target, stats, stat, spec, mask, info, refit=True
                    )
                del target
                rounds += 1
        W = None if again else W  # (measured against the 16-bit weight a row block at a time)
        ref = weight if again else W
        metrics["err_after_adapters"] = weighted_rel_error(ref, w_c, s_err, left, right)
        if lr.quant_bits is not None and not lr.quant_before_refit:
            lq, rq = quant_ad(left, right)
        if lq is not None:
            left, right = lq.dequantize().T.contiguous(), rq.dequantize().T.contiguous()
    else:
        metrics["err_after_adapters"] = metrics["err_after_adapters_norefit"] = metrics[
            "err_before_adapters"
        ]

    out = CompressedLinear(
        weight=w_c, weight_q=qt, mask=mask, lora_l=left, lora_r=right, lora_l_q=lq, lora_r_q=rq
    )
    n_kept = d_out * d_in if mask is None else int(mask.sum())
    metrics.update(
        sparsity=1.0 - n_kept / (d_out * d_in),
        rank=float(rank),
        adapter_params=float(rank * (d_in + d_out)),
        alpha=alpha,
        err_final=weighted_rel_error(ref, w_c, s_err, left, right),
        refit_rounds=float(rounds),
        bits_per_weight=bits_per_weight(
            d_out,
            d_in,
            weight_bits=None if qt is None else qt.bits,
            sparsity=sp,
            n_kept=n_kept,
            n_weight_scales=0 if qt is None else qt.scale.numel(),
            in_scale=qt is not None and qt.in_scale is not None,
            rank=rank,
            adapter_bits=lr.quant_bits if rank else None,
            adapter_group_size=lr.quant_group_size,
            adapter_in_scale=lq is not None and lq.in_scale is not None,
        ),
        **{k: float(v) for k, v in info.items()},
    )
    if isinstance(qt, GroupQuant):  # SpQR / SliM-LLM: the papers' count beside the file's
        metrics.update(bits_formula=qt.paper_bits(), outlier_share=qt.n_outliers / W.numel())
    out.metrics = metrics
    return out


# -- large weights, a block of rows at a time ----------------------------------------------------
# Values per row block of ``compress_linear_rows`` (4 Mi: 16 MiB per fp32 work copy).
ROW_STEP = 1 << 22
# Specs whose every output row is compressed independently of the others: elementwise pruning
# scores with per-row masks (N:M groups along d_in, unstructured ratio per row), group AbsMax
# along the row (or no quantisation), no adapters (a low-rank fit needs the whole matrix) and no
# SLiM-Quant (one scale fitted on the whole tensor).
ROW_PRUNERS = ("magnitude", "wanda")
ROW_QUANTIZERS = ("none", "absmax")
_RATIO_METRICS = (
    "err_before_adapters",
    "err_after_adapters",
    "err_after_adapters_norefit",
    "err_final",
)


def row_separable(spec: CompressSpec) -> bool:
    """Whether ``spec`` compresses each output row independently (``compress_linear_rows``)."""
    return (
        spec.pruner.method in ROW_PRUNERS
        and spec.quant.method in ROW_QUANTIZERS
        and spec.quant.outlier_ratio == 0
        and not ADAPTERS.get_entry(spec.lowrank.method).enabled
    )


def compress_linear_rows(
    weight: torch.Tensor, stats: LayerStats, spec: CompressSpec, step: int = ROW_STEP
) -> CompressedLinear:
    """``compress_linear`` with work memory of ``step`` values instead of the whole weight.

    For a row-separable spec (``row_separable``) and a weight of more than ``step`` values, the
    rows are compressed in blocks of ``step // d_in`` and the results concatenated: the tensors
    are exactly ``compress_linear``'s (every row sees the same operations), and the metrics are
    combined exactly (relative errors from their per-block numerators and denominators, sparsity
    and bits per weight by counts) up to float summation order. Other specs and small weights:
    the plain call.
    """
    d_out, d_in = weight.shape
    if not row_separable(spec) or weight.numel() <= step or d_out < 2:
        return compress_linear(weight, stats, spec)
    rows = max(1, step // d_in)
    stat = stats.channel_stat("sq").to(weight.device)
    try:
        s_err = saliency(stat, "sq")
    except ValueError:
        s_err = torch.ones_like(stat)
    out: CompressedLinear | None = None
    all_metrics: list[dict[str, float]] = []
    dens: list[float] = []
    sizes: list[int] = []
    for s in range(0, d_out, rows):
        w = weight[s : s + rows]
        c = compress_linear(w, stats, spec)
        if out is None:  # the whole result, filled block by block (no concatenation copies)
            qt = None
            if c.weight_q is not None:
                q0 = c.weight_q
                scale = q0.scale
                if scale.shape[0] == w.shape[0]:  # per-row groups
                    scale = scale.new_empty((d_out, *scale.shape[1:]))
                qt = QuantTensor(q0.q.new_empty((d_out, d_in)), scale, q0.group_size, q0.bits, None)
            out = CompressedLinear(
                weight=c.weight.new_empty((d_out, d_in)),
                weight_q=qt,
                mask=None if c.mask is None else c.mask.new_empty((d_out, d_in)),
            )
        e = s + w.shape[0]
        out.weight[s:e] = c.weight
        if out.mask is not None:
            out.mask[s:e] = c.mask
        if out.weight_q is not None:
            out.weight_q.q[s:e] = c.weight_q.q
            if out.weight_q.scale.shape[0] == d_out:
                out.weight_q.scale[s:e] = c.weight_q.scale
        all_metrics.append(c.metrics)
        sizes.append(w.shape[0] * d_in)
        dens.append(float(torch.linalg.norm(w.detach().float() * s_err[None, :])))
        del c
    total = float(sum(sizes))
    metrics: dict[str, float] = {}
    for key in all_metrics[0]:
        vals = [float(m[key]) for m in all_metrics]
        if key in _RATIO_METRICS:  # weighted_rel_error: num / den (num alone where den == 0)
            num2 = sum((v * d if d > 0 else v) ** 2 for v, d in zip(vals, dens))
            den2 = sum(d * d for d in dens)
            metrics[key] = math.sqrt(num2 / den2) if den2 > 0 else math.sqrt(num2)
        elif all(v == vals[0] or (math.isnan(v) and math.isnan(vals[0])) for v in vals):
            metrics[key] = vals[0]
        else:  # per-weight quantities (sparsity, bits per weight, ...): weighted by size
            metrics[key] = sum(v * n for v, n in zip(vals, sizes)) / total
    out.metrics = metrics
    return out
