"""compress_linear end to end: presets, invariants (mask, grid), re-fit, bits per weight."""

import dataclasses
import math

import pytest
import torch

from slim_lightning.core.compress import bits_per_weight, compress_linear, weighted_rel_error
from slim_lightning.core.lowrank import saliency
from slim_lightning.core.types import (
    CompressSpec,
    LayerStats,
    LowRankSpec,
    PrunerSpec,
    QuantSpec,
    SparsitySpec,
)

pytestmark = pytest.mark.usefixtures("one_thread")


NO_LR = LowRankSpec(method="none")
PRESETS = {
    "slim_q": CompressSpec(),
    "slim": CompressSpec(lowrank=LowRankSpec(quant_bits=None)),
    "naive_lora": CompressSpec(lowrank=LowRankSpec(method="naive")),
    "wanda_absmax": CompressSpec(quant=QuantSpec("absmax"), lowrank=NO_LR),
    "sparsegpt_optq": CompressSpec(
        quant=QuantSpec("absmax", group_size=-1),
        pruner=PrunerSpec("sparsegpt", joint_quant=True),
        lowrank=NO_LR,
    ),
    "sparsegpt_optq_slim": CompressSpec(
        quant=QuantSpec("absmax", group_size=-1), pruner=PrunerSpec("sparsegpt", joint_quant=True)
    ),
    "sparsegpt_slimquant": CompressSpec(pruner=PrunerSpec("sparsegpt")),
    "magnitude_absmax": CompressSpec(
        quant=QuantSpec("absmax"), pruner=PrunerSpec("magnitude"), lowrank=NO_LR
    ),
    "slim_unstructured": CompressSpec(sparsity=SparsitySpec("unstructured", ratio=0.5)),
    "slim_exact_outliers": CompressSpec(quant=QuantSpec(error_model="exact", outlier_ratio=0.02)),
    "quant_then_mask": CompressSpec(pruner=PrunerSpec(order="quant_then_mask")),
    "adapters_in_scale_before_refit": CompressSpec(
        lowrank=LowRankSpec(quant_in_scale=True, quant_before_refit=True)
    ),
    "sparsegpt_optq_slim_in_scale": CompressSpec(
        quant=QuantSpec("absmax"),
        pruner=PrunerSpec("sparsegpt", joint_quant=True),
        lowrank=LowRankSpec(quant_in_scale=True, quant_before_refit=True),
    ),
    "hassle_free_alternation": CompressSpec(
        quant=QuantSpec("absmax"),
        pruner=PrunerSpec("sparsegpt", joint_quant=True),
        lowrank=LowRankSpec(alternate=2, quant_in_scale=True, quant_before_refit=True),
    ),
    "balanced_randomized_rounds": CompressSpec(
        lowrank=LowRankSpec(
            split="balanced", svd="randomized", refit_rounds=2, quant_before_refit=True
        )
    ),
}


