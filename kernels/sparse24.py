"""Triton kernels for SLiM layers: 2:4-sparse 4-bit matmul with the adapter folded in.

A SLiM layer ``y = x (Q(W)*M)^T + (x L) R + bias`` runs as two launches:

1. ``dense4_matmul``: ``t = x L`` from the packed 4-bit ``L^T (r, d_in)`` (dense nibbles, AbsMax
   groups along d_in).
2. ``slim24_matmul``: ``y = x W^T + t R + bias`` from the packed 2:4 weight and the packed 4-bit
   ``R^T (d_out, r)``; the adapter is just more reduction steps (``[x | t] [W^T ; R]``) in the
   same program, dequantisation happens in registers.

Storage follows ``slim_lightning.packed`` (2:4: byte ``g`` of a row holds group ``g``'s two kept
codes, two's-complement nibbles, low = lower column; metadata byte ``i`` holds the four 2-bit
positions of groups ``2i`` and ``2i+1``, LSB first).

Each kernel has two paths selected by a constexpr:

* small batch (M <= 8, decode; ``USE_DOT=False``): GEMV-style. For the sparse weight each kept
  value's 2-bit index picks its activation (``x[m, 4g + pos]``, a gather from the cached
  activation row), so only the kept half of the MACs is done; fp32 multiply-accumulate.
* larger batch (``USE_DOT=True``, M >= 16): the 2:4 tile is expanded to dense in registers, four
  ``tl.dot`` s per tile (one per position in the group), fp32 accumulation.

Per-tensor scales (SLiM-Quant) are applied once to the fp32 accumulator (``tl.dot`` then sees the
exact integer codes); grouped scales (AbsMax) and SLiM-Quant^O ``in_scale`` are applied per
element before the product.

The launchers check every shape, dtype, stride and group size BEFORE launching: out-of-bounds
loads in Triton's interpreter silently return garbage. With ``TRITON_INTERPRET=1`` (read at call
time) one fixed config is used; on a GPU the configs are autotuned. Triton itself decides
interpreter vs compiler when this module is imported, so set the variable before importing it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

SMALL_M = 8  # batches up to this use the GEMV-style path

# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _acc_dense4(
    acc,
    a_ptr,
    stride_am,
    offs_m,
    M,
    w_ptr,
    stride_wn,
    s_ptr,
    stride_sn,
    ins_ptr,
    offs_n,
    N,
    KDIM,
    GROUP,
    HAS_INS: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    USE_DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """acc (BM, BN) += a (M, KDIM) @ dequant(W (N, KDIM))^T: nibbles, scales
    (N, ceil(KDIM/GROUP)), optional column divisor ins (KDIM,)."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_n = offs_n.to(tl.int64)  # int64 offsets: M x stride overflows int32 past ~2^31
    rows_m = offs_m.to(tl.int64)
    n_bytes = (KDIM + 1) // 2
    for kb in range(0, n_bytes, BLOCK_KB):
        offs_b = kb + tl.arange(0, BLOCK_KB)  # (BKB,) byte = columns 2b (low), 2b+1 (high)
        k_lo = offs_b * 2
        k_hi = k_lo + 1
        ok_lo = k_lo < KDIM
        ok_hi = k_hi < KDIM  # the high nibble of an odd row's last byte is padding
        wmask = mask_n[:, None] & ok_lo[None, :]
        wb = tl.load(w_ptr + rows_n[:, None] * stride_wn + offs_b[None, :], mask=wmask, other=0).to(
            tl.int32
        )  # (BN, BKB)
        q_lo = ((wb & 0xF) ^ 8) - 8  # sign-extend two's-complement nibbles
        q_hi = ((wb >> 4) ^ 8) - 8
        s_row = s_ptr + rows_n[:, None] * stride_sn
        s_lo = tl.load(s_row + (k_lo // GROUP)[None, :], mask=wmask, other=0.0).to(tl.float32)
        s_hi = tl.load(
            s_row + (k_hi // GROUP)[None, :], mask=mask_n[:, None] & ok_hi[None, :], other=0.0
        ).to(tl.float32)
        w_lo = q_lo.to(tl.float32) * s_lo  # (BN, BKB)
        w_hi = q_hi.to(tl.float32) * s_hi
        if HAS_INS:
            w_lo = w_lo / tl.load(ins_ptr + k_lo, mask=ok_lo, other=1.0).to(tl.float32)[None, :]
            w_hi = w_hi / tl.load(ins_ptr + k_hi, mask=ok_hi, other=1.0).to(tl.float32)[None, :]
        a_row = a_ptr + rows_m[:, None] * stride_am
        a_lo = tl.load(a_row + k_lo[None, :], mask=mask_m[:, None] & ok_lo[None, :], other=0.0)
        a_hi = tl.load(a_row + k_hi[None, :], mask=mask_m[:, None] & ok_hi[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(a_lo, tl.trans(w_lo.to(a_lo.dtype)), input_precision=PREC)
            acc += tl.dot(a_hi, tl.trans(w_hi.to(a_hi.dtype)), input_precision=PREC)
        else:
            prod = a_lo.to(tl.float32)[:, None, :] * w_lo[None, :, :]  # (BM, BN, BKB)
            prod += a_hi.to(tl.float32)[:, None, :] * w_hi[None, :, :]
            acc += tl.sum(prod, axis=2)
    return acc


@triton.jit
def _dense4_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    ins_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    GROUP,
    HAS_INS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    USE_DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _acc_dense4(
        acc,
        x_ptr,
        stride_xm,
        offs_m,
        M,
        w_ptr,
        stride_wn,
        s_ptr,
        stride_sn,
        ins_ptr,
        offs_n,
        N,
        K,
        GROUP,
        HAS_INS,
        BLOCK_KB,
        USE_DOT,
        PREC,
    )
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _slim24_kernel(
    x_ptr,
    v_ptr,
    meta_ptr,
    s_ptr,
    ins_ptr,
    t_ptr,
    rv_ptr,
    rs_ptr,
    rins_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_vn,
    stride_metan,
    stride_sn,
    stride_tm,
    stride_rvn,
    stride_rsn,
    stride_ym,
    W_GROUP,
    R_GROUP,
    SCALE_MODE: tl.constexpr,  # 0: per-tensor, on the accumulator; 1: grouped, per element
    HAS_IN_SCALE: tl.constexpr,
    HAS_ADAPTER: tl.constexpr,
    HAS_R_INS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_RB: tl.constexpr,
    USE_DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)  # int64 offsets: M x stride overflows int32 past ~2^31
    rows_n = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_groups = K // 4
    for g0 in range(0, n_groups, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)  # (BG,) groups of 4 columns
        nmask = mask_n[:, None] & (offs_g < n_groups)[None, :]  # (BN, BG)
        vb = tl.load(v_ptr + rows_n[:, None] * stride_vn + offs_g[None, :], mask=nmask, other=0).to(
            tl.int32
        )  # one byte = the group's two kept codes
        mb = tl.load(
            meta_ptr + rows_n[:, None] * stride_metan + (offs_g // 2)[None, :], mask=nmask, other=0
        ).to(tl.int32)  # one byte = positions of groups 2i, 2i+1
        nib = (mb >> ((offs_g & 1) * 4)[None, :]) & 0xF
        p0 = nib & 3
        p1 = nib >> 2
        w0 = (((vb & 0xF) ^ 8) - 8).to(tl.float32)  # (BN, BG)
        w1 = (((vb >> 4) ^ 8) - 8).to(tl.float32)
        col0 = offs_g[None, :] * 4 + p0  # (BN, BG) column of each kept value
        col1 = offs_g[None, :] * 4 + p1
        if SCALE_MODE == 1:
            s = tl.load(
                s_ptr + rows_n[:, None] * stride_sn + (offs_g * 4 // W_GROUP)[None, :],
                mask=nmask,
                other=0.0,
            ).to(tl.float32)
            w0 = w0 * s
            w1 = w1 * s
        if HAS_IN_SCALE:
            w0 = w0 / tl.load(ins_ptr + col0, mask=nmask, other=1.0).to(tl.float32)
            w1 = w1 / tl.load(ins_ptr + col1, mask=nmask, other=1.0).to(tl.float32)
        if USE_DOT:
            # expand the 2:4 tile to dense, one position j of every group per dot
            for j in tl.static_range(4):
                wj = tl.where(p0 == j, w0, 0.0) + tl.where(p1 == j, w1, 0.0)  # (BN, BG)
                xj = tl.load(
                    x_ptr + rows_m[:, None] * stride_xm + (offs_g * 4 + j)[None, :],
                    mask=mask_m[:, None] & (offs_g < n_groups)[None, :],
                    other=0.0,
                )  # (BM, BG)
                acc += tl.dot(xj, tl.trans(wj.to(xj.dtype)), input_precision=PREC)
        else:
            # each kept value's index picks its activation: x[m, col]
            x_row = x_ptr + rows_m[:, None, None] * stride_xm
            xmask = mask_m[:, None, None] & nmask[None, :, :]
            x0 = tl.load(x_row + col0[None, :, :], mask=xmask, other=0.0).to(tl.float32)
            x1 = tl.load(x_row + col1[None, :, :], mask=xmask, other=0.0).to(tl.float32)
            acc += tl.sum(x0 * w0[None, :, :] + x1 * w1[None, :, :], axis=2)  # (BM, BN)
    if SCALE_MODE == 0:
        acc = acc * tl.load(s_ptr).to(tl.float32)
    if HAS_ADAPTER:
        # the adapter's second matmul as extra reduction steps: acc += t (M, R) @ dq(R^T)^T
        acc = _acc_dense4(
            acc,
            t_ptr,
            stride_tm,
            offs_m,
            M,
            rv_ptr,
            stride_rvn,
            rs_ptr,
            stride_rsn,
            rins_ptr,
            offs_n,
            N,
            R,
            R_GROUP,
            HAS_R_INS,
            BLOCK_RB,
            USE_DOT,
            PREC,
        )
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rows_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_m(m: int) -> int:
    return (
        triton.next_power_of_2(m) if m <= SMALL_M else min(64, max(16, triton.next_power_of_2(m)))
    )


def _slim24_configs(small: bool) -> list[triton.Config]:
    if small:
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_G": bg, "BLOCK_RB": 32}, num_warps=w)
            for bn in (8, 16, 32)
            for bg in (32, 64, 128)
            for w in (2, 4)
        ]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_G": bg, "BLOCK_RB": 32}, num_warps=w, num_stages=s)
        for bn in (32, 64, 128)
        for bg in (16, 32)
        for w in (4, 8)
        for s in (2, 3)
    ]


def _dense4_configs(small: bool) -> list[triton.Config]:
    bns = (8, 16, 32) if small else (32, 64)
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_KB": kb}, num_warps=w)
        for bn in bns
        for kb in (32, 64, 128)
        for w in (2, 4)
    ]


# Largest fp32 register tile a config may hold per program: the GEMV path materialises
# (BLOCK_M, BLOCK_N, BLOCK_G) products, the dot path (BLOCK_N, BLOCK_G) expanded weights plus
# (BLOCK_M, BLOCK_N) accumulators. Past ~8K fp32 values per program the registers spill.
MAX_TILE = 8192


def prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of the autotuner: drops configs whose register tile would spill
    for this launch's ``BLOCK_M`` (keeps at least the smallest one)."""
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))

    def tile(c) -> int:
        kw = c.kwargs
        inner = kw.get("BLOCK_G", kw.get("BLOCK_KB", 0))
        if bm <= SMALL_M:
            return bm * kw["BLOCK_N"] * inner
        return kw["BLOCK_N"] * inner + bm * kw["BLOCK_N"]

    kept = [c for c in configs if tile(c) <= MAX_TILE]
    return kept or [min(configs, key=tile)]


# Fixed configs: the interpreter (small tiles; autotuning several configs crashes there) and
# SLIM_KERNEL_FIXED=1 on a GPU (autotuning off: one compile per path, for tests and first
# measurements)
_FIXED_SLIM24 = {"BLOCK_N": 16, "BLOCK_G": 16, "BLOCK_RB": 16}
_FIXED_DENSE4 = {"BLOCK_N": 16, "BLOCK_KB": 32}
_FIXED_GPU = {
    ("slim24", True): {"BLOCK_N": 16, "BLOCK_G": 64, "BLOCK_RB": 32, "num_warps": 4},
    ("slim24", False): {"BLOCK_N": 64, "BLOCK_G": 32, "BLOCK_RB": 32, "num_warps": 4},
    ("dense4", True): {"BLOCK_N": 16, "BLOCK_KB": 64, "num_warps": 4},
    ("dense4", False): {"BLOCK_N": 64, "BLOCK_KB": 64, "num_warps": 4},
}


def fixed_mode() -> bool:
    """``SLIM_KERNEL_FIXED=1``: no autotuning on a GPU (read at call time)."""
    return os.environ.get("SLIM_KERNEL_FIXED", "0") == "1"


@functools.cache
def _autotuned(name: str, small: bool):
    """Autotuned wrapper of a kernel (built on first use on a GPU, one per path).

    The key is the M bucket (``BLOCK_M``: 1, 2, 4, 8, 16, 32, 64), N and K, so a new prompt
    length re-uses the bucket's tuning instead of re-tuning; ``prune_configs`` drops configs
    that would spill for the bucket.
    """
    kernel = _slim24_kernel if name == "slim24" else _dense4_kernel
    configs = _slim24_configs(small) if name == "slim24" else _dense4_configs(small)
    return triton.autotune(
        configs=configs,
        key=["BLOCK_M", "N", "K"],
        prune_configs_by={"early_config_prune": prune_configs},
    )(kernel)


def _get_kernel(name: str, small: bool):
    """``(kernel, fixed launch kwargs)``: the jit kernel with a fixed config under the
    interpreter or with ``SLIM_KERNEL_FIXED=1``, else the autotuned kernel."""
    jit = {"slim24": _slim24_kernel, "dense4": _dense4_kernel}[name]
    if _interpreting():
        return jit, dict(_FIXED_SLIM24 if name == "slim24" else _FIXED_DENSE4)
    if fixed_mode():
        return jit, dict(_FIXED_GPU[(name, small)])
    return _autotuned(name, small), {}


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float16, torch.float32)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_tensor(name: str, t: torch.Tensor, shape: tuple, dtypes: tuple, device) -> None:
    _check(
        tuple(t.shape) == tuple(shape),
        f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}",
    )
    _check(t.dtype in dtypes, f"{name}: expected dtype in {dtypes}, got {t.dtype}")
    _check(t.is_contiguous(), f"{name}: must be contiguous")
    _check(t.device == device, f"{name}: on {t.device}, expected {device}")


