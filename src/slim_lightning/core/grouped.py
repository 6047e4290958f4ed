"""``GroupQuant``: asymmetric group quantisation with the SpQR / SliM-LLM extras.

The contract shared by ``core.spqr``, ``core.slim_llm``, the packed ``grouped`` format
(``formats.grouped``) and its decode kernel (``kernels.grouped``). Pure torch.

Columns are held in a **stored order** (``perm``: stored column ``j`` is original input column
``perm[j]``; identity when ``perm`` is None, SpQR's act-order otherwise). Column groups are
``group_size`` consecutive stored columns (the last one may be shorter); every group ``g`` has a
code width ``group_bits[g]`` in 1..8 (one width for all groups when ``group_bits`` is None).

Dequantised value, in fp32, in this order (the packed decode repeats it operation for operation,
so both give the same bits):

1. ``v[i, j] = (q[i, j] - zero[i, g]) * scale[i, g]`` with ``g = j // group_size``,
2. ``v[i, j] = 0`` where ``mask`` (stored order) is False,
3. ``v[i, j] += outlier`` for each sparse outlier ``(i, j, value)`` (fp16-representable values:
   the correction that makes dense + sparse equal the weight the column pass kept in 16 bits),
4. ``w[:, perm[j]] = v[:, j]``.

With bi-level statistics (SpQR) ``scale`` and ``zero`` are themselves quantised: per column group
and per ``stat_group`` consecutive rows, ``scale[i, g] = (scale_q[i, g] - scale_z2[r, g]) *
scale_s2[r, g]`` (``r = i // stat_group``; fp16-representable ``s2``/``z2``; ``stat_bits``-bit
codes), the same for ``zero``; ``scale`` / ``zero`` hold those decoded fp32 values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class BiLevel:
    """Second-level quantisation of one first-level statistic (SpQR).

    Attributes:
        q: uint8 ``(rows, n_groups)`` codes in ``[0, 2**bits - 1]``.
        s2, z2: fp32 ``(ceil(rows / group), n_groups)`` fp16-representable scale and zero.
        bits: code width of ``q``.
        group: consecutive rows sharing one ``(s2, z2)``.
    """

    q: torch.Tensor
    s2: torch.Tensor
    z2: torch.Tensor
    bits: int
    group: int

    def decode(self) -> torch.Tensor:
        """fp32 ``(rows, n_groups)``: ``(q - z2[r]) * s2[r]`` for ``r = row // group``."""
        rows = self.q.shape[0]
        z2 = self.z2.repeat_interleave(self.group, dim=0)[:rows]
        s2 = self.s2.repeat_interleave(self.group, dim=0)[:rows]
        return (self.q.to(torch.float32) - z2) * s2


