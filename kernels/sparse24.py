"""Triton kernels for SLiM layers: 2:4-sparse 4-bit matmul with the adapter folded in.

A SLiM layer ``y = x (Q(W)*M)^T + (x L) R + bias`` runs as two launches:

1. ``dense4_matmul``: ``t = x L`` from the packed 4-bit ``L^T (r, d_in)`` (dense nibbles, AbsMax
   groups along d_in).
2. ``slim24_matmul``: ``y = x W^T + t R + bias`` from the packed 2:4 weight and the packed 4-bit
   ``R^T (d_out, r)``; the adapter is just more reduction steps (``[x | t] [W^T ; R]``) in the
   same program, dequantisation happens in registers.

Storage follows ``slim_lightning.formats`` (2:4: byte ``g`` of a row holds group ``g``'s two kept
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

from .jit import SMALL_M, _dense4_kernel, _slim24_kernel

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
