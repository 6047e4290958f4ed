"""The block reconstruction's memory savings compute what they replace: grid weights in blocks
of output rows, each parameter's optimiser step taken inside the backward, the codes and the
parked dense weights dropped (issue 35)."""

from __future__ import annotations

import pytest
import torch

from slim_lightning.compress import recon_linear as RL
from slim_lightning.compress import reconstruct as R

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("mask_kind", "per_tensor", "in_scale"),
    [("nm", False, True), ("random", False, False), ("none", True, True), ("none", False, False)],
)
def test_row_blocks_compute_the_whole_weights_product_and_gradients(
    monkeypatch, mask_kind, per_tensor, in_scale
):
    """Above ``ROW_STEP`` values the grid linear works in blocks of output rows (a last partial
    block, rows with different kept counts, one scale for every row): output, the gradients of
    x, the grid values and the scales, and the refinement's accumulators equal the whole
    weight's (up to summation order)."""
    g = torch.Generator().manual_seed(3)
    rows, cols, group = 37, 48, 16
    q = torch.randint(-8, 8, (rows, cols), generator=g).float()
    if mask_kind == "nm":
        mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
        idx = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
        mask = mask.scatter_(-1, idx, True).reshape(rows, cols)
    elif mask_kind == "random":
        mask = torch.rand(rows, cols, generator=g) > 0.4
    else:
        mask = None
    v0 = (q.masked_select(mask) if mask is not None else q) + 0.3 * torch.randn(
        int(mask.sum()) if mask is not None else (rows, cols), generator=g
    )
    s0 = torch.rand(*((1, 1) if per_tensor else (rows, cols // group)), generator=g) + 0.1
    ins = torch.rand(cols, generator=g) + 0.5 if in_scale else None
    x0 = torch.randn(2, 5, cols, generator=g)
    gy = torch.randn(2, 5, rows, generator=g)
    outs = []
    for step in (1 << 30, 5 * cols + 7):  # whole; blocks of 5 rows, the last of 2
        monkeypatch.setattr(RL, "ROW_STEP", step)
        assert len(RL._row_blocks(v0, s0, mask)) == (1 if step > rows * cols else 8)
        v, u = v0.clone().requires_grad_(True), torch.zeros_like(s0).requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        acc = (torch.zeros(rows, cols), torch.zeros(cols))
        y = RL._GridLinear.apply(x * 1.0, v, s0 * torch.exp(u), ins, mask, -8, 7, group, acc)
        y.backward(gy)
        outs.append((y.detach(), x.grad, v.grad, u.grad, *acc))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "adam8bit"])
def test_steps_inside_the_backward_equal_a_step_after_it(kind):
    """Each parameter stepped by its hook as soon as its gradient is complete (and the gradient
    dropped) ends bit for bit where ``opt.step()`` after the whole backward puts it: grid values
    through the grid linear, log-scales, a norm-like gain read again by the backward."""
    g = torch.Generator().manual_seed(0)
    rows, cols = 24, 64
    mask = torch.rand(rows, cols, generator=g) > 0.5
    v0 = torch.randn(int(mask.sum()), generator=g) * 4
    s0 = torch.rand(rows, 2, generator=g) + 0.1
    gain0 = torch.rand(cols, generator=g) + 0.5
    xs = [torch.randn(8, cols, generator=g) for _ in range(3)]
    ends = []
    for in_backward in (False, True):
        ps = [
            torch.nn.Parameter(v0.clone()),
            torch.nn.Parameter(torch.zeros_like(s0)),
            torch.nn.Parameter(gain0.clone()),
        ]
        big = torch.nn.Parameter(torch.randn(4096 + 64, generator=torch.Generator()))
        groups = [{"params": ps[:2], "lr": 0.05}, {"params": [ps[2], big], "lr": 0.01}]
        opt = R._adam(groups, kind)
        hooks = R._step_in_backward(opt, groups) if in_backward else []
        for x in xs:
            opt.zero_grad(set_to_none=True)
            h = x * ps[2]
            y = RL._GridLinear.apply(h, ps[0], s0 * torch.exp(ps[1]), None, mask, -8, 7, 32)
            loss = (y**2).mean() + (big[:64] * h.sum(0)).sum() * 1e-3 + (ps[2] ** 2).sum()
            loss.backward()
            if not in_backward:
                opt.step()
            assert all(p.grad is None for p in ps) == in_backward
        for hk in hooks:
            hk.remove()
        ends.append([p.detach().clone() for p in (*ps, big)])
    for a, b in zip(*ends):
        assert torch.equal(a, b)


def test_the_view_drops_the_codes_its_values_hold():
    """A reconstruction view keeps the codes as its trainable values only: the result's int8
    matrix becomes a meta tensor of the same shape, and the snapped result has the codes back."""
    from slim_lightning.compress.plan import ReconConfig
    from slim_lightning.core.types import CompressedLinear, QuantTensor

    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (16, 32), generator=g, dtype=torch.int8)
    mask = torch.rand(16, 32, generator=g) > 0.5
    q = q * mask
    qt = QuantTensor(q.clone(), torch.rand(16, 2, generator=g) + 0.1, 16, 4)
    c = CompressedLinear(weight=torch.empty(0), weight_q=qt, mask=mask)
    view = RL.ReconLinear(c, None, ReconConfig(mode="block"))
    assert torch.equal(c.weight_q.q, q)  # (building a view changes nothing)
    view.release_codes()
    assert c.weight_q.q.is_meta and c.weight_q.q.shape == q.shape
    assert torch.equal(view.snap().weight_q.q, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blocked_error_measures_and_adapter_search_equal_the_whole(monkeypatch, dtype):
    """Large weights measure their errors and score the adapter quantisation in blocks of rows,
    and (16-bit weights) rebuild their fp32 copy between rounds: the same compressed layer
    (codes, adapters, chosen power) and the same error metrics."""
    from conftest import compose_config

    from slim_lightning.compress.plan import build_plan
    from slim_lightning.core import compress as C
    from slim_lightning.core import metrics as M
    from slim_lightning.core.types import LayerStats

    spec = build_plan(compose_config("compress", ["debug=default", "method=slim_q"])).spec
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 64, generator=g) * 0.02
    x = torch.randn(256, 64, generator=g) * (torch.rand(64, generator=g) * 3)
    outs = []
    for step in (1 << 30, 64 * 7):  # whole; blocks of 7 rows
        monkeypatch.setattr(C, "ROW_STEP", step)
        monkeypatch.setattr(M, "ROW_STEP", step)
        stats = LayerStats(
            sq_sum=(x**2).sum(0), abs_sum=x.abs().sum(0), n_tokens=256, hessian=x.T @ x
        )
        outs.append(C.compress_linear(w.to(dtype), stats, spec))
    a, b = outs
    assert torch.equal(a.weight_q.q, b.weight_q.q) and torch.equal(a.lora_l_q.q, b.lora_l_q.q)
    assert torch.equal(a.weight, b.weight)  # (the sparse part rebuilt from its codes)
    assert a.metrics["adapter_in_scale_power"] == b.metrics["adapter_in_scale_power"]
    for key in ("err_before_adapters", "err_after_adapters", "err_final"):
        assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-5)


