"""Packed storage format: bit-exact literals, round trips, illegal input, exactness, byte counts."""

import json
import math

import pytest
import torch

from slim_lightning.core.compress import compress_linear
from slim_lightning.core.quant import absmax_quant, quantize_per_tensor
from slim_lightning.core.types import (
    CompressSpec,
    LayerStats,
    LowRankSpec,
    QuantSpec,
    QuantTensor,
    SparsitySpec,
)
from slim_lightning.formats import PackedWeight
from slim_lightning.formats.bitpack import pack_int4, pack_uint, unpack_int4, unpack_uint
from slim_lightning.formats.nm import pack_nm, unpack_nm
from slim_lightning.formats.unstructured import pack_unstructured, unpack_unstructured

pytestmark = pytest.mark.usefixtures("one_thread")


def _u8(*xs):
    return torch.tensor(xs, dtype=torch.uint8)


def _i8(*xs):
    return torch.tensor(xs, dtype=torch.int8)


# ---------------------------------------------------------------------------------------------
# bit-exact literals
# ---------------------------------------------------------------------------------------------


def test_int4_pack_unpack_literals():
    # two's complement nibbles, first value in the low nibble
    q = torch.tensor([[-1, 2, 7, -8], [0, 1, -2, 3]], dtype=torch.int8)
    packed = pack_int4(q)
    expected = torch.tensor(
        [[0b0010_1111, 0b1000_0111], [0b0001_0000, 0b0011_1110]], dtype=torch.uint8
    )
    assert torch.equal(packed, expected)
    assert torch.equal(unpack_int4(packed), q)
    # odd column count only with explicit padding (zero high nibble)
    assert torch.equal(pack_int4(_i8(5, -3, 4), pad=True), _u8(0b1101_0101, 0b0000_0100))
    assert torch.equal(unpack_int4(_u8(0b1101_0101, 0b0000_0100), 3), _i8(5, -3, 4))


def test_uint_pack_literals():
    assert torch.equal(pack_uint(_u8(1, 2, 3, 0), 2), _u8(0b00_11_10_01))
    assert torch.equal(unpack_uint(_u8(0b00_11_10_01), 2), _u8(1, 2, 3, 0))
    bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert torch.equal(pack_uint(bits, 1, pad=True), _u8(0b1000_1101, 0b0000_0001))
    assert torch.equal(unpack_uint(_u8(0b1000_1101, 0b0000_0001), 1, 9).bool(), bits)


def test_nm_pack_literals():
    # one row, two 2:4 groups: group 0 keeps cols 1, 3 (codes 3, -2); group 1 keeps 0, 2 (5, -1)
    q = _i8(0, 3, 0, -2, 5, 0, -1, 0)[None]
    mask = q != 0
    p = pack_nm(q, mask, 2, 4)
    assert torch.equal(p["values"], _u8(0b1110_0011, 0b1111_0101)[None])
    # positions [1, 3, 0, 2], 2 bits each, LSB first
    assert torch.equal(p["meta"], _u8(0b10_00_11_01)[None])
    q2, m2 = unpack_nm(p["values"], p["meta"], 2, 4, 8)
    assert torch.equal(q2, q) and torch.equal(m2, mask)


def test_nm_group_with_fewer_kept_is_filled_with_lowest_unused_position():
    q = _i8(0, 0, 4, 0)[None]
    mask = q != 0  # one kept value: col 2; filler position 0 holds code 0
    p = pack_nm(q, mask, 2, 4)
    assert torch.equal(p["values"], _u8(0b0100_0000)[None])
    assert torch.equal(p["meta"], _u8(0b0000_10_00)[None])  # positions [0, 2]
    q2, m2 = unpack_nm(p["values"], p["meta"], 2, 4, 4)
    assert torch.equal(q2, q) and m2.tolist() == [[True, False, True, False]]


def test_unstructured_pack_literals():
    q = torch.tensor([[3, 0, -1, 0], [0, 0, 0, 7]], dtype=torch.int8)
    p = pack_unstructured(q, q != 0)
    assert torch.equal(p["bitmask"], _u8(0b0101, 0b1000)[:, None])
    assert torch.equal(p["values"], _u8(0b1111_0011, 0b0000_0111))  # 3, -1 | 7, pad
    assert p["row_offsets"].tolist() == [0, 2, 3] and p["row_offsets"].dtype == torch.int32
    q2, m2 = unpack_unstructured(p["bitmask"], p["values"], 4)
    assert torch.equal(q2, q) and torch.equal(m2, q != 0)