@dataclass
class GroupQuant:
    """An asymmetric, group-quantised matrix (module docstring for the decode).

    Attributes:
        q: uint8 ``(rows, cols)`` codes in the stored column order, ``[0, 2**b_g - 1]`` per group;
            0 where pruned.
        scale, zero: fp32 ``(rows, n_groups)``; ``zero`` in code units (not rounded: SpQR's
            second level and SliM-LLM's 1-bit groups give fractional zeros).
        group_size: stored columns per group.
        bits: the nominal width (SpQR: all groups; SliM-LLM: the average N).
        group_bits: int8 ``(n_groups,)`` per-group widths, or None (all ``bits``).
        mask: bool ``(rows, cols)`` kept entries in the stored order, or None (dense).
        perm: int64 ``(cols,)`` stored column -> original column, or None (identity).
        outlier_rows, outlier_cols: int64 ``(nnz,)`` positions (stored order) of the 16-bit
            outliers, sorted by row then column; ``outlier_vals`` fp32 ``(nnz,)`` fp16-representable.
        scale_bl, zero_bl: the ``BiLevel`` quantisation of ``scale`` / ``zero``, or None (fp16).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    bits: int
    group_bits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    outlier_rows: torch.Tensor | None = None
    outlier_cols: torch.Tensor | None = None
    outlier_vals: torch.Tensor | None = None
    scale_bl: BiLevel | None = None
    zero_bl: BiLevel | None = None
    in_scale: None = field(default=None, repr=False)  # the QuantTensor attribute, never set

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def n_groups(self) -> int:
        return math.ceil(self.q.shape[1] / self.group_size)

    @property
    def n_outliers(self) -> int:
        return 0 if self.outlier_vals is None else int(self.outlier_vals.numel())

    def paper_bits(self) -> float:
        """Bits per weight as the papers count them: the codes at their widths (kept weights
        only), the statistics (bi-level: ``2 b_s / beta1 + 64 / (beta1 beta2)``, SpQR App. D;
        else an fp16 scale and zero per group) and 32 bits per outlier."""
        rows, cols = self.q.shape
        sizes = torch.full((self.n_groups,), self.group_size, dtype=torch.int64)
        sizes[-1] = cols - self.group_size * (self.n_groups - 1)
        kept = 1.0 if self.mask is None else float(self.mask.float().mean())
        code = float((self.widths() * sizes).sum()) / cols * kept
        if self.scale_bl is not None:
            b2, g2 = self.scale_bl.bits, self.scale_bl.group
            stats = (2 * b2 * rows + 64 * math.ceil(rows / g2)) * self.n_groups / (rows * cols)
        else:
            stats = 32 * self.n_groups / cols
        return code + stats + 32 * self.n_outliers / (rows * cols)

    def widths(self) -> torch.Tensor:
        """int64 ``(n_groups,)`` code width of every group."""
        if self.group_bits is None:
            return torch.full((self.n_groups,), self.bits, dtype=torch.int64)
        return self.group_bits.to(torch.int64).cpu()

    def dequantize_stored(self) -> torch.Tensor:
        """fp32 ``(rows, cols)`` in the stored column order (steps 1-3 of the module docstring)."""
        rows, cols = self.q.shape
        g = self.group_size
        idx = torch.arange(cols, device=self.q.device) // g  # (cols,) group of each column
        v = (self.q.to(torch.float32) - self.zero[:, idx]) * self.scale[:, idx]
        if self.mask is not None:
            v.masked_fill_(~self.mask, 0.0)
        if self.n_outliers:
            v.index_put_(
                (self.outlier_rows, self.outlier_cols),
                self.outlier_vals.to(torch.float32),
                accumulate=True,
            )
        return v

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(rows, cols)`` matrix in the original column order, in ``dtype``."""
        v = self.dequantize_stored()
        if self.perm is not None:
            w = torch.empty_like(v)
            w[:, self.perm] = v
            v = w
        return v.to(dtype)

    def original_mask(self) -> torch.Tensor | None:
        """bool ``(rows, cols)`` kept entries in the original column order, or None."""
        if self.mask is None or self.perm is None:
            return self.mask
        out = torch.empty_like(self.mask)
        out[:, self.perm] = self.mask
        return out

    # -- generic tensor plumbing (resume state, device moves) ---------------------------------
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Flat ``{name: tensor}`` and a JSON-able ``{name: value}`` of the non-tensor fields."""
        out, meta = {}, {"kind": "group"}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, BiLevel):
                for k in ("q", "s2", "z2"):
                    out[f"{f.name}.{k}"] = getattr(v, k)
                meta[f.name] = {"bits": v.bits, "group": v.group}
            elif torch.is_tensor(v):
                out[f.name] = v
            elif v is not None:
                meta[f.name] = v
        return out, meta

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict) -> GroupQuant:
        """Inverse of ``to_tensors``."""
        kw = {k: v for k, v in meta.items() if k != "kind" and not isinstance(v, dict)}
        for name in ("scale_bl", "zero_bl"):
            if name in meta:
                kw[name] = BiLevel(t[f"{name}.q"], t[f"{name}.s2"], t[f"{name}.z2"], **meta[name])
        for f in fields(cls):
            if f.name in t:
                kw[f.name] = t[f.name]
        return cls(**kw)

    def map(self, fn) -> GroupQuant:
        """A copy with ``fn`` applied to every tensor (e.g. a device move)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, BiLevel):
                kw[f.name] = replace(v, q=fn(v.q), s2=fn(v.s2), z2=fn(v.z2))
            elif torch.is_tensor(v):
                kw[f.name] = fn(v)
        return replace(self, **kw)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to fp16-representable ones (what a packed file stores exactly)."""
    return x.to(torch.float32).to(torch.float16).to(torch.float32)


def quantize_codes(w: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    """``clamp(round(w / scale + zero), 0, 2**bits - 1)`` as fp32 codes (broadcasting)."""
    return torch.clamp(torch.round(w / scale + zero), 0, 2**bits - 1)


def spqr_bits_formula(
    bits: int, stat_bits: int | None, group: int, stat_group: int, outlier_share: float
) -> float:
    """SpQR's average bits per weight (paper App. D): ``b_w + (b_s + b_z) / beta1 + 64 /
    (beta1 * beta2) + 32 r_o`` (fp16 statistics: ``32 / beta1`` and no second level)."""
    if stat_bits is None:
        return bits + 32 / group + 32 * outlier_share
    return bits + 2 * stat_bits / group + 64 / (group * stat_group) + 32 * outlier_share
