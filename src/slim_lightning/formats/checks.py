"""Checks of packed metadata and tensors (a loaded checkpoint's), for every packed format.

* ``expected_tensors(meta)``: the tensors (shapes, dtypes) a ``meta()`` implies,
* ``check_meta(meta)``: ``meta["tensors"]`` is exactly that,
* ``check_values(pw)``: stored values are in range (finite scales, consistent offsets, ...),

for ``PackedWeight`` (``nm``, ``unstructured``, ``dense``) and ``GroupedWeight`` (``grouped``,
``*_grouped``); and ``_choose_format``, the default format of a ``PackedWeight``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from slim_lightning.formats.bitpack import (
    _BITS_DTYPE,
    _DTYPES,
    _dtype_name,
    meta_bits,
    unpack_uint,
)
from slim_lightning.formats.grouped import LAYOUTS, _stored_groups

ALLOWED_FORMATS = "nm, unstructured, dense, grouped"


def expected_tensors(meta: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{field: (shape, dtype name)}`` that ``meta``'s format parameters imply.

    Used to check a loaded checkpoint: a ``meta()`` whose ``tensors`` disagree with its format,
    shape, bits, n, m, group size or nnz was damaged or edited.

    Raises:
        ValueError: the parameters themselves are impossible (e.g. ``n > m``, ``cols % m``).
    """
    if meta.get("format") == "grouped":
        return expected_tensors_grouped(meta)
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
        raise ValueError(f"format {fmt!r}; allowed: {ALLOWED_FORMATS}")
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


def check_values(pw: Any) -> None:
    """Raises ValueError if a stored scale / fp value of a ``PackedWeight`` / ``GroupedWeight``
    is NaN/Inf or a row offset is inconsistent (``check_values_grouped`` for ``grouped``)."""
    if pw.format == "grouped":
        return check_values_grouped(pw)
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


def _choose_format(mask: torch.Tensor | None, cols: int, n: int, m: int) -> str:
    """``dense`` without a mask; ``nm`` when every group of ``m`` keeps at most ``n``; else
    ``unstructured``."""
    if mask is None:
        return "dense"
    if cols % m == 0 and bool((mask.reshape(mask.shape[0], -1, m).sum(-1) <= n).all()):
        return "nm"
    return "unstructured"


# ----------------------------------------------------------------------------------------------
# the grouped format (``formats.grouped``)
# ----------------------------------------------------------------------------------------------


def _meta_int(meta: dict, key: str, lo: int = 0) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"grouped meta {key}={v!r}; needs an integer >= {lo}")
    return v


