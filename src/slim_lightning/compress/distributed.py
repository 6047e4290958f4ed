"""Distributed one-shot compression on ``torch.distributed`` (``torchrun`` or SLURM ``srun``).

``compress.py`` under several processes (``torchrun --nproc-per-node=N compress.py ...`` or
``srun`` with ``SLURM_PROCID``/``SLURM_NTASKS``/``MASTER_ADDR``) compresses with all of them and
writes the same packed checkpoint as one process:

* calibration batches are sharded over ranks (batch ``b`` -> rank ``b % world_size``); per-linear
  input statistics are exchanged per batch (the owner broadcasts its partial sums) and every rank
  adds them in batch order, exactly as the one-process hook does, so the sums are bit-identical;
  with ``pruner=sparsegpt`` that is ``d_in^2`` floats (the X^T X partial) per linear per batch;
* the linears of a block are assigned to ranks by greedy longest-processing-time on their cost
  (``d_in * d_out`` for the first block, then the previous block's measured seconds); each rank
  compresses its own with the one-process per-layer seed and broadcasts the results, which every
  rank installs in the same order;
* each rank forwards only its own batches to make the next block's inputs;
* perplexity windows are sharded and the NLL sums all-reduced (fp64); zero-shot and exports run on
  rank zero only, which also holds the run directory's lock and writes every output.

Errors inside a rank's own work (forwards, compression, evaluation, rank zero's exports) are
agreed at fixed points (:meth:`DistContext.agree`): every rank then raises. Anything else ends
that process: with gloo the others' pending collective fails at once ("Connection closed by
peer", measured ~1 s) and ``torchrun``'s agent stops the rest (SIGTERM); the process group's
timeout (``SLIM_DIST_TIMEOUT_S``, default 1800 s) bounds every other wait (a hung rank).

Resume state (``engine.resume``) is single-process: with several processes the default ``true``
is turned off with a warning, and ``engine.resume=true`` given on the command line is refused.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TIMEOUT_ENV = "SLIM_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0


class DistributedAbort(RuntimeError):
    """Another rank (or this one) failed at an agreed point; every rank raises this or its own
    error."""


def env_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's or SLURM's environment, else None.

    torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; under ``srun`` (``SLURM_STEP_NUM_TASKS``
    or ``SLURM_NTASKS`` inside a job step) they come from ``SLURM_PROCID``/``SLURM_LOCALID``, and
    ``MASTER_ADDR`` (default ``127.0.0.1`` on one node) / ``MASTER_PORT`` (default 29500) are set
    for the ``env://`` rendezvous.
    """
    env = os.environ
    if env.get("WORLD_SIZE", "").strip().isdigit():
        ws = int(env["WORLD_SIZE"])
        return int(env.get("RANK", "0")), ws, int(env.get("LOCAL_RANK", "0"))
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or (
        env.get("SLURM_NTASKS") if "SLURM_STEP_ID" in env else None
    )
    if ntasks and ntasks.strip().isdigit() and int(ntasks) > 1 and "SLURM_PROCID" in env:
        rank, ws = int(env["SLURM_PROCID"]), int(ntasks)
        local = int(env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env:
            if env.get("SLURM_NNODES", "1").strip() not in ("", "1"):
                raise RuntimeError(
                    "distributed compression under SLURM on several nodes needs MASTER_ADDR (the "
                    "first node's address), e.g. export MASTER_ADDR=$(scontrol show hostnames "
                    '"$SLURM_JOB_NODELIST" | head -n 1)'
                )
            env["MASTER_ADDR"] = "127.0.0.1"
        env.setdefault("MASTER_PORT", "29500")
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(ws), str(local)
        return rank, ws, local
    return None


@dataclass
class DistContext:
    """The process group of a distributed compression run and the few collectives it uses."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    timeout_s: float
    owns_group: bool = True
    shares: dict[str, Any] = field(default_factory=dict)  # this rank's work, for the report

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for collectives live (the backend's device)."""
        return torch.device("cuda") if self.backend == "nccl" else torch.device("cpu")

    def owner(self, batch: int) -> int:
        return batch % self.world_size

    def batches(self, n: int) -> list[int]:
        """This rank's calibration batches of ``n``."""
        return [b for b in range(n) if b % self.world_size == self.rank]

    def add(self, key: str, value: float) -> None:
        self.shares[key] = self.shares.get(key, 0) + value

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        import torch.distributed as dist

        dist.broadcast(t, src=src)
        return t

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def agree(self, err: BaseException | None, what: str) -> None:
        """A fixed meeting point: raises on every rank when any rank brings an error.

        The failing rank re-raises its own error; the others raise :class:`DistributedAbort`
        naming the rank and its error.
        """
        msg = None if err is None else f"{type(err).__name__}: {err}"[:1000]
        errs = self.all_gather_object(msg)
        if err is not None:
            raise err
        failed = [(r, m) for r, m in enumerate(errs) if m is not None]
        if failed:
            r, m = failed[0]
            raise DistributedAbort(f"rank {r} failed while {what}: {m}")


@contextmanager
def agreed(ctx: DistContext | None, what: str) -> Iterator[None]:
    """Runs the body (this rank's own work), then meets the other ranks (:meth:`DistContext.agree`):
    an error in the body on any rank is raised on every rank. No-op for one process."""
    if ctx is None:
        yield
        return
    err = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - agreed below, re-raised on every rank
        err = e
    ctx.agree(err, what)


def resume_requested() -> bool:
    """Whether ``engine.resume=true`` was given on the command line (Hydra overrides)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return False
    if not HydraConfig.initialized():
        return False
    for o in HydraConfig.get().overrides.task:
        key, _, value = str(o).lstrip("+~").partition("=")
        if key == "engine.resume" and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
    return False


def follow_run_dir(local: Path, run_dir: Path) -> None:
    """A non-zero rank whose own (Hydra, timestamped) run directory differs from rank zero's:
    its log files move to rank zero's directory and its own directory goes if left empty."""
    import logging as logging_

    if local.resolve() == run_dir.resolve():
        return
    for logger in [logging_.getLogger(), *logging_.Logger.manager.loggerDict.values()]:
        for h in list(getattr(logger, "handlers", [])):
            path = Path(getattr(h, "baseFilename", ""))
            if isinstance(h, logging_.FileHandler) and path.parent == local.resolve():
                logger.removeHandler(h)
                h.close()
                target = run_dir / path.name
                if path.is_file():  # what this rank logged so far
                    with open(target, "a") as f:
                        f.write(path.read_text())
                    path.unlink()
                new = logging_.FileHandler(target, mode="a")
                new.setLevel(h.level)
                new.setFormatter(h.formatter)
                logger.addHandler(new)
    try:
        local.rmdir()  # only when empty
    except OSError:
        pass


def init_distributed(device: str) -> DistContext | None:
    """Joins the process group when the environment describes several processes.

    gloo on CPU; nccl with ``cuda:LOCAL_RANK`` when ``device`` is CUDA. Returns None for one
    process. The group's timeout is ``SLIM_DIST_TIMEOUT_S`` seconds (default 1800).
    """
    world = env_world()
    if world is None or world[1] <= 1:
        return None
    import torch.distributed as dist

    rank, ws, local = world
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    cuda = str(device).startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=ws,
            timeout=datetime.timedelta(seconds=timeout),
        )
    else:
        backend = dist.get_backend()
    ctx = DistContext(rank, ws, local, backend, timeout, owns_group=owns)
    log.info("distributed compression: rank %d of %d (%s)", rank, ws, backend)
    return ctx


