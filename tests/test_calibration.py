"""The layer-wise calibration engine on a toy model: statistics, ordering and resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from slim_lightning.compress.engine import CalibrationEngine
from slim_lightning.core.types import CompressedLinear, CompressSpec, LayerStats, SparsitySpec
from slim_lightning.models.arch import capture_block_inputs

D, VOCAB, N_BLOCKS = 16, 50, 4


class ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor, *, gain: torch.Tensor) -> tuple[torch.Tensor]:
        return (x + gain * self.fc2(torch.tanh(self.fc1(x))),)


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(N_BLOCKS))
        self.register_buffer("gain", torch.tensor(0.5))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        h = self.embed(input_ids)
        for b in self.blocks:
            h = b(h, gain=self.gain)[0]
        return h


def prune24(w: torch.Tensor, stats: LayerStats, spec: CompressSpec) -> CompressedLinear:
    """A tiny deterministic compressor: Wanda-style 2:4 mask, no quantisation."""
    score = w.abs() * stats.channel_stat().sqrt()[None, :]
    idx = score.reshape(w.shape[0], -1, 4).topk(2, dim=-1).indices
    mask = torch.zeros_like(score.reshape(w.shape[0], -1, 4), dtype=torch.bool).scatter_(
        -1, idx, True
    )
    mask = mask.reshape(w.shape)
    return CompressedLinear(weight=w * mask, mask=mask, metrics={"sparsity": 0.5})


def make(seed: int = 0) -> tuple[ToyModel, torch.Tensor]:
    torch.manual_seed(seed)
    model = ToyModel().eval()
    ids = torch.randint(0, VOCAB, (6, 8), generator=torch.Generator().manual_seed(1))
    return model, ids


def run_engine(model: ToyModel, ids: torch.Tensor, state_dir: Path | None, fn=prune24, **kw):
    inputs, kwargs = capture_block_inputs(model, model.blocks[0], ids, batch_size=4)
    engine = CalibrationEngine(
        model.blocks,
        ("fc1", "fc2"),
        CompressSpec(sparsity=SparsitySpec()),
        fn,
        state_dir=state_dir,
        fingerprint="toy",
        progress=False,
        keep_layers=True,
        **kw,
    )
    return engine.run(inputs, kwargs)


def test_capture_batches_and_kwargs():
    model, ids = make()
    inputs, kwargs = capture_block_inputs(model, model.blocks[0], ids, batch_size=4)
    assert [x.shape for x in inputs] == [(4, 8, D), (2, 8, D)]  # last batch is the remainder
    assert torch.equal(torch.cat(inputs), model.embed(ids))
    assert all(torch.equal(kw["gain"], model.gain) for kw in kwargs)


def test_statistics_equal_direct_computation():
    model, ids = make()
    ref = make()[0]  # an identical, uncompressed copy to compute expectations by hand
    seen: dict[tuple[int, int], LayerStats] = {}
    calls = []

    def recording(w, stats, spec):
        calls.append(w.shape)
        seen[len(calls) - 1] = stats
        return prune24(w, stats, spec)

    run_engine(model, ids, None, fn=recording)
    assert len(calls) == 2 * N_BLOCKS
    # (a block's linears compress widest input first: fc2, then fc1; keyed here fc1 = 0, fc2 = 1)
    for b in range(N_BLOCKS):
        order = sorted((2 * b, 2 * b + 1), key=lambda k: calls[k][1] != D)
        seen[2 * b], seen[2 * b + 1] = seen[order[0]], seen[order[1]]
    # block 0's fc1 sees the embeddings; fc2 sees tanh(fc1(x)) of the *uncompressed* block
    with torch.no_grad():
        x = ref.embed(ids).reshape(-1, D)
        s0 = seen[0]
        assert s0.n_tokens == ids.numel()
        torch.testing.assert_close(s0.sq_sum, (x * x).sum(0))
        torch.testing.assert_close(s0.abs_sum, x.abs().sum(0))
        h = torch.tanh(ref.blocks[0].fc1(x))
        torch.testing.assert_close(seen[1].sq_sum, (h * h).sum(0), rtol=1e-5, atol=1e-5)
        # block 1's inputs come from the *compressed* block 0
        for name in ("fc1", "fc2"):
            lin = getattr(ref.blocks[0], name)
            lin.weight.copy_(prune24(lin.weight, seen[0 if name == "fc1" else 1], None).weight)
        x1 = ref.blocks[0](ref.embed(ids), gain=ref.gain)[0].reshape(-1, D)
        torch.testing.assert_close(seen[2].sq_sum, (x1 * x1).sum(0), rtol=1e-5, atol=1e-4)


def test_hessian_collected_only_when_needed():
    from slim_lightning.core.types import PrunerSpec

    model, ids = make()
    got = []
    inputs, kwargs = capture_block_inputs(model, model.blocks[0], ids, batch_size=4)

    def fn(w, stats, spec):
        got.append(stats.hessian)
        return prune24(w, stats, spec)

    spec = CompressSpec(pruner=PrunerSpec(method="sparsegpt"))
    CalibrationEngine(model.blocks, ("fc1",), spec, fn, progress=False).run(inputs, kwargs)
    x = model.embed(ids).reshape(-1, D).detach()
    torch.testing.assert_close(got[0], x.T @ x, rtol=1e-5, atol=1e-4)
    got.clear()
    model, ids = make()
    run_engine(model, ids, None, fn=fn)
    assert all(h is None for h in got)


def test_resume_after_crash_matches_uninterrupted(tmp_path):
    model_a, ids = make()
    full = run_engine(model_a, ids, tmp_path / "a")

    model_b, _ = make()
    n_calls = 0

    def crashing(w, stats, spec):
        nonlocal n_calls
        n_calls += 1
        if n_calls == 5:  # dies while compressing block 2
            raise RuntimeError("simulated crash")
        return prune24(w, stats, spec)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_engine(model_b, ids, tmp_path / "b", fn=crashing)
    model_b, _ = make()  # a fresh process: the model is reloaded from scratch
    resumed = run_engine(model_b, ids, tmp_path / "b")
    assert resumed.resumed_blocks == 2
    for k, v in model_a.state_dict().items():
        assert torch.equal(v, model_b.state_dict()[k]), k
    assert set(full.layers) == set(resumed.layers)


def test_state_with_other_fingerprint_is_not_reused(tmp_path):
    model, ids = make()
    run_engine(model, ids, tmp_path)
    model2, _ = make()
    inputs, kwargs = capture_block_inputs(model2, model2.blocks[0], ids, batch_size=4)
    engine = CalibrationEngine(
        model2.blocks,
        ("fc1", "fc2"),
        CompressSpec(),
        prune24,
        state_dir=tmp_path,
        fingerprint="other",
        progress=False,
    )
    assert engine.run(inputs, kwargs).resumed_blocks == 0


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_calibration import make, prune24, run_engine
    kill_at = int(sys.argv[2])
    calls = 0
    def fn(w, stats, spec):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no finally blocks
        return prune24(w, stats, spec)
    model, ids = make()
    run_engine(model, ids, sys.argv[1], fn=fn)
    torch.save(model.state_dict(), os.path.join(sys.argv[1], "final.pt"))
    """
)


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    state = tmp_path / "state"
    p = subprocess.run([sys.executable, str(script), str(state), "6"], env=env)
    assert p.returncode == -signal.SIGKILL
    assert (state / "progress.json").exists() and not (state / "final.pt").exists()
    p = subprocess.run([sys.executable, str(script), str(state), "0"], env=env)
    assert p.returncode == 0
    resumed = torch.load(state / "final.pt", weights_only=True)
    model_ref, ids = make()
    run_engine(model_ref, ids, None)
    for k, v in model_ref.state_dict().items():
        assert torch.equal(v, resumed[k]), k


