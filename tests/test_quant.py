"""SLiM-Quant alpha search, per-tensor / AbsMax quantisers, SLiM-Quant^O."""

import math

import pytest
import torch

from slim_lightning.core.quant import (
    absmax_quant,
    alpha_errors,
    apply_mask,
    default_num_bins,
    quantize_per_tensor,
    quantize_weight,
    slim_quant,
    slim_quant_alpha,
)
from slim_lightning.core.types import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_force_errors(w, bits, model, n_bins):
    """Per-candidate loop with the reference formula (floor / true rounding at bin centres)."""
    a = w.abs().flatten().float()
    lo, hi = a.min().item(), a.max().item()
    c = torch.histc(a, n_bins, lo, hi).double()
    v = lo + (torch.arange(n_bins, dtype=torch.float64) + 0.5) * (hi - lo) / n_bins
    errs = []
    for i in range(n_bins):
        alpha = v[i]
        if model == "reference":
            h = alpha / 2**bits
            qv = torch.floor(v[:i] / h) * h
        else:
            h = alpha / (2 ** (bits - 1) - 1)
            qv = torch.round(v[:i] / h) * h
        errs.append((c[:i] * (v[:i] - qv) ** 2).sum() + (c[i:] * (v[i:] - alpha) ** 2).sum())
    return v, torch.stack(errs)


