"""SparseGPT with joint OPTQ: exact N:M masks, values on the grid, Hessian-weighted error below
magnitude / Wanda, agreement with a naive per-column OBS loop, and zero-statistic handling."""

import warnings

import pytest
import torch

from slim_lightning.core.prune import make_mask
from slim_lightning.core.quant import absmax_quant, qmax_of
from slim_lightning.core.sparsegpt import hinv_cholesky, sparsegpt
from slim_lightning.core.types import PrunerSpec, QuantSpec, SparsitySpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(seed=0, d_out=48, d_in=160, n=512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) * 0.2 + torch.eye(d_in)  # correlated inputs
    x = (torch.randn(n, d_in, generator=g) @ mix) * (torch.rand(d_in, generator=g) * 3)
    w = torch.randn(d_out, d_in, generator=g)
    return w, x, x.T @ x


def _h_err(w, w_hat, h):
    d = w - w_hat
    return torch.trace(d @ h @ d.T).item()


def _naive_obs(w, h, n_tokens, n, m, damp=0.01, scale=None):
    """Literal per-column SparseGPT (no lazy blocks): mask chosen every m columns from the
    current weights, optional rounding to a per-row ``scale``, OBS update of all later columns."""
    W = w.clone()
    U = hinv_cholesky(h * (2.0 / n_tokens), damp)
    mask = torch.ones_like(W, dtype=torch.bool)
    d = torch.diag(U)
    for i in range(W.shape[1]):
        if i % m == 0:
            tmp = W[:, i : i + m] ** 2 / d[None, i : i + m] ** 2
            drop = torch.topk(tmp, m - n, dim=1, largest=False).indices
            mask[:, i : i + m].scatter_(1, drop, False)
        q = W[:, i] * mask[:, i]
        if scale is not None:
            q = torch.round(q / scale).clamp(-8, 7) * scale
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        W[:, i] = q
    return W, mask


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


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm_exact_and_matches_naive_loop(n, m):
    # lazy block updates are exact: any blocksize (multiple of m) reproduces the naive loop
    w, x, h = _problem(3, d_out=24, d_in=96, n=256)
    ref, ref_mask = _naive_obs(w, h, x.shape[0], n, m)
    for bs in (16, 32, 96):
        got, mask, _ = sparsegpt(w, h, x.shape[0], SparsitySpec("nm", n, m), blocksize=bs)
        assert (mask.view(24, -1, m).sum(-1) == n).all()
        assert torch.equal(mask, ref_mask)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_sparsegpt_joint_quant_matches_naive_loop_per_channel():
    w, x, h = _problem(4, d_out=24, d_in=96, n=256)
    scale = (w.abs().amax(1, keepdim=True) / 7).half().float()  # per-channel, from the start
    ref, ref_mask = _naive_obs(w, h, x.shape[0], 2, 4, scale=scale[:, 0])
    got, mask, qt = sparsegpt(
        w, h, x.shape[0], SparsitySpec("nm"), blocksize=32, quant=QuantSpec("absmax", 4, -1)
    )
    torch.testing.assert_close(qt.scale, scale)
    assert torch.equal(mask, ref_mask)
    # rounding may flip a handful of borderline values between the two float orders
    assert (got != ref).float().mean() < 0.01


