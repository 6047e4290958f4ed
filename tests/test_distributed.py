"""Distributed compression (``slim_lightning.compress.distributed``): torchrun with 2 CPU processes writes
the same packed checkpoint as one process; errors on one rank stop every rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from slim_lightning.compress.distributed import env_world, lpt_assign

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """A command in the repository root with one thread per process; output captured."""
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes_equal_one(cmd: list[str], a: Path, b: Path) -> None:
    """Runs ``cmd`` under torchrun with 2 processes into ``a`` and in one process into ``b``
    (at the same time) and asserts the packed checkpoints are equal tensor for tensor."""
    from safetensors.torch import load_file

    # the launcher of this interpreter (a venv not on PATH works too)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    pa = subprocess.Popen(
        [*torchrun, *cmd, f"hydra.run.dir={a}"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pb = _run([sys.executable, *cmd, f"hydra.run.dir={b}"])
    out_a = pa.communicate(timeout=300)[0]
    assert pb.returncode == 0, pb.stderr[-3000:]
    assert pa.returncode == 0, out_a[-3000:]
    ta = load_file(a / "packed" / "model.safetensors")
    tb = load_file(b / "packed" / "model.safetensors")
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_lpt_assign_balances_and_is_deterministic() -> None:
    costs = [9.0, 1.0, 1.0, 3.0, 3.0, 3.0, 27.0]
    owner = lpt_assign(costs, 2)
    assert owner == lpt_assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert sorted(loads) == [20.0, 27.0]
    assert lpt_assign([1.0, 1.0], 3) == [0, 1]


def test_env_world_from_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    # env_world() sets these for the env:// rendezvous; set-then-delete makes monkeypatch record
    # them, so they are removed again after the test (delenv of an absent key records nothing,
    # and a leaked WORLD_SIZE would make every later in-process run wait for a second rank)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NNODES", "1")
    assert env_world() == (1, 2, 1)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["WORLD_SIZE"] == "2"
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NNODES", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        env_world()
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("SLURM_NTASKS", "2")  # an sbatch script's own shell: not a job step
    assert env_world() is None


LEVERS = (
    "reconstruct=block",
    "reconstruct.mask=refine",
    "lowrank.permute=true",
    "lowrank.alternate=1",
    "calib.nsamples=32",
    "reconstruct.epochs=4",
    "reconstruct.lr_weight=0.1",
    "reconstruct.lr_adapter=0.1",
)


@pytest.mark.parametrize(
    "extra", [(), ("reconstruct=block",), LEVERS], ids=["one_shot", "reconstruct", "levers"]
)
def test_torchrun_two_processes_write_the_same_checkpoint(tmp_path: Path, extra: tuple) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    two_processes_equal_one(["compress.py", "debug=default", *extra], a, b)
    ra = json.loads((a / "report.json").read_text())
    rb = json.loads((b / "report.json").read_text())
    assert ra["status"] == rb["status"] == "done"
    assert ra["world_size"] == 2 and rb["world_size"] == 1
    for name, ppl in rb["ppl"].items():
        assert abs(ra["ppl"][name] - ppl) <= 1e-6 * ppl
    ranks = ra["distributed"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    n_linears = len(rb["layers"])
    assert sum(r["linears"] for r in ranks) == n_linears and all(r["linears"] for r in ranks)
    # debug: 8 samples (LEVERS: 32) in batches of 4
    assert sum(r["batches"] for r in ranks) == (8 if extra == LEVERS else 2)
    assert not (a / "calib_state").exists()  # no resume state with several processes
    if extra == LEVERS:  # the levers did something, the same on both sides
        assert any(r.get("permuted") for r in rb["layers"])
        assert any(r.get("recon_mask_moved", 0) > 0 for r in rb["layers"])
        assert [r.get("permuted") for r in ra["layers"]] == [
            r.get("permuted") for r in rb["layers"]
        ]


def test_torchrun_streaming_equals_one_process(tmp_path: Path) -> None:
    """engine.streaming under torchrun (each rank reads the blocks from the shards; the dense
    model is evaluated block by block on sharded windows) writes the checkpoint of a plain
    one-process run and reports its perplexities."""
    from slim_lightning.checkpoint.load import read_weights
    from slim_lightning.models.tiny import tiny_model

    ckpt = tmp_path / "ckpt"
    model, tok = tiny_model(kind="llama", seed=0)
    model.to(torch.float16).save_pretrained(ckpt, safe_serialization=True, max_shard_size="40KB")
    tok.save_pretrained(ckpt)
    base = ["compress.py", "debug=default", f"+model.path={ckpt}", "model.random_init=false"]
    a, b = tmp_path / "A", tmp_path / "B"
    # the launcher of this interpreter (a venv not on PATH works too)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    pa = _run([*torchrun, *base, "engine.streaming=true", f"hydra.run.dir={a}"])
    assert pa.returncode == 0, (pa.stdout + pa.stderr)[-3000:]
    pb = _run([sys.executable, *base, f"hydra.run.dir={b}"])
    assert pb.returncode == 0, pb.stderr[-3000:]
    ta = read_weights(a / "packed")  # (streaming: sharded)
    tb = read_weights(b / "packed")
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    ra = json.loads((a / "report.json").read_text())
    rb = json.loads((b / "report.json").read_text())
    assert ra["world_size"] == 2 and ra["config"]["engine"]["streaming"] is True
    for key in ("ppl", "ppl_dense"):
        assert rb[key] and ra[key].keys() == rb[key].keys()
        for name, ppl in rb[key].items():
            assert abs(ra[key][name] - ppl) <= 1e-6 * ppl, (key, name)


FAILING = textwrap.dedent(
    """
    import os, sys, torch
    from torch import nn
    from slim_lightning.compress import distributed
    from slim_lightning.compress.engine import CalibrationEngine
    from slim_lightning.compress.steps import make_step
    from slim_lightning.models.arch import capture_block_inputs
    from slim_lightning.core.types import CompressedLinear, CompressSpec

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        def forward(self, x):
            return (x + self.fc2(torch.tanh(self.fc1(x))),)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.blocks = nn.ModuleList(Block() for _ in range(3))
        def forward(self, input_ids, use_cache=False):
            h = self.embed(input_ids)
            for b in self.blocks:
                h = b(h)[0]
            return h

    ctx = distributed.init_distributed("cpu")
    fail_rank = int(sys.argv[1])

    def compress(w, stats, spec):
        if ctx.rank == fail_rank and torch.initial_seed() % 1009 == 1:  # block 0, fc2
            raise FloatingPointError("injected failure")
        return CompressedLinear(weight=w.clone(), metrics={})

    torch.manual_seed(0)
    model = Toy().eval()
    ids = torch.randint(0, 20, (6, 4), generator=torch.Generator().manual_seed(1))
    inputs, kwargs = capture_block_inputs(model, model.blocks[0], ids, 2)
    try:
        CalibrationEngine(model.blocks, ("fc1", "fc2"), CompressSpec(), compress,
                          progress=False, block_step=make_step(ctx)).run(inputs, kwargs)
    finally:
        distributed.shutdown(ctx)
    print("finished")
    """
)


def test_a_failing_rank_stops_every_rank(tmp_path: Path) -> None:
    """The compressing rank's error is agreed after the block: every rank raises at once."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    env = _env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    env["SLIM_DIST_TIMEOUT_S"] = "60"
    t0 = time.perf_counter()
    procs = []
    for rank in range(2):
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), "1"],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert time.perf_counter() - t0 < 50, "a rank waited for the group's timeout"
    assert [p.returncode for p in procs] != [0, 0]
    assert procs[0].returncode != 0 and procs[1].returncode != 0, outs
    assert "rank 1 failed while compressing block 0" in outs[0], outs[0][-2000:]
    assert "FloatingPointError: injected failure" in outs[1], outs[1][-2000:]