# ---------------------------------------------------------------------------------------------
# illegal input
# ---------------------------------------------------------------------------------------------


def test_illegal_input_raises():
    with pytest.raises(ValueError, match="odd column count"):
        pack_int4(_i8(1, 2, 3)[None])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(_i8(8, 0)[None])
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.zeros(1, 2))
    q = _i8(1, 2, 3, 0)[None]
    with pytest.raises(ValueError, match="not 2:4"):
        pack_nm(q, q != 0, 2, 4)
    with pytest.raises(ValueError, match="outside the mask"):
        pack_nm(q, torch.tensor([[True, True, False, False]]), 2, 4)
    with pytest.raises(ValueError, match="cols % m"):
        pack_nm(_i8(1, 0, 0, 0, 1, 0)[None], _i8(1, 0, 0, 0, 1, 0)[None] != 0, 2, 4)
    with pytest.raises(ValueError, match=r"\[-4, 3\]"):
        pack_nm(_i8(4, 0, 0, 0)[None], _i8(4, 0, 0, 0)[None] != 0, 2, 4, bits=3)
    with pytest.raises(ValueError, match="bool"):
        pack_nm(q, q, 2, 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_uint(_u8(1, 2, 3), 2)
    with pytest.raises(ValueError, match="scale shape"):
        PackedWeight.from_quant(QuantTensor(_i8(1, 2)[None], torch.ones(2, 1), 2, 4))


# ---------------------------------------------------------------------------------------------
# random round trips
# ---------------------------------------------------------------------------------------------


def _codes(rows, cols, bits, gen):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.randint(lo, hi + 1, (rows, cols), generator=gen, dtype=torch.int8)


def _nm_mask(rows, cols, n, m, gen):
    score = torch.rand(rows, cols // m, m, generator=gen)
    keep = torch.topk(score, n, -1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, keep, True).reshape(rows, cols)


@pytest.mark.parametrize("bits", [4, 3, 8])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_round_trip_random(n, m, bits):
    g = torch.Generator().manual_seed(n * 10 + m + bits)
    rows, cols = 12, 576
    mask = _nm_mask(rows, cols, n, m, g)
    q = _codes(rows, cols, bits, g) * mask
    p = pack_nm(q, mask, n, m, bits)
    q2, m2 = unpack_nm(p["values"], p["meta"], n, m, cols, bits)
    assert torch.equal(q2, q) and torch.equal(m2, mask)
    k = cols // m * n
    assert p["values"].dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert p["values"].shape == (rows, math.ceil(k / 2) if bits <= 4 else k)


@pytest.mark.parametrize("bits", [4, 8])
def test_unstructured_round_trip_random(bits):
    g = torch.Generator().manual_seed(bits)
    mask = torch.rand(9, 131, generator=g) < 0.5  # odd cols and odd nnz exercise padding
    q = _codes(9, 131, bits, g) * mask
    p = pack_unstructured(q, mask, bits)
    q2, m2 = unpack_unstructured(p["bitmask"], p["values"], 131, bits)
    assert torch.equal(q2, q) and torch.equal(m2, mask)


@pytest.mark.parametrize("cols,group", [(576, 128), (77, 128), (256, 64), (57, 16)])
@pytest.mark.parametrize("bits", [4, 2, 6])
def test_dense_grouped_round_trip_exact(cols, group, bits):
    g = torch.Generator().manual_seed(cols + bits)
    w = torch.randn(10, cols, generator=g)
    qt = absmax_quant(w, bits, group)
    pw = PackedWeight.from_quant(qt)
    assert pw.format == "dense" and pw.dtypes["scale"] == "float16"
    assert torch.equal(pw.codes_and_mask()[0], qt.q)
    assert torch.equal(pw.to_dense(), qt.dequantize())
    assert pw.tensors["scale"].shape == (10, math.ceil(cols / group))


def test_fp32_scale_and_in_scale_are_kept_exactly():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    in_scale = torch.ones(16)
    in_scale[3] = 2.0
    qt = quantize_per_tensor(w, 2.5, 4, in_scale)
    qt.scale = torch.tensor([[1 / 3]])  # not fp16-representable: must be stored in fp32
    pw = PackedWeight.from_quant(qt)
    assert pw.dtypes == {"scale": "float32", "in_scale": "float16"}
    assert pw.tensors["scale"].dtype == torch.int32
    assert torch.equal(pw.to_dense(), qt.dequantize())


# ---------------------------------------------------------------------------------------------
# exactness against compress_linear, byte counts, meta
# ---------------------------------------------------------------------------------------------

NO_LR = LowRankSpec(method="none")
SPECS = {
    "slim_2of4": (CompressSpec(), "nm"),
    "absmax_2of4": (CompressSpec(quant=QuantSpec("absmax"), lowrank=NO_LR), "nm"),
    "unstructured": (CompressSpec(sparsity=SparsitySpec("unstructured", ratio=0.5)), None),
    "outliers": (CompressSpec(quant=QuantSpec(outlier_ratio=0.02)), "nm"),
    "dense_q": (CompressSpec(sparsity=SparsitySpec("dense"), lowrank=NO_LR), "dense"),
    "fp_2of4": (CompressSpec(quant=QuantSpec("none"), lowrank=NO_LR), "nm"),
    "8bit_4of8": (CompressSpec(quant=QuantSpec(bits=8), sparsity=SparsitySpec(n=4, m=8)), None),
}


def _compressed(spec, d_out=32, d_in=576, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, d_in, generator=g) * (torch.rand(d_in, generator=g) + 0.1)
    w = torch.randn(d_out, d_in, generator=g) * 0.02
    stats = LayerStats(sq_sum=(x**2).sum(0), abs_sum=x.abs().sum(0), n_tokens=128)
    return compress_linear(w, stats, spec)


@pytest.mark.parametrize("name", list(SPECS))
def test_to_dense_equals_compressed_weight(name):
    spec, fmt = SPECS[name]
    c = _compressed(spec)
    if c.weight_q is None:
        pw = PackedWeight.from_float(c.weight, c.mask)
        assert pw.nbytes() == c.mask.sum() * 4 + c.mask.numel() // 8  # fp32 values + 2-bit pos
    else:
        pw = PackedWeight.from_quant(c.weight_q, c.mask)
        # every stored byte is counted; matches the core's bits-per-weight accounting except
        # for the unstructured row offsets (int32 per row + 1) the core does not count
        extra = 4 * (c.weight.shape[0] + 1) if pw.format == "unstructured" else 0
        if spec.lowrank.method == "none":
            bpw = c.metrics["bits_per_weight"] * c.weight.numel() / 8
            assert pw.nbytes() == bpw + extra
    if fmt is not None:
        assert pw.format == fmt
    assert torch.equal(pw.to_dense(), c.weight)
    if c.mask is not None:
        assert torch.equal(pw.mask(), c.mask)
    # meta is JSON-able and rebuilds tensors of the same shapes/dtypes
    meta = json.loads(json.dumps(pw.meta()))
    empty = PackedWeight.empty(meta)
    for k, v in pw.tensors.items():
        assert empty.tensors[k].shape == v.shape and empty.tensors[k].dtype == v.dtype
        empty.tensors[k].copy_(v)
    assert torch.equal(empty.to_dense(), c.weight)


def test_4of8_mask_packs_as_bitmap_unless_nm_is_forced():
    # auto-detection tries 2:4 only; a 4:8 mask as nm 4:8 would cost 4-bit positions (2 bits per
    # weight), the bitmap 1 bit per weight
    spec, _ = SPECS["8bit_4of8"]
    c = _compressed(spec, d_out=16, d_in=64)
    auto = PackedWeight.from_quant(c.weight_q, c.mask)
    forced = PackedWeight.from_quant(c.weight_q, c.mask, fmt="nm", n=4, m=8)
    assert auto.format == "unstructured" and forced.format == "nm"
    assert torch.equal(auto.to_dense(), c.weight) and torch.equal(forced.to_dense(), c.weight)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("group", [None, 8, 16, 7, 96])
@pytest.mark.parametrize("in_scale", [False, True])
def test_nm_fast_dequant_is_bit_exact(n, m, group, in_scale):
    """The lean runtime's N:M dequantisation equals QuantTensor.dequantize bit for bit."""
    g = torch.Generator().manual_seed(n * 100 + m + (group or 0))
    rows, cols = 12, 96
    score = torch.rand(rows, cols // m, m, generator=g)
    keep = torch.topk(score, n, -1).indices
    mask = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, keep, True).reshape(rows, cols)
    q = torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8) * mask
    if group is None:
        scale, gs = torch.tensor([[0.0123]]), cols
    else:
        scale, gs = torch.rand(rows, -(-cols // group), generator=g).half().float() + 0.01, group
    ins = (torch.rand(cols, generator=g) + 0.5).half().float() if in_scale else None
    qt = QuantTensor(q=q, scale=scale, group_size=gs, bits=4, in_scale=ins)
    pw = PackedWeight.from_quant(qt, mask, fmt="nm", n=n, m=m)
    assert torch.equal(pw.to_dense(), qt.dequantize())


@pytest.mark.parametrize("fmt", ["nm", "dense"])
def test_row_blocks_dequantise_to_the_rows_of_the_whole(fmt):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(50, 64, generator=g)
    mask = torch.zeros(50, 64, dtype=torch.bool)
    mask.view(50, 16, 4)[:, :, 1:3] = True
    ins = torch.rand(64, generator=g) + 0.5
    qt = absmax_quant(w * mask * ins, 4, 16)
    qt.in_scale = ins
    pw = PackedWeight.from_quant(qt, None if fmt == "dense" else mask, fmt=fmt)
    whole = pw.to_dense()
    for s, e in [(0, 7), (7, 50), (49, 50)]:
        blk = pw.row_block(s, e)
        assert blk.shape == (e - s, 64) and torch.equal(blk.to_dense(), whole[s:e])
    assert sum(pw.row_block(s, min(s + 8, 50)).nnz for s in range(0, 50, 8)) == pw.nnz
    with pytest.raises(ValueError, match="outside"):
        pw.row_block(3, 51)
    un = PackedWeight.from_quant(absmax_quant(w * mask, 4, 16), mask, fmt="unstructured")
    with pytest.raises(ValueError, match="not row-sliceable"):
        un.row_block(0, 2)


def test_large_weights_are_dequantised_in_row_blocks(monkeypatch):
    """Above DEQUANT_STEP values the packed forward and its backward multiply block by block:
    the same output and input gradient (to float rounding), and no dense copy of the whole
    weight is made either way."""
    from slim_lightning.formats import PackedWeight
    from slim_lightning.nn import functional as linear_ops
    from slim_lightning.nn.linear import SLiMLinear

    c = _compressed(CompressSpec(), d_out=96, d_in=64)
    m = SLiMLinear.from_compressed(c)
    x = torch.randn(2, 3, 64, requires_grad=True)
    whole = m(x)
    g = torch.randn_like(whole)
    (whole_grad,) = torch.autograd.grad(whole, x, g)
    sizes = []
    real = PackedWeight.to_dense

    def spy(self):
        sizes.append(self.shape[0])
        return real(self)

    monkeypatch.setattr(PackedWeight, "to_dense", spy)
    monkeypatch.setattr(linear_ops, "DEQUANT_STEP", 64 * 10)
    # equal up to the BLAS blocking of a narrower product (not bit-identical)
    y = m(x)
    torch.testing.assert_close(y, whole, rtol=1e-5, atol=1e-6)
    assert max(sizes) == 10 and sum(sizes) == 96
    sizes.clear()
    (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-5, atol=1e-6)
    assert max(sizes) == 10 and sum(sizes) == 96


@pytest.mark.parametrize("cols", [4, 12, 92, 576])
def test_24_table_decode_equals_the_general_path_for_every_byte(cols):
    """The 2:4 4-bit fast path (one table lookup per group) equals the general scatter path on
    every value byte and every meta nibble, including an odd number of groups per row and meta
    nibbles no packer writes (equal or descending positions)."""
    from slim_lightning.formats import nm

    g = torch.Generator().manual_seed(cols)
    rows, n_groups = 40, cols // 4
    values = torch.randint(0, 256, (rows, n_groups), generator=g, dtype=torch.uint8)
    meta = torch.randint(0, 256, (rows, -(-n_groups // 2)), generator=g, dtype=torch.uint8)
    if cols == 4:  # all 256 value bytes x 16 nibbles
        values = torch.arange(256, dtype=torch.uint8).repeat_interleave(16)[:, None]
        meta = torch.arange(16, dtype=torch.uint8).repeat(256)[:, None]
        rows = 4096
    scale = torch.rand(rows, -(-cols // 8), generator=g).half().float() + 0.01
    ins = (torch.rand(cols, generator=g) + 0.5).half().float()
    fast = nm.dequant_nm(
        values, meta, scale, ins, shape=(rows, cols), n=2, m=4, bits=4, group_size=8
    )
    ref = nm._dequant_scatter(values, meta, scale, ins, (rows, cols), 2, 4, 4, 8)
    assert torch.equal(fast, ref)
