"""``lowrank.permute``: free input-channel permutations before N:M pruning keep the block's
function, move the consumer's statistics with the channels, gain retained importance, and are
undone when a pairing is not function-preserving."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from slim_lightning.compress import permute as perm
from slim_lightning.compress.plan import build_plan
from slim_lightning.compress.steps import StatsHook
from slim_lightning.errors import ConfigError
from slim_lightning.models.arch import (
    block_kwargs,
    block_linears,
    block_output,
    capture_block_inputs,
    get_arch,
    get_blocks,
)
from slim_lightning.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _block_and_stats(kind: str):
    model, _ = tiny_model(kind, seed=3)
    # non-uniform channel scales so that the order matters
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(torch.rand(p.shape[1], generator=torch.Generator().manual_seed(5)) * 3)
        for name, p in model.named_parameters():  # the first 4 value channels of every head
            if name.endswith("o_proj.weight"):  # dominate: one 2:4 group holds all four
                p.view(p.shape[0], -1, 16)[:, :, :4].mul_(10.0)
    arch = get_arch(model)
    blocks = get_blocks(model, arch)
    ids = torch.randint(0, 259, (4, 16), generator=torch.Generator().manual_seed(1))
    x, kw = capture_block_inputs(model, blocks, ids, 4)
    kwargs = block_kwargs(kw, 0)
    block = blocks[0]
    lin = block_linears(block, arch)
    hooks = {n: StatsHook(m.in_features, torch.device("cpu"), True) for n, m in lin.items()}
    handles = [lin[n].register_forward_hook(h) for n, h in hooks.items()]
    with torch.no_grad():
        out = block_output(block(x[0], **kwargs[0]))
    for h in handles:
        h.remove()
    return block, lin, hooks, x[0], kwargs[0], out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "phi3", "gpt_neox", "opt"])
def test_permutation_keeps_the_function_and_moves_the_statistics(kind):
    block, lin, hooks, x, kw, out = _block_and_stats(kind)
    plans = perm.plan_permutations(lin, hooks, block, 2, 4)
    assert plans, "no free pair found"
    with torch.no_grad():
        done = perm.apply_permutations(
            plans, lin, hooks, lambda: block_output(block(x, **kw)).float()
        )
        new_out = block_output(block(x, **kw))
    assert set(done) == {p[0] for p in plans}
    torch.testing.assert_close(new_out, out, rtol=1e-5, atol=1e-5)
    # brute force: the permuted block's own consumer inputs give the permuted statistics
    fresh = {n: StatsHook(lin[n].in_features, torch.device("cpu"), True) for n in done}
    handles = [lin[n].register_forward_hook(h) for n, h in fresh.items()]
    with torch.no_grad():
        block(x, **kw)
    for h in handles:
        h.remove()
    for n in done:
        torch.testing.assert_close(hooks[n].sq, fresh[n].sq, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hooks[n].h, fresh[n].h, rtol=1e-5, atol=1e-5)
    for name, _, p in plans:  # each kept plan raised the importance the 2:4 pattern keeps
        cols = p[0] if p.ndim == 2 else p
        w = lin[name].weight.detach().float()
        rms = (hooks[name].sq / hooks[name].n).sqrt()
        inv = torch.argsort(cols)
        assert perm.retained(w, rms, 2, 4) > perm.retained(w[:, inv], rms[inv], 2, 4)
    if kind in ("llama", "qwen2"):  # the attention pair too (GQA in qwen2's tiny config)
        assert any(n.endswith("o_proj") for n in done)


def test_a_pairing_that_changes_the_function_is_undone(monkeypatch):
    block, lin, hooks, x, kw, out = _block_and_stats("llama")
    monkeypatch.setitem(perm.MLP_PAIRS, "down_proj", ("up_proj",))  # gate_proj left behind
    plans = [p for p in perm.plan_permutations(lin, hooks, block, 2, 4) if "mlp" in p[0]]
    assert plans
    before = {n: m.weight.detach().clone() for n, m in lin.items()}
    sq = hooks["mlp.down_proj"].sq.clone()
    with torch.no_grad():
        done = perm.apply_permutations(
            plans, lin, hooks, lambda: block_output(block(x, **kw)).float()
        )
    assert done == []
    for n, m in lin.items():
        assert torch.equal(m.weight, before[n]), n
    assert torch.equal(hooks["mlp.down_proj"].sq, sq)


def test_compress_with_permutation_reports_and_reloads(tmp_path):
    from slim_lightning import load_compressed
    from slim_lightning.app.compress_run import run_compress
    from slim_lightning.data.evaluation import make_eval_windows, perplexity

    cfg = compose_config(
        "compress", ["debug=default", "eval_dense=false", "method=slim_q", "lowrank.permute=true"]
    )
    report = run_compress(cfg, tmp_path)
    permuted = [r["name"] for r in report["layers"] if r.get("permuted")]
    assert any(n.endswith("down_proj") for n in permuted)
    model, tok, _ = load_compressed(tmp_path / "packed")
    ppl = perplexity(model, make_eval_windows(tok, build_plan(cfg).eval), progress=False)["ppl"]
    assert ppl == pytest.approx(report["ppl"]["embedded"], rel=1e-5)


def test_permute_needs_an_nm_pattern():
    cfg = compose_config(
        "compress", ["debug=default", "lowrank.permute=true", "sparsity=unstructured50"]
    )
    with pytest.raises(ConfigError) as e:
        build_plan(cfg)
    assert e.value.key == "lowrank.permute"
    for bad in ("sometimes", "1"):
        with pytest.raises(ConfigError) as e:
            build_plan(compose_config("compress", ["debug=default", f"lowrank.permute={bad}"]))
        assert e.value.key == "lowrank.permute"
    # auto: on for 2:4, off (no error) for unstructured
    auto = ["debug=default", "lowrank.permute=auto"]
    assert build_plan(compose_config("compress", auto)).spec.lowrank.permute == "auto"
    build_plan(compose_config("compress", [*auto, "sparsity=unstructured50"]))
