"""SpQR and SliM-LLM quantisers (core/spqr.py, core/slim_llm.py, core/gptq_group.py) on small
hand-built cases: the leave-one-out fit, dense + outliers, the bit count, the tau search, SBA's
average and its choice, masks, the config checks."""

from __future__ import annotations

import math

import pytest
import torch

from slim_lightning.compress.plan import QuantConfig, validate_spec
from slim_lightning.core.compress import compress_linear
from slim_lightning.core.gptq_group import gptq_group_pass, layer_factor
from slim_lightning.core.grouped import GroupQuant, spqr_bits_formula
from slim_lightning.core.slim_llm import (
    allocations,
    salience_bits,
    slim_llm_quantize,
)
from slim_lightning.core.spqr import _SpqrFit, loo_gain, spqr_bits, spqr_quantize, spqr_target
from slim_lightning.core.types import (
    CompressSpec,
    LayerStats,
    LowRankSpec,
    PrunerSpec,
    QuantSpec,
    SparsitySpec,
)
from slim_lightning.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _stats(x: torch.Tensor, samples: bool = True) -> LayerStats:
    return LayerStats(
        sq_sum=(x * x).sum(0),
        abs_sum=x.abs().sum(0),
        n_tokens=x.shape[0],
        hessian=x.T @ x,
        samples=x[:512] if samples else None,
    )


