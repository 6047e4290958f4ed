"""Masks (N:M, unstructured), scores, and SparseGPT with joint OPTQ."""

import pytest
import torch

from slim_lightning.core.prune import (
    magnitude_score,
    make_mask,
    nm_mask,
    unstructured_mask,
    wanda_score,
)
from slim_lightning.core.quant import absmax_quant
from slim_lightning.core.sparsegpt import sparsegpt
from slim_lightning.core.types import PrunerSpec, QuantSpec, SparsitySpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The 2 CPU cores are shared: with 2 intra-op threads, these tiny SVD/matmul calls spin-wait
    # under load and run ~100x slower than single-threaded.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_keeps_exactly_n(n, m):
    torch.manual_seed(0)
    score = torch.rand(17, 64)
    mask = nm_mask(score, n, m)
    groups = mask.view(17, 64 // m, m)
    assert (groups.sum(-1) == n).all()
    # the kept entries are the n largest of each group
    kept_min = torch.where(groups, score.view(17, -1, m), torch.inf).amin(-1)
    pruned_max = torch.where(~groups, score.view(17, -1, m), -torch.inf).amax(-1)
    assert (kept_min > pruned_max).all()


def test_nm_hand_case_and_error():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.3, 4.0, 3.0, 2.0, 1.0]])
    assert nm_mask(score, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]
    with pytest.raises(ValueError, match=r"\(3, 10\)"):
        nm_mask(torch.rand(3, 10), 2, 4)


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.9])
def test_unstructured_exact_per_row(ratio):
    torch.manual_seed(1)
    score = torch.rand(9, 70)
    mask = unstructured_mask(score, ratio)
    assert (mask.sum(1) == 70 - round(ratio * 70)).all()
    kept_min = torch.where(mask, score, torch.inf).amin(1)
    pruned_max = torch.where(~mask, score, -torch.inf).amax(1)
    assert (kept_min > pruned_max).all()


def test_scores_and_make_mask():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    stat = torch.tensor([16.0, 4.0, 1.0, 0.0])
    assert wanda_score(w, stat).tolist() == [[4.0, 4.0, 3.0, 0.0]]
    assert magnitude_score(w).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    sp = SparsitySpec("nm", 2, 4)
    assert make_mask(w, stat, sp, PrunerSpec("wanda")).tolist() == [[True, True, False, False]]
    assert make_mask(w, None, sp, PrunerSpec("magnitude")).tolist() == [[False, False, True, True]]
    assert make_mask(w, stat, SparsitySpec("dense"), PrunerSpec()) is None
    with pytest.raises(ValueError):
        make_mask(w, stat, sp, PrunerSpec("sparsegpt"))


def _problem(seed=0, d_out=48, d_in=160, n=512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) * 0.2 + torch.eye(d_in)  # correlated inputs
    x = (torch.randn(n, d_in, generator=g) @ mix) * (torch.rand(d_in, generator=g) * 3)
    w = torch.randn(d_out, d_in, generator=g)
    return w, x, x.T @ x


def _h_err(w, w_hat, h):
    d = w - w_hat
    return torch.trace(d @ h @ d.T).item()


@pytest.mark.parametrize("sp", [SparsitySpec("nm", 2, 4), SparsitySpec("unstructured", ratio=0.5)])
def test_sparsegpt_beats_wanda_and_magnitude(sp):
    w, x, h = _problem()
    w_new, mask, qt = sparsegpt(w, h, x.shape[0], sp, blocksize=64)
    assert qt is None and torch.equal(w_new[~mask], torch.zeros(int((~mask).sum())))
    assert abs(1 - mask.float().mean().item() - 0.5) < 1e-6
    if sp.pattern == "nm":
        assert (mask.view(48, -1, 4).sum(-1) == 2).all()
    stat = (x**2).mean(0)
    e_sgpt = _h_err(w, w_new, h)
    for pr in ("wanda", "magnitude"):
        m = make_mask(w, stat, sp, PrunerSpec(pr))
        assert e_sgpt < 0.9 * _h_err(w, w * m, h)


@pytest.mark.parametrize("group_size", [-1, 48, 128])
def test_sparsegpt_joint_optq_on_grid(group_size):
    # group 48 straddles the 64-column blocks; 160 % 128 leaves a short last group
    w, x, h = _problem(1)
    quant = QuantSpec("absmax", bits=4, group_size=group_size)
    w_new, mask, qt = sparsegpt(
        w, h, x.shape[0], SparsitySpec("nm", 2, 4), blocksize=64, quant=quant
    )
    assert qt.q.dtype == torch.int8 and qt.q.min() >= -8 and qt.q.max() <= 7
    assert torch.equal(qt.dequantize() * mask, w_new) and torch.equal(qt.dequantize(), w_new)
    assert torch.equal(qt.q[~mask], torch.zeros_like(qt.q[~mask]))
    g = 160 if group_size == -1 else group_size
    assert qt.group_size == g and qt.scale.shape == (48, -(-160 // g))
    # OPTQ compensation beats rounding the SparseGPT result after the fact (same mask)
    w_sp, _, _ = sparsegpt(w, h, x.shape[0], SparsitySpec("nm", 2, 4), blocksize=64)
    post = absmax_quant(w_sp, 4, group_size).dequantize()
    assert _h_err(w, w_new, h) < _h_err(w, post, h)


def test_sparsegpt_fixed_mask_dead_inputs_and_failure():
    w, x, h = _problem(2)
    h[:, 7] = 0.0
    h[7, :] = 0.0  # input 7 never fires
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.3
    info = {}
    w_new, m2, _ = sparsegpt(w, h, x.shape[0], SparsitySpec("nm"), mask=mask, info=info)
    assert torch.equal(m2, mask) and torch.equal(w_new[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(w_new[:, 7], torch.zeros(48)) and info["damp"] == pytest.approx(0.01)
    # dense + quant: no mask returned
    _, m3, qt = sparsegpt(w, h, x.shape[0], SparsitySpec("dense"), quant=QuantSpec("absmax"))
    assert m3 is None and qt is not None
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="Cholesky"):
        sparsegpt(w, bad, x.shape[0], SparsitySpec("nm"))
