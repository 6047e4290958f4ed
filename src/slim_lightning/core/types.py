"""Typed contracts shared by the pure compression core, the packed format and the drivers.

Everything here imports only torch. Shapes follow ``nn.Linear``: a weight is ``(d_out, d_in)``
and ``d_in`` (K) is the reduction axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class QuantTensor:
    """A symmetric, uniformly quantised matrix with grouped scales along its columns.

    Dequantised value: ``w[i, j] = q[i, j] * scale[i % rows, j // group_size] / in_scale[j]``.

    Attributes:
        q: int8 ``(rows, cols)``, values in ``[-2**(bits-1), 2**(bits-1) - 1]``; pruned entries are 0.
        scale: fp32 ``(1, 1)`` for one scale per tensor (SLiM-Quant) or ``(rows, ceil(cols / g))``
            for group AbsMax (``g == cols`` is per-channel).
        group_size: columns per scale group (``cols`` for per-tensor / per-channel).
        bits: bit width, 2..8.
        in_scale: optional fp32 ``(cols,)`` per-input-channel divisor (SLiM-Quant^O salient
            channels are multiplied by ``s`` before quantisation and divided back after).
    """

    q: torch.Tensor
    scale: torch.Tensor
    group_size: int
    bits: int
    in_scale: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Returns the dense ``(rows, cols)`` matrix in ``dtype`` (computed in fp32)."""
        w = self.q.to(torch.float32, copy=True)  # a fresh tensor: scaled in place
        return scale_groups_(w, self.scale, self.group_size, self.in_scale).to(dtype)


def scale_groups_(
    w: torch.Tensor, scale: torch.Tensor, group_size: int, in_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``w[i, j] *= scale[i, j // group_size]`` (then ``/= in_scale[j]``) in place; returns ``w``.

    ``w`` fp32 ``(rows, cols)`` holding codes; ``scale`` ``(1, 1)`` (one scale for the tensor)
    or ``(rows | 1, ceil(cols / group_size))``. Whole groups multiply through a
    ``(rows, groups, group_size)`` view (no expanded scale matrix), a last partial group apart:
    per element the same fp32 product as multiplying by the expanded scales.
    """
    rows, cols = w.shape
    s = scale.to(torch.float32)
    if tuple(s.shape) == (1, 1):
        w.mul_(s)
    else:
        gs = group_size
        full = min(cols // gs, s.shape[1])
        if full:
            w[:, : full * gs].view(rows, full, gs).mul_(s[:, :full, None])
        if full * gs < cols:
            w[:, full * gs :].mul_(s[:, full : full + 1])
    if in_scale is not None:
        w.div_(in_scale.to(torch.float32).reshape(1, -1))
    return w


def group_sums(x: torch.Tensor, shape: torch.Size, group_size: int) -> torch.Tensor:
    """The adjoint of ``scale_groups_``'s scale product: sums of ``x (rows, cols)`` over each
    scale group, shaped like the scales (``(1, 1)`` or ``(rows, ceil(cols / group_size))``)."""
    if tuple(shape) == (1, 1):
        return x.sum().reshape(1, 1)
    rows, cols = x.shape
    full = min(cols // group_size, shape[1])
    parts = [x[:, : full * group_size].reshape(rows, full, group_size).sum(-1)] if full else []
    if full * group_size < cols:
        parts.append(x[:, full * group_size :].sum(-1, keepdim=True))
    return torch.cat(parts, dim=1)


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input, accumulated in fp32.

    Attributes:
        sq_sum: ``(d_in,)`` sum over all calibration tokens of ``x_j ** 2``.
        abs_sum: ``(d_in,)`` sum over all calibration tokens of ``|x_j|``.
        n_tokens: number of tokens accumulated.
        hessian: optional ``(d_in, d_in)`` sum of ``x x^T`` (only when a method asks for it).
            Linears fed the same input (q/k/v, gate/up) may share one tensor: never modify it
            (except SparseGPT under ``cache["consume_hessian"]``, see ``core.sparsegpt``).
        cache: work derived from ``hessian`` alone (SparseGPT's inverse factor), shared by every
            linear that shares the Hessian and by the re-fit of the same linear.
        samples: optional fp32 ``(n, d_in)`` calibration input rows (a strided subset, for
            quantisers that score a layer's real outputs: ``CompressSpec.needs_samples``).
    """

    sq_sum: torch.Tensor
    abs_sum: torch.Tensor
    n_tokens: int
    hessian: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def channel_stat(self, kind: Literal["sq", "abs"] = "sq") -> torch.Tensor:
        """Per-input-channel statistic: mean ``x_j^2`` (Wanda's) or mean ``|x_j|``, fp32 ``(d_in,)``."""
        total = self.sq_sum if kind == "sq" else self.abs_sum
        return total.to(torch.float32) / max(self.n_tokens, 1)


@dataclass(frozen=True)
class QuantSpec:
    """How the (sparse) weight is quantised.

    method: ``none`` (keep fp32), ``slim_quant`` (one scale per tensor, error-minimising alpha) or
    ``absmax`` (group AbsMax round-to-nearest). ``group_size`` applies to absmax (-1 = per-channel).
    ``error_model`` applies to slim_quant: ``reference`` (floor, step alpha/2^b as in the reference
    code) or ``exact`` (true rounding to the grid). ``outlier_ratio`` > 0 enables SLiM-Quant^O.
    ``spqr`` and ``slim_llm`` (asymmetric groups of ``group_size`` columns inside their own GPTQ
    pass, ``core.spqr`` / ``core.slim_llm``) read the fields below the first six.
    """

    method: str = "slim_quant"  # a key of core.registry.QUANTIZERS
    bits: int = 4
    group_size: int = 128
    error_model: Literal["reference", "exact"] = "reference"
    outlier_ratio: float = 0.0
    outlier_scale: float = 2.0
    # the quantisers with their own GPTQ pass (spqr, slim_llm; core.gptq_group):
    damp: float = 0.01  # relative damping of H (SpQR's published configs: 1.0)
    act_order: bool = False  # columns by decreasing diag(H), permutation stored (spqr)
    blocksize: int = 128  # GPTQ lazy-update block
    stat_bits: int | None = None  # spqr: bits of the second-level scale/zero codes (null: fp16)
    stat_group: int = 16  # spqr: beta2, rows per second-level group
    tau: float = 0.2  # spqr: relative outlier threshold
    tau_min: float = 0.05  # spqr: lower end of the target_bpw search
    target_bpw: float | None = None  # spqr: search tau per layer for this bits/weight budget
    sqc_lambda: float = 1.0  # slim_llm: extra weight of salient weights in the range search
    kl_tokens: int = 2048  # slim_llm: calibration tokens of the bit-allocation KL objective


@dataclass(frozen=True)
class SparsitySpec:
    """Sparsity pattern: ``dense``, ``nm`` (N of every M along d_in) or ``unstructured`` (per row)."""

    pattern: Literal["dense", "nm", "unstructured"] = "nm"
    n: int = 2
    m: int = 4
    ratio: float = 0.5

    @property
    def density(self) -> float:
        if self.pattern == "dense":
            return 1.0
        if self.pattern == "nm":
            return self.n / self.m
        return 1.0 - self.ratio


@dataclass(frozen=True)
class PrunerSpec:
    """How the mask is chosen.

    method: ``magnitude`` (|W|), ``wanda`` (|W| * sqrt(stat)) or ``sparsegpt`` (Hessian-based with
    weight updates; ``joint_quant`` runs OPTQ quantisation in the same column loop using the
    QuantSpec's bits and group_size, -1 = per-channel as in the reference).
    order: ``mask_then_quant`` (reference: mask from full-precision W) or ``quant_then_mask``.
    """

    method: str = "wanda"  # a key of core.registry.PRUNERS
    order: Literal["mask_then_quant", "quant_then_mask"] = "mask_then_quant"
    blocksize: int = 128
    damp: float = 0.01
    joint_quant: bool = False


@dataclass(frozen=True)
class LowRankSpec:
    """Low-rank adapters ``W ~= W_c + (L R)^T``.

    method: ``none``, ``slim`` (saliency-scaled SVD) or ``naive`` (plain SVD).
    rank = round(rank_ratio * min(d_in, d_out)) with ``rank_rounding`` to ``rank_multiple``.
    svd: ``exact`` or ``randomized`` (oversample / niter power iterations).
    split: ``left`` (all singular values in L, reference) or ``balanced`` (sqrt(S) on both sides).
    refit: re-fit the sparse part after the adapters (reference, default on); ``refit_rounds`` > 1
    alternates adapters and re-fit. ``alternate`` = N > 0 runs N rounds before those in which the
    pruner re-picks the mask on ``W - L R`` (HASSLE-free alternation: the sparse part and the
    rank fit take turns, each solving its own subproblem with the other fixed). ``permute``:
    free input-channel permutations of N:M-pruned linears (``compress.permute``); ``auto``: on
    for an N:M pattern, off otherwise.
    quant_bits: None keeps adapters in floating point; otherwise AbsMax with ``quant_group_size``
    groups along each matmul's reduction axis. ``quant_before_refit`` quantises the adapters before
    the final re-fit so the sparse part compensates their error. ``quant_in_scale`` quantises each
    adapter in its activation-scaled domain: ``L^T`` columns are multiplied by the input channels'
    RMS ``sqrt(stat)`` and ``R^T`` columns by the RMS of ``x L`` (diagonal estimate) before AbsMax,
    and the stored ``QuantTensor.in_scale`` divides them back (costs ``d_in + r`` fp16 values).
    stat: which channel statistic gives the saliency (``sq`` -> s = sqrt(mean x^2), ``abs``).
    fit: ``diag`` weighs the residual by the saliency (the paper's SLiM-LoRA); ``whitened`` by
    the full input covariance (EoRA-style: the SVD of ``err H^1/2`` minimises the calibration
    outputs' error ``||(err - (L R)^T) X^T||``; needs the layer's Hessian, damped by
    ``fit_damp`` times its mean diagonal).
    """

    method: str = "slim"  # a key of core.registry.ADAPTERS
    rank_ratio: float = 0.1
    rank_rounding: Literal["none", "up", "down"] = "none"
    rank_multiple: int = 1
    svd: Literal["exact", "randomized"] = "exact"
    oversample: int = 16
    niter: int = 2
    split: Literal["left", "balanced"] = "left"
    refit: bool = True
    refit_rounds: int = 1
    alternate: int = 0
    permute: bool | str = False  # True | False | "auto" (on for N:M patterns)
    quant_bits: int | None = 4
    quant_group_size: int = 128
    quant_before_refit: bool = False
    stat: Literal["sq", "abs"] = "sq"
    quant_in_scale: bool = False
    fit: Literal["diag", "whitened"] = "diag"
    fit_damp: float = 0.01


@dataclass(frozen=True)
class CompressSpec:
    """Everything ``compress_linear`` needs; one field per axis."""

    quant: QuantSpec = field(default_factory=QuantSpec)
    sparsity: SparsitySpec = field(default_factory=SparsitySpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    lowrank: LowRankSpec = field(default_factory=LowRankSpec)

    @property
    def needs_hessian(self) -> bool:
        """True when the pruner (``core.registry.PRUNERS``) or the quantiser (``QUANTIZERS``)
        needs ``X^T X`` for this spec."""
        from slim_lightning.core.registry import PRUNERS, QUANTIZERS

        entry = PRUNERS.get(self.pruner.method)
        quant = QUANTIZERS.get(self.quant.method)
        return (
            bool(entry and entry.needs_hessian)
            and (self.sparsity.pattern != "dense" or self.pruner.joint_quant)
        ) or bool(quant and quant.needs_hessian)

    @property
    def needs_samples(self) -> int:
        """Calibration input rows the quantiser reads (``LayerStats.samples``), 0 for none."""
        from slim_lightning.core.registry import QUANTIZERS

        quant = QUANTIZERS.get(self.quant.method)
        return int(self.quant.kl_tokens) if quant and quant.needs_samples else 0

    @property
    def is_identity(self) -> bool:
        """True when this spec changes nothing (the ``dense`` method): dense, unquantised, no
        adapters, no joint OPTQ."""
        from slim_lightning.core.registry import ADAPTERS, PRUNERS

        sp, q, pr, lr = self.sparsity, self.quant, self.pruner, self.lowrank
        return (
            sp.pattern == "dense"
            and q.method == "none"
            and not ADAPTERS.get_entry(lr.method).enabled
            and not (PRUNERS.get_entry(pr.method).joint_quant and pr.joint_quant)
        )


@dataclass
class CompressedLinear:
    """Result of compressing one linear layer.

    Attributes:
        weight: fp32 ``(d_out, d_in)`` effective dense weight ``dequant(weight_q) * mask``.
        weight_q: the quantised sparse weight (q is 0 where pruned), or None when not quantised.
        mask: bool ``(d_out, d_in)`` kept entries, or None when dense.
        lora_l: fp32 ``(d_in, r)`` effective (dequantised when quantised) adapter, or None.
        lora_r: fp32 ``(r, d_out)`` effective adapter, or None.
        lora_l_q: quantised ``L^T`` as ``(r, d_in)`` (groups along d_in, the reduction axis of x @ L).
        lora_r_q: quantised ``R^T`` as ``(d_out, r)`` (groups along r, the reduction axis of (xL) @ R).
        metrics: per-layer diagnostics (errors, sparsity, rank, alpha, bits per weight...).
    """

    weight: torch.Tensor
    weight_q: QuantTensor | None = None
    mask: torch.Tensor | None = None
    lora_l: torch.Tensor | None = None
    lora_r: torch.Tensor | None = None
    lora_l_q: QuantTensor | None = None
    lora_r_q: QuantTensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return 0 if self.lora_l is None else int(self.lora_l.shape[1])

    def effective_weight(self) -> torch.Tensor:
        """fp32 ``(d_out, d_in)`` weight equal to what the layer computes (adapters merged)."""
        w = self.weight
        if self.lora_l is not None and self.lora_r is not None:
            w = w + (self.lora_l @ self.lora_r).T
        return w
