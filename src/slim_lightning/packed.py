"""Compatibility module: the packed storage contract now lives in ``slim_lightning.formats``.

Re-exports every name this module used to define, so ``from slim_lightning.packed import ...``
keeps working (the kernels, benchmarks and tests use it). New code imports from
``slim_lightning.formats`` (``fake_quant_absmax`` from ``slim_lightning.core.quant``).
"""

from __future__ import annotations

from slim_lightning.core.quant import fake_quant_absmax
from slim_lightning.core.types import QuantTensor
from slim_lightning.formats.bitpack import (
    _BITS_DTYPE,
    _DTYPES,
    _bits_f,
    _check_codes,
    _dtype_name,
    _f_bits,
    _lossless_dtype,
    _pack_codes,
    _unpack_codes,
    meta_bits,
    pack_int4,
    pack_uint,
    unpack_int4,
    unpack_uint,
)
from slim_lightning.formats.nm import nm_mask_of, nm_scatter, nm_select, pack_nm, unpack_nm
from slim_lightning.formats.packed import (
    Format,
    PackedWeight,
    _choose_format,
    check_meta,
    check_values,
    expected_tensors,
    pack_absmax,
)
from slim_lightning.formats.unstructured import (
    _check_mask,
    _row_offsets,
    pack_unstructured,
    unpack_unstructured,
)

__all__ = [
    "_BITS_DTYPE",
    "_DTYPES",
    "Format",
    "PackedWeight",
    "QuantTensor",
    "_bits_f",
    "_check_codes",
    "_check_mask",
    "_choose_format",
    "_dtype_name",
    "_f_bits",
    "_lossless_dtype",
    "_pack_codes",
    "_row_offsets",
    "_unpack_codes",
    "check_meta",
    "check_values",
    "expected_tensors",
    "fake_quant_absmax",
    "meta_bits",
    "nm_mask_of",
    "nm_scatter",
    "nm_select",
    "pack_absmax",
    "pack_int4",
    "pack_nm",
    "pack_uint",
    "pack_unstructured",
    "unpack_int4",
    "unpack_nm",
    "unpack_uint",
    "unpack_unstructured",
]