def _layer(d_out=48, d_in=64, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * (torch.rand(d_in, generator=g) + 0.2)
    w = torch.randn(d_out, d_in, generator=g) * 0.05
    return w, x


def _out_err(x, w, w_hat):
    return float(((x @ (w - w_hat).T) ** 2).mean() / ((x @ w.T) ** 2).mean())


SPQR = QuantSpec(
    method="spqr", bits=4, group_size=16, stat_bits=3, stat_group=16, damp=1.0, act_order=True
)


def test_bit_formula_matches_the_paper():
    assert spqr_bits_formula(4, 3, 16, 16, 0.0) == pytest.approx(4.625)
    assert spqr_bits_formula(3, 3, 16, 16, 0.0) == pytest.approx(3.625)
    assert spqr_bits_formula(3, 3, 8, 64, 0.002) == pytest.approx(3.875 + 0.064)


def test_leave_one_out_finds_and_ignores_a_planted_outlier():
    g = torch.Generator().manual_seed(1)
    group = torch.randn(6, 16, generator=g) * 0.01
    group[2, 5] = 0.5  # one weight 50x the others
    gain = loo_gain(group, torch.ones(16), bits=3)
    assert int(gain[2].argmax()) == 5 and float(gain[2, 5]) > 10 * float(gain[2].median())
    # the fit without likely outliers: row 2's range is set by the other weights, not by 0.5
    fit = _SpqrFit(QuantSpec(method="spqr", bits=3, stat_bits=None), thr=1e-4)
    s, z, _ = fit(group, None, 0, torch.ones(16))
    plain = (group[2].max() - group[2].min()) / 7
    assert float(s[2]) < 0.2 * float(plain)
    assert float(s[2]) == pytest.approx(float(s[[0, 1, 3, 4, 5]].mean()), rel=1.0)


def test_spqr_dense_plus_outliers_equals_the_kept_weight_and_beats_no_outliers():
    w, x = _layer()
    w[5, 9] = 1.5  # a weight the 4-bit group cannot hold
    gq = spqr_quantize(w, _stats(x), SPQR)
    assert isinstance(gq, GroupQuant) and gq.n_outliers > 0
    assert gq.perm is not None and sorted(gq.perm.tolist()) == list(range(64))
    # every outlier correction is fp16-representable and lands on a stored position
    vals = gq.outlier_vals
    assert torch.equal(vals, vals.half().float())
    orig_col = gq.perm[gq.outlier_cols]
    assert (5, 9) in set(zip(gq.outlier_rows.tolist(), orig_col.tolist()))
    # dense + sparse reproduces the planted weight up to the GPTQ update (its own error is 0)
    assert abs(float(gq.dequantize()[5, 9]) - 1.5) < 0.05
    no_out = spqr_quantize(w, _stats(x), SPQR, tau=math.inf)
    assert no_out.n_outliers == 0
    assert _out_err(x, w, gq.dequantize()) < _out_err(x, w, no_out.dequantize())
    # the second level decodes exactly to the statistics the weights were rounded with
    assert torch.equal(gq.scale_bl.decode(), gq.scale)
    assert torch.equal(gq.zero_bl.decode(), gq.zero)
    assert int(gq.scale_bl.q.max()) <= 7 and int(gq.zero_bl.q.max()) <= 7


def test_gptq_pass_outliers_are_exact_and_feed_back_no_error():
    w, x = _layer(d_out=8, d_in=32)
    st = _stats(x)
    f = layer_factor(st, 0.01, False, w.device)
    fit = lambda cur, kept, g, d: (torch.full((8,), 0.02), torch.full((8,), 7.0), 4)  # noqa: E731
    res = gptq_group_pass(w, f.hinv, 16, fit, outliers=lambda wc, dq, u, k: wc.abs() > 0.08)
    rows, cols, vals = res.outliers
    code_val = (res.q.float() - 7.0) * 0.02
    assert torch.equal(res.weight[rows, cols], code_val[rows, cols] + vals)
    gq = GroupQuant(
        q=res.q,
        scale=res.scale,
        zero=res.zero,
        group_size=16,
        bits=4,
        outlier_rows=rows,
        outlier_cols=cols,
        outlier_vals=vals,
    )
    assert torch.equal(gq.dequantize(), res.weight)


def test_tau_search_meets_the_budget():
    w, x = _layer()
    w[:, 3] *= 8  # a column of large weights: many outlier candidates
    spec = QuantSpec(**{**SPQR.__dict__, "bits": 3, "target_bpw": 3.7})
    gq, tau = spqr_target(w, _stats(x), spec, None)
    assert spqr_bits(gq, spec) <= 3.7 and gq.n_outliers > 0 and math.isfinite(tau)
    with pytest.raises(ValueError, match="target_bpw"):
        spqr_target(w, _stats(x), QuantSpec(**{**spec.__dict__, "target_bpw": 3.5}), None)


def test_sba_holds_the_average_and_includes_the_uniform_allocation():
    order = torch.tensor([3, 0, 4, 1, 2])
    cands = allocations(6, 5, 2, order)  # 5 whole groups and a ragged last one
    assert torch.equal(cands[0], torch.full((6,), 2))
    sizes = torch.tensor([64] * 5 + [20])
    for wd in cands:
        assert int(wd[-1]) == 2  # the ragged group keeps N
        assert float((wd * sizes).sum()) / float(sizes.sum()) == 2.0  # the average exactly N
        assert (wd == 1).sum() == (wd == 3).sum()


def test_sba_gives_the_planted_salient_group_more_bits():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 256, generator=g)
    w = torch.randn(32, 256, generator=g) * 0.01
    w[:, 64:128] *= 20  # group 1 dominates the layer's output
    st = _stats(x)
    f = layer_factor(st, 0.01, False, w.device)
    widths, kls = salience_bits(w, torch.diag(f.hinv), x[:512], 2, 64)
    assert int(widths[1]) == 3 and int((widths == 1).sum()) == int((widths == 3).sum()) >= 1
    assert min(kls) < kls[0]  # better than the uniform allocation


def test_slim_llm_beats_uniform_gptq_at_two_bits_and_respects_a_mask():
    w, x = _layer(d_out=64, d_in=128)
    w[:, :32] *= 6
    spec = QuantSpec(method="slim_llm", bits=2, group_size=32)
    gq, _ = slim_llm_quantize(w, _stats(x), spec)
    assert gq.group_bits is not None and float(gq.group_bits.float().mean()) == 2.0
    assert set(gq.group_bits.tolist()) <= {1, 2, 3}
    for gi, b in enumerate(gq.group_bits.tolist()):
        assert int(gq.q[:, gi * 32 : (gi + 1) * 32].max()) < 2**b
    from slim_lightning.core.sparsegpt import sparsegpt

    wg, _, _ = sparsegpt(
        w,
        x.T @ x,
        x.shape[0],
        SparsitySpec(pattern="dense"),
        quant=QuantSpec(method="absmax", bits=2, group_size=32),
    )
    assert _out_err(x, w, gq.dequantize()) < 0.5 * _out_err(x, w, wg)
    mask = torch.rand(64, 128, generator=torch.Generator().manual_seed(0)).argsort(1) < 64
    gm, _ = slim_llm_quantize(w, _stats(x), spec, mask)
    assert bool((gm.dequantize()[~mask] == 0).all())


