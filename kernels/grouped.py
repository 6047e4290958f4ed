"""Triton decode of the packed ``grouped`` weight format (SpQR / SliM-LLM group quantisation).

``grouped_decode(pw, dtype) -> W (rows, cols)`` rebuilds the dequantised matrix of a
``GroupedWeight`` (``slim_lightning.formats.grouped``; anything with ``.tensors``, ``.shape``,
``.bits``, ``.group_size``, ``.n``, ``.m`` and ``.meta()`` works) in two launches:

1. ``_grouped_values_kernel``, a 2-D grid over (row blocks x stored-value blocks). Every row's
   ``codes`` are one LSB-first bitstream; the values are split into *width groups* of ``VPG``
   consecutive values sharing one width (the column groups; ``nm``: ``group_size / m * n`` kept
   values; uniform widths: one group of all values), so value ``t`` starts at bit
   ``wstart[t // VPG] + (t % VPG) * wid[t // VPG]`` (``wstart``: host prefix sums of the widths,
   the same for every row). The program loads the two bytes the field can touch (the second one
   masked at the row end), extracts the code, finds its stored column (``t``; ``nm``:
   ``(t // n) * m + pos`` from the 2-bit / ``meta_bits(m)`` position metadata), dequantises
   ``(code - zero[r, g]) * scale[r, g]`` in fp32 with ``g = column // group_size``, zeroes the
   pruned entries (``bitmask`` layout) and stores at column ``perm[column]`` (or ``column``).
2. ``_grouped_outliers_kernel``, one program per row: walks its CSR outliers in blocks of lanes
   and adds each fp16 value to ``W[r, perm[col]]`` in fp32 (positions are unique per row).

The per-value fp32 operations are exactly those of ``GroupQuant.dequantize`` (subtract, multiply,
mask, add the outlier), so an fp32 decode is bit-identical to the reference. A 16-bit decode is
the fp32 values rounded once: without outliers the values kernel rounds on store; with outliers
the launcher decodes into fp32 and casts (a transient fp32 copy, so the outlier add does not
round twice). bf16 runs only on a GPU (under the interpreter the fp32 decode is cast on the host).

The small per-(row, group) statistics are decoded on the host with torch (fp16 fields, or SpQR's
bi-level codes ``(code - z2[row // stat_group]) * s2``); the kernels take fp32 scale and zero.
``grouped_matmul(x, pw) = x @ grouped_decode(pw, x.dtype).T`` (a torch matmul on the decoded
weight). The launcher checks every tensor before launching (interpreter loads out of bounds
return garbage); one fixed config, no autotuning.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from slim_lightning.formats.bitpack import meta_bits as _meta_bits

LAYOUTS = ("dense", "bitmask", "nm")
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# jit programs
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grouped_values_kernel(
    codes_ptr,
    wid_ptr,
    wstart_ptr,
    scale_ptr,
    zero_ptr,
    bm_ptr,
    meta_ptr,
    perm_ptr,
    out_ptr,
    ROWS,
    K,
    ROW_BYTES,
    VPG,
    GROUP,
    NGROUPS,
    N_KEEP,
    M_GROUP,
    stride_c,
    stride_bm,
    stride_meta,
    stride_o,
    LAYOUT: tl.constexpr,  # 0 dense, 1 bitmask, 2 nm
    META_BITS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Decodes values ``[pid1 * BLOCK_V, +BLOCK_V)`` of rows ``[pid0 * BLOCK_R, +BLOCK_R)``."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_t = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok_r = offs_r < ROWS
    ok_t = offs_t < K
    ok = ok_r[:, None] & ok_t[None, :]
    rows = offs_r.to(tl.int64)  # int64 row offsets: rows x stride may pass 2^31
    # bit offset of every value (the same for every row): width group, then place inside it
    wg = offs_t // VPG
    w = tl.load(wid_ptr + wg, mask=ok_t, other=1)
    bit = tl.load(wstart_ptr + wg, mask=ok_t, other=0) + (offs_t - wg * VPG) * w
    byte = bit >> 3
    shift = bit & 7
    row_c = codes_ptr + rows[:, None] * stride_c
    ok0 = ok & (byte < ROW_BYTES)[None, :]
    ok1 = ok & (byte + 1 < ROW_BYTES)[None, :]  # a field spans at most two bytes
    b0 = tl.load(row_c + byte[None, :], mask=ok0, other=0).to(tl.int32)
    b1 = tl.load(row_c + byte[None, :] + 1, mask=ok1, other=0).to(tl.int32)
    code = ((b0 | (b1 << 8)) >> shift[None, :]) & ((1 << w) - 1)[None, :]  # (BR, BV)
    # stored column of every value
    if LAYOUT == 2:
        mb = tl.load(
            meta_ptr + rows[:, None] * stride_meta + (offs_t // (8 // META_BITS))[None, :],
            mask=ok,
            other=0,
        ).to(tl.int32)
        pos = (mb >> ((offs_t % (8 // META_BITS)) * META_BITS)[None, :]) & ((1 << META_BITS) - 1)
        col = ((offs_t // N_KEEP) * M_GROUP)[None, :] + pos
    else:
        col = offs_t[None, :] + tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.int32)
    g = col // GROUP
    ok_g = ok & (g < NGROUPS)
    st = rows[:, None] * NGROUPS + g
    s = tl.load(scale_ptr + st, mask=ok_g, other=0.0)
    z = tl.load(zero_ptr + st, mask=ok_g, other=0.0)
    v = (code.to(tl.float32) - z) * s
    if LAYOUT == 1:
        kb = tl.load(bm_ptr + rows[:, None] * stride_bm + col // 8, mask=ok, other=0).to(tl.int32)
        v = tl.where(((kb >> (col % 8)) & 1) != 0, v, 0.0)
    if HAS_PERM:
        col = tl.load(perm_ptr + col, mask=ok, other=0)
    tl.store(out_ptr + rows[:, None] * stride_o + col, v.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grouped_outliers_kernel(
    out_ptr,
    offsets_ptr,
    cols_ptr,
    vals_ptr,
    perm_ptr,
    stride_o,
    HAS_PERM: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """``W[r, perm[col]] += val`` (fp32 add) for row ``r = pid``'s CSR outliers."""
    r = tl.program_id(0)
    start = tl.load(offsets_ptr + r)
    end = tl.load(offsets_ptr + r + 1)
    row = out_ptr + r.to(tl.int64) * stride_o
    for i0 in range(start, end, BLOCK_O):
        i = i0 + tl.arange(0, BLOCK_O)
        ok = i < end
        col = tl.load(cols_ptr + i, mask=ok, other=0).to(tl.int32)
        if HAS_PERM:
            col = tl.load(perm_ptr + col, mask=ok, other=0)
        o = tl.load(vals_ptr + i, mask=ok, other=0.0).to(tl.float32)
        cur = tl.load(row + col, mask=ok, other=0.0).to(tl.float32)
        tl.store(row + col, (cur + o).to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# host side: the contract's fields
# ---------------------------------------------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"grouped_decode: {msg}")


def _meta(pw) -> dict:
    return pw.meta() if callable(getattr(pw, "meta", None)) else dict(getattr(pw, "meta", {}))


def _layout(pw, meta: dict | None = None) -> str:
    meta = _meta(pw) if meta is None else meta
    layout = meta.get("layout", getattr(pw, "layout", None))
    _check(layout in LAYOUTS, f"layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    return layout


def _float_field(pw, name: str) -> torch.Tensor:
    """fp32 values of a floating-point field stored as bits (fp16 in int16, fp32 in int32)."""
    if callable(getattr(pw, "float_field", None)):
        return pw.float_field(name).to(torch.float32)
    t = pw.tensors[name]
    return t.view({torch.int16: torch.float16, torch.int32: torch.float32}[t.dtype]).float()


def value_widths(pw) -> torch.Tensor:
    """int64 ``(n_groups,)`` code width of every column group (on the CPU)."""
    cols = pw.shape[1]
    n_groups = math.ceil(cols / pw.group_size)
    w = pw.tensors.get("widths")
    if w is None:
        return torch.full((n_groups,), int(pw.bits), dtype=torch.int64)
    return w.to("cpu", torch.int64).reshape(-1)


def stream_bits(stream: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """int64 ``(rows, len(widths))`` fields of LSB-first per-row bitstreams (torch, host side)."""
    widths = widths.to(stream.device, torch.int64)
    start = torch.cumsum(widths, 0) - widths
    byte, shift = start // 8, start % 8
    s = stream.to(torch.int64)
    pad = torch.nn.functional.pad(s, (0, 1))  # the second byte of the last field may not exist
    word = pad[:, byte] | (pad[:, byte + 1] << 8)
    return (word >> shift) & ((1 << widths) - 1)


def _stat(pw, meta: dict, name: str) -> torch.Tensor:
    """fp32 ``(rows, n_groups)`` ``scale`` / ``zero``: fp16/fp32 field, or the bi-level codes."""
    t = pw.tensors
    if name in t:
        return _float_field(pw, name)
    rows = pw.shape[0]
    n_groups = math.ceil(pw.shape[1] / pw.group_size)
    stat_bits, stat_group = int(meta["stat_bits"]), int(meta["stat_group"])
    q = stream_bits(t[f"{name}_q"], torch.full((n_groups,), stat_bits, dtype=torch.int64))
    s2 = _float_field(pw, f"{name}_s2").repeat_interleave(stat_group, dim=0)[:rows]
    z2 = _float_field(pw, f"{name}_z2").repeat_interleave(stat_group, dim=0)[:rows]
    return (q.to(torch.float32) - z2) * s2


def _plan(pw, layout: str) -> tuple[int, int, torch.Tensor, torch.Tensor, int]:
    """``(k, VPG, wid, wstart, total_bits)``: values per row, values per width group, the int32
    widths and first bits of the width groups (CPU)."""
    rows, cols = pw.shape
    gs = int(pw.group_size)
    widths = value_widths(pw)
    _check(gs >= 1, f"group_size {gs}")
    _check(widths.numel() == math.ceil(cols / gs), f"{widths.numel()} widths for {cols} columns")
    _check(bool(((widths >= 1) & (widths <= 8)).all()), "code widths must be in 1..8")
    uniform = bool((widths == widths[0]).all())
    if layout == "nm":
        n, m = int(pw.n), int(pw.m)
        _check(1 <= n <= m and cols % m == 0, f"n={n}, m={m} do not fit {cols} columns")
        k = cols // m * n
        if uniform:
            vpg, wid = k, widths[:1]
        else:
            _check(gs % m == 0, f"mixed widths need group_size % m == 0 (nm), got {gs}, m={m}")
            vpg, wid = gs // m * n, widths
    else:
        k = cols
        vpg, wid = (k, widths[:1]) if uniform else (gs, widths)
    count = torch.full_like(wid, vpg)
    count[-1] = k - vpg * (wid.numel() - 1)
    wstart = torch.cumsum(wid * count, 0) - wid * count
    total = int((wid * count).sum())
    return k, vpg, wid.to(torch.int32), wstart.to(torch.int32), total


def _tensor(name, t, shape, dtypes, device) -> None:
    _check(t is not None, f"{name} missing")
    _check(tuple(t.shape) == tuple(shape), f"{name}: shape {tuple(t.shape)}, expected {shape}")
    _check(t.dtype in dtypes, f"{name}: dtype {t.dtype}, expected one of {dtypes}")
    _check(t.device == device, f"{name}: on {t.device}, expected {device}")


def grouped_unsupported_reason(meta: dict) -> str | None:
    """Why ``grouped_decode`` cannot decode a weight with this ``meta()`` (no tensor is read,
    nothing syncs), or None."""
    layout, gs, m = meta.get("layout"), int(meta.get("group_size", 0)), int(meta.get("m", 0))
    if layout not in LAYOUTS:
        return f"layout {layout!r}; the decode kernel handles {', '.join(LAYOUTS)}"
    if gs < 1:
        return f"group_size {gs}"
    if layout == "nm" and meta.get("mixed") and (m < 1 or gs % m):
        return f"nm layout with mixed widths needs group_size % m == 0, got {gs}, m={m}"
    return None


# fixed launch configs (no autotuning: one compile per layout / flags)
_BLOCKS_INTERP = {"BLOCK_R": 8, "BLOCK_V": 32}
_BLOCKS_GPU = {"BLOCK_R": 16, "BLOCK_V": 128, "num_warps": 4}
_BLOCK_O = 32


def grouped_decode(pw, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantised ``(rows, cols)`` matrix of a packed grouped weight, in ``dtype``.

    Args:
        pw: a ``GroupedWeight`` (module docstring: the fields it must have).
        dtype: fp32 (bit-identical to the reference decode), fp16 or bf16 (the fp32 values
            rounded once; bf16 only on a GPU, else the fp32 decode is cast on the host).
    """
    _check(dtype in _OUT_DTYPES, f"dtype {dtype}; allowed: {_OUT_DTYPES}")
    meta = _meta(pw)
    layout = _layout(pw, meta)
    t = pw.tensors
    codes = t["codes"]
    dev = codes.device
    rows, cols = (int(x) for x in pw.shape)
    gs = int(pw.group_size)
    n_groups = math.ceil(cols / gs)
    k, vpg, wid, wstart, total = _plan(pw, layout)
    _check(codes.dim() == 2 and codes.shape[0] == rows, f"codes shape {tuple(codes.shape)}")
    _tensor("codes", codes, (rows, codes.shape[1]), (torch.uint8,), dev)
    _check(
        codes.shape[1] * 8 >= total, f"codes hold {codes.shape[1]} bytes a row, need {total} bits"
    )
    codes = codes.contiguous()
    scale = _stat(pw, meta, "scale").to(dev).contiguous()
    zero = _stat(pw, meta, "zero").to(dev).contiguous()
    _tensor("scale", scale, (rows, n_groups), (torch.float32,), dev)
    _tensor("zero", zero, (rows, n_groups), (torch.float32,), dev)
    dummy = codes  # never read when its layout / flag is off
    bm, mt = dummy, dummy
    meta_bits = 1
    if layout == "bitmask":
        bm = t.get("bitmask")
        _tensor("bitmask", bm, (rows, math.ceil(cols / 8)), (torch.uint8,), dev)
        bm = bm.contiguous()
    elif layout == "nm":
        meta_bits = _meta_bits(int(pw.m))
        mt = t.get("meta")
        _tensor("meta", mt, (rows, math.ceil(k / (8 // meta_bits))), (torch.uint8,), dev)
        mt = mt.contiguous()
    perm = t.get("perm")
    if perm is not None:
        _tensor("perm", perm, (cols,), (torch.int32, torch.int64), dev)
        perm = perm.to(torch.int32).contiguous()
    has_out = "outlier_offsets" in t and t["outlier_vals"].numel() > 0
    host_bf16 = dtype == torch.bfloat16 and _interpreting()
    work = torch.float32 if (has_out or host_bf16) else dtype
    alloc = torch.zeros if layout == "nm" else torch.empty  # nm: unkept columns stay 0
    out = alloc(rows, cols, dtype=work, device=dev)
    if rows == 0 or cols == 0:
        return out.to(dtype)
    blocks = _BLOCKS_INTERP if _interpreting() else _BLOCKS_GPU
    grid = (triton.cdiv(rows, blocks["BLOCK_R"]), triton.cdiv(k, blocks["BLOCK_V"]))
    _grouped_values_kernel[grid](
        codes,
        wid.to(dev),
        wstart.to(dev),
        scale,
        zero,
        bm,
        mt,
        dummy if perm is None else perm,
        out,
        rows,
        k,
        codes.shape[1],
        vpg,
        gs,
        n_groups,
        max(1, int(pw.n)),
        max(1, int(pw.m)),
        codes.stride(0),
        bm.stride(0),
        mt.stride(0),
        out.stride(0),
        LAYOUT=LAYOUTS.index(layout),
        META_BITS=meta_bits,
        HAS_PERM=perm is not None,
        **blocks,
    )
    if has_out:
        offs, ocols, ovals = t["outlier_offsets"], t["outlier_cols"], t["outlier_vals"]
        nnz = ovals.numel()
        _tensor("outlier_offsets", offs, (rows + 1,), (torch.int32, torch.int64), dev)
        _tensor("outlier_cols", ocols, (nnz,), (torch.int16, torch.int32), dev)
        _tensor("outlier_vals", ovals, (nnz,), (torch.int16, torch.float16), dev)
        ovals = ovals.view(torch.float16) if ovals.dtype == torch.int16 else ovals
        _grouped_outliers_kernel[(rows,)](
            out,
            offs.to(torch.int32).contiguous(),
            ocols.to(torch.int32).contiguous(),
            ovals.contiguous(),
            dummy if perm is None else perm,
            out.stride(0),
            HAS_PERM=perm is not None,
            BLOCK_O=_BLOCK_O,
        )
    return out if out.dtype == dtype else out.to(dtype)


def grouped_matmul(x: torch.Tensor, pw, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x (..., cols) @ W^T`` with ``W = grouped_decode(pw, dtype or x.dtype)``, in that dtype."""
    w = grouped_decode(pw, x.dtype if dtype is None else dtype)
    return torch.nn.functional.linear(x.to(w.dtype), w)
