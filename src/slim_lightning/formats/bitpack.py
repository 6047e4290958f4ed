"""Bit-level packing and the dtype conventions shared by every packed format.

Integer codes
    ``q`` is a symmetric integer code in ``[-2**(bits-1), 2**(bits-1) - 1]`` (``QuantTensor.q``).
    For ``bits <= 4`` codes are stored as 4-bit TWO'S COMPLEMENT nibbles (``q & 0xF``; decode
    ``((v ^ 8) - 8)``), two per ``uint8``, the FIRST (lower column) value in the LOW nibble:
    ``byte = (q[2k] & 0xF) | ((q[2k+1] & 0xF) << 4)``. A row with an odd number of values is
    padded with one zero nibble. For ``5 <= bits <= 8`` codes are stored unpacked as ``int8``
    (one byte per value; no sub-byte packing for those widths).
    Unquantised matrices (``bits = None``) store their fp32 values.

Variable-width codes (the ``grouped`` format): ``pack_bits`` / ``unpack_bits`` put the values of
each row into one LSB-first bitstream, value ``t`` at ``widths[t]`` bits (1..8) right after value
``t - 1``, zero-padded to whole bytes.

Floating-point fields are stored as their BIT PATTERNS in integer tensors (fp16 -> ``int16``,
fp32 -> ``int32``; decode with ``Tensor.view``), so that ``module.to(torch.bfloat16)`` or
``.half()`` on a model holding these buffers can never re-round a scale. The logical dtype of every
field is recorded in ``meta()``. Scales are stored in fp16 when that is lossless (the quantisers
round scales to fp16-representable values), else in fp32.
"""

from __future__ import annotations

import math

import torch

_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# floating-point fields are stored as integer bit patterns of the same width (see module docstring)
_BITS_DTYPE = {torch.float16: torch.int16, torch.float32: torch.int32}


def pack_uint(x: torch.Tensor, bits: int, pad: bool = False) -> torch.Tensor:
    """Packs unsigned ``bits``-bit fields along the last axis, ``8 // bits`` per byte, LSB first.

    Element ``j`` of a row goes to bits ``[bits * (j % p), bits * (j % p) + bits)`` of byte
    ``j // p`` with ``p = 8 // bits``.

    Args:
        x: integer or bool ``(..., cols)`` with values in ``[0, 2**bits)``.
        bits: 1, 2, 4 or 8.
        pad: allow ``cols % p != 0`` (the last byte is padded with zero fields); otherwise raise.

    Returns:
        uint8 ``(..., ceil(cols / p))``.
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"pack_uint: bits must be 1, 2, 4 or 8, got {bits}")
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise ValueError(f"pack_uint: needs an integer or bool tensor, got {x.dtype}")
    p = 8 // bits
    cols = x.shape[-1]
    if cols % p != 0 and not pad:
        raise ValueError(
            f"pack_uint: last dimension {cols} is not a multiple of {p} ({bits}-bit fields)"
        )
    v = x.to(torch.int32)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"pack_uint: values must be in [0, {2**bits}), got [{v.min()}, {v.max()}]")
    n_bytes = math.ceil(cols / p)
    v = torch.nn.functional.pad(v, (0, n_bytes * p - cols))
    v = v.reshape(*x.shape[:-1], n_bytes, p)  # (..., n_bytes, p) fields of one byte
    shifts = torch.arange(p, device=x.device, dtype=torch.int32) * bits
    return (v << shifts).sum(-1).to(torch.uint8)


def unpack_uint(packed: torch.Tensor, bits: int, cols: int | None = None) -> torch.Tensor:
    """Inverse of ``pack_uint``: uint8 ``(..., n_bytes)`` -> uint8 ``(..., cols)`` fields.

    ``cols`` defaults to ``n_bytes * 8 // bits`` (no padding to strip).
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"unpack_uint: bits must be 1, 2, 4 or 8, got {bits}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_uint: needs uint8, got {packed.dtype}")
    p = 8 // bits
    full = packed.shape[-1] * p
    cols = full if cols is None else int(cols)
    if not full - p < cols <= full and not (cols == 0 and full == 0):
        raise ValueError(f"unpack_uint: {packed.shape[-1]} bytes cannot hold {cols} fields")
    shifts = torch.arange(p, device=packed.device, dtype=torch.int32) * bits
    v = (packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)  # (..., n_bytes, p)
    return v.reshape(*packed.shape[:-1], full)[..., :cols].to(torch.uint8)


