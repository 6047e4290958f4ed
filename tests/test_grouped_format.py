"""The ``grouped`` packed format (``formats.grouped``) and its variable-width bitstreams
(``bitpack.pack_bits`` / ``unpack_bits``): bit-exact round trips of ``GroupQuant`` s, byte counts,
metadata and value checks, safetensors storage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slim_lightning.core.grouped import BiLevel, GroupQuant, fp16_round
from slim_lightning.formats import (
    GroupedWeight,
    PackedWeight,
    bitpack,
    check_meta,
    check_values,
    expected_tensors,
    pack_bits,
    unpack_bits,
)
from slim_lightning.formats import grouped as grouped_mod

# -- bitstreams --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "widths, values, expected",
    [
        ([3, 1, 2, 4], [5, 1, 2, 9], [0b01101101, 0b00000010]),  # 5 | 1<<3 | 2<<4 | 9<<6
        ([8, 8], [0xAB, 0xCD], [0xAB, 0xCD]),
        ([1] * 8, [1, 0, 1, 1, 0, 0, 0, 1], [0b10001101]),
        ([5, 5], [31, 1], [0b00111111, 0b00000000]),  # 10 bits -> 2 bytes, zero padded
        ([7, 2], [0, 3], [0b10000000, 0b00000001]),  # the 2-bit value straddles a byte
        ([2, 3, 4, 6], [3, 7, 0b1001, 0b101010], [0b00111111, 0b01010101]),  # 3|7<<2|9<<5|42<<9
    ],
)
def test_pack_bits_literals(widths, values, expected):
    v = torch.tensor([values], dtype=torch.uint8)
    w = torch.tensor(widths)
    packed = pack_bits(v, w)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [expected]
    assert torch.equal(unpack_bits(packed, w), v)


def _naive_pack(values: list[int], widths: list[int]) -> list[int]:
    """Bit-by-bit reference of the stream layout: value bit b -> stream bit off + b."""
    out = [0] * math.ceil(sum(widths) / 8)
    off = 0
    for v, w in zip(values, widths):
        for b in range(w):
            if (v >> b) & 1:
                out[(off + b) // 8] |= 1 << ((off + b) % 8)
        off += w
    return out


def test_pack_bits_random_round_trip_and_reference(monkeypatch):
    g = torch.Generator().manual_seed(0)
    widths = torch.randint(1, 9, (37,), generator=g)
    values = torch.randint(0, 256, (9, 37), generator=g) % (1 << widths)
    packed = pack_bits(values, widths)
    assert packed.shape == (9, math.ceil(int(widths.sum()) / 8))
    for r in range(9):
        assert packed[r].tolist() == _naive_pack(values[r].tolist(), widths.tolist())
    assert torch.equal(unpack_bits(packed, widths), values.to(torch.uint8))
    # row blocks (the memory bound) give the same bytes
    monkeypatch.setattr(bitpack, "BITS_STEP", 40)
    assert torch.equal(pack_bits(values, widths), packed)
    assert torch.equal(unpack_bits(packed, widths), values.to(torch.uint8))


def test_pack_bits_rejects_bad_input():
    w = torch.tensor([3, 2])
    with pytest.raises(ValueError, match="fit"):
        pack_bits(torch.tensor([[8, 0]]), w)  # 8 needs 4 bits
    with pytest.raises(ValueError, match="fit"):
        pack_bits(torch.tensor([[-1, 0]]), w)
    with pytest.raises(ValueError, match="1..8"):
        pack_bits(torch.tensor([[0, 0]]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="1..8"):
        pack_bits(torch.tensor([[0, 0]]), torch.tensor([9, 2]))
    with pytest.raises(ValueError, match="widths"):
        pack_bits(torch.tensor([[0, 0, 0]]), w)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(1, 2, dtype=torch.uint8), w)  # 5 bits -> 1 byte


# -- GroupQuant builders -----------------------------------------------------------------------


def make_gq(
    rows: int,
    cols: int,
    group: int,
    *,
    bits: int = 3,
    widths: list[int] | None = None,
    mask: str | None = None,
    n_outliers: int = 0,
    perm: bool = False,
    bilevel: tuple[int, int] | None = None,
    fp32_stats: bool = False,
    seed: int = 0,
) -> GroupQuant:
    """A random ``GroupQuant`` obeying the contract (codes within widths, fp16 statistics,
    sorted unique outliers at kept positions). ``mask``: None, "24" (exact 2:4), "24loose"
    (at most 2 of 4), "random". ``fp32_stats``: scale / zero with full fp32 mantissas (the
    products of fp16 values are exact in fp32, so only these make the decode order observable)."""
    g = torch.Generator().manual_seed(seed)
    n_groups = math.ceil(cols / group)
    gw = torch.tensor(widths) if widths is not None else torch.full((n_groups,), bits)
    w_col = gw[torch.arange(cols) // group]
    q = (torch.randint(0, 256, (rows, cols), generator=g) % (1 << w_col)).to(torch.uint8)
    keep = None
    if mask in ("24", "24loose"):
        score = torch.rand(rows, cols // 4, 4, generator=g)
        top = score.topk(2, dim=-1).indices
        keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, top, True)
        if mask == "24loose":
            keep[0, 0] = torch.tensor([True, False, False, False])
        keep = keep.reshape(rows, cols)
    elif mask == "random":
        keep = torch.rand(rows, cols, generator=g) < 0.6
    if keep is not None:
        q[~keep] = 0

    def fp16(shape, lo, hi, exact=True):
        x = lo + (hi - lo) * torch.rand(*shape, generator=g)
        return fp16_round(x) if exact else x

    scale_bl = zero_bl = None
    if bilevel is None:
        scale = fp16((rows, n_groups), 0.001, 0.1, not fp32_stats)
        zero = fp16((rows, n_groups), 0.0, 1.0, not fp32_stats) * (2 ** gw.float() - 1)
        zero = zero if fp32_stats else fp16_round(zero)  # fractional zeros
    else:
        sb, sg = bilevel
        second = (math.ceil(rows / sg), n_groups)
        bls = []
        for lo, hi in ((0.0001, 0.01), (0.01, 0.5)):
            codes = torch.randint(0, 2**sb, (rows, n_groups), generator=g).to(torch.uint8)
            bls.append(BiLevel(codes, fp16(second, lo, hi), fp16(second, 0.0, 2**sb), sb, sg))
        scale_bl, zero_bl = bls
        scale, zero = scale_bl.decode(), zero_bl.decode()
    o_rows = o_cols = o_vals = None
    if n_outliers:
        kept = torch.nonzero(keep if keep is not None else torch.ones(rows, cols, dtype=torch.bool))
        pick = kept[torch.randperm(kept.shape[0], generator=g)[:n_outliers]]
        order = (pick[:, 0] * cols + pick[:, 1]).argsort()
        o_rows, o_cols = pick[order, 0].clone(), pick[order, 1].clone()
        o_vals = fp16_round(torch.randn(n_outliers, generator=g))
    return GroupQuant(
        q=q,
        scale=scale,
        zero=zero,
        group_size=group,
        bits=bits,
        group_bits=None if widths is None else gw.to(torch.int8),
        mask=keep,
        perm=torch.randperm(cols, generator=g) if perm else None,
        outlier_rows=o_rows,
        outlier_cols=o_cols,
        outlier_vals=o_vals,
        scale_bl=scale_bl,
        zero_bl=zero_bl,
    )


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and torch.equal(a, b)


def assert_same_group_quant(a: GroupQuant, b: GroupQuant) -> None:
    for name in ("q", "scale", "zero", "group_bits", "mask", "perm"):
        assert _same(getattr(a, name), getattr(b, name)), name
    for name in ("outlier_rows", "outlier_cols", "outlier_vals"):
        assert _same(getattr(a, name), getattr(b, name)), name
    assert (a.group_size, a.bits) == (b.group_size, b.bits)
    for name in ("scale_bl", "zero_bl"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert (x.bits, x.group) == (y.bits, y.group)
            for f in ("q", "s2", "z2"):
                assert _same(getattr(x, f), getattr(y, f)), f"{name}.{f}"


CASES = {
    "uniform3": (dict(rows=16, cols=32, group=8, bits=3), "dense"),
    "uniform4": (dict(rows=8, cols=64, group=16, bits=4, fp32_stats=True), "dense"),
    "mixed123_ragged": (dict(rows=12, cols=72, group=32, bits=2, widths=[1, 2, 3]), "dense"),
    "mixed234_ragged": (
        dict(rows=10, cols=72, group=32, bits=3, widths=[2, 3, 4], fp32_stats=True),
        "dense",
    ),
    "bilevel": (dict(rows=40, cols=48, group=16, bits=3, bilevel=(3, 16)), "dense"),
    "outliers": (dict(rows=16, cols=32, group=8, bits=3, n_outliers=11), "dense"),
    "perm": (
        dict(rows=8, cols=40, group=16, bits=4, perm=True, n_outliers=5, fp32_stats=True),
        "dense",
    ),
    "nm24": (
        dict(rows=8, cols=64, group=16, bits=3, mask="24", n_outliers=6, fp32_stats=True),
        "nm",
    ),
    "nm24_mixed": (dict(rows=6, cols=72, group=32, bits=2, widths=[1, 2, 3], mask="24"), "nm"),
    "bitmask": (
        dict(rows=9, cols=72, group=32, bits=3, mask="random", n_outliers=7, fp32_stats=True),
        "bitmask",
    ),
    "bitmask_loose24": (dict(rows=8, cols=32, group=8, bits=4, mask="24loose"), "bitmask"),
    "everything": (
        dict(
            rows=20,
            cols=64,
            group=16,
            bits=3,
            widths=[2, 3, 4, 3],
            mask="24",
            n_outliers=9,
            perm=True,
            bilevel=(3, 16),
        ),
        "nm",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_bit_exact(case):
    kw, layout = CASES[case]
    gq = make_gq(**kw)
    pw = PackedWeight.from_quant(gq)  # a GroupQuant goes to the grouped format
    assert isinstance(pw, GroupedWeight)
    assert pw.format == "grouped" and pw.layout == layout
    assert torch.equal(pw.to_dense(), gq.dequantize())  # bit for bit
    assert_same_group_quant(pw.group_quant(), gq)
    assert _same(pw.mask(), gq.original_mask())
    meta = json.loads(json.dumps(pw.meta()))  # JSON-able
    check_meta(meta)
    check_values(pw)
    assert pw.nbytes() == sum(t.numel() * t.element_size() for t in pw.tensors.values())
    # empty(meta) + the stored tensors (what a checkpoint load does) decodes the same
    fresh = PackedWeight.empty(meta)
    assert isinstance(fresh, GroupedWeight)
    for k, v in pw.tensors.items():
        fresh.tensors[k].copy_(v)
    assert torch.equal(fresh.to_dense(), gq.dequantize())


def test_nbytes_by_hand():
    # 16 x 32, uniform 3-bit, group 8: 96 bits = 12 bytes of codes per row, fp16 scale / zero
    pw = GroupedWeight.from_group_quant(make_gq(16, 32, 8, bits=3))
    assert set(pw.tensors) == {"codes", "scale", "zero"}
    assert pw.tensors["codes"].shape == (16, 12)
    assert pw.nbytes() == 16 * 12 + 2 * (16 * 4 * 2)  # 448
    # + 5 outliers (offsets 17 x int32, cols / vals 5 x int16) + perm (32 x int32)
    pw = GroupedWeight.from_group_quant(make_gq(16, 32, 8, bits=3, n_outliers=5, perm=True))
    assert pw.nbytes() == 448 + 17 * 4 + 5 * 2 + 5 * 2 + 32 * 4
    # mixed widths [1, 2, 3] over 72 cols in groups of 32: 32 + 64 + 24 = 120 bits = 15 bytes
    pw = GroupedWeight.from_group_quant(make_gq(12, 72, 32, bits=2, widths=[1, 2, 3]))
    assert pw.row_bits == 120 and pw.tensors["codes"].shape == (12, 15)
    assert pw.nbytes() == 12 * 15 + 3 + 2 * (12 * 3 * 2)
    # bi-level 3-bit statistics over 3 groups: 9 bits -> 2 bytes a row; 40 rows / 16 -> 3
    pw = GroupedWeight.from_group_quant(make_gq(40, 48, 16, bits=3, bilevel=(3, 16)))
    assert pw.tensors["scale_q"].shape == (40, 2) and pw.tensors["zero_s2"].shape == (3, 3)
    assert pw.nbytes() == 40 * 18 + 2 * (40 * 2) + 4 * (3 * 3 * 2)
    # 2:4 with 3-bit codes: 32 kept of 64 -> 12 bytes of codes, 8 bytes of positions a row
    pw = GroupedWeight.from_group_quant(make_gq(8, 64, 16, bits=3, mask="24"))
    assert pw.nnz == 8 * 32 and pw.tensors["meta"].shape == (8, 8)
    assert pw.nbytes() == 8 * 12 + 8 * 8 + 2 * (8 * 4 * 2)


def test_expected_tensors_match_meta():
    pw = GroupedWeight.from_group_quant(make_gq(**CASES["everything"][0]))
    want = expected_tensors(pw.meta())
    have = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in pw.tensors.items()}
    assert want == have
    assert set(have) == {
        *("codes", "widths", "meta", "scale_q", "zero_q"),
        *("scale_s2", "scale_z2", "zero_s2", "zero_z2"),
        *("outlier_offsets", "outlier_cols", "outlier_vals", "perm"),
    }


def test_fp32_statistics_when_fp16_is_lossy():
    gq = make_gq(4, 16, 8)
    gq.scale = gq.scale + 1e-6  # no longer fp16-representable
    pw = GroupedWeight.from_group_quant(gq)
    assert pw.dtypes["scale"] == "float32" and pw.tensors["scale"].dtype == torch.int32
    assert pw.dtypes["zero"] == "float16"
    ref = gq.dequantize()
    assert torch.equal(pw.to_dense(), ref)
    check_meta(pw.meta())
    gq.scale.mul_(2)  # the packed tensors are copies, never views of the GroupQuant's
    assert torch.equal(pw.to_dense(), ref)


@pytest.mark.parametrize("case", ["everything", "bitmask", "perm", "bilevel", "nm24_mixed"])
def test_row_blocks_encode_and_decode_the_same(case, monkeypatch):
    gq = make_gq(**CASES[case][0])
    ref = GroupedWeight.from_group_quant(gq).tensors
    monkeypatch.setattr(grouped_mod, "BITS_STEP", 150)  # blocks of 2-3 rows
    pw = GroupedWeight.from_group_quant(gq)
    assert all(torch.equal(ref[k], pw.tensors[k]) for k in ref)
    assert torch.equal(pw.to_dense(), gq.dequantize())


def test_nm_needs_group_size_multiple_of_m():
    pw = GroupedWeight.from_group_quant(make_gq(4, 48, 6, bits=3, mask="24"))
    assert pw.layout == "bitmask"


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["tensors"]["codes"]["shape"].__setitem__(1, 13), "codes"),
        (lambda m: m["tensors"]["scale"].__setitem__("dtype", "int32"), "scale"),
        (lambda m: m.__setitem__("bits", 9), "bits"),
        (lambda m: m.__setitem__("group_size", 0), "group_size"),
        (lambda m: m.__setitem__("nnz", 7), "nnz"),
        (lambda m: m.__setitem__("layout", "csr"), "layout"),
        (lambda m: m.__setitem__("row_bits", 95), "row_bits"),
        (lambda m: m.__setitem__("mixed", 1), "mixed"),
        (lambda m: m.__setitem__("stat_bits", 0), "stat_bits"),
        (lambda m: m["dtypes"].__setitem__("scale", "bfloat16"), "scale"),
        (lambda m: m.__setitem__("n_outliers", 3), "outlier"),
    ],
)
def test_check_meta_rejects_tampering(edit, match):
    meta = GroupedWeight.from_group_quant(make_gq(16, 32, 8, bits=3)).meta()
    check_meta(meta)
    edit(meta)
    with pytest.raises(ValueError, match=match):
        check_meta(meta)


def test_check_values_rejects_bad_values():
    gq = make_gq(**CASES["perm"][0])
    pw = GroupedWeight.from_group_quant(gq)
    check_values(pw)
    bad = GroupedWeight.from_group_quant(gq)
    bad.float_field("scale")[0, 0] = float("nan")  # a view of the stored bits
    with pytest.raises(ValueError, match="scale has 1 NaN"):
        check_values(bad)
    bad = GroupedWeight.from_group_quant(gq)
    bad.tensors["perm"][0] = bad.tensors["perm"][1]
    with pytest.raises(ValueError, match="perm"):
        check_values(bad)
    bad = GroupedWeight.from_group_quant(gq)
    bad.tensors["outlier_offsets"][-1] += 1
    with pytest.raises(ValueError, match="outlier_offsets"):
        check_values(bad)
    bad = GroupedWeight.from_group_quant(gq)
    bad.tensors["outlier_cols"][0] = 40
    with pytest.raises(ValueError, match="outlier column"):
        check_values(bad)
    mixed = GroupedWeight.from_group_quant(make_gq(**CASES["mixed123_ragged"][0]))
    mixed.tensors["widths"][0] = 9
    with pytest.raises(ValueError, match="widths"):
        check_values(mixed)


def test_from_group_quant_rejects_contract_breaks():
    gq = make_gq(8, 32, 8, bits=3, mask="random")
    gq.q[~gq.mask] = 1
    with pytest.raises(ValueError, match="mask prunes"):
        GroupedWeight.from_group_quant(gq)
    gq = make_gq(8, 32, 8, bits=3)
    gq.q[0, 0] = 8  # beyond 3 bits
    with pytest.raises(ValueError, match="fit"):
        GroupedWeight.from_group_quant(gq)
    gq = make_gq(8, 32, 8, bits=3, n_outliers=4)
    gq.outlier_vals[0] = 0.1  # not fp16-representable
    with pytest.raises(ValueError, match="fp16"):
        GroupedWeight.from_group_quant(gq)
    gq = make_gq(8, 32, 8, bits=3, n_outliers=4)
    gq.outlier_cols = gq.outlier_cols.flip(0)
    gq.outlier_rows = gq.outlier_rows.flip(0)
    with pytest.raises(ValueError, match="sorted"):
        GroupedWeight.from_group_quant(gq)
    gq = make_gq(40, 48, 16, bits=3, bilevel=(3, 16))
    gq.scale = gq.scale * 2
    with pytest.raises(ValueError, match="decode"):
        GroupedWeight.from_group_quant(gq)


def test_not_meaningful_operations_raise():
    pw = GroupedWeight.from_group_quant(make_gq(4, 16, 8))
    for call in (pw.codes_and_mask, pw.quant_tensor, lambda: pw.row_block(0, 2)):
        with pytest.raises(ValueError):
            call()
    assert pw.float_field("in_scale") is None
    assert pw.float_field("scale").dtype == torch.float16
    with pytest.raises(ValueError, match="floating-point"):
        pw.float_field("codes")


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    gq = make_gq(**CASES["everything"][0])
    pw = GroupedWeight.from_group_quant(gq)
    save_file(pw.tensors, str(tmp_path / "w.safetensors"))
    meta = json.loads(json.dumps(pw.meta()))
    loaded = GroupedWeight.empty({**meta, "tensors": {}})
    loaded.tensors = load_file(str(tmp_path / "w.safetensors"))
    check_meta({**meta, "tensors": loaded.meta()["tensors"]})
    check_values(loaded)
    assert torch.equal(loaded.to_dense(), gq.dequantize())
    assert_same_group_quant(loaded.group_quant(), gq)


def test_slim_linear_holds_a_grouped_weight():
    from slim_lightning.core.types import CompressedLinear
    from slim_lightning.nn.linear import SLiMLinear

    gq = make_gq(**CASES["everything"][0])
    w = gq.dequantize()
    c = CompressedLinear(weight=w, weight_q=gq, mask=gq.original_mask())
    mod = SLiMLinear.from_compressed(c, bias=torch.zeros(w.shape[0]))
    assert mod.format == "grouped"
    assert torch.equal(mod.dense_weight(), w)
    assert mod.packed_nbytes() == GroupedWeight.from_group_quant(gq).nbytes()
    meta = json.loads(json.dumps(mod.meta()))
    check_meta(meta["weight"])
    again = SLiMLinear.from_meta(meta)
    again.load_state_dict(mod.state_dict())
    check_values(again.packed_weight())
    x = torch.randn(3, w.shape[1])
    assert torch.equal(again(x), mod(x))