@pytest.mark.parametrize("group_size", [-1, 48, 128])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_sparsegpt_joint_optq_on_grid(group_size, bits):
    # group 48 straddles the 64-column blocks; 160 % 128 leaves a short last group
    w, x, h = _problem(1)
    quant = QuantSpec("absmax", bits=bits, group_size=group_size)
    w_new, mask, qt = sparsegpt(
        w, h, x.shape[0], SparsitySpec("nm", 2, 4), blocksize=64, quant=quant
    )
    qmax = qmax_of(bits)
    assert qt.q.dtype == torch.int8 and qt.q.min() >= -qmax - 1 and qt.q.max() <= qmax
    assert torch.equal(qt.dequantize() * mask, w_new) and torch.equal(qt.dequantize(), w_new)
    assert torch.equal(qt.q[~mask], torch.zeros_like(qt.q[~mask]))
    assert (mask.view(48, -1, 4).sum(-1) == 2).all()
    g = 160 if group_size == -1 else group_size
    assert qt.group_size == g and qt.scale.shape == (48, -(-160 // g))
    if bits > 4:  # at 8 bits the rounding error is noise next to the pruning error
        return
    # OPTQ compensation beats rounding the SparseGPT result after the fact
    w_sp, _, _ = sparsegpt(w, h, x.shape[0], SparsitySpec("nm", 2, 4), blocksize=64)
    post = absmax_quant(w_sp, bits, group_size).dequantize()
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
    assert info["dead_inputs"] == 1.0  # reported, not silent
    # dense + quant: no mask returned
    _, m3, qt = sparsegpt(w, h, x.shape[0], SparsitySpec("dense"), quant=QuantSpec("absmax"))
    assert m3 is None and qt is not None
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="Cholesky"):
        sparsegpt(w, bad, x.shape[0], SparsitySpec("nm"))
    with pytest.raises(ValueError, match="all zero"):
        sparsegpt(w, torch.zeros_like(h), x.shape[0], SparsitySpec("nm"))


def test_inverse_factor_in_place_and_cached(monkeypatch):
    """The in-place factorisation (``rebuild``) equals the copying one; a second call with the same
    cache (the re-fit, or a linear sharing the Hessian) reuses the factor, with identical output."""
    import slim_lightning.core.sparsegpt as sg

    w, _, h = _problem(seed=3)
    h2 = h * (2.0 / 512)
    ref = hinv_cholesky(h2, 0.01)
    assert torch.equal(hinv_cholesky(h2.clone(), 0.01, rebuild=lambda: h2.clone()), ref)
    calls = []
    real = sg.hinv_cholesky
    monkeypatch.setattr(sg, "hinv_cholesky", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    sp, qs, cache = SparsitySpec("nm", 2, 4), QuantSpec("absmax", 4, 32), {}
    first = sparsegpt(w, h, 512, sp, quant=qs, cache=cache)
    again = sparsegpt(w, h, 512, sp, quant=qs, cache=cache, info=(info := {}))
    other = sparsegpt(w, h, 512, sp, quant=qs, damp=0.1, cache=cache)
    assert len(calls) == 2 and sum(isinstance(k, tuple) for k in cache) == 2  # one per damping
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert info["damp"] == 0.01 and not torch.equal(first[0], other[0])
    assert torch.equal(first[0], sparsegpt(w, h, 512, sp, quant=qs)[0])  # as without a cache


@pytest.mark.parametrize("indefinite", [False, True], ids=["first_try", "damping_raised"])
def test_consumed_hessian_gives_the_same_result(indefinite):
    """``consume_hessian``: the factor is computed in the Hessian's own storage (no second matrix)
    with the same result, also when the damping has to be raised (the sum is read back from its
    copy on disk); a later call with other options is refused instead of reading the factor as
    a Hessian."""
    w, _, h = _problem(seed=4)
    if indefinite:  # one eigenvalue -0.05 x mean(diag): damping 0.01 fails, 0.1 succeeds
        q, _ = torch.linalg.qr(torch.randn(160, 160, generator=torch.Generator().manual_seed(0)))
        lam = torch.ones(160)
        lam[-1] = -0.05
        h = (q * lam[None, :]) @ q.T * (512 / 2.0)
    sp, qs = SparsitySpec("nm", 2, 4), QuantSpec("absmax", 4, 32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ref = sparsegpt(w, h.clone(), 512, sp, quant=qs, info=(ref_info := {}))
        h2 = h.clone()
        cache = {"consume_hessian": True}
        got = sparsegpt(w, h2, 512, sp, quant=qs, cache=cache, info=(info := {}))
    assert ref_info["damp_retries"] == info["damp_retries"] == float(indefinite)
    assert sum("needed damping" in str(x.message) for x in seen) == 2 * indefinite
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    factor = next(v[0] for k, v in cache.items() if isinstance(k, tuple))
    if not indefinite:  # the factor lives in the Hessian's storage
        assert factor.data_ptr() == h2.data_ptr()
    assert torch.equal(sparsegpt(w, h2, 512, sp, quant=qs, cache=cache)[0], ref[0])
    with pytest.raises(RuntimeError, match="factorised in place"):
        sparsegpt(w, h2, 512, sp, quant=qs, damp=0.1, cache=cache)