def pack_int4(q: torch.Tensor, pad: bool = False) -> torch.Tensor:
    """Packs signed 4-bit codes, two's complement, two per byte, first value in the low nibble.

    Args:
        q: int8 ``(..., cols)`` with values in ``[-8, 7]``.
        pad: allow an odd ``cols`` (a zero nibble is appended); otherwise raise.

    Returns:
        uint8 ``(..., ceil(cols / 2))``.
    """
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4: needs int8 codes, got {q.dtype}")
    if q.shape[-1] % 2 and not pad:
        raise ValueError(f"pack_int4: odd column count {q.shape[-1]} (two codes per byte)")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4: codes must be in [-8, 7], got [{q.min()}, {q.max()}]")
    return pack_uint(q.to(torch.int32) & 0xF, 4, pad=True)


def unpack_int4(packed: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 ``(..., n_bytes)`` -> int8 ``(..., cols)`` in ``[-8, 7]``."""
    v = unpack_uint(packed, 4, cols).to(torch.int32)
    return ((v ^ 8) - 8).to(torch.int8)  # sign-extend the nibble


def meta_bits(m: int) -> int:
    """Bits per stored N:M position: 1 (m=2), 2 (m<=4), 4 (m<=16), else 8 (m<=256)."""
    if not 1 <= m <= 256:
        raise ValueError(f"N:M group size m must be in 1..256, got {m}")
    for b in (1, 2, 4, 8):
        if m <= 2**b:
            return b
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# integer codes and floating-point fields
# ----------------------------------------------------------------------------------------------


def _check_codes(q: torch.Tensor, bits: int) -> None:
    if q.dtype != torch.int8:
        raise ValueError(f"quantised codes must be int8, got {q.dtype}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"{bits}-bit codes must be in [{lo}, {hi}], got [{q.min()}, {q.max()}]")


def _pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes ``(..., k)`` -> nibbles (bits <= 4, odd k padded) or int8 unchanged."""
    return pack_int4(q, pad=True) if bits <= 4 else q.contiguous()


def _unpack_codes(v: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    return unpack_int4(v, k) if bits <= 4 else v


def _f_bits(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float tensor -> its ``dtype`` bit pattern in an integer tensor of the same width."""
    return x.to(dtype).contiguous().view(_BITS_DTYPE[dtype])


def _bits_f(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integer bit-pattern tensor -> fp32 values of the logical ``dtype``."""
    return x.view(dtype).to(torch.float32)


def _lossless_dtype(x: torch.Tensor) -> torch.dtype:
    """fp16 if every value of fp32 ``x`` survives the fp16 round trip, else fp32."""
    x = x.to(torch.float32)
    back = x.to(torch.float16).to(torch.float32)
    return torch.float16 if torch.equal(back, x) else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# variable-width bitstreams (the ``grouped`` format's codes)
# ----------------------------------------------------------------------------------------------

# rows of at most this many values are packed / unpacked per block: the int32 work tensors of
# ``pack_bits`` / ``unpack_bits`` stay a few times this size whatever the matrix
BITS_STEP = 1 << 22


def _stream_layout(widths: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(widths, byte, shift, row_bytes)`` of a row bitstream: int64 ``(n,)`` widths, the byte
    holding each value's first bit and the bit inside it; ``row_bytes`` a 0-d int64."""
    w = torch.as_tensor(widths).to(device=device, dtype=torch.int64).reshape(-1)
    if w.numel() and (int(w.min()) < 1 or int(w.max()) > 8):
        raise ValueError(f"bit widths must be in 1..8, got [{int(w.min())}, {int(w.max())}]")
    off = torch.cumsum(w, 0) - w  # (n,) first stream bit of each value
    return w, off // 8, off % 8, (w.sum() + 7) // 8


def pack_bits(values: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Packs each row's values at their own bit widths into one LSB-first bitstream per row.

    Value ``t`` occupies stream bits ``[off_t, off_t + widths[t])`` with ``off_t =
    sum(widths[:t])`` (value bit ``b`` -> stream bit ``off_t + b``); stream bit ``p`` is bit
    ``p % 8`` of byte ``p // 8``; the row is zero-padded to whole bytes. Every row uses the same
    widths, so every row has the same byte length and a decoder finds value ``t`` of any row at
    a fixed (byte, shift).

    Args:
        values: unsigned integer ``(rows, n)`` (uint8 or any int dtype), ``0 <= v < 2**widths``.
        widths: int ``(n,)`` in 1..8.

    Returns:
        uint8 ``(rows, ceil(sum(widths) / 8))``.

    Raises:
        ValueError: a width outside 1..8, a value outside its width, or mismatched shapes.
    """
    if values.dim() != 2 or values.dtype.is_floating_point or values.dtype == torch.bool:
        raise ValueError(
            f"pack_bits: needs an integer (rows, n) tensor, got {values.dtype} "
            f"{tuple(values.shape)}"
        )
    rows, n = values.shape
    w, byte, shift, row_bytes = _stream_layout(widths, values.device)
    if w.numel() != n:
        raise ValueError(f"pack_bits: {w.numel()} widths for {n} values per row")
    # one spare byte: a value that ends inside its first byte adds 0 to the next one
    out = torch.zeros(rows, int(row_bytes) + 1, dtype=torch.int32, device=values.device)
    step = max(1, BITS_STEP // max(1, n))
    for s in range(0, rows, step):
        v = values[s : s + step].to(torch.int64)
        if v.numel() and bool(((v < 0) | (v >= (1 << w))).any()):
            raise ValueError("pack_bits: a value does not fit its bit width (needs 0 <= v < 2**w)")
        # a value spans at most two bytes (shift <= 7, width <= 8): its low byte and high byte
        # land in disjoint bit ranges of their bytes, so adding them is a bitwise OR
        word = (v << shift).to(torch.int32)  # (block, n) < 2**15
        out[s : s + step].index_add_(1, byte, word & 0xFF)
        out[s : s + step].index_add_(1, byte + 1, word >> 8)
    return out[:, : int(row_bytes)].to(torch.uint8)


def unpack_bits(stream: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 ``(rows, ceil(sum(widths) / 8))`` -> uint8 ``(rows, n)``.

    Args:
        stream: uint8 ``(rows, row_bytes)`` bitstreams.
        widths: int ``(n,)`` in 1..8, the same for every row.
    """
    if stream.dim() != 2 or stream.dtype != torch.uint8:
        raise ValueError(
            f"unpack_bits: needs uint8 (rows, bytes), got {stream.dtype} {tuple(stream.shape)}"
        )
    rows = stream.shape[0]
    w, byte, shift, row_bytes = _stream_layout(widths, stream.device)
    if stream.shape[1] != int(row_bytes):
        raise ValueError(
            f"unpack_bits: rows of {stream.shape[1]} bytes; widths need {int(row_bytes)}"
        )
    n = w.numel()
    out = torch.empty(rows, n, dtype=torch.uint8, device=stream.device)
    lo_mask = ((1 << w) - 1).to(torch.int32)  # (n,)
    shift32 = shift.to(torch.int32)
    step = max(1, BITS_STEP // max(1, n))
    for s in range(0, rows, step):
        blk = torch.nn.functional.pad(stream[s : s + step].to(torch.int32), (0, 1))
        word = blk.index_select(1, byte) | (blk.index_select(1, byte + 1) << 8)  # (block, n)
        out[s : s + step] = ((word >> shift32) & lo_mask).to(torch.uint8)
    return out
