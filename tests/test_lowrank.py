"""SLiM-LoRA: rank rule, saliency, closed-form adapters, randomized SVD, adapter quantisation."""

import pytest
import torch

from slim_lightning.core.lowrank import (
    adapter_in_scales,
    adapter_rank,
    low_rank_svd,
    quantize_adapters,
    quantize_adapters_searched,
    saliency,
    slim_lora,
)
from slim_lightning.core.types import LowRankSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def test_adapter_rank_rounding():
    assert adapter_rank(768, 3072, LowRankSpec(rank_ratio=0.1)) == 77
    assert adapter_rank(768, 768, LowRankSpec(rank_rounding="up", rank_multiple=128)) == 128
    assert adapter_rank(1280, 5000, LowRankSpec(rank_rounding="up", rank_multiple=128)) == 128
    assert adapter_rank(768, 768, LowRankSpec(rank_rounding="down", rank_multiple=64)) == 64
    assert adapter_rank(768, 768, LowRankSpec(rank_rounding="down", rank_multiple=128)) == 1
    assert (
        adapter_rank(64, 64, LowRankSpec(rank_ratio=0.9, rank_rounding="up", rank_multiple=128))
        == 64
    )


def test_saliency_shift_and_errors():
    s = saliency(torch.tensor([4.0, 0.0, 1.0]), "sq")
    torch.testing.assert_close(s, torch.tensor([5.0, 1.0, 2.0]).sqrt())
    assert torch.equal(saliency(torch.tensor([4.0, 9.0]), "sq"), torch.tensor([2.0, 3.0]))
    assert torch.equal(saliency(torch.tensor([0.5, 2.0]), "abs"), torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match="all zero"):
        saliency(torch.zeros(5))
    with pytest.raises(ValueError):
        saliency(torch.tensor([1.0, float("nan")]))


def _weighted(err, s):
    return torch.linalg.norm(err * s[None, :]).item()


@pytest.mark.parametrize("split", ["left", "balanced"])
def test_slim_lora_exact_when_rank_suffices(split):
    torch.manual_seed(0)
    err = torch.randn(40, 6) @ torch.randn(6, 72)  # true rank 6
    s = torch.rand(72) * 5 + 0.1
    for rank in (6, 9):
        left, right = slim_lora(err, s, rank, LowRankSpec(split=split))
        assert left.shape == (72, rank) and right.shape == (rank, 40)
        torch.testing.assert_close((left @ right).T, err, rtol=1e-4, atol=1e-4)


def test_slim_lora_balanced_equals_left_product():
    torch.manual_seed(1)
    err, s = torch.randn(30, 50), torch.rand(50) + 0.1
    l1, r1 = slim_lora(err, s, 7, LowRankSpec(split="left"))
    l2, r2 = slim_lora(err, s, 7, LowRankSpec(split="balanced"))
    torch.testing.assert_close(l1 @ r1, l2 @ r2, rtol=1e-4, atol=1e-5)
    # balanced: both factors carry sqrt(S); left: R has orthonormal rows
    torch.testing.assert_close(r1 @ r1.T, torch.eye(7), rtol=0, atol=1e-5)


def test_slim_beats_naive_on_weighted_error():
    torch.manual_seed(2)
    err = torch.randn(64, 96)
    s = torch.rand(96) ** 3 * 10 + 0.01  # strongly non-uniform saliency
    ls, rs = slim_lora(err, s, 8, LowRankSpec())
    ln, rn = slim_lora(err, None, 8, LowRankSpec())
    e_slim = _weighted(err - (ls @ rs).T, s)
    e_naive = _weighted(err - (ln @ rn).T, s)
    assert e_slim < 0.95 * e_naive
    # and naive wins on the unweighted norm, as it should (Eckart-Young)
    assert torch.linalg.norm(err - (ln @ rn).T) <= torch.linalg.norm(err - (ls @ rs).T)