def _check_scale(name: str, s: torch.Tensor, rows: int, cols: int, group: int, device) -> None:
    _check(group >= 1, f"{name}: group size must be >= 1, got {group}")
    n_groups = -(-cols // group)
    _check(
        tuple(s.shape) == (rows, n_groups),
        f"{name}: expected shape ({rows}, {n_groups}) for {cols} columns in groups of {group}, "
        f"got {tuple(s.shape)}",
    )
    _check_tensor(name, s, s.shape, _SCALE_DTYPES, device)


def dense4_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    k: int,
    in_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W)^T`` for a dense 4-bit ``W (N, k)`` (packed nibbles, grouped scales).

    Args:
        x: ``(M, k)`` fp16 / bf16 / fp32, contiguous.
        values: uint8 ``(N, ceil(k / 2))`` two's-complement nibbles (``packed`` dense format).
        scale: fp16 / fp32 ``(N, ceil(k / group_size))`` (the logical dtype: ``.view`` the
            stored bit patterns first).
        group_size: columns per scale group.
        k: number of columns of W.
        in_scale: optional fp16 / fp32 ``(k,)`` column divisor (``QuantTensor.in_scale``).

    Returns:
        ``(M, N)`` in x's dtype (fp32 accumulation).
    """
    _check(x.dim() == 2, f"x: expected (M, K), got shape {tuple(x.shape)}")
    m, n = x.shape[0], values.shape[0]
    dev = x.device
    _check_tensor("x", x, (m, k), _ACT_DTYPES, dev)
    _check_tensor("values", values, (n, (k + 1) // 2), (torch.uint8,), dev)
    _check_scale("scale", scale, n, k, group_size, dev)
    if in_scale is not None:
        _check_tensor("in_scale", in_scale, (k,), _SCALE_DTYPES, dev)
    y = torch.empty(m, n, dtype=x.dtype, device=dev)
    if m == 0 or n == 0:
        return y
    small = m <= SMALL_M
    kernel, fixed = _get_kernel("dense4", small)
    bm = _block_m(m)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, bm))

    kernel[grid](
        x,
        values,
        scale,
        values if in_scale is None else in_scale,  # never read without HAS_INS
        y,
        m,
        n,
        k,
        x.stride(0),
        values.stride(0),
        scale.stride(0),
        y.stride(0),
        group_size,
        HAS_INS=in_scale is not None,
        BLOCK_M=bm,
        USE_DOT=not small,
        PREC="ieee" if x.dtype == torch.float32 else "tf32",
        **fixed,
    )
    return y


def slim24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    *,
    in_scale: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    r_values: torch.Tensor | None = None,
    r_scale: torch.Tensor | None = None,
    r_group_size: int = 0,
    r_in_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (Q(W)*M)^T [+ t @ dequant(R^T)^T] [+ bias]`` for a 2:4-sparse 4-bit weight.

    Args:
        x: ``(M, K)`` fp16 / bf16 / fp32, contiguous; ``K % 4 == 0``.
        values: uint8 ``(N, K / 4)`` kept codes (one byte per group of 4 columns).
        meta: uint8 ``(N, ceil(K / 8))`` 2-bit positions.
        scale: fp16 / fp32 ``(1, 1)`` per-tensor, or ``(N, ceil(K / group_size))`` grouped with
            ``group_size % 4 == 0``.
        group_size: columns per scale group (ignored for a per-tensor scale).
        in_scale: optional fp16 / fp32 ``(K,)`` SLiM-Quant^O divisor.
        t: optional ``(M, r)`` adapter activations ``x L`` in x's dtype.
        r_values: uint8 ``(N, ceil(r / 2))`` packed ``R^T`` nibbles (with ``t``).
        r_scale: fp16 / fp32 ``(N, ceil(r / r_group_size))``.
        r_in_scale: optional fp16 / fp32 ``(r,)`` column divisor of ``R^T``.
        bias: optional ``(N,)``.

    Returns:
        ``(M, N)`` in x's dtype (fp32 accumulation).
    """
    _check(x.dim() == 2, f"x: expected (M, K), got shape {tuple(x.shape)}")
    m, k = x.shape
    n = values.shape[0]
    dev = x.device
    _check(k % 4 == 0, f"2:4 kernel needs K % 4 == 0, got K={k}")
    _check_tensor("x", x, (m, k), _ACT_DTYPES, dev)
    _check_tensor("values", values, (n, k // 4), (torch.uint8,), dev)
    _check_tensor("meta", meta, (n, (k // 2 + 3) // 4), (torch.uint8,), dev)
    per_tensor = tuple(scale.shape) == (1, 1)
    if per_tensor:
        _check_tensor("scale", scale, (1, 1), _SCALE_DTYPES, dev)
        group_size = k
    else:
        _check(
            group_size % 4 == 0,
            f"grouped scales need group_size % 4 == 0 (whole 2:4 groups), got {group_size}",
        )
        _check_scale("scale", scale, n, k, group_size, dev)
    if in_scale is not None:
        _check_tensor("in_scale", in_scale, (k,), _SCALE_DTYPES, dev)
    has_adapter = t is not None
    r = 0
    if has_adapter:
        _check(
            r_values is not None and r_scale is not None,
            "t given without r_values / r_scale",
        )
        _check(t.dim() == 2, f"t: expected (M, r), got shape {tuple(t.shape)}")
        r = t.shape[1]
        _check_tensor("t", t, (m, r), (x.dtype,), dev)
        _check_tensor("r_values", r_values, (n, (r + 1) // 2), (torch.uint8,), dev)
        _check_scale("r_scale", r_scale, n, r, r_group_size, dev)
        if r_in_scale is not None:
            _check_tensor("r_in_scale", r_in_scale, (r,), _SCALE_DTYPES, dev)
    else:
        _check(r_in_scale is None, "r_in_scale given without t")
    if bias is not None:
        _check_tensor("bias", bias, (n,), _ACT_DTYPES, dev)
    y = torch.empty(m, n, dtype=x.dtype, device=dev)
    if m == 0 or n == 0:
        return y
    small = m <= SMALL_M
    kernel, fixed = _get_kernel("slim24", small)
    bm = _block_m(m)
    dummy = values  # never dereferenced when its HAS_* flag is off

    def grid(meta_):
        return (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(m, bm))

    kernel[grid](
        x,
        values,
        meta,
        scale,
        dummy if in_scale is None else in_scale,
        dummy if t is None else t,
        dummy if r_values is None else r_values,
        dummy if r_scale is None else r_scale,
        dummy if r_in_scale is None else r_in_scale,
        dummy if bias is None else bias,
        y,
        m,
        n,
        k,
        r,
        x.stride(0),
        values.stride(0),
        meta.stride(0),
        scale.stride(0),
        t.stride(0) if has_adapter else 0,
        r_values.stride(0) if has_adapter else 0,
        r_scale.stride(0) if has_adapter else 0,
        y.stride(0),
        group_size,
        max(1, r_group_size),
        SCALE_MODE=0 if per_tensor else 1,
        HAS_IN_SCALE=in_scale is not None,
        HAS_ADAPTER=has_adapter,
        HAS_R_INS=r_in_scale is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        USE_DOT=not small,
        PREC="ieee" if x.dtype == torch.float32 else "tf32",
        **fixed,
    )
    return y
