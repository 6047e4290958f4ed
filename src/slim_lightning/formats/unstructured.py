"""The ``unstructured`` packed format: any mask, as a bitmap plus the kept values.

``unstructured`` -- any mask: a bitmap plus the kept values in row-major order.
    * ``bitmask``: ``uint8 (rows, ceil(cols / 8))``, bit ``j % 8`` (LSB first) of byte ``j // 8``
      is column ``j`` (1 = kept). One bit per dense weight: at 50% density this is cheaper than
      any per-value index (>= 2 bytes each for d_in > 256) and the kept codes still pack densely.
    * ``values``: the ``nnz`` kept values of all rows concatenated in row-major order:
      ``uint8 (ceil(nnz / 2),)`` nibbles (one zero pad nibble when nnz is odd), ``int8 (nnz,)`` or
      fp32-as-``int32 (nnz,)``.
    * ``row_offsets``: ``int32 (rows + 1,)``, row ``i``'s values are ``[off[i], off[i+1])`` of the
      flat value stream (lets a kernel or a row slice find its values without a prefix sum).

Codes and fp32 values follow ``formats.bitpack``.
"""

from __future__ import annotations

import torch

from slim_lightning.formats.bitpack import (
    _bits_f,
    _check_codes,
    _f_bits,
    _pack_codes,
    _unpack_codes,
    pack_uint,
    unpack_uint,
)


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(x.shape)}")
    if mask.dtype != torch.bool or mask.shape != x.shape:
        raise ValueError(
            f"mask must be bool with the matrix's shape {tuple(x.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if bool((x[~mask] != 0).any()):
        raise ValueError("values are nonzero outside the mask (pruned entries must be 0)")


def pack_unstructured(q: torch.Tensor, mask: torch.Tensor, bits: int = 4) -> dict:
    """Packs an arbitrarily masked integer matrix: bitmap + row-major kept codes + row offsets.

    Returns:
        ``{"bitmask": uint8 (rows, ceil(cols/8)), "values": uint8 (ceil(nnz/2),) | int8 (nnz,),
        "row_offsets": int32 (rows + 1,)}``.
    """
    _check_codes(q, bits)
    _check_mask(q, mask)
    return {
        "bitmask": pack_uint(mask, 1, pad=True),
        "values": _pack_codes(q[mask], bits),  # boolean indexing is row-major
        "row_offsets": _row_offsets(mask),
    }


def unpack_unstructured(
    bitmask: torch.Tensor, values: torch.Tensor, cols: int, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_unstructured``: returns int8 ``(rows, cols)`` codes and the bool mask."""
    mask = unpack_uint(bitmask, 1, cols).bool()
    nnz = int(mask.sum())
    q = torch.zeros(mask.shape, dtype=torch.int8, device=bitmask.device)
    q[mask] = _unpack_codes(values, bits, nnz)
    return q, mask


def _row_offsets(mask: torch.Tensor) -> torch.Tensor:
    counts = mask.sum(1, dtype=torch.int64)
    off = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    off[1:] = counts.cumsum(0)
    if int(off[-1]) >= 2**31:
        raise ValueError("unstructured format: more than 2**31 - 1 kept values in one matrix")
    return off.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# FORMATS-table entry points (used by ``PackedWeight``)
# ----------------------------------------------------------------------------------------------


def encode(
    x: torch.Tensor, mask: torch.Tensor | None, *, n: int, m: int, bits: int | None
) -> tuple[dict[str, torch.Tensor], int]:
    """``(tensors, nnz)`` of int8 codes ``x`` (``bits``) or fp32 values ``x`` (``bits=None``)."""
    if mask is None:
        raise ValueError("format unstructured needs a mask")
    if bits is not None:
        return pack_unstructured(x, mask, bits), int(mask.sum())
    _check_mask(x, mask)
    t = {
        "bitmask": pack_uint(mask, 1, pad=True),
        "values": _f_bits(x[mask], torch.float32),
        "row_offsets": _row_offsets(mask),
    }
    return t, int(t["values"].numel())


def decode(
    t: dict[str, torch.Tensor], shape: tuple[int, int], *, n: int, m: int, bits: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(rows, cols)`` int8 codes (fp32 values when ``bits`` is None) and the mask."""
    rows, cols = shape
    if bits is not None:
        return unpack_unstructured(t["bitmask"], t["values"], cols, bits)
    vals = _bits_f(t["values"], torch.float32)
    mask = unpack_uint(t["bitmask"], 1, cols).bool()
    out = torch.zeros(rows, cols, dtype=torch.float32, device=vals.device)
    out[mask] = vals
    return out, mask