@pytest.mark.parametrize("quant", [False, True])
def test_sparsegpt_lazy_update_in_column_blocks_equals_the_whole(monkeypatch, quant):
    """SparseGPT's lazy update of the later columns in blocks of columns (large weights) gives
    the mask, codes and weights of the one-product update (up to summation order)."""
    from slim_lightning.core import sparsegpt as S
    from slim_lightning.core.types import QuantSpec, SparsitySpec

    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 96, generator=g)
    x = torch.randn(300, 96, generator=g)
    q = QuantSpec(method="absmax", bits=4, group_size=32) if quant else None
    outs = []
    for step in (1 << 30, 24 * 20):  # whole; blocks of 20 columns (the blocksize is 32)
        monkeypatch.setattr(S, "LAZY_STEP", step)
        outs.append(
            S.sparsegpt(w, x.T @ x, 300, SparsitySpec("nm", n=2, m=4), blocksize=32, quant=q)
        )
    (w1, m1, q1), (w2, m2, q2) = outs
    assert torch.equal(m1, m2)
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-5)
    if quant:
        assert (q1.q != q2.q).float().mean() < 1e-3  # (a rounding tie may fall either way)


def test_the_low_rank_fit_may_consume_its_residual():
    """``slim_lora(consume=True)`` scales the residual in place and fits the same adapters."""
    from slim_lightning.core.lowrank import slim_lora
    from slim_lightning.core.types import LowRankSpec

    g = torch.Generator().manual_seed(4)
    err, s = torch.randn(30, 50, generator=g), torch.rand(50, generator=g) + 0.1
    spec = LowRankSpec()
    a = slim_lora(err, s, 5, spec)
    work = err.clone()
    b = slim_lora(work, s, 5, spec, consume=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(work, err)  # (overwritten: the caller gave it up)


@pytest.mark.parametrize("extra", [5000, 1000])  # a last part of its own; one joining the last
def test_8bit_adam_in_parts_steps_like_the_whole_parameter(monkeypatch, extra):
    """A large parameter stepped by bitsandbytes' 8-bit Adam as parts viewing its data (inside
    the backward, from its gradient) ends bit for bit where the whole-tensor step puts it."""
    monkeypatch.setattr(R, "PART", 8192)
    g = torch.Generator().manual_seed(9)
    n = 2 * 8192 + extra
    w0, grads = torch.randn(n, generator=g), [torch.randn(n, generator=g) for _ in range(3)]
    ends = []
    for split in (False, True):
        p = torch.nn.Parameter(w0.clone())
        groups = [{"params": [p], "lr": 0.01}]
        opt = R._adam(groups, "adam8bit", split=split)
        assert len(getattr(opt, "slim_parts", {}).get(p, ())) == (
            0 if not split else (3 if extra >= 4096 else 2)
        )
        hooks = R._step_in_backward(opt, groups)
        for gr in grads:
            (p * gr).sum().backward()
        for h in hooks:
            h.remove()
        ends.append(p.detach().clone())
    assert torch.equal(*ends)