@pytest.mark.parametrize("model", ["reference", "exact"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_alpha_matches_brute_force(model, bits):
    torch.manual_seed(bits)
    w = torch.randn(96, 80) * torch.rand(96, 1)  # heavy-ish tails: an interior optimum
    cand, err = alpha_errors(w, bits, model, n_bins=400)
    cand_b, err_b = _brute_force_errors(w, bits, model, 400)
    torch.testing.assert_close(cand, cand_b)
    torch.testing.assert_close(err, err_b, rtol=1e-9, atol=1e-9 * err_b.max().item())
    assert slim_quant_alpha(w, bits, model, n_bins=400) == pytest.approx(
        cand_b[err_b.argmin()].item()
    )


def _reference_search(err: torch.Tensor) -> int:
    """The reference coarse-to-fine search over precomputed errors (with its defect)."""
    n = err.numel()
    stride = n // 10
    losses = torch.full((11,), math.inf, dtype=torch.float64)
    idx = torch.zeros(11, dtype=torch.long)
    for j, i in enumerate(range(0, n, stride)):
        losses[j], idx[j] = err[i], i
    tp = int(losses.argmin())
    start, end = int(idx[max(tp - 1, 0)]), int(idx[min(tp + 1, 10)])
    total = torch.full((n,), math.inf, dtype=torch.float64)
    total[start:end] = err[start:end]
    return int(total.argmin())


def test_no_collapse_when_bins_multiple_of_ten():
    # 600 x 1000 weights -> default B = 600 (a multiple of 10); uniform |W| at 8 bits puts the
    # optimum near max|W|, i.e. the last coarse candidate, where the reference range is empty.
    torch.manual_seed(0)
    w = torch.rand(600, 1000) * 2 - 1
    assert default_num_bins(w.numel()) == 600
    cand, err = alpha_errors(w, 8, "exact")
    assert _reference_search(err) == 0  # the case really triggers the reference defect
    alpha = slim_quant_alpha(w, 8, "exact")
    assert alpha > 0.9
    assert alpha == pytest.approx(cand[err.argmin()].item())


def test_quantize_per_tensor_on_grid():
    torch.manual_seed(1)
    w = torch.randn(32, 48)
    alpha = slim_quant_alpha(w, 4)
    qt = quantize_per_tensor(w, alpha, 4)
    assert qt.q.dtype == torch.int8 and qt.scale.shape == (1, 1) and qt.group_size == 48
    assert qt.q.min() >= -8 and qt.q.max() <= 7
    torch.testing.assert_close(qt.dequantize(), qt.q.float() * qt.scale, rtol=0, atol=0)
    inside = w.abs() <= alpha * 0.999
    err = (qt.dequantize() - w).abs()[inside]
    assert err.max() <= qt.scale.item() / 2 + 1e-6
    assert qt.scale.item() == pytest.approx(alpha / 7, rel=1e-3)  # fp16-rounded scale


def test_zero_tensor_gives_zeros():
    qt = slim_quant(torch.zeros(8, 16), 4)
    assert torch.equal(qt.dequantize(), torch.zeros(8, 16))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_absmax_groups_576(bits):
    torch.manual_seed(bits)
    w = torch.randn(40, 576)
    w[3, 128:256] = 0.0  # an all-zero group must not give NaN
    qt = absmax_quant(w, bits, 128)
    qmax = 2 ** (bits - 1) - 1
    assert qt.scale.shape == (40, 5) and qt.group_size == 128
    assert qt.q.min() >= -qmax - 1 and qt.q.max() <= qmax
    deq = qt.dequantize()
    assert torch.isfinite(deq).all() and torch.equal(deq[3, 128:256], torch.zeros(128))
    # the per-group error is at most half a step (scales are fp16-rounded: small slack)
    step = qt.scale.repeat_interleave(128, dim=1)[:, :576]
    assert ((deq - w).abs() <= step / 2 * 1.002 + 1e-7).all()
    # the last, short group (512..575) has its own scale from its own 64 columns
    torch.testing.assert_close(qt.scale[:, 4], w[:, 512:].abs().amax(1) / qmax, rtol=1e-3, atol=0)


def test_absmax_per_channel():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    qt = absmax_quant(w, 4, -1)
    assert qt.scale.shape == (2, 1) and qt.group_size == 4
    assert qt.q.tolist() == [[4, -7, 2, 0], [0, 0, 0, 0]]  # 1 / (2/7) = 3.5 -> 4
    assert qt.scale[1, 0].item() == 0.0


def test_slim_quant_outliers():
    torch.manual_seed(2)
    w = torch.randn(16, 200)
    stat = torch.rand(200)
    stat[[5, 77]] = 100.0  # the two most salient channels at 1% of 200
    plain = slim_quant(w, 4)
    qt = slim_quant(w, 4, stat=stat, outlier_ratio=0.01, outlier_scale=2.0)
    assert torch.equal(qt.scale, plain.scale)  # alpha on the unscaled W
    expected = torch.ones(200)
    expected[[5, 77]] = 2.0
    assert torch.equal(qt.in_scale, expected)
    torch.testing.assert_close(qt.dequantize(), qt.q.float() * qt.scale / expected[None, :])
    # salient columns get a finer effective grid -> smaller error there
    e_o = (qt.dequantize() - w)[:, [5, 77]].abs().mean()
    e_p = (plain.dequantize() - w)[:, [5, 77]].abs().mean()
    assert e_o < e_p


@pytest.mark.parametrize("method", ["slim_quant", "absmax"])
def test_quantize_weight_respects_mask(method):
    torch.manual_seed(3)
    w = torch.randn(24, 64)
    mask = torch.rand(24, 64) > 0.5
    qt, alpha = quantize_weight(w, QuantSpec(method=method), mask=mask)
    assert torch.equal(qt.q[~mask], torch.zeros_like(qt.q[~mask]))
    assert torch.equal(qt.dequantize()[~mask], torch.zeros(int((~mask).sum())))
    assert math.isnan(alpha) == (method == "absmax")
    assert apply_mask(qt, None) is qt


@pytest.mark.parametrize("bits", [3, 4])
def test_exact_alpha_near_fine_grid_optimum_of_real_mse(bits):
    # the histogram model is only a model: the alpha it picks must also (nearly) minimise the REAL
    # squared error of symmetric rounding of W (levels -qmax..qmax, the model's grid; the int grid's
    # extra level -qmax-1 only helps), brute-forced over a fine grid of 1000 alphas
    torch.manual_seed(10 + bits)
    w = torch.randn(256, 96) * (torch.rand(256, 1) + 0.2)  # gaussian mixture: interior optimum
    qmax = 2 ** (bits - 1) - 1

    def mse(a):
        h = a / qmax
        return (torch.round(w / h).clamp(-qmax, qmax) * h - w).pow(2).mean().item()

    hi = w.abs().max().item()
    best = min(mse(a) for a in torch.linspace(hi / 1000, hi, 1000).tolist())
    alpha = slim_quant_alpha(w, bits, "exact")
    assert mse(alpha) <= best * 1.005
    # the reference error model (floor, step alpha/2^b) is a different objective: still sane
    ref = slim_quant_alpha(w, bits, "reference")
    assert 0 < ref <= hi


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [16, 32, 64, 100, 128, 576, 1000, -1])
def test_absmax_any_bits_any_group(bits, group_size):
    torch.manual_seed(bits * 1000 + group_size)
    w = torch.randn(6, 576)
    qt = absmax_quant(w, bits, group_size)
    qmax = 2 ** (bits - 1) - 1
    g = 576 if group_size in (-1, 1000) else group_size
    assert qt.group_size == g and qt.scale.shape == (6, -(-576 // g))
    assert qt.q.min() >= -qmax - 1 and qt.q.max() <= qmax
    # every group's largest |w| maps to +-qmax exactly (scale = max / qmax, fp16-rounded)
    deq = qt.dequantize()
    step = qt.scale.repeat_interleave(g, dim=1)[:, :576]
    assert ((deq - w).abs() <= step / 2 * 1.002 + 1e-7).all()
    pad = torch.nn.functional.pad(qt.q.abs(), (0, qt.scale.shape[1] * g - 576))
    assert (pad.view(6, -1, g).amax(-1) == qmax).all()
