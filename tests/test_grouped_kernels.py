"""The ``grouped`` decode kernel (``kernels/grouped.py``) vs its plain-PyTorch twin, vs
``GroupQuant.dequantize`` and vs ``GroupedWeight.to_dense``, and the ``SLiMLinear`` triton backend
on a grouped weight vs the reference backend.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before Triton is
imported): tiny shapes, fp16/fp32 only.
"""

import pytest
import torch
from slim_lightning.kernels.grouped import (
    grouped_decode,
    grouped_matmul,
    grouped_unsupported_reason,
)
from slim_lightning.kernels.ops import triton_unsupported_reason
from slim_lightning.kernels.reference import grouped_matmul_ref, grouped_weight_ref

from slim_lightning.core.grouped import BiLevel, GroupQuant, fp16_round
from slim_lightning.core.quant import absmax_quant
from slim_lightning.core.types import CompressedLinear, QuantTensor
from slim_lightning.formats.grouped import GroupedWeight
from slim_lightning.nn.backend import set_backend
from slim_lightning.nn.linear import SLiMLinear

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

pytestmark = pytest.mark.usefixtures("one_thread")


def _group_quant(
    rows=8,
    cols=64,
    gs=16,
    bits=3,
    *,
    group_bits=None,
    mask=None,
    perm=False,
    outliers=0,
    bilevel=False,
    seed=0,
) -> GroupQuant:
    """A random ``GroupQuant``: codes within each group's width, fp16-representable statistics
    (fractional zeros), optional 2:4 / random mask, act-order perm, unique sorted outliers,
    bi-level (3-bit, 4-row groups) statistics."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = -(-cols // gs)
    widths = torch.full((n_groups,), bits) if group_bits is None else torch.tensor(group_bits)
    wcol = widths.repeat_interleave(gs)[:cols]  # (cols,) width of each column
    q = (torch.rand(rows, cols, generator=gen) * 2.0 ** wcol.float()).floor().to(torch.uint8)
    keep = None
    if mask == "2:4":
        top = torch.topk(torch.rand(rows, cols // 4, 4, generator=gen), 2, -1).indices
        keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, top, True)
        keep = keep.reshape(rows, cols)
    elif mask == "random":
        keep = torch.rand(rows, cols, generator=gen) < 0.6
    if keep is not None:
        q = q * keep
    maxq = (2.0 ** widths.float() - 1)[None, :]
    kw = {}
    if bilevel:
        stat_group, n2 = 4, -(-rows // 4)

        def level(lo, hi):
            bq = torch.randint(0, 8, (rows, n_groups), generator=gen, dtype=torch.uint8)
            s2 = fp16_round(torch.rand(n2, n_groups, generator=gen) * (hi - lo) / 7 + 1e-3)
            z2 = fp16_round(torch.rand(n2, n_groups, generator=gen) * 2 - lo / s2)
            return BiLevel(q=bq, s2=s2, z2=z2, bits=3, group=stat_group)

        kw["scale_bl"], kw["zero_bl"] = level(0.01, 0.06), level(0.0, 4.0)
        scale, zero = kw["scale_bl"].decode(), kw["zero_bl"].decode()
    else:
        scale = fp16_round(torch.rand(rows, n_groups, generator=gen) * 0.05 + 0.005)
        zero = fp16_round(torch.rand(rows, n_groups, generator=gen) * maxq)
    if perm:
        kw["perm"] = torch.randperm(cols, generator=gen)
    if outliers:
        flat = torch.randperm(rows * cols, generator=gen)[:outliers].sort().values
        kw["outlier_rows"], kw["outlier_cols"] = flat // cols, flat % cols
        kw["outlier_vals"] = fp16_round(torch.randn(outliers, generator=gen))
    return GroupQuant(
        q=q,
        scale=scale,
        zero=zero,
        group_size=gs,
        bits=bits,
        group_bits=None if group_bits is None else widths.to(torch.int8),
        mask=keep,
        **kw,
    )


CASES = {
    "uniform3_dense": dict(bits=3),
    "mixed123_ragged": dict(cols=60, gs=16, bits=2, group_bits=[1, 3, 2, 3]),
    "mixed578_unaligned": dict(cols=70, gs=12, bits=8, group_bits=[5, 8, 7, 8, 6, 8]),
    "nm24_uniform": dict(bits=4, mask="2:4"),
    "nm24_mixed": dict(bits=3, mask="2:4", group_bits=[2, 4, 3, 1]),
    "bitmask_mixed": dict(cols=72, gs=24, mask="random", group_bits=[3, 1, 2]),
    "outliers_perm": dict(perm=True, outliers=20, group_bits=[3, 2, 4, 3]),
    "bitmask_outliers_perm": dict(mask="random", perm=True, outliers=9, seed=3),
    "nm_outliers_perm": dict(mask="2:4", perm=True, outliers=12, seed=4),
    "bilevel": dict(rows=10, bilevel=True, outliers=5),
}
LAYOUT = {"nm24_uniform": "nm", "nm24_mixed": "nm", "nm_outliers_perm": "nm"}
LAYOUT |= {"bitmask_mixed": "bitmask", "bitmask_outliers_perm": "bitmask"}


def _packed(name: str) -> tuple[GroupQuant, GroupedWeight]:
    gq = _group_quant(**CASES[name])
    pw = GroupedWeight.from_group_quant(gq)
    pw.tensors = {k: v.to(DEV) for k, v in pw.tensors.items()}
    assert pw.meta()["layout"] == LAYOUT.get(name, "dense")
    return gq, pw


@pytest.mark.parametrize("name", list(CASES))
def test_grouped_decode_fp32_is_the_reference_bit_for_bit(name):
    gq, pw = _packed(name)
    ref = grouped_weight_ref(pw)
    assert torch.equal(ref.cpu(), gq.dequantize())  # the twin decodes the contract
    assert torch.equal(ref, pw.to_dense())  # ... as the format does
    w = grouped_decode(pw, torch.float32)
    assert w.dtype == torch.float32 and w.shape == gq.shape
    assert torch.equal(w, ref)


@pytest.mark.parametrize("name", ["mixed123_ragged", "nm24_mixed", "bitmask_outliers_perm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_decode_16bit_rounds_the_fp32_values_once(name, dtype):
    # bf16 under the interpreter: the fp32 decode cast on the host (bf16 is wrong there)
    _, pw = _packed(name)
    ref = grouped_weight_ref(pw)
    w = grouped_decode(pw, dtype)
    assert w.dtype == dtype
    assert torch.equal(w, ref.to(dtype))  # close by contract; equal by construction


@pytest.mark.parametrize(
    "name,m,dtype", [("outliers_perm", 3, torch.float32), ("nm24_mixed", 5, torch.float16)]
)
def test_grouped_matmul_matches_twin(name, m, dtype):
    gq, pw = _packed(name)
    x = torch.randn(m, gq.shape[1], generator=torch.Generator().manual_seed(m)).to(DEV, dtype)
    y, ref = grouped_matmul(x, pw), grouped_matmul_ref(x, pw)
    assert y.dtype == dtype and y.shape == (m, gq.shape[0])
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * scale)


def test_grouped_decode_checks_before_launch():
    _, pw = _packed("mixed123_ragged")
    short = dict(pw.tensors, codes=pw.tensors["codes"][:, :-1].contiguous())
    with pytest.raises(ValueError, match="bytes a row"):
        grouped_decode(GroupedWeight(**{**vars(pw), "tensors": short}))
    bad = dict(pw.tensors, widths=torch.tensor([1, 3, 9, 3], dtype=torch.uint8, device=DEV))
    with pytest.raises(ValueError, match="1..8"):
        grouped_decode(GroupedWeight(**{**vars(pw), "tensors": bad}))
    with pytest.raises(ValueError, match="dtype"):
        grouped_decode(pw, torch.float64)
    assert grouped_unsupported_reason(pw.meta()) is None
    assert "layout" in grouped_unsupported_reason({**pw.meta(), "layout": "csr"})


# ---------------------------------------------------------------------------------------------
# SLiMLinear on a grouped weight: triton backend == reference backend
# ---------------------------------------------------------------------------------------------


def _layer(name: str, adapters: str | None, seed: int = 0):
    gq = _group_quant(**{**CASES[name], "rows": 24, "seed": seed})
    rows, cols = gq.shape
    gen = torch.Generator().manual_seed(seed + 1)
    kw = {}
    if adapters is not None:
        r = 4
        lo = torch.randn(cols, r, generator=gen) * 0.05
        ro = torch.randn(r, rows, generator=gen) * 0.05
        kw = dict(lora_l=lo, lora_r=ro)
        if adapters == "q4":

            def quant(w):
                qt = absmax_quant(w, 4, 16)
                return QuantTensor(q=qt.q, scale=qt.scale.half().float(), group_size=16, bits=4)

            lq, rq = quant(lo.T.contiguous()), quant(ro.T.contiguous())
            kw = dict(
                lora_l=lq.dequantize().T.contiguous(),
                lora_r=rq.dequantize().T.contiguous(),
                lora_l_q=lq,
                lora_r_q=rq,
            )
    c = CompressedLinear(weight=gq.dequantize(), weight_q=gq, mask=None, **kw)
    return SLiMLinear.from_compressed(c, torch.randn(rows, generator=gen) * 0.1).to(DEV)


@pytest.mark.parametrize(
    "name,adapters,dtype",
    [
        ("outliers_perm", None, torch.float32),
        ("nm24_mixed", "fp", torch.float32),
        ("bilevel", "q4", torch.float16),
    ],
)
def test_slim_linear_grouped_triton_matches_reference(name, adapters, dtype):
    mod = _layer(name, adapters)
    assert mod.meta()["weight"]["format"] == "grouped"
    assert triton_unsupported_reason(mod) is None
    x = torch.randn(2, 3, mod.in_features, generator=torch.Generator().manual_seed(7))
    x = x.to(DEV, dtype)
    with torch.no_grad():
        ref = mod(x)  # reference backend, same dtype: the same weight bits, the same matmuls
        assert set_backend(mod, "triton") == 1
        y = mod(x)
    assert y.shape == (2, 3, mod.out_features) and y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def test_slim_linear_grouped_triton_trains_like_reference():
    # the base through the decode kernel (slim_base_triton), the adapters through autograd
    mod = _layer("mixed123_ragged", "fp")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, mod.in_features, generator=gen).to(DEV)
    up = torch.randn(3, mod.out_features, generator=gen).to(DEV)
    got = {}
    for backend in ("reference", "triton"):
        mod.backend = backend
        mod.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = mod(xi)
        (y * up).sum().backward()
        got[backend] = (y.detach(), xi.grad, mod.lora_l.grad.clone(), mod.lora_r.grad.clone())
    for a, b in zip(got["reference"], got["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "case",
    [
        dict(rows=4096, cols=4096, gs=16, bits=4, perm=True, outliers=4096, bilevel=True),
        dict(rows=4096, cols=4096, gs=64, bits=2, group_bits=[1, 2, 3, 2] * 16),
        dict(rows=4096, cols=4096, gs=64, bits=3, mask="2:4", group_bits=[2, 3, 4, 3] * 16),
    ],
    ids=["spqr_4096", "slim_llm_2bit_4096", "slim_llm_2of4_4096"],
)
def test_gpu_grouped_decode_llama_shapes(case):
    """Compiled kernels at a LLaMA-7B width: fp32 bit for bit, bf16 / fp16 the rounded fp32."""
    gq = _group_quant(**case)
    pw = GroupedWeight.from_group_quant(gq)
    pw.tensors = {k: v.to(DEV) for k, v in pw.tensors.items()}
    ref = gq.dequantize().to(DEV)
    assert torch.equal(grouped_decode(pw, torch.float32), ref)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(grouped_decode(pw, dtype), ref.to(dtype))