def test_a_rank_follows_rank_zeros_run_dir(tmp_path: Path) -> None:
    """A rank whose Hydra run directory (timestamp) differs moves its log to rank zero's."""
    import logging

    from slim_lightning.compress.distributed import follow_run_dir

    local, run_dir = tmp_path / "12-00-01", tmp_path / "12-00-00"
    local.mkdir()
    run_dir.mkdir()
    logger = logging.getLogger("slim_test_follow")
    logger.setLevel(logging.INFO)
    h = logging.FileHandler(local / "compress.log")
    logger.addHandler(h)
    try:
        logger.info("before")
        follow_run_dir(local, run_dir)
        logger.info("after")
        assert not local.exists()
        assert (run_dir / "compress.log").read_text().split() == ["before", "after"]
    finally:
        for x in list(logger.handlers):
            logger.removeHandler(x)
            x.close()


def test_explicit_resume_is_refused_with_several_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from slim_lightning.app import compress_run
    from slim_lightning.compress import distributed
    from slim_lightning.errors import ConfigError

    ctx = SimpleNamespace(world_size=2, rank=0, is_main=True)
    plan = SimpleNamespace(
        engine=SimpleNamespace(resume=True), spec=SimpleNamespace(needs_samples=0)
    )
    monkeypatch.setattr(distributed, "resume_requested", lambda: True)
    with pytest.raises(ConfigError, match="engine.resume.*several processes"):
        compress_run._run_distributed(ctx, plan, {}, tmp_path)