def _layer(seed=0, d_out=64, d_in=192, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * (torch.rand(d_in, generator=g) ** 2 * 3 + 0.05)
    w = torch.randn(d_out, d_in, generator=g) * 0.02
    stats = LayerStats(sq_sum=(x**2).sum(0), abs_sum=x.abs().sum(0), n_tokens=n, hessian=x.T @ x)
    return w, stats


def _s(stats):
    return saliency(stats.channel_stat("sq"))


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_end_to_end(name):
    spec = PRESETS[name]
    w, stats = _layer()
    out = compress_linear(w, stats, spec)
    m = out.metrics
    for key in (
        "sparsity",
        "rank",
        "alpha",
        "err_before_adapters",
        "err_after_adapters",
        "err_final",
        "bits_per_weight",
        "adapter_params",
    ):
        assert isinstance(m[key], float), key
    assert m["sparsity"] == pytest.approx(0.5)
    assert out.mask is not None and torch.equal(
        out.weight[~out.mask], torch.zeros(int((~out.mask).sum()))
    )
    if spec.sparsity.pattern == "nm":
        assert (out.mask.view(64, -1, 4).sum(-1) == 2).all()
    # the sparse part is exactly the dequantised integers, which lie on the grid
    qt = out.weight_q
    qmax = 2 ** (qt.bits - 1) - 1
    assert qt.q.dtype == torch.int8 and qt.q.min() >= -qmax - 1 and qt.q.max() <= qmax
    assert torch.equal(out.weight, qt.dequantize())
    assert math.isnan(m["alpha"]) == (spec.quant.method != "slim_quant")
    lr = spec.lowrank
    if lr.method == "none":
        assert out.rank == 0 and m["err_final"] == pytest.approx(m["err_before_adapters"])
        assert 3.0 < m["bits_per_weight"] < 3.2
    else:
        assert out.rank == m["rank"] == 6  # round(0.1 * min(64, 192))
        assert m["adapter_params"] == 6 * (64 + 192)
        assert m["err_after_adapters"] < m["err_before_adapters"]
        assert m["err_final"] < m["err_before_adapters"]
        if lr.quant_bits is None:
            assert out.lora_l_q is None and m["err_final"] == pytest.approx(m["err_after_adapters"])
        else:
            assert torch.equal(out.lora_l, out.lora_l_q.dequantize().T)
            assert torch.equal(out.lora_r, out.lora_r_q.dequantize().T)
            assert out.lora_l_q.q.shape == (6, 192) and out.lora_r_q.q.shape == (64, 6)
            assert (out.lora_l_q.in_scale is not None) == lr.quant_in_scale
    assert m["err_final"] == pytest.approx(
        weighted_rel_error(w, out.effective_weight(), _s(stats)), rel=1e-6
    )


def test_slim_beats_baselines():
    w, stats = _layer(1)
    err = {
        k: compress_linear(w, stats, PRESETS[k]).metrics["err_final"]
        for k in ("slim", "naive_lora", "wanda_absmax", "magnitude_absmax")
    }
    assert err["slim"] < err["naive_lora"] < err["wanda_absmax"] < err["magnitude_absmax"]


def test_dense_is_identity():
    w, stats = _layer()
    spec = CompressSpec(quant=QuantSpec("none"), sparsity=SparsitySpec("dense"), lowrank=NO_LR)
    out = compress_linear(w.half(), stats, spec)
    assert torch.equal(out.effective_weight(), w.half().float()) and out.mask is None
    assert out.metrics["bits_per_weight"] == 16.0 and out.metrics["err_final"] == 0.0


def test_refit_never_increases_error_without_quantisation():
    # Without quantisation the re-fit is elementwise optimal on the kept entries (error 0 there,
    # unchanged on pruned ones), and each further round re-solves the adapters optimally in the
    # same weighted norm, so errors are monotone. With quantisation this is NOT guaranteed: the
    # fresh alpha/scales can land worse (seen with slim_quant + unstructured on random data), see
    # test_refit_helps_quantised_2of4 for the empirical claim.
    for seed in range(4):
        w, stats = _layer(seed)
        prev = None
        for rounds, refit in ((1, False), (1, True), (2, True), (3, True)):
            lr = LowRankSpec(quant_bits=None, refit=refit, refit_rounds=rounds)
            e = compress_linear(w, stats, CompressSpec(quant=QuantSpec("none"), lowrank=lr))
            e = e.metrics["err_final"]
            assert prev is None or e <= prev + 1e-7
            prev = e


@pytest.mark.parametrize("quant", [QuantSpec("slim_quant"), QuantSpec("absmax")])
def test_refit_helps_quantised_2of4(quant):
    # empirical on these fixed seeds (deterministic), not a theorem: see the test above
    for seed in range(3):
        w, stats = _layer(seed)
        on = compress_linear(w, stats, CompressSpec(quant=quant)).metrics
        off = compress_linear(
            w, stats, CompressSpec(quant=quant, lowrank=LowRankSpec(refit=False))
        ).metrics
        assert on["err_final"] < off["err_final"]


def _sparse_plus_low_rank(seed, d_out=48, d_in=64, r=4, n=512):
    """A weight that IS a 2:4 sparse matrix plus a rank-r one (the ground truth to recover)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * (torch.rand(d_in, generator=g) * 2 + 0.2)
    pick = torch.rand(d_out, d_in // 4, 4, generator=g).argsort(-1)[..., :2]
    keep = torch.zeros(d_out, d_in // 4, 4).scatter_(-1, pick, 1.0).reshape(d_out, d_in).bool()
    low = torch.randn(d_in, r, generator=g) @ torch.randn(r, d_out, generator=g)
    w = torch.randn(d_out, d_in, generator=g) * keep + 0.5 * low.T
    st = LayerStats(sq_sum=(x**2).sum(0), abs_sum=x.abs().sum(0), n_tokens=n, hessian=x.T @ x)
    return w, st, keep, x


@pytest.mark.parametrize("fit", ["diag", "whitened"])
def test_alternation_recovers_sparse_plus_low_rank(fit):
    """lowrank.alternate: each round re-picks the 2:4 mask on W - L R (SparseGPT) and re-fits the
    adapters on the rest; on a weight that is exactly sparse + low rank the calibration outputs'
    error falls round after round and the chosen mask moves towards the true one."""
    for seed in range(2):
        w, st, keep, x = _sparse_plus_low_rank(seed)
        errs, hits = [], []
        for alt in (0, 1, 3):
            lr = LowRankSpec(quant_bits=None, rank_ratio=4 / 48, alternate=alt, fit=fit)
            spec = CompressSpec(quant=QuantSpec("none"), pruner=PrunerSpec("sparsegpt"), lowrank=lr)
            c = compress_linear(w, st, spec)
            groups = c.mask.reshape(48, 16, 4).sum(-1)
            assert bool((groups == 2).all())  # always a valid 2:4 pattern
            assert c.metrics["refit_rounds"] == alt + 1
            errs.append(float(((x @ (w - c.effective_weight()).T) ** 2).sum()))
            hits.append(float((c.mask == keep).float().mean()))
        assert errs[1] < 0.9 * errs[0] and errs[2] < 0.85 * errs[1]
        assert hits[2] > hits[0]


def test_zero_statistic_and_bad_combinations():
    w, stats = _layer()
    dead = LayerStats(sq_sum=torch.zeros(192), abs_sum=torch.zeros(192), n_tokens=10)
    with pytest.raises(ValueError, match="all zero"):
        compress_linear(w, dead, CompressSpec())
    out = compress_linear(
        w, dead, CompressSpec(pruner=PrunerSpec("magnitude"), lowrank=LowRankSpec("naive"))
    )
    assert out.metrics["err_uniform_weights"] == 1.0
    with pytest.raises(ValueError, match="quant_then_mask"):
        compress_linear(
            w, stats, CompressSpec(pruner=PrunerSpec("sparsegpt", order="quant_then_mask"))
        )
    with pytest.raises(ValueError, match="joint_quant"):
        compress_linear(
            w,
            stats,
            CompressSpec(quant=QuantSpec("none"), pruner=PrunerSpec("sparsegpt", joint_quant=True)),
        )
    no_h = dataclasses.replace(stats, hessian=None)
    with pytest.raises(ValueError, match="hessian"):
        compress_linear(w, no_h, CompressSpec(pruner=PrunerSpec("sparsegpt")))


def test_bits_per_weight_accounting():
    nm = SparsitySpec("nm", 2, 4)
    # 2:4 + 4-bit, one scale: 2 (values) + 1 (2-bit index per kept value) + 16 / numel
    assert bits_per_weight(
        4096, 4096, weight_bits=4, sparsity=nm, n_weight_scales=1
    ) == pytest.approx(3.0 + 16 / 4096**2)
    # + rank-410 4-bit adapters, groups of 128: values and their fp16 group scales
    r = 410
    extra = (4 * r * 8192 + 16 * (r * 32 + 4096 * 4)) / 4096**2
    got = bits_per_weight(
        4096,
        4096,
        weight_bits=4,
        sparsity=nm,
        n_weight_scales=1,
        rank=r,
        adapter_bits=4,
        adapter_group_size=128,
    )
    assert got == pytest.approx(3.0 + 16 / 4096**2 + extra) and 3.8 < got < 3.9
    # unstructured: bitmap (1 bit/weight) at 50%, 16-bit indices when cheaper (95% sparse)
    un = SparsitySpec("unstructured", ratio=0.5)
    assert bits_per_weight(100, 100, weight_bits=4, sparsity=un) == pytest.approx(3.0)
    un95 = SparsitySpec("unstructured", ratio=0.95)
    assert bits_per_weight(100, 100, weight_bits=4, sparsity=un95) == pytest.approx(0.2 + 0.8)
    dense = SparsitySpec("dense")
    assert bits_per_weight(8, 8, weight_bits=None, sparsity=dense) == 16.0
    # adapter in_scale vectors: d_in + rank fp16 values
    with_in = bits_per_weight(
        4096,
        4096,
        weight_bits=4,
        sparsity=nm,
        n_weight_scales=1,
        rank=r,
        adapter_bits=4,
        adapter_in_scale=True,
    )
    assert with_in == pytest.approx(got + 16 * (4096 + r) / 4096**2)
    # fp16 adapters: 16 bits per adapter value, no scales
    assert bits_per_weight(8, 8, weight_bits=None, sparsity=dense, rank=2) == 16.0 + 16 * 32 / 64


@pytest.mark.parametrize(
    "spec",
    [
        CompressSpec(quant=QuantSpec("absmax", group_size=16), lowrank=LowRankSpec(method="none")),
        CompressSpec(
            quant=QuantSpec("absmax", group_size=-1),
            sparsity=SparsitySpec("unstructured", ratio=0.6),
            lowrank=LowRankSpec(method="none"),
        ),
        CompressSpec(quant=QuantSpec("none"), lowrank=LowRankSpec(method="none")),
    ],
)
def test_row_blocks_give_the_whole_weight_result(spec):
    """compress_linear_rows: the tensors of compress_linear exactly, the metrics combined
    (relative errors, sparsity, bits per weight) to float rounding."""
    from slim_lightning.core.compress import compress_linear_rows, row_separable

    g = torch.Generator().manual_seed(0)
    w = torch.randn(77, 64, generator=g)
    x = torch.randn(300, 64, generator=g) * (torch.rand(64, generator=g) + 0.1)
    st = LayerStats(sq_sum=(x * x).sum(0), abs_sum=x.abs().sum(0), n_tokens=300)
    assert row_separable(spec)
    a, b = compress_linear(w, st, spec), compress_linear_rows(w, st, spec, step=64 * 10)
    assert torch.equal(a.weight, b.weight)
    assert (a.mask is None) == (b.mask is None) and (a.mask is None or torch.equal(a.mask, b.mask))
    if a.weight_q is not None:
        assert torch.equal(a.weight_q.q, b.weight_q.q)
        assert torch.equal(a.weight_q.scale, b.weight_q.scale)
    assert a.metrics.keys() == b.metrics.keys()
    for k, v in a.metrics.items():
        assert b.metrics[k] == pytest.approx(v, rel=1e-6, nan_ok=True), k


def test_specs_that_need_the_whole_weight_are_not_split():
    from slim_lightning.core.compress import compress_linear_rows, row_separable

    assert not row_separable(CompressSpec())  # SLiM-Quant (one scale) + adapters
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 32, generator=g)
    st = LayerStats(sq_sum=torch.rand(32) + 0.5, abs_sum=torch.rand(32) + 0.5, n_tokens=10)
    a, b = compress_linear(w, st, CompressSpec()), compress_linear_rows(w, st, CompressSpec(), 64)
    assert torch.equal(a.weight, b.weight) and a.metrics.keys() == b.metrics.keys()