def test_linears_fed_one_input_share_one_hessian():
    """q/k/v-style linears on the same input tensor keep one X^T X (the very same tensor, equal
    to the sum computed alone); a linear on another input keeps its own; an input that stops
    being shared later is an error, not a silently wrong Hessian."""
    from slim_lightning.compress.steps import StatsHook

    torch.manual_seed(0)
    q, k, o = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
    share: dict = {}
    hooks = {n: StatsHook(D, torch.device("cpu"), True, share) for n in ("q", "k", "o")}
    alone = StatsHook(D, torch.device("cpu"), True)  # no sharing: its own sum of k's inputs
    handles = [m.register_forward_hook(hooks[n]) for n, m in (("q", q), ("k", k), ("o", o))]
    handles.append(k.register_forward_hook(alone))
    xs = [torch.randn(3, 5, D) for _ in range(3)]
    for x in xs:
        o(q(x) + k(x))
    st = {n: h.stats() for n, h in hooks.items()}
    assert st["k"].hessian is st["q"].hessian and st["k"].cache is st["q"].cache
    assert st["o"].hessian is not st["q"].hessian
    assert torch.equal(st["k"].hessian, alone.stats().hessian)
    x = torch.cat(xs).reshape(-1, D)
    torch.testing.assert_close(st["q"].hessian, x.T @ x)
    assert st["k"].n_tokens == st["q"].n_tokens == x.shape[0]
    q(xs[0])
    with pytest.raises(RuntimeError, match="different input"):
        k(xs[0] + 1)  # k's input is no longer the one q's X^T X was added from
    for h in handles:
        h.remove()
