"""Packed storage formats of compressed weight matrices (the on-disk / in-memory contract).

* ``bitpack``: bit packing, integer-code and floating-point-field conventions shared by all formats,
* ``nm``: the N:M sparse format (and its fast dequantisation),
* ``unstructured``: any mask, as a bitmap plus the kept values,
* ``dense``: no sparsity,
* ``grouped``: ``GroupedWeight``, a ``GroupQuant`` (SpQR / SliM-LLM) at its true code widths,
* ``packed``: ``PackedWeight`` (one matrix in one of the formats, via ``FORMATS``; ``grouped``
  weights are ``GroupedWeight`` s),
* ``checks``: the checks of a loaded checkpoint's packed metadata and tensors (all formats).

Only torch and ``slim_lightning.core`` are imported.
"""

from slim_lightning.formats.bitpack import (
    meta_bits,
    pack_bits,
    pack_int4,
    pack_uint,
    unpack_bits,
    unpack_int4,
    unpack_uint,
)
from slim_lightning.formats.checks import (
    check_meta,
    check_values,
    check_values_grouped,
    expected_tensors,
    expected_tensors_grouped,
)
from slim_lightning.formats.dense import pack_dense, unpack_dense
from slim_lightning.formats.grouped import GroupedWeight
from slim_lightning.formats.nm import (
    dequant_nm,
    nm_mask_of,
    nm_scatter,
    nm_select,
    pack_nm,
    unpack_nm,
)
from slim_lightning.formats.packed import FORMATS, Format, PackedWeight, pack_absmax
from slim_lightning.formats.unstructured import pack_unstructured, unpack_unstructured

__all__ = [
    "FORMATS",
    "Format",
    "GroupedWeight",
    "PackedWeight",
    "check_meta",
    "check_values",
    "check_values_grouped",
    "dequant_nm",
    "expected_tensors",
    "expected_tensors_grouped",
    "meta_bits",
    "nm_mask_of",
    "nm_scatter",
    "nm_select",
    "pack_absmax",
    "pack_bits",
    "pack_dense",
    "pack_int4",
    "pack_nm",
    "pack_uint",
    "pack_unstructured",
    "unpack_bits",
    "unpack_dense",
    "unpack_int4",
    "unpack_nm",
    "unpack_uint",
    "unpack_unstructured",
]