def expected_tensors_grouped(meta: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{field: (shape, dtype name)}`` that a ``GroupedWeight.meta()`` implies.

    Raises:
        ValueError: impossible parameters (bits or ``stat_bits`` outside 1..8, ``group_size < 1``,
            an unknown layout, an N:M pattern that does not fit, ``nnz`` / ``row_bits`` that
            disagree with the layout, ``dtypes`` other than the stored fp fields').
    """
    shape = meta.get("shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 2 or min(int(x) for x in shape) < 1:
        raise ValueError(f"shape {shape!r} is not a positive matrix shape")
    rows, cols = (int(x) for x in shape)
    bits = meta.get("bits")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}; allowed: 1..8")
    g = _meta_int(meta, "group_size", 1)
    n, m, nnz, row_bits, n_out, sg = (
        _meta_int(meta, k) for k in ("n", "m", "nnz", "row_bits", "n_outliers", "stat_group")
    )
    layout, mixed, has_perm = meta.get("layout"), meta.get("mixed"), meta.get("has_perm")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    if not isinstance(mixed, bool) or not isinstance(has_perm, bool):
        raise ValueError(f"mixed={mixed!r}, has_perm={has_perm!r}; both must be booleans")
    groups = math.ceil(cols / g)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    if layout == "nm":
        if not 1 <= n <= m <= 256 or cols % m or g % m:
            raise ValueError(f"n={n}, m={m} do not fit {cols} cols / group {g} (need m | both)")
        per_row = cols // m * n
        out["meta"] = ((rows, math.ceil(per_row * meta_bits(m) / 8)), "uint8")
    else:
        if (n, m) != (0, 0):
            raise ValueError(f"n={n}, m={m} for layout {layout}; expected 0, 0")
        per_row = cols
        if layout == "bitmask":
            out["bitmask"] = ((rows, math.ceil(cols / 8)), "uint8")
    if nnz != rows * per_row:
        raise ValueError(f"nnz={nnz} != {rows * per_row} stored values ({layout} layout)")
    if mixed:
        if not per_row <= row_bits <= 8 * per_row:
            raise ValueError(f"row_bits={row_bits} outside [1, 8] bits x {per_row} values")
        out["widths"] = ((groups,), "uint8")
    elif row_bits != bits * per_row:
        raise ValueError(f"row_bits={row_bits} != bits * values per row = {bits * per_row}")
    out["codes"] = ((rows, math.ceil(row_bits / 8)), "uint8")
    stored = meta.get("dtypes", {})
    dtypes: dict[str, str] = {}
    sb = meta.get("stat_bits")
    if sb is None:
        if sg != 0:
            raise ValueError(f"stat_group={sg} without bi-level statistics; expected 0")
        for name in ("scale", "zero"):
            dt = stored.get(name)
            if dt not in _DTYPES:
                raise ValueError(f"{name} dtype {dt!r}; allowed: {', '.join(_DTYPES)}")
            dtypes[name] = dt
            out[name] = ((rows, groups), _dtype_name(_BITS_DTYPE[_DTYPES[dt]]))
    else:
        if isinstance(sb, bool) or not isinstance(sb, int) or not 1 <= sb <= 8 or sg < 1:
            raise ValueError(f"stat_bits={sb!r}, stat_group={sg}; need 1..8 and >= 1")
        for name in ("scale", "zero"):
            out[f"{name}_q"] = ((rows, math.ceil(groups * sb / 8)), "uint8")
            for part in ("s2", "z2"):
                out[f"{name}_{part}"] = ((math.ceil(rows / sg), groups), "int16")
                dtypes[f"{name}_{part}"] = "float16"
    if n_out > rows * cols:
        raise ValueError(f"n_outliers={n_out} > rows * cols = {rows * cols}")
    if n_out:
        out["outlier_offsets"] = ((rows + 1,), "int32")
        out["outlier_cols"] = ((n_out,), "int16" if cols <= 32767 else "int32")
        out["outlier_vals"] = ((n_out,), "int16")
        dtypes["outlier_vals"] = "float16"
    if has_perm:
        out["perm"] = ((cols,), "int32")
    if stored != dtypes:
        raise ValueError(f"dtypes {stored} != the fp fields' {dtypes}")
    return out


def check_values_grouped(pw: Any) -> None:
    """Raises ValueError if a ``GroupedWeight``'s stored values are out of range: NaN/Inf in an
    fp field, widths outside 1..8 or not adding up to ``row_bits``, N:M positions out of order,
    outlier offsets / columns inconsistent, ``perm`` not a permutation. (Codes cannot exceed
    their widths: the bitstream has no room for it.)"""
    t, (rows, cols) = pw.tensors, pw.shape
    for name in pw.dtypes:
        x = pw.float_field(name)
        if x is None:
            raise ValueError(f"{name} is listed in dtypes but not stored")
        bad = ~torch.isfinite(x.float())
        if bool(bad.any()):
            raise ValueError(f"{name} has {int(bad.sum())} NaN/Inf entries")
    if pw.mixed:
        w = t["widths"].to(torch.int64)
        if w.numel() and (int(w.min()) < 1 or int(w.max()) > 8):
            raise ValueError(f"widths must be in 1..8, got [{int(w.min())}, {int(w.max())}]")
        grp = _stored_groups(pw.layout, cols, pw.group_size, pw.n, pw.m, w.device)
        if int(w[grp].sum()) != pw.row_bits:
            raise ValueError(f"widths add up to {int(w[grp].sum())} bits per row, not row_bits")
    if pw.layout == "nm":
        k = cols // pw.m * pw.n
        pos = unpack_uint(t["meta"], meta_bits(pw.m), k).to(torch.int64).reshape(rows, -1, pw.n)
        if bool((pos >= pw.m).any()) or bool((pos[..., 1:] <= pos[..., :-1]).any()):
            raise ValueError("nm meta: a position >= m or not increasing inside its group")
    if pw.n_outliers:
        o = t["outlier_offsets"].to(torch.int64)
        if int(o[0]) != 0 or int(o[-1]) != pw.n_outliers or bool((o[1:] < o[:-1]).any()):
            raise ValueError("outlier_offsets are not a monotone prefix sum ending at n_outliers")
        c = t["outlier_cols"].to(torch.int64)
        if bool(((c < 0) | (c >= cols)).any()):
            raise ValueError(f"an outlier column is outside 0..{cols - 1}")
        r = torch.repeat_interleave(torch.arange(rows, device=o.device), o.diff())
        if bool(((r[1:] == r[:-1]) & (c[1:] <= c[:-1])).any()):
            raise ValueError("outlier columns are not strictly increasing within a row")
    perm = t.get("perm")
    if perm is not None:
        p = perm.to(torch.int64)
        if not torch.equal(p.sort().values, torch.arange(cols, device=p.device)):
            raise ValueError(f"perm is not a permutation of {cols} columns")
