"""The ``grouped`` packed format: a ``GroupQuant`` (SpQR / SliM-LLM) at its true code widths.

One ``(rows, cols)`` matrix quantised asymmetrically in column groups (``core.grouped``: read its
module docstring for the decode). Columns are in the STORED order (``perm``); group ``g`` covers
stored columns ``[g * group_size, (g + 1) * group_size)`` (the last one may be shorter) and has a
code width ``w_g`` in 1..8. Every stored value of a row is packed into one LSB-first bitstream at
the width of its group (``bitpack.pack_bits``): every row has the same byte length and a kernel
finds value ``t`` of any row at a fixed (byte, shift).

Layouts (meta ``layout``), chosen by ``from_group_quant``:

* ``dense`` -- no mask: all ``cols`` values of a row in stored column order.
* ``nm`` -- the mask keeps EXACTLY ``n`` of every ``m`` stored columns, ``cols % m == 0`` and
  ``group_size % m == 0`` (so each ``m``-group lies in one quantisation group and the width of
  every kept value is the same for all rows): the ``k = cols / m * n`` kept values in column
  order, plus ``meta`` (their in-group positions, exactly ``formats.nm``'s ``meta``).
* ``bitmask`` -- any other mask: all ``cols`` values (0 where pruned) plus ``bitmask``.

Tensors (field names are a contract shared with ``kernels.grouped``):

* ``codes`` uint8 ``(rows, ceil(row_bits / 8))``: ``pack_bits`` of each row's stored values;
  ``row_bits`` (meta) is the bit length of one row's values.
* ``widths`` uint8 ``(n_groups,)``: the per-group widths, only when ``mixed`` (else all ``bits``).
* ``meta`` uint8 ``(rows, ceil(k * meta_bits(m) / 8))`` (``nm``) / ``bitmask`` uint8
  ``(rows, ceil(cols / 8))`` (``bitmask``, ``pack_uint(mask, 1)``).
* statistics, fp16 / fp32 bit patterns as in ``formats.bitpack``: ``scale``, ``zero``
  ``(rows, n_groups)`` (int16 when fp16 is lossless, else int32); or, bi-level (``stat_bits``
  not null): ``scale_q``, ``zero_q`` uint8 ``pack_bits`` of the ``(rows, n_groups)`` codes at
  ``stat_bits`` each and ``scale_s2``, ``scale_z2``, ``zero_s2``, ``zero_z2`` int16 (fp16)
  ``(ceil(rows / stat_group), n_groups)``; decoded by ``BiLevel.decode``.
* outliers (``n_outliers > 0``), CSR over rows in stored column order: ``outlier_offsets`` int32
  ``(rows + 1,)``, ``outlier_cols`` int16 (int32 when ``cols > 32767``) and ``outlier_vals``
  int16 (fp16) ``(n_outliers,)``.
* ``perm`` int32 ``(cols,)`` (``has_perm``): stored column ``j`` is original column ``perm[j]``.

``to_dense()`` equals ``GroupQuant.dequantize()`` bit for bit (the same fp32 operations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from slim_lightning.core.grouped import BiLevel, GroupQuant
from slim_lightning.formats.bitpack import (
    _DTYPES,
    BITS_STEP,
    _bits_f,
    _dtype_name,
    _f_bits,
    _lossless_dtype,
    meta_bits,
    pack_bits,
    pack_uint,
    unpack_bits,
    unpack_uint,
)
from slim_lightning.formats.nm import nm_mask_of, nm_scatter, nm_select

LAYOUTS = ("dense", "nm", "bitmask")
# integer meta() keys (also: format, shape, layout, stat_bits, mixed, has_perm, dtypes, tensors)
_INT_KEYS = ("bits", "n", "m", "group_size", "nnz", "row_bits", "n_outliers", "stat_group")
_FP16 = torch.float16


def _stored_groups(layout: str, cols: int, group_size: int, n: int, m: int, device=None):
    """int64 ``(values per row,)``: the quantisation group of each stored value of a row (the
    same for every row: ``nm`` keeps ``n`` values per ``m``-group, each inside one group)."""
    if layout == "nm":
        k = cols // m * n
        return (torch.arange(k, device=device) // n * m) // group_size
    return torch.arange(cols, device=device) // group_size


def _fp16_exact(x: torch.Tensor, what: str) -> torch.Tensor:
    """int16 fp16 bit pattern of ``x``; ValueError unless every value is fp16-representable."""
    x = x.to(torch.float32)
    if _lossless_dtype(x) != _FP16:
        raise ValueError(f"{what} is not fp16-representable (the grouped format stores fp16)")
    return _f_bits(x, _FP16)


def _choose_layout(mask: torch.Tensor | None, cols: int, group_size: int, n: int, m: int) -> str:
    """``dense`` without mask; ``nm`` when it keeps exactly n of every m; else ``bitmask``."""
    if mask is None:
        return "dense"
    fits = 0 < n <= m and cols % m == 0 and group_size % m == 0
    exact = fits and bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all())
    return "nm" if exact else "bitmask"


@dataclass
class GroupedWeight:
    """One packed ``GroupQuant`` (module docstring); the ``PackedWeight`` interface.

    Attributes:
        format: ``"grouped"``.
        shape: ``(rows, cols)``.
        bits: the nominal width (all groups unless ``mixed``).
        tensors: the stored tensors by field name.
        n, m: the N:M pattern of the ``nm`` layout (0 otherwise).
        group_size: stored columns per group.
        nnz: stored code values (``rows * cols``, or ``rows * cols / m * n`` for ``nm``).
        dtypes: logical dtype name of every floating-point field stored as bits.
        layout: ``dense``, ``nm`` or ``bitmask``.
        row_bits: bits of one row's packed values (before the byte padding).
        n_outliers: stored 16-bit outliers.
        stat_bits, stat_group: bi-level statistics' code width and row group (None / 0: none).
        mixed, has_perm: ``widths`` / ``perm`` are stored.
    """

    format: str
    shape: tuple[int, int]
    bits: int
    tensors: dict[str, torch.Tensor]
    n: int = 0
    m: int = 0
    group_size: int = 0
    nnz: int = 0
    dtypes: dict[str, str] = field(default_factory=dict)
    layout: str = "dense"
    row_bits: int = 0
    n_outliers: int = 0
    stat_bits: int | None = None
    stat_group: int = 0
    mixed: bool = False
    has_perm: bool = False

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_group_quant(cls, gq: GroupQuant, *, n: int = 2, m: int = 4) -> GroupedWeight:
        """Packs ``gq`` losslessly (``group_quant()`` gives it back field for field).

        Args:
            gq: the quantised matrix (its mask, perm, outliers and statistics are all stored).
            n, m: the N:M pattern of the ``nm`` layout, used when ``gq.mask`` keeps exactly
                ``n`` of every ``m`` columns.

        Raises:
            ValueError: ``gq`` breaks its contract (codes outside their widths or nonzero where
                pruned, scale / zero not their bi-level decode, fp16 fields not fp16-exact,
                unsorted outliers, a non-permutation).
        """
        q = gq.q
        if q.dim() != 2 or q.dtype.is_floating_point or q.dtype == torch.bool:
            raise ValueError(f"GroupQuant.q must be integer (rows, cols), got {q.dtype}")
        rows, cols = q.shape
        gs, bits, groups = int(gq.group_size), gq.bits, gq.n_groups
        if gs < 1 or isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"group_size={gs}, bits={bits!r}; need group_size >= 1, bits 1..8")
        gw = gq.widths().to(q.device)
        if gw.shape != (groups,):
            raise ValueError(f"group_bits has shape {tuple(gw.shape)}, expected ({groups},)")
        mask = gq.mask
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != q.shape:
                raise ValueError(f"mask must be bool {tuple(q.shape)}, got {mask.dtype}")
            if bool((q[~mask] != 0).any()):
                raise ValueError("codes are nonzero where the mask prunes (they must be 0)")
        layout = _choose_layout(mask, cols, gs, n, m)
        nm_ = (n, m) if layout == "nm" else (0, 0)
        vw = gw[_stored_groups(layout, cols, gs, *nm_, device=q.device)]  # width of each value
        t: dict[str, torch.Tensor] = {}
        if layout == "nm":  # row blocks: nm_select's int64 work tensors stay bounded
            step = max(1, BITS_STEP // cols)
            parts = [
                nm_select(q[s : s + step], mask[s : s + step], n, m) for s in range(0, rows, step)
            ]
            t["codes"] = torch.cat([pack_bits(kept, vw) for kept, _ in parts])
            t["meta"] = torch.cat([pack_uint(pos, meta_bits(m), pad=True) for _, pos in parts])
        else:
            t["codes"] = pack_bits(q, vw)
            if layout == "bitmask":
                t["bitmask"] = pack_uint(mask, 1, pad=True)
        if gq.group_bits is not None:
            t["widths"] = gw.to(torch.uint8)
        dtypes: dict[str, str] = {}
        stat_bits, stat_group = _pack_stats(gq, rows, groups, t, dtypes)
        if gq.n_outliers:
            _pack_outliers(gq, rows, cols, t, dtypes)
        if gq.perm is not None:
            p = gq.perm.reshape(-1).to(torch.int64)
            if p.numel() != cols or not torch.equal(
                p.sort().values, torch.arange(cols, device=p.device)
            ):
                raise ValueError(f"perm is not a permutation of {cols} columns")
            t["perm"] = p.to(torch.int32)
        return cls(
            format="grouped",
            shape=(rows, cols),
            bits=bits,
            tensors=t,
            n=nm_[0],
            m=nm_[1],
            group_size=gs,
            nnz=rows * vw.numel(),
            dtypes=dtypes,
            layout=layout,
            row_bits=int(vw.sum()),
            n_outliers=gq.n_outliers,
            stat_bits=stat_bits,
            stat_group=stat_group,
            mixed=gq.group_bits is not None,
            has_perm=gq.perm is not None,
        )

    # -- decoding ------------------------------------------------------------------------------
    def _values(self, s: int = 0, e: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(e - s, values per row)`` stored codes of rows ``s:e`` and int64
        ``(values per row,)`` the group of each."""
        codes = self.tensors["codes"][s:e]
        cols = self.shape[1]
        grp = _stored_groups(self.layout, cols, self.group_size, self.n, self.m, codes.device)
        if self.mixed:
            gw = self.tensors["widths"].to(device=codes.device, dtype=torch.int64)
        else:
            gw = torch.full((math.ceil(cols / self.group_size),), self.bits, device=codes.device)
        return unpack_bits(codes, gw[grp]), grp

    def _positions(self, s: int, e: int) -> torch.Tensor:
        """int64 ``(e - s, k)``: stored column of each kept value of rows ``s:e`` (``nm``)."""
        k = self.shape[1] // self.m * self.n
        pos = unpack_uint(self.tensors["meta"][s:e], meta_bits(self.m), k).to(torch.int64)
        return pos + (torch.arange(k, device=pos.device) // self.n * self.m)[None, :]

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor, BiLevel | None, BiLevel | None]:
        """fp32 ``(rows, n_groups)`` scale and zero, and their ``BiLevel`` s (or None)."""
        t, out = self.tensors, []
        for name in ("scale", "zero"):
            if self.stat_bits is None:
                out.append((_bits_f(t[name], _DTYPES[self.dtypes[name]]), None))
                continue
            q = t[f"{name}_q"]
            widths = torch.full((math.ceil(self.shape[1] / self.group_size),), self.stat_bits)
            bl = BiLevel(
                q=unpack_bits(q, widths.to(q.device)),
                s2=_bits_f(t[f"{name}_s2"], _FP16),
                z2=_bits_f(t[f"{name}_z2"], _FP16),
                bits=self.stat_bits,
                group=self.stat_group,
            )
            out.append((bl.decode(), bl))
        (scale, scale_bl), (zero, zero_bl) = out
        return scale, zero, scale_bl, zero_bl

    def _outliers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """int64 rows, int64 stored columns, fp32 values ``(n_outliers,)``; None without."""
        if not self.n_outliers:
            return None
        t = self.tensors
        off = t["outlier_offsets"].to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=off.device), off.diff())
        return rows, t["outlier_cols"].to(torch.int64), _bits_f(t["outlier_vals"], _FP16)

    def group_quant(self) -> GroupQuant:
        """The stored ``GroupQuant`` (inverse of ``from_group_quant``): uint8 codes, fp32
        statistics, int8 ``group_bits``, int64 ``perm`` / outlier positions, fp32 outliers."""
        rows, cols = self.shape
        vals, _ = self._values()
        mask = None
        if self.layout == "nm":
            k = cols // self.m * self.n
            pos = unpack_uint(self.tensors["meta"], meta_bits(self.m), k)
            q, mask = nm_scatter(vals, pos, self.m, cols), nm_mask_of(pos, self.m, cols)
        else:
            q = vals
            if self.layout == "bitmask":
                mask = unpack_uint(self.tensors["bitmask"], 1, cols).bool()
        scale, zero, scale_bl, zero_bl = self._stats()
        out = self._outliers()
        perm = self.tensors.get("perm")
        return GroupQuant(
            q=q,
            scale=scale,
            zero=zero,
            group_size=self.group_size,
            bits=self.bits,
            group_bits=self.tensors["widths"].to(torch.int8) if self.mixed else None,
            mask=mask,
            perm=None if perm is None else perm.to(torch.int64),
            outlier_rows=None if out is None else out[0],
            outlier_cols=None if out is None else out[1],
            outlier_vals=None if out is None else out[2],
            scale_bl=scale_bl,
            zero_bl=zero_bl,
        )

    def to_dense(self) -> torch.Tensor:
        """fp32 ``(rows, cols)`` in the original column order, bit for bit
        ``GroupQuant.dequantize()``: per element the same fp32 operations in the same order.
        Rows are decoded a block at a time (rows are independent and the outlier CSR slices by
        row), so the work tensors besides the output stay about ``BITS_STEP`` values."""
        rows, cols = self.shape
        scale, zero, _, _ = self._stats()
        perm = self.tensors.get("perm")
        perm = None if perm is None else perm.to(torch.int64)
        o = self._outliers()
        bounds = None if o is None else self.tensors["outlier_offsets"].tolist()
        out = torch.empty(rows, cols, dtype=torch.float32, device=scale.device)
        step = max(1, BITS_STEP // cols)
        for s in range(0, rows, step):
            e = min(s + step, rows)
            vals, grp = self._values(s, e)
            # (q - zero) * scale, per element exactly GroupQuant's expression
            v = (vals.to(torch.float32) - zero[s:e, grp]) * scale[s:e, grp]
            if self.layout == "nm":  # kept values only: the pruned entries are GroupQuant's +0.0
                blk = torch.zeros(e - s, cols, dtype=torch.float32, device=v.device)
                v = blk.scatter_(1, self._positions(s, e), v)
            elif self.layout == "bitmask":
                v.masked_fill_(~unpack_uint(self.tensors["bitmask"][s:e], 1, cols).bool(), 0.0)
            if o is not None:  # this block's outliers: CSR entries bounds[s]:bounds[e]
                a, b = bounds[s], bounds[e]
                v.index_put_((o[0][a:b] - s, o[1][a:b]), o[2][a:b], accumulate=True)
            if perm is None:
                out[s:e] = v
            else:  # stored column j is original column perm[j]
                out[s:e, perm] = v
        return out

    def mask(self) -> torch.Tensor | None:
        """bool ``(rows, cols)`` kept entries in the ORIGINAL column order, or None (dense)."""
        if self.layout == "dense":
            return None
        return self.group_quant().original_mask()

    def codes_and_mask(self):
        """Not meaningful: the codes are unsigned per-group asymmetric codes of mixed widths."""
        raise ValueError(
            "codes_and_mask: the grouped format's codes are asymmetric per-group codes "
            "(use group_quant(), to_dense() or mask())"
        )

    def quant_tensor(self):
        """Not meaningful: a ``GroupQuant`` is no symmetric ``QuantTensor`` (use ``group_quant``)."""
        raise ValueError("quant_tensor: the grouped format holds a GroupQuant (use group_quant())")

    def row_block(self, start: int, end: int):
        """Not supported: the outlier CSR and bi-level row groups are not sliced."""
        raise ValueError("row_block: the grouped format is not row-sliceable")

    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes, widths, metadata, statistics, outliers, perm)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def float_field(self, name: str) -> torch.Tensor | None:
        """A floating-point field (``scale``, ``zero``, ``scale_s2``, ... ``outlier_vals``) in
        its logical dtype (a view of the stored bits), or None when absent."""
        t = self.tensors.get(name)
        if t is None:
            return None
        if name not in self.dtypes:
            raise ValueError(f"float_field: {name} is not a floating-point field")
        return t.view(_DTYPES[self.dtypes[name]])

    # -- metadata ------------------------------------------------------------------------------
    def meta(self) -> dict:
        """JSON-able description; ``GroupedWeight.empty(meta)`` rebuilds shaped tensors."""
        out = {k: getattr(self, k) for k in ("format", *_INT_KEYS, "stat_bits", "layout")}
        out.update(shape=list(self.shape), mixed=self.mixed, has_perm=self.has_perm)
        out["dtypes"] = dict(self.dtypes)
        out["tensors"] = {
            k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)}
            for k, v in self.tensors.items()
        }
        return out

    @classmethod
    def empty(cls, meta: dict, device: torch.device | str | None = None) -> GroupedWeight:
        """Uninitialised tensors with the shapes and dtypes recorded in ``meta``."""
        tensors = {
            k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device=device)
            for k, v in meta.get("tensors", {}).items()
        }
        sb = meta["stat_bits"]
        return cls(
            format="grouped",
            shape=(int(meta["shape"][0]), int(meta["shape"][1])),
            tensors=tensors,
            dtypes=dict(meta["dtypes"]),
            stat_bits=None if sb is None else int(sb),
            mixed=bool(meta["mixed"]),
            has_perm=bool(meta["has_perm"]),
            layout=str(meta["layout"]),
            **{k: int(meta[k]) for k in _INT_KEYS},
        )