def test_randomized_svd_close_to_exact():
    torch.manual_seed(3)
    base = torch.randn(120, 10) @ torch.diag(torch.linspace(10, 5, 10)) @ torch.randn(10, 90)
    e = base + 0.01 * torch.randn(120, 90)
    u, s, v = low_rank_svd(e, 10, "exact")
    ur, sr, vr = low_rank_svd(e, 10, "randomized", oversample=8, niter=2)
    assert ur.shape == (120, 10) and vr.shape == (90, 10)
    torch.testing.assert_close(sr, s, rtol=1e-3, atol=0)
    approx_exact = u @ torch.diag(s) @ v.T
    approx_rand = ur @ torch.diag(sr) @ vr.T
    rel = torch.linalg.norm(approx_rand - approx_exact) / torch.linalg.norm(approx_exact)
    assert rel < 1e-3
    with pytest.raises(ValueError):
        low_rank_svd(e, 91)


def test_quantize_adapters_layout():
    torch.manual_seed(4)
    left, right = torch.randn(576, 20), torch.randn(20, 300)
    lq, rq = quantize_adapters(left, right, 4, 128)
    assert lq.q.shape == (20, 576) and lq.scale.shape == (20, 5)  # L^T, groups along d_in
    assert rq.q.shape == (300, 20) and rq.scale.shape == (300, 1) and rq.group_size == 20
    rel = torch.linalg.norm(lq.dequantize().T - left) / torch.linalg.norm(left)
    assert rel < 0.2


def test_quantize_adapters_in_scale_domain():
    # After a Wanda mask the residual is large where the saliency is small (err ~ 1/s), so
    # L = diag(1/s) V S spans a wide range: low-saliency channels set each group's absmax and the
    # salient channels round to ~0 unless L^T is quantised in the activation-scaled domain.
    torch.manual_seed(5)
    d_in, d_out, r = 256, 96, 12
    stat = torch.rand(d_in) ** 6 * 100 + 1e-4  # heavy-tailed channel energies
    s = saliency(stat)
    x = torch.randn(512, d_in) * s
    err = torch.randn(d_out, d_in) * 0.02 / s
    left, right = slim_lora(err, s, r, LowRankSpec())
    l_in, r_in = adapter_in_scales(left, stat)
    assert l_in.shape == (d_in,) and r_in.shape == (r,) and l_in.max() == 1 and r_in.max() == 1
    assert torch.equal(l_in, l_in.half().float()) and (l_in >= 2.0**-14).all()
    plain = quantize_adapters(left, right, 4, 128)
    scaled = quantize_adapters(left, right, 4, 128, (l_in, r_in))
    lq, rq = scaled
    assert torch.equal(lq.in_scale, l_in) and torch.equal(rq.in_scale, r_in)
    assert lq.q.shape == (r, d_in) and lq.q.min() >= -8 and lq.q.max() <= 7
    torch.testing.assert_close(
        lq.dequantize(), lq.q.float() * lq.scale.repeat_interleave(128, 1) / l_in, rtol=0, atol=0
    )

    def out_err(pair):
        lq_, rq_ = pair
        return torch.linalg.norm(x @ left @ right - x @ lq_.dequantize().T @ rq_.dequantize().T)

    assert out_err(scaled) < 0.5 * out_err(plain)
    *searched, power = quantize_adapters_searched(left, right, 4, 128, stat, s)
    assert power > 0 and out_err(searched) <= out_err(scaled) * 1.05
    with pytest.raises(ValueError, match="all zero"):
        adapter_in_scales(left, torch.zeros(d_in))


def test_adapter_in_scale_search_never_worse_than_plain():
    # a residual concentrated on salient channels: full scaling can lose, the search must not
    torch.manual_seed(6)
    stat = torch.rand(256) ** 6 * 100 + 1e-4
    s = saliency(stat)
    for seed in range(3):
        err = torch.randn(96, 256, generator=torch.Generator().manual_seed(seed)) * 0.02
        left, right = slim_lora(err, s, 12, LowRankSpec())

        target = left @ right  # (d_in, d_out)

        def werr(lq, rq, target=target):
            approx = lq.dequantize().T @ rq.dequantize().T
            return torch.linalg.norm((target - approx) * s[:, None])

        lq, rq, power = quantize_adapters_searched(left, right, 4, 128, stat, s)
        assert werr(lq, rq) <= werr(*quantize_adapters(left, right, 4, 128)) + 1e-6
        assert (lq.in_scale is None) == (power == 0)


