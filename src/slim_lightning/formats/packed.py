"""Packed storage of a compressed weight matrix: the on-disk / in-memory contract.

A ``PackedWeight`` stores one ``(rows, cols)`` matrix (a linear weight ``(d_out, d_in)``, or an
adapter ``L^T (r, d_in)`` / ``R^T (d_out, r)``) in one of three formats (a ``GroupQuant`` goes to
``formats.grouped``). It only imports torch and the core contracts; ``to_dense()`` reproduces
``QuantTensor.dequantize()`` (and so ``CompressedLinear.weight``) bit-exactly, and ``nbytes()``
counts every stored byte, padding included.

Integer codes (4-bit two's complement nibbles, low nibble first, or ``int8``) and floating-point
fields (stored as their bit patterns: fp16 -> ``int16``, fp32 -> ``int32``): ``formats.bitpack``.

Formats (``format`` field; all tensors are row-major and contiguous), one module each, listed in
``FORMATS``:

* ``nm`` (``formats.nm``) -- N:M sparse along columns: ``values`` + per-value position ``meta``.
* ``unstructured`` (``formats.unstructured``) -- any mask: ``bitmask`` + row-major ``values`` +
  ``row_offsets``.
* ``dense`` (``formats.dense``) -- no sparsity: ``values``.
* ``grouped`` (``formats.grouped``, its own class ``GroupedWeight``) -- a ``GroupQuant``
  (SpQR / SliM-LLM) at its true code widths; ``from_quant`` / ``empty`` hand it over.

Quantisation fields (all formats, only when ``bits`` is not None):
    * ``scale``: fp16/fp32 bit patterns, ``(1, 1)`` (one scale per tensor: SLiM-Quant) or
      ``(rows, ceil(cols / group_size))`` (group AbsMax; the last group may be shorter).
    * ``in_scale`` (optional): fp16/fp32 bit patterns ``(cols,)``, the SLiM-Quant^O per-input-channel
      divisor. Dequantised value: ``q[i, j] * scale[i, j // group_size] / in_scale[j]`` (fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Literal

import torch

from slim_lightning.core.grouped import GroupQuant
from slim_lightning.core.types import QuantTensor
from slim_lightning.formats import dense, nm, unstructured
from slim_lightning.formats.bitpack import (
    _DTYPES,
    _bits_f,
    _check_codes,
    _dtype_name,
    _f_bits,
    _lossless_dtype,
)
from slim_lightning.formats.checks import (  # noqa: F401 - check_* re-exported (old home)
    ALLOWED_FORMATS,
    _choose_format,
    check_meta,
    check_values,
    expected_tensors,
)
from slim_lightning.formats.grouped import GroupedWeight
from slim_lightning.formats.nm import dequant_nm

Format = Literal["nm", "unstructured", "dense"]

# format name -> its module; each provides ``encode(x, mask, *, n, m, bits) -> (tensors, nnz)``
# and ``decode(tensors, shape, *, n, m, bits) -> (codes or fp32 values, mask or None)``
FORMATS: dict[str, ModuleType] = {"nm": nm, "unstructured": unstructured, "dense": dense}


def _format_module(fmt: str) -> ModuleType:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown packed format {fmt!r}; allowed: {ALLOWED_FORMATS}") from None


# matrices with more values than this are encoded a block of rows at a time (row-major formats)
ENCODE_STEP = 1 << 22


def _encode(
    fmt: str, x: torch.Tensor, mask: torch.Tensor | None, **kw: Any
) -> tuple[dict[str, torch.Tensor], int]:
    """``encode`` of format ``fmt``; ``nm`` and ``dense`` matrices larger than ``ENCODE_STEP``
    values are encoded in row blocks and concatenated (rows are encoded independently, so the
    tensors are equal; the int64 work tensors of an encode stay one block in size)."""
    encode = _format_module(fmt).encode
    rows, cols = x.shape
    if fmt not in ("nm", "dense") or rows * cols <= ENCODE_STEP:
        return encode(x, mask, **kw)
    step = max(1, ENCODE_STEP // cols)
    parts = [
        encode(x[s : s + step], None if mask is None else mask[s : s + step], **kw)
        for s in range(0, rows, step)
    ]
    tensors = cat_row_blocks([t for t, _ in parts], rows, step, f"the {fmt} encoding")
    return tensors, sum(nnz for _, nnz in parts)


def cat_row_blocks(
    parts: list[dict[str, torch.Tensor]], rows: int, step: int, what: str
) -> dict[str, torch.Tensor]:
    """The fields of the consecutive ``step``-row blocks of a ``rows``-row matrix, concatenated
    along rows; raises ValueError naming ``what`` when a field is not one entry per row."""
    for i, t in enumerate(parts):
        check_row_major(t, min(step, rows - i * step), what)
    return {k: torch.cat([t[k] for t in parts]) for k in parts[0]}


def check_row_major(fields: dict[str, torch.Tensor], rows: int, what: str) -> None:
    """Raises ValueError naming ``what`` unless every field holds one entry per row."""
    for k, v in fields.items():
        if v.dim() == 0 or v.shape[0] != rows:
            raise ValueError(f"{what}: field {k} is not row-major ({tuple(v.shape)})")


def _per_row(name: str, t: torch.Tensor, rows: int) -> bool:
    """Whether field ``name`` holds one entry per matrix row (``row_block`` slices it)."""
    return name != "in_scale" and t.dim() > 0 and t.shape[0] == rows


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
        qt: QuantTensor | GroupQuant,
        mask: torch.Tensor | None = None,
        *,
        fmt: Format | None = None,
        n: int = 2,
        m: int = 4,
    ) -> PackedWeight | GroupedWeight:
        """Packs a QuantTensor (codes 0 where ``mask`` is False), or a ``GroupQuant`` (its own
        mask; ``mask`` / ``fmt`` unused) as a ``GroupedWeight``.

        Args:
            qt: the quantised matrix.
            mask: bool kept entries, or None (dense).
            fmt: force a format; default: ``dense`` without mask, ``nm`` (``n:m``) when the mask
                fits it, else ``unstructured``.
            n, m: the N:M pattern tried / used.
        """
        if isinstance(qt, GroupQuant):
            return GroupedWeight.from_group_quant(qt, n=n, m=m)
        q = qt.q
        rows, cols = q.shape
        fmt = _choose_format(mask, cols, n, m) if fmt is None else fmt
        _check_codes(q, qt.bits)
        t, nnz = _encode(fmt, q, mask, n=n, m=m, bits=qt.bits)
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
        t, nnz = _encode(fmt, w, mask, n=n, m=m, bits=None)
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
        decode = _format_module(self.format).decode
        return decode(self.tensors, self.shape, n=self.n, m=self.m, bits=self.bits)

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
        if self.format == "nm":  # fast path: scale only the kept values (``nm.dequant_nm``)
            t = self.tensors
            ins = t.get("in_scale")
            return dequant_nm(
                t["values"],
                t["meta"],
                _bits_f(t["scale"], _DTYPES[self.dtypes["scale"]]),
                None if ins is None else _bits_f(ins, _DTYPES[self.dtypes["in_scale"]]),
                shape=self.shape,
                n=self.n,
                m=self.m,
                bits=self.bits,
                group_size=self.group_size,
            )
        return self.quant_tensor().dequantize(torch.float32)

    def row_block(self, start: int, end: int) -> PackedWeight:
        """Rows ``start:end`` as a PackedWeight of views (``dense`` and ``nm`` formats, whose
        fields are row-major; ``in_scale`` (per column) and per-tensor scales are shared, not
        sliced). Dequantising the blocks
        gives the rows of ``to_dense()`` exactly, with work memory of the block's size."""
        if self.format not in ("dense", "nm"):
            raise ValueError(f"row_block: the {self.format} format is not row-sliceable")
        rows = self.shape[0]
        if not 0 <= start < end <= rows:
            raise ValueError(f"row_block: rows {start}:{end} outside 0:{rows}")
        return replace(
            self,
            shape=(end - start, self.shape[1]),
            nnz=self.nnz * (end - start) // rows,
            tensors={
                k: v[start:end] if _per_row(k, v, rows) else v for k, v in self.tensors.items()
            },
            dtypes=dict(self.dtypes),
        )

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
    def empty(
        cls, meta: dict, device: torch.device | str | None = None
    ) -> PackedWeight | GroupedWeight:
        """Uninitialised tensors with the shapes and dtypes recorded in ``meta`` (a
        ``GroupedWeight`` for the ``grouped`` format)."""
        if meta["format"] == "grouped":
            return GroupedWeight.empty(meta, device)
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


def pack_absmax(
    w: torch.Tensor, bits: int, group_size: int, in_scale: torch.Tensor | None = None
) -> PackedWeight:
    """AbsMax-quantises ``w (rows, cols)`` along columns (optionally in the ``in_scale``-scaled
    domain, as ``core.quant.fake_quant_absmax``) and packs it in the ``dense`` format."""
    from slim_lightning.core.quant import absmax_quant

    w = w.detach().to(torch.float32)
    ins = None if in_scale is None else in_scale.to(w.device, torch.float32)
    qt = absmax_quant(w if ins is None else w * ins[None, :], bits, group_size)
    qt.in_scale = ins
    return PackedWeight.from_quant(qt, fmt="dense")
