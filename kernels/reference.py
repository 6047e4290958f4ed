"""Plain-PyTorch twins of the Triton kernels in ``sparse24.py`` (same arguments, same packed
tensors). They decode with ``slim_lightning.formats`` and compute in fp32; the tests compare the
kernels with them on fresh random inputs."""

from __future__ import annotations

import torch

from slim_lightning.formats.bitpack import unpack_int4, unpack_uint
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