def shutdown(ctx: DistContext | None, *, synchronize: bool = False) -> None:
    """Leaves the process group (when this module created it).

    ``synchronize`` (a run that ended normally on every rank): a barrier first, so no rank
    tears its gloo connections down while a peer still talks on them (a rank leaving early
    made its peer's destructor abort with "terminate called without an active exception").
    A failed run skips it: the peers may never reach the barrier.
    """
    if ctx is None:
        return
    import torch.distributed as dist

    if ctx.owns_group and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def lpt_assign(costs: list[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time: each job (largest first, ties by index) to the least
    loaded rank (ties by rank). Deterministic, so every rank computes the same assignment."""
    loads = [0.0] * world_size
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        owner[j] = r
        loads[r] += costs[j]
    return owner


def perplexity_sharded(
    ctx: DistContext | None,
    model: torch.nn.Module,
    windows: torch.Tensor,
    perplexity: Any = None,
    **kw: Any,
) -> dict[str, Any]:
    """``evaluation.perplexity`` (or another ``perplexity`` function with its signature, e.g.
    ``evaluation.streaming_perplexity``) with the windows sharded over ranks (window ``i`` ->
    rank ``i % world_size``) and the fp64 NLL sums all-reduced; one process: the plain call."""
    import math

    if perplexity is None:
        from ..data.evaluation import perplexity

    if ctx is None:
        return perplexity(model, windows, **kw)
    mine = windows[ctx.rank :: ctx.world_size]
    err, total, n = None, 0.0, 0
    try:
        if mine.shape[0]:
            out = perplexity(model, mine, **{**kw, "progress": kw.get("progress") and ctx.is_main})
            total, n = out["nll"] * out["n_tokens"], out["n_tokens"]
    except Exception as e:  # noqa: BLE001 - agreed below, re-raised on every rank
        err = e
    ctx.agree(err, "evaluating perplexity")
    t = torch.tensor([total, float(n)], dtype=torch.float64, device=ctx.comm_device)
    ctx.all_reduce_sum_(t)
    total, n = float(t[0]), int(t[1])
    mean = total / n
    return {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "n_tokens": n}