def test_whitened_fit_minimises_the_output_error():
    """lowrank.fit=whitened: with correlated inputs the adapters cut the calibration outputs'
    error tr(E H E^T) below the diagonal (saliency) fit's; with a diagonal H it is that fit."""
    from slim_lightning.core.lowrank import slim_lora, whitening
    from slim_lightning.core.types import LowRankSpec

    g = torch.Generator().manual_seed(0)
    d_out, d_in, r = 48, 64, 6
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    x = torch.randn(512, d_in, generator=g) @ mix  # correlated channels
    h = x.T @ x
    err = torch.randn(d_out, d_in, generator=g)
    spec = LowRankSpec()

    def out_err(left, right):
        e = err - (left @ right).T
        return float(torch.trace(e @ h @ e.T))

    s = (x**2).mean(0).sqrt()
    diag = out_err(*slim_lora(err, s, r, spec))
    white = out_err(*slim_lora(err, s, r, spec, whitening(h, 1e-6)))
    assert white < 0.97 * diag
    # the optimum: no rank-r update does better than the whitened truncated SVD
    best = float((torch.linalg.svdvals(err @ torch.linalg.cholesky(h))[r:] ** 2).sum())
    assert abs(white - best) <= 1e-3 * best
    # diagonal H = diag(s^2): the whitened fit is the saliency fit (the same product L R)
    hd = torch.diag(s**2)
    a = slim_lora(err, s, r, spec)
    b = slim_lora(err, s, r, spec, whitening(hd, 1e-9))
    torch.testing.assert_close(a[0] @ a[1], b[0] @ b[1], rtol=1e-3, atol=1e-4)


def test_whitened_fit_needs_a_hessian():
    from slim_lightning.core.compress import compress_linear
    from slim_lightning.core.types import CompressSpec, LayerStats, LowRankSpec, PrunerSpec

    w = torch.randn(16, 32)
    x = torch.randn(64, 32)
    stats = LayerStats(sq_sum=(x**2).sum(0), abs_sum=x.abs().sum(0), n_tokens=64)
    spec = CompressSpec(pruner=PrunerSpec("wanda"), lowrank=LowRankSpec(fit="whitened"))
    with pytest.raises(ValueError, match="lowrank.fit=whitened needs"):
        compress_linear(w, stats, spec)


@pytest.mark.parametrize("shape", [(96, 200), (200, 96)])  # (twice as long as wide)
def test_exact_svd_of_a_large_matrix_through_the_gram_matrix(monkeypatch, shape):
    """From ``GRAM_MIN_SIDE`` on, the exact top-r triplets come from the fp64 Gram matrix of the
    smaller side: same singular values and the same rank-r product as the thin SVD (fp32
    rounding), orthonormal factors, both orientations, a spread-out spectrum."""
    import slim_lightning.core.lowrank as lowrank

    g = torch.Generator().manual_seed(7)
    e = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(0, -3, shape[1]))
    u0, s0, v0 = low_rank_svd(e, 24)  # below the threshold: LAPACK's thin SVD
    monkeypatch.setattr(lowrank, "GRAM_MIN_SIDE", 64)
    u, s, v = low_rank_svd(e, 24)
    assert u.shape == u0.shape and v.shape == v0.shape and u.dtype == torch.float32
    torch.testing.assert_close(s, s0, rtol=1e-5, atol=1e-6 * float(s0[0]))
    torch.testing.assert_close((u * s) @ v.T, (u0 * s0) @ v0.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u.T @ u, torch.eye(24), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(24), atol=1e-5, rtol=0)