def test_slim_llm_needs_samples():
    w, x = _layer()
    with pytest.raises(ValueError, match="samples"):
        slim_llm_quantize(w, _stats(x, samples=False), QuantSpec(method="slim_llm", bits=2))


def test_combination_2of4_spqr_with_adapters():
    w, x = _layer(d_out=32, d_in=64)
    spec = CompressSpec(
        quant=SPQR,
        sparsity=SparsitySpec(pattern="nm", n=2, m=4),
        pruner=PrunerSpec(method="sparsegpt", joint_quant=True),
        lowrank=LowRankSpec(method="slim", rank_ratio=0.25, quant_bits=4),
    )
    validate_spec(spec)
    c = compress_linear(w, _stats(x), spec)
    assert isinstance(c.weight_q, GroupQuant)
    assert c.weight_q.perm is None  # act-order is off under the mask: the 2:4 layout packs
    from slim_lightning.formats.grouped import GroupedWeight

    assert GroupedWeight.from_group_quant(c.weight_q).layout == "nm"
    kept = c.mask.reshape(32, 16, 4).sum(-1)
    assert bool((kept == 2).all())
    assert torch.equal(c.weight, c.weight_q.dequantize())
    assert bool((c.weight[~c.mask] == 0).all())
    assert c.metrics["err_final"] < c.metrics["err_before_adapters"]


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"method": "slim_llm", "bits": 8}, "quant.bits"),
        ({"method": "spqr", "tau": 0.0}, "quant.tau"),
        ({"method": "spqr", "stat_bits": 9}, "quant.stat_bits"),
        (
            {"method": "spqr", "bits": 4, "group_size": 16, "stat_bits": 3, "target_bpw": 4.5},
            "quant.target_bpw",
        ),
        ({"method": "slim_llm", "target_bpw": 3.0}, "quant.target_bpw"),
        ({"method": "spqr", "damp": 0.0}, "quant.damp"),
    ],
)
def test_bad_options_are_refused_naming_the_key(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        QuantConfig(**kw)


def test_paper_bit_count_against_the_file_bytes():
    """The packed file holds exactly the paper's count plus what the paper amortises away: the
    CSR row offsets, the act-order permutation and the byte padding of the statistic codes."""
    from slim_lightning.formats.grouped import GroupedWeight

    w, x = _layer(d_out=48, d_in=64)
    w[5, 9] = 1.5
    gq = spqr_quantize(w, _stats(x), SPQR)  # 4-bit, 16 x 16, 3-bit statistics
    pw = GroupedWeight.from_group_quant(gq)
    rows, cols, n_groups = 48, 64, 4
    formula = spqr_bits_formula(4, 3, 16, 16, gq.n_outliers / (rows * cols))
    assert gq.paper_bits() == pytest.approx(formula)
    pad = 2 * rows * (8 * math.ceil(3 * n_groups / 8) - 3 * n_groups)  # scale_q, zero_q rows
    extra = 32 * (rows + 1) + 32 * cols + pad
    assert 8 * pw.nbytes() == pytest.approx(formula * rows * cols + extra)
    gm, _ = slim_llm_quantize(w, _stats(x), QuantSpec(method="slim_llm", bits=2, group_size=16))
    pm = GroupedWeight.from_group_quant(gm)
    widths = 8 * n_groups  # one uint8 per group
    assert 8 * pm.nbytes() == pytest.approx(gm.paper_bits() * rows * cols + widths)


def test_second_level_of_a_nearly_constant_statistic_stays_finite():
    """Equal scales over a row group (common under a 2:4 mask) once gave an fp16 step of 0 and an
    infinite zero point: the step is bounded below by 1/1024 of the largest magnitude."""
    from slim_lightning.core.spqr import second_level

    x = torch.tensor([0.5, 0.5000001, 0.5, 0.5] * 4 + [0.25])
    bl = second_level(x, 3, 16)
    assert torch.isfinite(bl.z2).all() and torch.isfinite(bl.s2).all()
    assert torch.allclose(bl.decode()[:, 0], x, rtol=2e-3)