def _pack_stats(gq: GroupQuant, rows: int, groups: int, t: dict, dtypes: dict):
    """Stores ``gq``'s scale / zero into ``t`` / ``dtypes``; returns ``(stat_bits, stat_group)``
    (``(None, 0)`` for plain fp16 / fp32 statistics)."""
    sbl, zbl = gq.scale_bl, gq.zero_bl
    if (sbl is None) != (zbl is None):
        raise ValueError("scale_bl and zero_bl must both be set or both be None")
    for name, st in (("scale", gq.scale), ("zero", gq.zero)):
        if tuple(st.shape) != (rows, groups):
            raise ValueError(
                f"{name} shape {tuple(st.shape)} != (rows, n_groups) = {(rows, groups)}"
            )
    if sbl is None:
        for name, st in (("scale", gq.scale), ("zero", gq.zero)):
            dt = _lossless_dtype(st)
            dtypes[name] = _dtype_name(dt)
            t[name] = _f_bits(st.to(torch.float32), dt).clone()  # never alias gq.scale
        return None, 0
    bits, group = int(sbl.bits), int(sbl.group)
    if (zbl.bits, zbl.group) != (bits, group) or not 1 <= bits <= 8 or group < 1:
        raise ValueError(
            f"bi-level statistics need one stat_bits in 1..8 and stat_group >= 1 for scale and "
            f"zero, got {sbl.bits}/{sbl.group} and {zbl.bits}/{zbl.group}"
        )
    second = (math.ceil(rows / group), groups)
    for name, st, bl in (("scale", gq.scale, sbl), ("zero", gq.zero, zbl)):
        if (
            tuple(bl.q.shape) != (rows, groups)
            or tuple(bl.s2.shape) != second
            or tuple(bl.z2.shape) != second
        ):
            raise ValueError(f"{name}_bl shapes do not fit {rows} rows, {groups} groups")
        if not torch.equal(bl.decode(), st.to(torch.float32)):
            raise ValueError(f"{name} is not the decode of {name}_bl (only the codes are stored)")
        t[f"{name}_q"] = pack_bits(bl.q, torch.full((groups,), bits, device=bl.q.device))
        for part in ("s2", "z2"):
            t[f"{name}_{part}"] = _fp16_exact(getattr(bl, part), f"{name}_bl.{part}")
            dtypes[f"{name}_{part}"] = "float16"
    return bits, group


