"""Plain-PyTorch twins of the Triton kernels in ``sparse24.py`` and ``grouped.py`` (same
arguments, same packed tensors). They decode with ``slim_lightning.formats`` (``grouped``: bit by
bit, straight from the format contract) and compute in fp32; the tests compare the kernels with
them on fresh random inputs."""

from __future__ import annotations

import torch

from slim_lightning.formats.bitpack import meta_bits, unpack_int4, unpack_uint
from slim_lightning.formats.nm import nm_scatter


def _expand_scale(scale: torch.Tensor, rows: int, cols: int, group: int) -> torch.Tensor:
    """fp32 ``(rows, cols)`` per-element scale from ``(1, 1)`` or ``(rows, ceil(cols/group))``."""
    s = scale.to(torch.float32)
    if tuple(s.shape) == (1, 1):
        return s.expand(rows, cols)
    return s.repeat_interleave(group, dim=1)[:, :cols]  # (rows, n_groups * group) -> (rows, cols)


def dense4_weight(values, scale, group_size: int, k: int, in_scale=None) -> torch.Tensor:
    """fp32 ``(N, k)`` dequantised dense 4-bit weight ``q * scale / in_scale``."""
    q = unpack_int4(values, k).to(torch.float32)
    w = q * _expand_scale(scale, q.shape[0], k, group_size)
    return w if in_scale is None else w / in_scale.to(torch.float32)[None, :]


def slim24_weight(
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    in_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 ``(N, K)`` dequantised 2:4 weight ``q * scale / in_scale``."""
    n, k = values.shape[0], values.shape[1] * 4
    kept = unpack_int4(values, k // 2)  # (N, K/2) codes, group-major
    pos = unpack_uint(meta, 2, k // 2)  # (N, K/2) positions
    q = nm_scatter(kept, pos, 4, k).to(torch.float32)
    w = q * _expand_scale(scale, n, k, group_size)
    if in_scale is not None:
        w = w / in_scale.to(torch.float32)[None, :]
    return w


def dense4_matmul_ref(x, values, scale, group_size, k, in_scale=None):
    """Twin of ``sparse24.dense4_matmul``."""
    w = dense4_weight(values, scale, group_size, k, in_scale)
    return (x.to(torch.float32) @ w.T).to(x.dtype)


def slim24_matmul_ref(
    x,
    values,
    meta,
    scale,
    group_size,
    *,
    in_scale=None,
    t=None,
    r_values=None,
    r_scale=None,
    r_group_size=0,
    r_in_scale=None,
    bias=None,
):
    """Twin of ``sparse24.slim24_matmul``."""
    y = x.to(torch.float32) @ slim24_weight(values, meta, scale, group_size, in_scale).T
    if t is not None:
        r_t = dense4_weight(r_values, r_scale, r_group_size, t.shape[1], r_in_scale)  # (N, r)
        y = y + t.to(torch.float32) @ r_t.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# the ``grouped`` format (twin of ``grouped.grouped_decode``): a bit-by-bit decode of the contract
# ---------------------------------------------------------------------------------------------


def _stream_fields(stream: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """int64 ``(rows, len(widths))``: the fields of LSB-first per-row bitstreams, bit by bit."""
    rows = stream.shape[0]
    bits = (stream.to(torch.int64)[..., None] >> torch.arange(8)) & 1  # (rows, bytes, 8)
    bits = torch.nn.functional.pad(bits.reshape(rows, -1), (0, 8))
    widths = widths.to(torch.int64)
    start = torch.cumsum(widths, 0) - widths
    out = torch.zeros(rows, widths.numel(), dtype=torch.int64)
    for b in range(8):
        on = (b < widths)[None, :]
        out |= torch.where(on, bits[:, start + b], 0) << b
    return out


def _grouped_stat(pw, meta: dict, name: str, rows: int, n_groups: int) -> torch.Tensor:
    """fp32 ``(rows, n_groups)`` scale / zero: the fp16/fp32 field or the bi-level decode."""
    t = {k: v.cpu() for k, v in pw.tensors.items()}
    as_f = {torch.int16: torch.float16, torch.int32: torch.float32}
    if name in t:
        return t[name].view(as_f[t[name].dtype]).to(torch.float32)
    bits, group = int(meta["stat_bits"]), int(meta["stat_group"])
    q = _stream_fields(t[f"{name}_q"], torch.full((n_groups,), bits)).to(torch.float32)
    s2 = t[f"{name}_s2"].view(torch.float16).to(torch.float32)
    z2 = t[f"{name}_z2"].view(torch.float16).to(torch.float32)
    r = torch.arange(rows) // group
    return (q - z2[r]) * s2[r]


def grouped_weight_ref(pw) -> torch.Tensor:
    """fp32 ``(rows, cols)`` dequantised ``grouped`` weight, decoded per the format contract
    (``kernels/grouped.py``): ``(code - zero) * scale`` at kept positions, 0 elsewhere, plus the
    outliers, columns scattered through ``perm``. On the CPU; the result is moved back."""
    meta = pw.meta()
    layout = meta["layout"]
    rows, cols = (int(x) for x in pw.shape)
    gs = int(pw.group_size)
    n_groups = -(-cols // gs)
    t = {k: v.cpu() for k, v in pw.tensors.items()}
    dev = pw.tensors["codes"].device
    widths = t.get("widths")
    widths = torch.full((n_groups,), int(pw.bits)) if widths is None else widths.to(torch.int64)
    if layout == "nm":
        n, m = int(pw.n), int(pw.m)
        k = cols // m * n
        base = torch.arange(k) // n * m  # first column of each value's m-group
        col = base[None, :] + unpack_uint(t["meta"], meta_bits(m), k).to(torch.int64)
        wv = widths[base // gs]
    else:
        col = torch.arange(cols).expand(rows, cols)
        wv = widths[torch.arange(cols) // gs]
    code = _stream_fields(t["codes"], wv).to(torch.float32)
    scale = _grouped_stat(pw, meta, "scale", rows, n_groups)
    zero = _grouped_stat(pw, meta, "zero", rows, n_groups)
    g = col // gs
    v = (code - torch.gather(zero, 1, g)) * torch.gather(scale, 1, g)
    if layout == "bitmask":
        v.masked_fill_(~unpack_uint(t["bitmask"], 1, cols).bool(), 0.0)
    elif layout == "nm":
        v = torch.zeros(rows, cols).scatter_(1, col, v)
    if "outlier_offsets" in t and t["outlier_vals"].numel():
        counts = t["outlier_offsets"].to(torch.int64).diff()
        o_rows = torch.repeat_interleave(torch.arange(rows), counts)
        o_vals = t["outlier_vals"].view(torch.float16).to(torch.float32)
        v.index_put_((o_rows, t["outlier_cols"].to(torch.int64)), o_vals, accumulate=True)
    if "perm" in t:
        w = torch.empty_like(v)
        w[:, t["perm"].to(torch.int64)] = v
        v = w
    return v.to(dev)


def grouped_matmul_ref(x: torch.Tensor, pw, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Twin of ``grouped.grouped_matmul``: fp32 ``x W^T`` in ``dtype`` (default x's)."""
    y = x.to(torch.float32) @ grouped_weight_ref(pw).T
    return y.to(x.dtype if dtype is None else dtype)
