"""``reconstruct.mask=refine``: the mask is re-derived during block reconstruction from a
gradient-aware score, stays a valid pattern with the same counts, packs exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from slim_lightning.app.compress_run import run_compress
from slim_lightning.compress.pipeline import compress_model
from slim_lightning.compress.plan import build_plan
from slim_lightning.compress.recon_mask import _remap_state, _top_per_group
from slim_lightning.errors import ConfigError
from slim_lightning.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["debug=default", "eval_dense=false", "+model.tiny.num_hidden_layers=3"]
REFINE = (
    "reconstruct=block",
    "reconstruct.mask=refine",
    "reconstruct.epochs=6",
    "reconstruct.lr_weight=0.1",
    "reconstruct.lr_adapter=0.1",
)


def _compress(*overrides: str):
    plan = build_plan(compose_config("compress", [*BASE, *overrides]))
    model, _ = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 259, (32, 32), generator=torch.Generator().manual_seed(1))
    return compress_model(model, plan, ids, None, packed=False, keep_layers=True)


@pytest.fixture(scope="module")
def runs():
    return _compress("reconstruct=none"), _compress(*REFINE)


def test_refined_masks_stay_valid_2of4_and_on_the_grid(runs):
    one, ref = runs
    moved = 0
    for name, b in ref.layers.items():
        a = one.layers[name]
        groups = b.mask.reshape(b.mask.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), name  # N of every M, as before
        assert int(b.weight_q.q[~b.mask].abs().sum()) == 0  # pruned codes are 0
        assert torch.equal(b.weight, b.weight_q.dequantize() * b.mask)
        lo, hi = -(2 ** (b.weight_q.bits - 1)), 2 ** (b.weight_q.bits - 1) - 1
        assert int(b.weight_q.q.min()) >= lo and int(b.weight_q.q.max()) <= hi
        moved += int((b.mask & ~a.mask).sum())
    assert moved > 0  # some positions did move
    reps = {r["block"]: r for r in ref.reports}
    assert all(r["recon_mask_refines"] == 2 for r in reps.values())
    assert any(r["recon_mask_moved"] > 0 for r in reps.values())
    assert all(r["recon_err_after"] <= r["recon_err_before"] for r in reps.values())


def test_refined_model_packs_and_reloads_to_the_runs_perplexity(tmp_path):
    from slim_lightning import load_compressed
    from slim_lightning.data.evaluation import make_eval_windows, perplexity

    cfg = compose_config("compress", [*BASE, *REFINE, "calib.nsamples=32"])
    report = run_compress(cfg, tmp_path)
    assert any(r.get("recon_mask_moved", 0) > 0 for r in report["layers"])
    model, tok, _ = load_compressed(tmp_path / "packed")
    windows = make_eval_windows(tok, build_plan(cfg).eval)
    ppl = perplexity(model, windows, progress=False)["ppl"]
    assert ppl == pytest.approx(report["ppl"]["embedded"], rel=1e-5)


@pytest.mark.parametrize("group", [4, 0])
def test_top_per_group_keeps_the_counts_and_the_best_scores(group):
    g = torch.Generator().manual_seed(0)
    score = torch.rand(6, 16, generator=g)
    mask = torch.rand(6, 16, generator=g) < 0.5
    if group:  # a 2:4 mask
        mask = torch.zeros(6, 4, 4, dtype=torch.bool)
        mask[..., :2] = True
        mask = mask.reshape(6, 16)
    new = _top_per_group(score, mask, group)
    view = (lambda t: t.reshape(6, -1, group)) if group else (lambda t: t.reshape(6, 1, 16))
    assert torch.equal(view(new).sum(-1), view(mask).sum(-1))
    s, n = view(score), view(new)
    for i in range(s.shape[0]):  # brute force: every kept score >= every dropped one
        for j in range(s.shape[1]):
            kept, dropped = s[i, j][n[i, j]], s[i, j][~n[i, j]]
            if kept.numel() and dropped.numel():
                assert float(kept.min()) >= float(dropped.max())


def test_optimiser_moments_follow_their_positions():
    old = torch.tensor([[True, False, True, False]])
    new = torch.tensor([[False, True, True, False]])
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.Adam([p])
    opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.tensor([10.0, 20.0])}
    _remap_state(opt, p, old, new)
    # position 2 (value 20) stays kept and is now the second kept value; position 1 is new: 0
    assert opt.state[p]["exp_avg"].tolist() == [0.0, 20.0]


@pytest.mark.parametrize(
    "overrides",
    [
        ("reconstruct=none", "+reconstruct.mask=refine"),
        ("reconstruct=block", "reconstruct.mask=refine", "sparsity=dense"),
        ("reconstruct=block", "reconstruct.mask=refine", "method=spqr"),
        ("reconstruct=block", "reconstruct.mask=refine", "reconstruct.optimizer=adam8bit"),
        ("reconstruct=block", "reconstruct.mask=sometimes"),
    ],
)
def test_refine_is_refused_where_it_cannot_work(overrides):
    with pytest.raises(ConfigError) as e:
        build_plan(compose_config("compress", [*BASE, *overrides]))
    assert e.value.key == "reconstruct.mask"
