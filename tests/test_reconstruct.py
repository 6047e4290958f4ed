"""Block-wise reconstruction (``reconstruct=block``): the mask and the format never change, the
values end on their grids, the block error falls, and resume / streaming / options hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from slim_lightning.app.compress_run import run_compress
from slim_lightning.compress.pipeline import compress_model
from slim_lightning.compress.plan import build_plan
from slim_lightning.compress.reconstruct import ReconLinear, norm_params
from slim_lightning.errors import ConfigError
from slim_lightning.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["debug=default", "eval_dense=false", "+model.tiny.num_hidden_layers=3"]


def plan_of(*overrides: str):
    return build_plan(compose_config("compress", [*BASE, *overrides]))


FAST = ("reconstruct.epochs=6", "reconstruct.lr_weight=0.1", "reconstruct.lr_adapter=0.1")


def _compress(recon: str, *overrides: str, **kw):
    plan = plan_of(f"reconstruct={recon}", *(FAST if recon == "block" else ()), *overrides)
    model, _ = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 259, (32, 32), generator=torch.Generator().manual_seed(1))
    res = compress_model(model, plan, ids, None, packed=False, keep_layers=True, **kw)
    return model, res


@pytest.fixture(scope="module")
def both():
    return _compress("none"), _compress("block")


def test_block_zero_keeps_its_mask_and_ends_on_the_grid(both):
    (_, one), (_, rec) = both
    block0 = [n for n in one.layers if ".layers.0." in n]
    assert block0
    moved = 0
    for name in block0:
        a, b = one.layers[name], rec.layers[name]
        assert torch.equal(a.mask, b.mask), name  # positions never change
        for qa, qb in (
            (a.weight_q, b.weight_q),
            (a.lora_l_q, b.lora_l_q),
            (a.lora_r_q, b.lora_r_q),
        ):
            if qa is None:
                assert qb is None
                continue
            lo, hi = -(2 ** (qb.bits - 1)), 2 ** (qb.bits - 1) - 1
            assert qb.q.dtype == torch.int8 and qb.q.shape == qa.q.shape
            assert int(qb.q.min()) >= lo and int(qb.q.max()) <= hi
            assert qb.scale.shape == qa.scale.shape and qb.group_size == qa.group_size
            moved += int((qb.q != qa.q).sum())
        assert int(b.weight_q.q[~b.mask].abs().sum()) == 0  # pruned codes stay 0
        assert torch.equal(b.weight, b.weight_q.dequantize() * b.mask)  # the dense view is exact
        assert torch.equal(b.lora_l, b.lora_l_q.dequantize().T)
    assert moved > 0  # reconstruction did change codes


def test_block_error_falls_and_is_reported(both):
    _, (_, rec) = both
    blocks = {}
    for r in rec.reports:
        blocks[r["block"]] = (r["recon_err_before"], r["recon_err_after"])
    assert len(blocks) == 3
    assert all(after <= before for before, after in blocks.values())
    assert any(after < 0.99 * before for before, after in blocks.values())


def test_view_at_init_computes_the_one_shot_layer(both):
    (_, one), _ = both
    cfg = plan_of("reconstruct=block").reconstruct
    name = next(n for n in one.layers if n.endswith("mlp.down_proj"))
    c = one.layers[name]
    view = ReconLinear(c, None, cfg).eval()
    x = torch.randn(5, c.weight.shape[1])
    want = x @ c.effective_weight().T
    torch.testing.assert_close(view(x), want, rtol=1e-5, atol=1e-5)
    snapped = view.snap()  # untrained: the same codes and scales back
    assert torch.equal(snapped.weight_q.q, c.weight_q.q)
    assert torch.equal(snapped.weight_q.scale, c.weight_q.scale)


def test_frozen_groups_stay_put():
    plan = plan_of(
        "reconstruct=block",
        *FAST,
        "reconstruct.train_weights=false",
        "reconstruct.train_adapters=false",
        "reconstruct.train_norms=false",
    )
    (_, one), _ = _compress("none"), None
    model, _ = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 259, (32, 32), generator=torch.Generator().manual_seed(1))
    norms0 = {k: p.detach().clone() for k, p in norm_params(model.model.layers[0]).items()}
    res = compress_model(model, plan, ids, None, packed=False, keep_layers=True)
    for name in (n for n in res.layers if ".layers.0." in n):
        a, b = one.layers[name], res.layers[name]
        assert torch.equal(a.weight_q.q, b.weight_q.q), name  # codes frozen, scales may move
        assert torch.equal(a.lora_l_q.q, b.lora_l_q.q), name
    for k, p in norm_params(model.model.layers[0]).items():
        assert torch.equal(p, norms0[k]), k


def test_norm_gains_train_and_round_to_the_export_dtype(both):
    (m_one, _), (m_rec, _) = both
    a, b = norm_params(m_one.model.layers[0]), norm_params(m_rec.model.layers[0])
    assert a.keys() == b.keys() and a
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "override, key",
    [
        ("reconstruct.epochs=-1", "reconstruct.epochs"),
        ("reconstruct.loss=l1", "reconstruct.loss"),
        ("reconstruct.mode=layer", "reconstruct.mode"),
        ("reconstruct.holdout=0.9", "reconstruct.holdout"),
        ("reconstruct.lr_weight=-1", "reconstruct.lr_weight"),
        ("reconstruct.train_norms=1", "reconstruct.train_norms"),
        ("+reconstruct.steps=3", "reconstruct.steps"),
    ],
)
def test_bad_options_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        plan_of("reconstruct=block", override)
    assert e.value.key == key


def test_kill_during_reconstruction_resumes_byte_identical(tmp_path):
    import hashlib

    from test_reliability import forked

    cfg = compose_config("compress", [*BASE, "reconstruct=block"])
    ref = tmp_path / "ref" / "run"
    assert forked(lambda: run_compress(cfg, ref)) == 0
    run = tmp_path / "killed" / "run"
    # killed in block 2's reconstruction, after block 1 was committed
    code = forked(lambda: run_compress(cfg, run), {"SLIM_FAULT": "kill:reconstruct block 2"})
    assert code == -9
    progress = json.loads((run / "calib_state" / "progress.json").read_text())
    assert progress["next_block"] == 2
    assert forked(lambda: run_compress(cfg, run)) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["resumed_blocks"] == 2

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert sha(run / "packed" / "model.safetensors") == sha(ref / "packed" / "model.safetensors")


def test_streaming_reconstruction_equals_in_memory(tmp_path):
    from test_streaming import _overrides, _save_tiny, make_cfg

    from slim_lightning.checkpoint.load import read_weights

    ckpt = _save_tiny(tmp_path / "ckpt")
    out = {}
    for streaming in (False, True):
        run = tmp_path / f"run_{streaming}"
        cfg = make_cfg(_overrides(ckpt, streaming, ("reconstruct=block",)))
        out[streaming] = (run, run_compress(cfg, run))
    (d0, r0), (d1, r1) = out[False], out[True]
    assert r1["ppl"] == r0["ppl"]
    a = read_weights(d0 / "packed")
    b = read_weights(d1 / "packed")  # (streaming: sharded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(r.get("recon_err_after", 1) < r.get("recon_err_before", 0) for r in r1["layers"])


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("opt", ("model=tiny_opt",)),  # LayerNorm gains and biases, OPT kwargs
        (
            "llama",
            ("method=slim", "quant=none", "lowrank.quant_bits=null"),
        ),  # fp weights, fp adapters
    ],
)
def test_other_architectures_and_unquantised_specs(kind, overrides):
    plan = plan_of("reconstruct=block", *FAST, *overrides)
    model, _ = tiny_model(kind, num_hidden_layers=2)
    ids = torch.randint(0, 259, (32, 32), generator=torch.Generator().manual_seed(1))
    res = compress_model(model, plan, ids, None, packed=False, keep_layers=True)
    assert res.reports and all(r["recon_err_after"] <= r["recon_err_before"] for r in res.reports)
    for c in res.layers.values():
        if c.mask is not None:
            assert int((c.weight[~c.mask] != 0).sum()) == 0  # pruned entries stay pruned


@pytest.mark.parametrize(
    ("cols", "group", "per_tensor", "in_scale", "masked"),
    [(40, 16, False, True, True), (32, 8, False, False, True), (12, 12, True, True, False)],
)
def test_grid_value_equals_the_composed_straight_through_graph(
    cols, group, per_tensor, in_scale, masked
):
    """The fused grid value (forward and both gradients) equals the plain autograd composition
    round/clamp (straight through) * expanded scales / in_scale * mask, partial groups included;
    under a mask it holds the kept values only (and their gradient is the composed one's kept
    entries)."""
    from slim_lightning.compress.recon_linear import _GridValue

    g = torch.Generator().manual_seed(cols)
    rows = 6
    v0 = torch.randn(rows, cols, generator=g) * 5
    shape = (1, 1) if per_tensor else (rows, -(-cols // group))
    s0 = torch.rand(*shape, generator=g) + 0.1
    ins = torch.rand(cols, generator=g) + 0.5 if in_scale else None
    mask = torch.rand(rows, cols, generator=g) > 0.5 if masked else None
    gw = torch.randn(rows, cols, generator=g)

    def composed(v, s):
        q = v + (torch.clamp(torch.round(v), -8, 7) - v).detach()
        w = q * s.repeat_interleave(group, dim=1)[:, :cols] if not per_tensor else q * s
        w = w / ins[None, :] if ins is not None else w
        return w * mask if mask is not None else w

    outs = []
    kept = v0 if mask is None else v0.masked_select(mask)
    for f, v_init in (
        (composed, v0),
        (lambda v, s: _GridValue.apply(v, s, ins, mask, -8, 7, group), kept),
    ):
        v, s = v_init.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        w = f(v, s)
        w.backward(gw)
        grad_v = v.grad if mask is None or v.ndim == 1 else v.grad.masked_select(mask)
        outs.append((w.detach(), grad_v, s.grad))
    if mask is not None:
        assert outs[1][1].shape == (int(mask.sum()),)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("masked", "in_scale"), [(True, True), (True, False), (False, True)])
def test_grid_linear_equals_the_grid_value_product_and_saves_no_dense_weight(masked, in_scale):
    """``_GridLinear`` (the weight recomputed in the backward) gives bit for bit the output and
    the gradients of x, the grid values and the scales of ``x @ _GridValue(...).T``, partial
    groups included, and keeps no (out, in) fp32 matrix for its backward."""
    from slim_lightning.compress.recon_linear import _GridLinear, _GridValue

    g = torch.Generator().manual_seed(7)
    rows, cols, group = 48, 100, 32
    q = torch.randint(-8, 8, (rows, cols), generator=g).float()
    mask = torch.rand(rows, cols, generator=g) > 0.5 if masked else None
    v0 = q.masked_select(mask) if masked else q
    v0 = v0 + 0.3 * torch.randn(v0.shape, generator=g)
    s0 = torch.rand(rows, -(-cols // group), generator=g) + 0.1
    ins = torch.rand(cols, generator=g) + 0.5 if in_scale else None
    x0 = torch.randn(3, 9, cols, generator=g)
    gy = torch.randn(3, 9, rows, generator=g)
    outs, saved = [], []
    for fused in (False, True):
        v, u = v0.clone().requires_grad_(True), torch.zeros_like(s0).requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        s = s0 * torch.exp(u)
        kept: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, k=kept: k.append(t) or t, lambda t: t
        ):
            if fused:
                y = _GridLinear.apply(x * 1.0, v, s, ins, mask, -8, 7, group)
            else:
                y = (x * 1.0) @ _GridValue.apply(v, s, ins, mask, -8, 7, group).T
        y.backward(gy)
        outs.append((y.detach(), x.grad, v.grad, u.grad))
        # fp32 (out, in) matrices other than the grid values themselves (unmasked: v is one)
        saved.append(
            [
                t
                for t in kept
                if t.shape in ((rows, cols), (cols, rows))
                and t.is_floating_point()
                and t.data_ptr() != v.data_ptr()
            ]
        )
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert saved[0]  # the composed graph keeps the dense weight for the product's backward
    assert not saved[1]


def test_adam8bit_memory_plan_trains_with_8bit_moments(monkeypatch, tmp_path):
    """``reconstruct.optimizer=adam8bit`` reconstructs through bitsandbytes' 8-bit Adam (uint8
    moments for the large tensors) and still lowers the held-out block error of a run."""
    import bitsandbytes as bnb

    from slim_lightning.compress import reconstruct as R
    from slim_lightning.compress.plan import ReconConfig

    made = []
    real = bnb.optim.Adam8bit

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(bnb.optim, "Adam8bit", spy)
    opt = R._adam([{"params": [torch.nn.Parameter(torch.randn(64, 128))], "lr": 1e-3}], "adam8bit")
    assert made and opt is made[0]
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8
    from slim_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="reconstruct.optimizer"):
        ReconConfig(mode="block", optimizer="sgd")
    made.clear()
    cfg = compose_config(
        "compress", ["debug=default", "eval_dense=false", "reconstruct.optimizer=adam8bit"]
    )
    report = run_compress(cfg, tmp_path)
    assert len(made) == 2  # one optimiser per block
    errs = [(r["recon_err_before"], r["recon_err_after"]) for r in report["layers"]]
    assert any(after < before for before, after in errs), errs
