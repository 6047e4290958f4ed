"""The ``nm`` packed format: N:M sparsity along columns (value selection, packing, dequantisation).

``nm`` -- N:M sparse along columns (2:4 is the kernel format; any ``n <= m``, ``cols % m == 0``).
    Each row has ``G = cols / m`` groups; each group stores exactly ``n`` kept values in
    increasing column order (a group with fewer than ``n`` kept entries is filled with its lowest
    unused positions holding code 0), so a row has ``k = G * n`` kept values.

    * ``values``: ``uint8 (rows, ceil(k / 2))`` nibbles (``bits <= 4``), ``int8 (rows, k)``
      (``bits > 4``) or fp32-as-``int32 (rows, k)`` (unquantised). For 2:4, byte ``g`` of a row
      holds the two kept values of group ``g`` (low nibble = lower column).
    * ``meta``: ``uint8 (rows, ceil(k / per_byte))``: each kept value's position inside its group
      (``0 .. m-1``) in ``b = meta_bits(m)`` bits (1 for m=2, 2 for m<=4, 4 for m<=16, else 8),
      ``per_byte = 8 / b`` per byte, LSB first: value ``j`` of a row sits at bits
      ``[b * (j % per_byte), b * (j % per_byte) + b)`` of byte ``j // per_byte``. For 2:4 one byte
      covers two groups: bits 0-1 / 2-3 = positions of group 2i's two values, bits 4-5 / 6-7 =
      group 2i+1's (1 bit of metadata per dense weight).

Codes and fp32 values follow ``formats.bitpack``.
"""

from __future__ import annotations

import torch

from slim_lightning.core.types import scale_groups_
from slim_lightning.formats.bitpack import (
    _bits_f,
    _check_codes,
    _f_bits,
    _pack_codes,
    _unpack_codes,
    meta_bits,
    pack_uint,
    unpack_uint,
)
from slim_lightning.formats.unstructured import _check_mask