def _pack_outliers(gq: GroupQuant, rows: int, cols: int, t: dict, dtypes: dict) -> None:
    """Stores ``gq``'s outliers as CSR (``outlier_offsets`` / ``_cols`` / ``_vals``) in ``t``."""
    r = gq.outlier_rows.reshape(-1).to(torch.int64)
    c = gq.outlier_cols.reshape(-1).to(torch.int64)
    no = gq.n_outliers
    if r.numel() != no or c.numel() != no:
        raise ValueError("outlier_rows / outlier_cols / outlier_vals differ in length")
    if bool(((r < 0) | (r >= rows) | (c < 0) | (c >= cols)).any()):
        raise ValueError(f"an outlier position is outside the ({rows}, {cols}) matrix")
    key = r * cols + c
    if bool((key[1:] <= key[:-1]).any()):
        raise ValueError("outliers must be sorted by row then column, each position once")
    off = torch.zeros(rows + 1, dtype=torch.int64, device=r.device)
    off[1:] = torch.bincount(r, minlength=rows).cumsum(0)
    if no >= 2**31:
        raise ValueError("grouped format: more than 2**31 - 1 outliers in one matrix")
    t["outlier_offsets"] = off.to(torch.int32)
    t["outlier_cols"] = c.to(torch.int16 if cols <= 32767 else torch.int32)
    t["outlier_vals"] = _fp16_exact(gq.outlier_vals.reshape(-1), "outlier_vals")
    dtypes["outlier_vals"] = "float16"
