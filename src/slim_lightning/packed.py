"""Packed storage of a compressed weight matrix: the on-disk / in-memory contract.

A ``PackedWeight`` stores one ``(rows, cols)`` matrix (a linear weight ``(d_out, d_in)``, or an
adapter ``L^T (r, d_in)`` / ``R^T (d_out, r)``) in one of three formats. It only imports torch and
the ``QuantTensor`` contract; ``to_dense()`` reproduces ``QuantTensor.dequantize()`` (and so
``CompressedLinear.weight``) bit-exactly, and ``nbytes()`` counts every stored byte, padding
included.

Integer codes
    ``q`` is a symmetric integer code in ``[-2**(bits-1), 2**(bits-1) - 1]`` (``QuantTensor.q``).
    For ``bits <= 4`` codes are stored as 4-bit TWO'S COMPLEMENT nibbles (``q & 0xF``; decode
    ``((v ^ 8) - 8)``), two per ``uint8``, the FIRST (lower column) value in the LOW nibble:
    ``byte = (q[2k] & 0xF) | ((q[2k+1] & 0xF) << 4)``. A row with an odd number of values is
    padded with one zero nibble. For ``5 <= bits <= 8`` codes are stored unpacked as ``int8``
    (one byte per value; no sub-byte packing for those widths).
    Unquantised matrices (``bits = None``) store their fp32 values.

Floating-point fields are stored as their BIT PATTERNS in integer tensors (fp16 -> ``int16``,
fp32 -> ``int32``; decode with ``Tensor.view``), so that ``module.to(torch.bfloat16)`` or
``.half()`` on a model holding these buffers can never re-round a scale. The logical dtype of every
field is recorded in ``meta()``. Scales are stored in fp16 when that is lossless (the quantisers
round scales to fp16-representable values), else in fp32.

Formats (``format`` field; all tensors are row-major and contiguous):

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

``unstructured`` -- any mask: a bitmap plus the kept values in row-major order.
    * ``bitmask``: ``uint8 (rows, ceil(cols / 8))``, bit ``j % 8`` (LSB first) of byte ``j // 8``
      is column ``j`` (1 = kept). One bit per dense weight: at 50% density this is cheaper than
      any per-value index (>= 2 bytes each for d_in > 256) and the kept codes still pack densely.
    * ``values``: the ``nnz`` kept values of all rows concatenated in row-major order:
      ``uint8 (ceil(nnz / 2),)`` nibbles (one zero pad nibble when nnz is odd), ``int8 (nnz,)`` or
      fp32-as-``int32 (nnz,)``.
    * ``row_offsets``: ``int32 (rows + 1,)``, row ``i``'s values are ``[off[i], off[i+1])`` of the
      flat value stream (lets a kernel or a row slice find its values without a prefix sum).

``dense`` -- no sparsity.
    * ``values``: ``uint8 (rows, ceil(cols / 2))`` nibbles, ``int8 (rows, cols)`` or
      fp32-as-``int32 (rows, cols)``.

Quantisation fields (all formats, only when ``bits`` is not None):
    * ``scale``: fp16/fp32 bit patterns, ``(1, 1)`` (one scale per tensor: SLiM-Quant) or
      ``(rows, ceil(cols / group_size))`` (group AbsMax; the last group may be shorter).
    * ``in_scale`` (optional): fp16/fp32 bit patterns ``(cols,)``, the SLiM-Quant^O per-input-channel
      divisor. Dequantised value: ``q[i, j] * scale[i, j // group_size] / in_scale[j]`` (fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from slim_lightning.core.types import QuantTensor

Format = Literal["nm", "unstructured", "dense"]

_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# floating-point fields are stored as integer bit patterns of the same width (see module docstring)
_BITS_DTYPE = {torch.float16: torch.int16, torch.float32: torch.int32}


# ----------------------------------------------------------------------------------------------
# bit-level packing
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# N:M and unstructured value selection
# ----------------------------------------------------------------------------------------------


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
# PackedWeight
# ----------------------------------------------------------------------------------------------


@dataclass
class PackedWeight:
    """One packed ``(rows, cols)`` matrix: format parameters plus its tensors (module docstring).

    Attributes:
        format: ``nm``, ``unstructured`` or ``dense``.
        shape: ``(rows, cols)`` of the dense matrix.
        bits: code width 2..8, or None for fp32 values.
        n, m: N:M pattern (``nm`` only; 0 otherwise).
        group_size: columns per scale group (``cols`` for one scale per row or per tensor).
        nnz: number of stored values (kept entries, including N:M filler positions).
        dtypes: logical dtype name of every floating-point field stored as bits
            (``values`` when unquantised, ``scale``, ``in_scale``).
        tensors: the stored tensors by field name.
    """

    format: Format
    shape: tuple[int, int]
    bits: int | None
    tensors: dict[str, torch.Tensor]
    n: int = 0
    m: int = 0
    group_size: int = 0
    nnz: int = 0
    dtypes: dict[str, str] = field(default_factory=dict)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_quant(
        cls,
        qt: QuantTensor,
        mask: torch.Tensor | None = None,
        *,
        fmt: Format | None = None,
        n: int = 2,
        m: int = 4,
    ) -> PackedWeight:
        """Packs a QuantTensor (codes 0 where ``mask`` is False).

        Args:
            qt: the quantised matrix.
            mask: bool kept entries, or None (dense).
            fmt: force a format; default: ``dense`` without mask, ``nm`` (``n:m``) when the mask
                fits it, else ``unstructured``.
            n, m: the N:M pattern tried / used.
        """
        q = qt.q
        rows, cols = q.shape
        fmt = _choose_format(mask, cols, n, m) if fmt is None else fmt
        _check_codes(q, qt.bits)
        t: dict[str, torch.Tensor] = {}
        if fmt == "dense":
            if mask is not None and bool((q[~mask] != 0).any()):
                raise ValueError("values are nonzero outside the mask (pruned entries must be 0)")
            t["values"] = _pack_codes(q, qt.bits)
            nnz = rows * cols
        elif fmt == "nm":
            if mask is None:
                raise ValueError("format nm needs a mask")
            t.update(pack_nm(q, mask, n, m, qt.bits))
            nnz = rows * (cols // m) * n
        elif fmt == "unstructured":
            if mask is None:
                raise ValueError("format unstructured needs a mask")
            t.update(pack_unstructured(q, mask, qt.bits))
            nnz = int(mask.sum())
        else:
            raise ValueError(f"unknown packed format {fmt!r}; allowed: nm, unstructured, dense")
        scale = qt.scale.to(torch.float32)
        n_groups = math.ceil(cols / qt.group_size)
        if scale.shape not in ((1, 1), (rows, n_groups)):
            raise ValueError(
                f"scale shape {tuple(scale.shape)} is neither (1, 1) nor (rows, ceil(cols / g)) "
                f"= ({rows}, {n_groups})"
            )
        dtypes = {"scale": _dtype_name(_lossless_dtype(scale))}
        t["scale"] = _f_bits(scale, _DTYPES[dtypes["scale"]])
        if qt.in_scale is not None:
            ins = qt.in_scale.to(torch.float32).reshape(-1)
            if ins.numel() != cols:
                raise ValueError(f"in_scale has {ins.numel()} entries, expected cols={cols}")
            dtypes["in_scale"] = _dtype_name(_lossless_dtype(ins))
            t["in_scale"] = _f_bits(ins, _DTYPES[dtypes["in_scale"]])
        return cls(
            format=fmt,
            shape=(rows, cols),
            bits=qt.bits,
            tensors=t,
            n=n if fmt == "nm" else 0,
            m=m if fmt == "nm" else 0,
            group_size=int(qt.group_size),
            nnz=nnz,
            dtypes=dtypes,
        )

    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        fmt: Format | None = None,
        n: int = 2,
        m: int = 4,
    ) -> PackedWeight:
        """Packs an unquantised matrix: its fp32 values (0 where ``mask`` is False), no scales."""
        w = w.detach().to(torch.float32)
        rows, cols = w.shape
        fmt = _choose_format(mask, cols, n, m) if fmt is None else fmt
        t: dict[str, torch.Tensor] = {}
        if fmt == "dense":
            t["values"] = _f_bits(w, torch.float32)
            nnz = rows * cols
        elif fmt == "nm":
            if mask is None:
                raise ValueError("format nm needs a mask")
            kept, pos = nm_select(w, mask, n, m)
            t["values"] = _f_bits(kept, torch.float32)
            t["meta"] = pack_uint(pos, meta_bits(m), pad=True)
            nnz = kept.numel()
        elif fmt == "unstructured":
            if mask is None:
                raise ValueError("format unstructured needs a mask")
            _check_mask(w, mask)
            t["bitmask"] = pack_uint(mask, 1, pad=True)
            t["values"] = _f_bits(w[mask], torch.float32)
            t["row_offsets"] = _row_offsets(mask)
            nnz = int(t["values"].numel())
        else:
            raise ValueError(f"unknown packed format {fmt!r}; allowed: nm, unstructured, dense")
        return cls(
            format=fmt,
            shape=(rows, cols),
            bits=None,
            tensors=t,
            n=n if fmt == "nm" else 0,
            m=m if fmt == "nm" else 0,
            group_size=cols,
            nnz=nnz,
            dtypes={"values": "float32"},
        )

    # -- decoding ------------------------------------------------------------------------------
    def codes_and_mask(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense ``(rows, cols)`` int8 codes (fp32 values when unquantised) and the stored mask.

        The mask is None for ``dense``.
        """
        rows, cols = self.shape
        t = self.tensors
        if self.bits is None:
            vals = _bits_f(t["values"], torch.float32)
            if self.format == "dense":
                return vals.reshape(rows, cols), None
            if self.format == "nm":
                pos = unpack_uint(t["meta"], meta_bits(self.m), vals.shape[1])
                return nm_scatter(vals, pos, self.m, cols), nm_mask_of(pos, self.m, cols)
            mask = unpack_uint(t["bitmask"], 1, cols).bool()
            out = torch.zeros(rows, cols, dtype=torch.float32, device=vals.device)
            out[mask] = vals
            return out, mask
        if self.format == "dense":
            return _unpack_codes(t["values"], self.bits, cols), None
        if self.format == "nm":
            return unpack_nm(t["values"], t["meta"], self.n, self.m, cols, self.bits)
        return unpack_unstructured(t["bitmask"], t["values"], cols, self.bits)

    def quant_tensor(self) -> QuantTensor:
        """The stored matrix as a QuantTensor (quantised formats only)."""
        if self.bits is None:
            raise ValueError("quant_tensor: this PackedWeight is not quantised")
        q, _ = self.codes_and_mask()
        ins = self.tensors.get("in_scale")
        return QuantTensor(
            q=q,
            scale=_bits_f(self.tensors["scale"], _DTYPES[self.dtypes["scale"]]),
            group_size=self.group_size,
            bits=self.bits,
            in_scale=None if ins is None else _bits_f(ins, _DTYPES[self.dtypes["in_scale"]]),
        )

    def mask(self) -> torch.Tensor | None:
        """bool ``(rows, cols)`` stored positions, or None for ``dense``."""
        return self.codes_and_mask()[1]

    def to_dense(self) -> torch.Tensor:
        """fp32 ``(rows, cols)``, bit-exactly ``QuantTensor.dequantize()`` of the packed codes."""
        if self.bits is None:
            return self.codes_and_mask()[0]
        if self.format == "nm":
            return self._dequant_nm()
        return self.quant_tensor().dequantize(torch.float32)

    def _dequant_nm(self) -> torch.Tensor:
        """N:M fast path (the lean runtime calls it every forward and backward): scales only the
        kept values, then scatters them; the same fp32 operations per element as
        ``QuantTensor.dequantize`` (``q * scale``, then ``/ in_scale``), so bit-identical."""
        rows, cols = self.shape
        n, m, t = self.n, self.m, self.tensors
        n_groups = cols // m
        k = n_groups * n
        kept = _unpack_codes(t["values"], self.bits, k).to(torch.float32)  # (rows, k)
        pos = unpack_uint(t["meta"], meta_bits(m), k).to(torch.int64)  # (rows, k)
        col = pos + (torch.arange(k, device=pos.device) // n * m)[None, :]  # (rows, k)
        scale = _bits_f(t["scale"], _DTYPES[self.dtypes["scale"]]).to(torch.float32)
        if tuple(scale.shape) == (1, 1):
            kept = kept * scale
        elif self.group_size % m == 0:  # whole groups of m per scale: a contiguous expand
            per = self.group_size // m * n  # kept values per scale group
            kept = kept * scale.repeat_interleave(per, dim=1)[:, :k]
        else:
            kept = kept * torch.gather(scale, 1, col // self.group_size)
        ins = t.get("in_scale")
        if ins is not None:
            ins = _bits_f(ins, _DTYPES[self.dtypes["in_scale"]]).to(torch.float32).reshape(-1)
            kept = kept / ins[col]
        out = torch.zeros(rows, cols, dtype=torch.float32, device=kept.device)
        out.scatter_(1, col, kept)
        return out

    def nbytes(self) -> int:
        """Bytes of every stored tensor (values, metadata, bitmap, offsets, scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    # -- metadata ------------------------------------------------------------------------------
    def meta(self) -> dict:
        """JSON-able description; ``PackedWeight.empty(meta)`` rebuilds correctly shaped tensors."""
        return {
            "format": self.format,
            "shape": list(self.shape),
            "bits": self.bits,
            "n": self.n,
            "m": self.m,
            "group_size": self.group_size,
            "nnz": self.nnz,
            "dtypes": dict(self.dtypes),
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                for k, v in self.tensors.items()
            },
        }

    @classmethod
    def empty(cls, meta: dict, device: torch.device | str | None = None) -> PackedWeight:
        """Uninitialised tensors with the shapes and dtypes recorded in ``meta``."""
        tensors = {
            k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device=device)
            for k, v in meta["tensors"].items()
        }
        return cls(
            format=meta["format"],
            shape=(int(meta["shape"][0]), int(meta["shape"][1])),
            bits=meta["bits"],
            tensors=tensors,
            n=int(meta["n"]),
            m=int(meta["m"]),
            group_size=int(meta["group_size"]),
            nnz=int(meta["nnz"]),
            dtypes=dict(meta["dtypes"]),
        )

    def float_field(self, name: str) -> torch.Tensor | None:
        """A floating-point field (``scale``, ``in_scale``) in its logical dtype (a view of the
        stored bits), or None when absent."""
        t = self.tensors.get(name)
        return None if t is None else t.view(_DTYPES[self.dtypes[name]])


def expected_tensors(meta: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{field: (shape, dtype name)}`` that ``meta``'s format parameters imply.

    Used to check a loaded checkpoint: a ``meta()`` whose ``tensors`` disagree with its format,
    shape, bits, n, m, group size or nnz was damaged or edited.

    Raises:
        ValueError: the parameters themselves are impossible (e.g. ``n > m``, ``cols % m``).
    """
    fmt, bits = meta["format"], meta["bits"]
    rows, cols = (int(x) for x in meta["shape"])
    n, m, g, nnz = (int(meta[k]) for k in ("n", "m", "group_size", "nnz"))
    if rows < 1 or cols < 1:
        raise ValueError(f"shape {meta['shape']} is not a positive matrix shape")
    if bits is not None and not (isinstance(bits, int) and 2 <= bits <= 8):
        raise ValueError(f"bits={bits!r}; allowed: 2..8 or null")

    def codes(k_shape: tuple[int, ...]) -> tuple[tuple[int, ...], str]:
        if bits is None:
            return k_shape, "int32"
        if bits <= 4:
            return (*k_shape[:-1], math.ceil(k_shape[-1] / 2)), "uint8"
        return k_shape, "int8"

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    if fmt == "nm":
        if not (1 <= n <= m <= 256) or cols % m:
            raise ValueError(f"n={n}, m={m} do not fit {cols} columns (need 1 <= n <= m, m | cols)")
        k = cols // m * n
        if nnz != rows * k:
            raise ValueError(f"nnz={nnz} != rows * cols / m * n = {rows * k}")
        out["values"] = codes((rows, k))
        out["meta"] = ((rows, math.ceil(k * meta_bits(m) / 8)), "uint8")
    elif fmt == "unstructured":
        if not 0 <= nnz <= rows * cols:
            raise ValueError(f"nnz={nnz} outside [0, {rows * cols}]")
        out["bitmask"] = ((rows, math.ceil(cols / 8)), "uint8")
        out["values"] = codes((nnz,))
        out["row_offsets"] = ((rows + 1,), "int32")
    elif fmt == "dense":
        if nnz != rows * cols:
            raise ValueError(f"nnz={nnz} != rows * cols = {rows * cols}")
        out["values"] = codes((rows, cols))
    else:
        raise ValueError(f"format {fmt!r}; allowed: nm, unstructured, dense")
    dtypes = meta.get("dtypes", {})
    if bits is not None:
        if not 1 <= g:
            raise ValueError(f"group_size={g} must be >= 1")
        sdt = dtypes.get("scale")
        if sdt not in _DTYPES:
            raise ValueError(f"scale dtype {sdt!r}; allowed: {', '.join(_DTYPES)}")
        shape = tuple(meta["tensors"].get("scale", {}).get("shape", ()))
        per_group = (rows, math.ceil(cols / g))
        out["scale"] = (
            (1, 1) if shape == (1, 1) else per_group,
            _dtype_name(_BITS_DTYPE[_DTYPES[sdt]]),
        )
        if "in_scale" in meta["tensors"]:
            idt = dtypes.get("in_scale")
            if idt not in _DTYPES:
                raise ValueError(f"in_scale dtype {idt!r}; allowed: {', '.join(_DTYPES)}")
            out["in_scale"] = ((cols,), _dtype_name(_BITS_DTYPE[_DTYPES[idt]]))
    elif dtypes.get("values", "float32") != "float32":
        raise ValueError(f"unquantised values dtype {dtypes.get('values')!r}; allowed: float32")
    return out


def check_meta(meta: dict) -> None:
    """Raises ValueError unless ``meta["tensors"]`` is exactly what the format parameters imply."""
    want = expected_tensors(meta)
    have = {
        k: (tuple(int(x) for x in v["shape"]), str(v["dtype"])) for k, v in meta["tensors"].items()
    }
    if have != want:
        diff = sorted(
            f"{k}: stored {have.get(k)} expected {want.get(k)}"
            for k in set(have) | set(want)
            if have.get(k) != want.get(k)
        )
        raise ValueError("packed tensors do not match the format parameters: " + "; ".join(diff))


def check_values(pw: PackedWeight) -> None:
    """Raises ValueError if a stored scale / fp value is NaN/Inf or a row offset is inconsistent."""
    for name in ("scale", "in_scale", "values"):
        if name == "values" and pw.bits is not None:
            continue
        t = pw.float_field(name) if name != "values" else pw.float_field("values")
        if t is None:
            continue
        bad = ~torch.isfinite(t.float())
        if name == "in_scale":
            bad |= t == 0
        if bool(bad.any()):
            raise ValueError(f"{name} has {int(bad.sum())} NaN/Inf (or zero divisor) entries")
    off = pw.tensors.get("row_offsets")
    if off is not None:
        o = off.to(torch.int64)
        if int(o[0]) != 0 or int(o[-1]) != pw.nnz or bool((o[1:] < o[:-1]).any()):
            raise ValueError("row_offsets are not a monotone prefix sum ending at nnz")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _choose_format(mask: torch.Tensor | None, cols: int, n: int, m: int) -> Format:
    """``dense`` without a mask; ``nm`` when every group of ``m`` keeps at most ``n``; else
    ``unstructured``."""
    if mask is None:
        return "dense"
    if cols % m == 0 and bool((mask.reshape(mask.shape[0], -1, m).sum(-1) <= n).all()):
        return "nm"
    return "unstructured"


def fake_quant_absmax(
    w: torch.Tensor, bits: int, group_size: int, in_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """AbsMax fake quantisation along columns (the rounding of ``core.quant.absmax_quant``).

    With ``in_scale`` (``(cols,)``) the columns are multiplied by it before quantisation and
    divided back after, as ``core.lowrank.quantize_adapters`` does. Returns the dequantised matrix
    in ``w``'s dtype; idempotent on values already on such a grid (scales are fp16-representable
    and ``max |q| = 2**(bits-1)-1`` in every nonzero group, so re-quantising finds the same codes).
    """
    from slim_lightning.core.quant import absmax_quant

    if in_scale is None:
        return absmax_quant(w, bits, group_size).dequantize(w.dtype)
    ins = in_scale.to(w.device, torch.float32)
    qt = absmax_quant(w.to(torch.float32) * ins[None, :], bits, group_size)
    qt.in_scale = ins
    return qt.dequantize(w.dtype)


def pack_absmax(
    w: torch.Tensor, bits: int, group_size: int, in_scale: torch.Tensor | None = None
) -> PackedWeight:
    """AbsMax-quantises ``w (rows, cols)`` along columns (optionally in the ``in_scale``-scaled
    domain, as ``fake_quant_absmax``) and packs it in the ``dense`` format."""
    from slim_lightning.core.quant import absmax_quant

    w = w.detach().to(torch.float32)
    ins = None if in_scale is None else in_scale.to(w.device, torch.float32)
    qt = absmax_quant(w if ins is None else w * ins[None, :], bits, group_size)
    qt.in_scale = ins
    return PackedWeight.from_quant(qt, fmt="dense")