def nm_select(
    x: torch.Tensor, mask: torch.Tensor, n: int, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept values and in-group positions of an N:M-sparse matrix (no bit packing).

    Args:
        x: ``(rows, cols)`` values (any dtype), 0 where ``mask`` is False.
        mask: bool ``(rows, cols)``; every group of ``m`` columns has at most ``n`` True.
        n, m: ``0 < n <= m``, ``cols % m == 0``.

    Returns:
        ``(kept, pos)``: ``kept`` ``(rows, cols / m * n)`` of x's dtype, ``pos`` uint8 same shape,
        both in increasing column order inside each group (groups with fewer than ``n`` kept
        entries are filled with their lowest unused positions, value 0).
    """
    _check_mask(x, mask)
    rows, cols = x.shape
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m, got {n}:{m}")
    if cols % m:
        raise ValueError(f"N:M {n}:{m} needs cols % m == 0, got cols={cols}")
    g = mask.reshape(rows, cols // m, m)  # (rows, G, m)
    count = g.sum(-1)
    if bool((count > n).any()):
        bad = int((count > n).sum())
        raise ValueError(f"mask is not {n}:{m} sparse: {bad} groups of {m} keep more than {n}")
    # kept positions score >= m, unused ones m-1-j (lowest unused first); then sort by column
    ar = torch.arange(m, device=x.device)
    score = g.to(torch.int64) * m + (m - 1 - ar)
    pos = torch.topk(score, n, dim=-1).indices.sort(-1).values  # (rows, G, n)
    kept = torch.gather(x.reshape(rows, cols // m, m), -1, pos)  # (rows, G, n)
    return kept.reshape(rows, -1), pos.reshape(rows, -1).to(torch.uint8)


def nm_scatter(kept: torch.Tensor, pos: torch.Tensor, m: int, cols: int) -> torch.Tensor:
    """Inverse of ``nm_select``: ``(rows, k)`` values at positions -> dense ``(rows, cols)``."""
    rows, k = kept.shape
    n_groups = cols // m
    if cols % m or n_groups == 0 or k % n_groups:
        raise ValueError(
            f"nm_scatter: {k} kept values per row do not fit {cols} cols in groups {m}"
        )
    n = k // n_groups
    if pos.shape != kept.shape:
        raise ValueError(f"nm_scatter: pos shape {tuple(pos.shape)} != {tuple(kept.shape)}")
    out = torch.zeros(rows, n_groups, m, dtype=kept.dtype, device=kept.device)
    idx = pos.to(torch.int64).reshape(rows, n_groups, n)  # (rows, G, n)
    if idx.numel() and int(idx.max()) >= m:
        raise ValueError(f"nm_scatter: position >= m={m} in the metadata")
    out.scatter_(-1, idx, kept.reshape(rows, n_groups, n))
    return out.reshape(rows, cols)


def nm_mask_of(pos: torch.Tensor, m: int, cols: int) -> torch.Tensor:
    """bool ``(rows, cols)`` mask of the stored positions ``pos`` uint8 ``(rows, k)``."""
    ones = torch.ones(pos.shape, dtype=torch.bool, device=pos.device)
    return nm_scatter(ones, pos, m, cols)


def pack_nm(q: torch.Tensor, mask: torch.Tensor, n: int, m: int, bits: int = 4) -> dict:
    """Packs N:M-sparse integer codes: nibble values + position metadata (see module docstring).

    Args:
        q: int8 ``(rows, cols)`` codes in the ``bits`` range, 0 where ``mask`` is False.
        mask: bool ``(rows, cols)``, at most ``n`` True per group of ``m`` columns.
        n, m: the pattern (``cols % m == 0``).
        bits: code width (<= 4: nibbles, else int8).

    Returns:
        ``{"values": uint8 (rows, ceil(k/2)) | int8 (rows, k), "meta": uint8 (rows, ceil(k/p))}``
        with ``k = cols / m * n`` kept values per row and ``p = 8 / meta_bits(m)``.
    """
    _check_codes(q, bits)
    kept, pos = nm_select(q, mask, n, m)
    return {"values": _pack_codes(kept, bits), "meta": pack_uint(pos, meta_bits(m), pad=True)}


def unpack_nm(
    values: torch.Tensor, meta: torch.Tensor, n: int, m: int, cols: int, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_nm``.

    Returns:
        ``(q, mask)``: int8 ``(rows, cols)`` codes (0 where not stored) and the bool mask of the
        stored positions (equal to the packed mask whenever every group kept exactly ``n``).
    """
    if cols % m:
        raise ValueError(f"unpack_nm: cols={cols} is not a multiple of m={m}")
    k = cols // m * n
    kept = _unpack_codes(values, bits, k)
    pos = unpack_uint(meta, meta_bits(m), k)
    return nm_scatter(kept, pos, m, cols), nm_mask_of(pos, m, cols)


def _fields_u8(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``unpack_uint`` for the hot path: the same fields (LSB first), with uint8 ops only.

    uint8 ``(rows, n_bytes)`` -> uint8 ``(rows, count)``.
    """
    p = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(p)]  # p x (rows, n_bytes)
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)[:, :count]


def dequant_nm(
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor,
    in_scale: torch.Tensor | None,
    *,
    shape: tuple[int, int],
    n: int,
    m: int,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """fp32 ``(rows, cols)`` dequantised matrix straight from packed N:M codes.

    The fast path of ``PackedWeight.to_dense`` (the lean runtime calls it every forward and
    backward): scales only the kept values, then scatters them; the same fp32 operations per
    element as ``QuantTensor.dequantize`` (``q * scale``, then ``/ in_scale``), so bit-identical.

    Args:
        values, meta: the stored ``values`` / ``meta`` tensors (module docstring).
        scale: fp32 ``(1, 1)`` or ``(rows, ceil(cols / group_size))`` (decoded from its bits).
        in_scale: fp32 ``(cols,)`` per-input-channel divisor (decoded), or None.
        shape: ``(rows, cols)``; n, m: the pattern; bits: code width; group_size: scale groups.
    """
    rows, cols = shape
    if (n, m, bits) == (2, 4, 4):  # the kernel format: a table lookup per group
        return _dequant_24(values, meta, scale, in_scale, rows, cols, group_size)
    return _dequant_scatter(values, meta, scale, in_scale, shape, n, m, bits, group_size)


def _dequant_scatter(values, meta, scale, in_scale, shape, n, m, bits, group_size) -> torch.Tensor:
    """``dequant_nm``'s general path: any N:M and code width (scales the kept values, scatters)."""
    rows, cols = shape
    n_groups = cols // m
    k = n_groups * n
    if bits <= 4:  # nibbles: unpacked with uint8 ops, sign-extended as ((v ^ 8) - 8)
        kept = (_fields_u8(values, 4, k) ^ 8).to(torch.float32) - 8.0  # (rows, k)
    else:
        kept = _unpack_codes(values, bits, k).to(torch.float32)
    pos = _fields_u8(meta, meta_bits(m), k).to(torch.int64)  # (rows, k)
    col = pos + (torch.arange(k, device=pos.device) // n * m)[None, :]  # (rows, k)
    scale = scale.to(torch.float32)
    if tuple(scale.shape) == (1, 1):
        kept = kept * scale
    elif group_size % m == 0:  # whole groups of m per scale: a contiguous expand
        per = group_size // m * n  # kept values per scale group
        kept = kept * scale.repeat_interleave(per, dim=1)[:, :k]
    else:
        kept = kept * torch.gather(scale, 1, col // group_size)
    if in_scale is not None:
        kept = kept / in_scale.to(torch.float32).reshape(-1)[col]
    out = torch.zeros(rows, cols, dtype=torch.float32, device=kept.device)
    out.scatter_(1, col, kept)
    return out


_GROUPS_24: dict[torch.device, torch.Tensor] = {}


def _groups_24(device: torch.device) -> torch.Tensor:
    """int32 ``(4096,)``: the 4 int8 codes of a 2:4 group's dense columns, for every (value
    byte, meta nibble), as the bytes of one int32.

    Entry ``byte * 16 + nibble``: the low / high nibble of ``byte`` (sign-extended codes) at the
    positions ``nibble & 3`` / ``nibble >> 2``, zeros elsewhere (the second value wins when the
    two positions are equal, as the scatter of the general path does)."""
    if device not in _GROUPS_24:
        b = torch.arange(256)
        codes = torch.stack([((b & 15) ^ 8) - 8, ((b >> 4) ^ 8) - 8], -1)  # (256, 2)
        nib = torch.arange(16)
        pos = torch.stack([nib & 3, nib >> 2], -1)  # (16, 2)
        table = torch.zeros(256, 16, 4, dtype=torch.int64)
        for slot in (0, 1):
            hit = (pos[:, slot, None] == torch.arange(4)).to(torch.int64)  # (16, 4)
            table = table * (1 - hit) + codes[:, slot, None, None] * hit
        table = table.to(torch.int8).reshape(4096, 4).contiguous().view(torch.int32)
        _GROUPS_24[device] = table.reshape(4096).to(device)
    return _GROUPS_24[device]


def _dequant_24(
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor,
    in_scale: torch.Tensor | None,
    rows: int,
    cols: int,
    group_size: int,
) -> torch.Tensor:
    """``dequant_nm`` for 2:4 with 4-bit codes (the kernel format): one 4-byte table lookup per
    group of 4 columns (``_groups_24``) gives the dense int8 codes, then the scales multiply in
    place (``scale_groups_``). Per kept value the same fp32 operations as the general path
    (bit-identical); the zeros stay zeros for finite scales."""
    n_groups = cols // 4
    nib = torch.stack([meta & 15, meta >> 4], -1).reshape(rows, -1)[:, :n_groups]
    idx = values[:, :n_groups].to(torch.int32) * 16 + nib  # (rows, G)
    codes = _groups_24(values.device).index_select(0, idx.reshape(-1))  # int32 (rows * G,)
    w = codes.view(torch.int8).reshape(rows, cols).to(torch.float32)
    return scale_groups_(w, scale, group_size, in_scale)


# ----------------------------------------------------------------------------------------------
# FORMATS-table entry points (used by ``PackedWeight``)
# ----------------------------------------------------------------------------------------------


def encode(
    x: torch.Tensor, mask: torch.Tensor | None, *, n: int, m: int, bits: int | None
) -> tuple[dict[str, torch.Tensor], int]:
    """``(tensors, nnz)`` of int8 codes ``x`` (``bits``) or fp32 values ``x`` (``bits=None``)."""
    if mask is None:
        raise ValueError("format nm needs a mask")
    if bits is not None:
        rows, cols = x.shape
        return pack_nm(x, mask, n, m, bits), rows * (cols // m) * n
    kept, pos = nm_select(x, mask, n, m)
    t = {"values": _f_bits(kept, torch.float32), "meta": pack_uint(pos, meta_bits(m), pad=True)}
    return t, kept.numel()


def decode(
    t: dict[str, torch.Tensor], shape: tuple[int, int], *, n: int, m: int, bits: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(rows, cols)`` int8 codes (fp32 values when ``bits`` is None) and the mask."""
    cols = shape[1]
    if bits is not None:
        return unpack_nm(t["values"], t["meta"], n, m, cols, bits)
    vals = _bits_f(t["values"], torch.float32)
    pos = unpack_uint(t["meta"], meta_bits(m), vals.shape[1])
    return nm_scatter(vals, pos, m, cols), nm_mask_of(pos, m, cols)
