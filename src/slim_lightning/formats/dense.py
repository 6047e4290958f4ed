"""The ``dense`` packed format: every entry stored, no sparsity metadata.

``dense`` -- no sparsity.
    * ``values``: ``uint8 (rows, ceil(cols / 2))`` nibbles, ``int8 (rows, cols)`` or
      fp32-as-``int32 (rows, cols)``.

Codes and fp32 values follow ``formats.bitpack``.
"""

from __future__ import annotations

import torch

from slim_lightning.formats.bitpack import _bits_f, _f_bits, _pack_codes, _unpack_codes


def pack_dense(q: torch.Tensor, bits: int = 4) -> dict:
    """Packs int8 codes ``(rows, cols)`` (in the ``bits`` range, unchecked here).

    Returns:
        ``{"values": uint8 (rows, ceil(cols/2)) | int8 (rows, cols)}``.
    """
    return {"values": _pack_codes(q, bits)}


def unpack_dense(values: torch.Tensor, cols: int, bits: int = 4) -> torch.Tensor:
    """Inverse of ``pack_dense``: int8 ``(rows, cols)`` codes."""
    return _unpack_codes(values, bits, cols)


# ----------------------------------------------------------------------------------------------
# FORMATS-table entry points (used by ``PackedWeight``)
# ----------------------------------------------------------------------------------------------


def encode(
    x: torch.Tensor, mask: torch.Tensor | None, *, n: int, m: int, bits: int | None
) -> tuple[dict[str, torch.Tensor], int]:
    """``(tensors, nnz)`` of int8 codes ``x`` (``bits``) or fp32 values ``x`` (``bits=None``).

    A ``mask`` is only checked for quantised codes (they must be 0 outside it); it is not stored.
    """
    rows, cols = x.shape
    if bits is None:
        return {"values": _f_bits(x, torch.float32)}, rows * cols
    if mask is not None and bool((x[~mask] != 0).any()):
        raise ValueError("values are nonzero outside the mask (pruned entries must be 0)")
    return pack_dense(x, bits), rows * cols


def decode(
    t: dict[str, torch.Tensor], shape: tuple[int, int], *, n: int, m: int, bits: int | None
) -> tuple[torch.Tensor, None]:
    """Dense ``(rows, cols)`` int8 codes (fp32 values when ``bits`` is None); no mask."""
    rows, cols = shape
    if bits is None:
        return _bits_f(t["values"], torch.float32).reshape(rows, cols), None
    return unpack_dense(t["values"], cols, bits), None
