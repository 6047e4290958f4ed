"""How the engine runs one decoder block: in this process alone, or as one rank of several.

``CalibrationEngine`` asks its block step to ``select`` the calibration batches it holds, to
``compress`` a block (collect each linear's input statistics, compress every linear, hand each
result to the engine's install as soon as it may be installed) and to ``forward`` the compressed
block for the next block's inputs. ``make_step(ctx)`` builds the step from an explicit
distributed context (``distributed.init_distributed``; None for one process).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core.registry import QUANTIZERS
from ..core.types import CompressedLinear, LayerStats
from .distributed import DistContext, lpt_assign
from .permute import permute_block
from .resume import canonicalize

Install = Callable[[str, CompressedLinear], None]
SAMPLE_STRIDE = 4  # calibration tokens per kept sample row (LayerStats.samples)


class StatsHook:
    """Accumulates a linear's input statistics in fp32 (sum x^2, sum |x|, optional X X^T).

    With a ``share`` dict common to a block's hooks, linears whose hooks see the very same input
    tensor on their first call (q/k/v, gate/up in LLaMA) keep one X X^T: the first accumulates,
    the others hold the same tensor (bit-identical to separate sums of the same products) and
    check on every call that their input is still the one it was added from.
    """

    def __init__(
        self,
        d_in: int,
        device: torch.device,
        hessian: bool,
        share: dict | None = None,
        consume: bool = False,
        samples: int = 0,
    ):
        self.sq = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.ab = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.hessian, self.share, self.device = hessian, share, device
        self.h: torch.Tensor | None = None
        if hessian and share is None:  # (a distributed rank adds the owners' sums itself)
            self.h = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self.leader: StatsHook | None = None  # the hook whose X X^T this one shares
        # consume: the compression may factorise X X^T in place (nothing else reads it)
        self.cache: dict = {"consume_hessian": consume}
        self.n = 0
        # up to ``samples`` input rows (every SAMPLE_STRIDE-th token, in calibration order) for
        # quantisers that score the layer's real outputs; linears sharing an input share them
        self.cap, self.rows = int(samples), []

    def __call__(self, _mod: nn.Module, inp: tuple, _out: Any) -> None:
        raw = inp[0]
        x = raw.detach().reshape(-1, raw.shape[-1]).float()  # (tokens, d_in)
        self.sq += (x * x).sum(0)
        self.ab += x.abs().sum(0)
        if self.hessian:
            self._hessian(raw, x)
        self.n += x.shape[0]
        kept = sum(r.shape[0] for r in self.rows)
        if self.cap > kept and self.leader is None:
            self.rows.append(x[::SAMPLE_STRIDE][: self.cap - kept].clone())

    def _hessian(self, raw: torch.Tensor, x: torch.Tensor) -> None:
        last = None if self.share is None else self.share.get("last")
        if self.n == 0 and self.h is None:  # first call: share the X X^T just added, if any
            if last is not None and last[0] is raw and last[1].n == x.shape[0]:
                self.leader = last[1]
                self.h, self.cache = self.leader.h, self.leader.cache
                return
            self.h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=self.device)
        if self.leader is not None:
            if last is None or last[0] is not raw or last[1] is not self.leader:
                raise RuntimeError(
                    "statistics: a linear that shared its input with another on the first "
                    "calibration batch was fed a different input later"
                )
            return
        self.h += x.T @ x
        if self.share is not None:
            self.share["last"] = (raw, self)

    def stats(self) -> LayerStats:
        rows = (self.leader or self).rows
        return LayerStats(
            sq_sum=self.sq,
            abs_sum=self.ab,
            n_tokens=self.n,
            hessian=self.h,
            cache=self.cache,
            samples=torch.cat(rows) if rows else None,
        )


class PartsHook:
    """Keeps each forward call's partial statistics (the terms ``StatsHook`` adds), flattened
    for a broadcast: ``[sum x^2, sum |x|, (X^T X), n_tokens as int64 bits]``."""

    def __init__(self, hessian: bool):
        self.hessian = hessian
        self.parts: list[list[torch.Tensor]] = []

    def __call__(self, _mod: nn.Module, inp: tuple, _out: Any) -> None:
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()  # (tokens, d_in)
        p = [(x * x).sum(0), x.abs().sum(0)]
        if self.hessian:
            p.append(x.T @ x)
        n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        p.append(n.view(torch.float32))
        self.parts.append(p)


class LocalStep:
    """One process: every batch is here; each linear is installed as soon as it is compressed."""

    resumable = True  # the resume state is single-process
    shows_progress = True

    def select(self, inputs: list, kwargs: list) -> tuple[list, list]:
        return inputs, kwargs

    def compress(
        self,
        engine: Any,
        i: int,
        block: nn.Module,
        lin: dict[str, nn.Linear],
        inputs: list[torch.Tensor],
        kwargs: list[dict],
        install: Install,
    ) -> dict[str, CompressedLinear]:
        share: dict = {}  # linears fed one input tensor keep one X^T X
        spec = engine.spec
        # SparseGPT may factorise X^T X in place unless something else reads it afterwards
        quant = QUANTIZERS.get_entry(spec.quant.method)
        consume = spec.lowrank.fit != "whitened" and not quant.needs_hessian
        hooks = {
            n: StatsHook(
                m.in_features,
                engine.device,
                spec.needs_hessian,
                share,
                consume,
                samples=spec.needs_samples,
            )
            for n, m in lin.items()
        }
        handles = [lin[n].register_forward_hook(h) for n, h in hooks.items()]
        try:
            engine.run_block(block, inputs, kwargs)
        finally:
            for h in handles:
                h.remove()
            share.clear()
        permuted = permute_block(engine, block, lin, hooks, inputs, kwargs)
        results = {}
        # widest input first: its X^T X (the largest statistic) goes before the others'
        # work starts; each linear keeps its own seed (its index j), so the order changes no
        # result
        names = list(lin)
        for j in sorted(range(len(names)), key=lambda j: -lin[names[j]].in_features):
            name, m = names[j], lin[names[j]]
            results[name] = c = engine.compress_one(i, j, m, hooks.pop(name).stats())
            if name in permuted:
                c.metrics["permuted"] = 1.0
            install(name, c)
        return {name: results[name] for name in names}

    def forward(
        self, engine: Any, i: int, block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]
    ) -> list[torch.Tensor]:
        return engine.run_block(block, inputs, kwargs)


class DistributedStep:
    """One rank of a distributed run (:mod:`.distributed`): this rank's batches (``b % world_size
    == rank``), statistics exchanged in batch order, the linears spread over ranks; no resume."""

    resumable = False

    def __init__(self, ctx: DistContext):
        self.ctx, self.n_batches = ctx, 0
        self._costs: dict[str, float] = {}

    @property
    def shows_progress(self) -> bool:
        return self.ctx.is_main

    def select(self, inputs: list, kwargs: list) -> tuple[list, list]:
        self.n_batches = len(inputs)
        mine = self.ctx.batches(self.n_batches)
        self.ctx.shares["batches"] = len(mine)
        return [inputs[b] for b in mine], [kwargs[b] for b in mine]

    def compress(
        self,
        engine: Any,
        i: int,
        block: nn.Module,
        lin: dict[str, nn.Linear],
        inputs: list[torch.Tensor],
        kwargs: list[dict],
        install: Install,
    ) -> dict[str, CompressedLinear]:
        results = self._compress_block(engine, i, block, lin, inputs, kwargs)
        for name, c in results.items():  # every rank installs all of them, in the block's order
            install(name, c)
        return results

    def _stats(
        self,
        engine: Any,
        i: int,
        block: nn.Module,
        lin: dict[str, nn.Linear],
        inputs: list[torch.Tensor],
        kwargs: list[dict],
    ) -> dict[str, StatsHook]:
        """Every linear's statistics over all ranks' batches, summed in batch order.

        In round ``t`` rank ``r`` forwards batch ``t * world_size + r``; the owners then broadcast
        their per-call partial sums in batch order and every rank adds them to zero-initialised
        accumulators exactly as ``StatsHook`` does in one process (bit-identical sums).
        """
        d, n_b = self.ctx, self.n_batches
        ws, hess, dev = d.world_size, engine.spec.needs_hessian, engine.device
        acc = {n: StatsHook(m.in_features, dev, hess) for n, m in lin.items()}
        parts = {n: PartsHook(hess) for n in lin}
        handles = [lin[n].register_forward_hook(h) for n, h in parts.items()]
        try:
            for t in range((n_b + ws - 1) // ws):
                err = None
                try:
                    if t * ws + d.rank < n_b:
                        tf = time.perf_counter()
                        block(inputs[t].to(dev), **kwargs[t])
                        d.add("forward_s", time.perf_counter() - tf)
                except Exception as e:  # noqa: BLE001 - agreed, then raised on every rank
                    err = e
                tc = time.perf_counter()
                d.agree(err, f"collecting the statistics of block {i}")
                # hook calls per linear in each rank's batch (an MoE expert runs 0, 1 or 2 times)
                counts = d.all_gather_object([len(parts[n].parts) for n in lin])
                for src in range(ws):
                    if t * ws + src >= n_b:
                        break
                    calls = counts[src]
                    size = sum(
                        k * (2 * m.in_features + (m.in_features**2 if hess else 0) + 2)
                        for k, m in zip(calls, lin.values())
                    )
                    if src == d.rank:
                        flat = torch.cat(
                            [v.reshape(-1) for n in lin for p in parts[n].parts for v in p]
                        ).to(d.comm_device)
                        assert flat.numel() == size, "a linear ran a different number of times"
                    else:
                        flat = torch.empty(size, dtype=torch.float32, device=d.comm_device)
                    d.broadcast_(flat, src)
                    flat, off = flat.to(dev), 0
                    for k, (n, m) in zip(calls, lin.items()):
                        di = m.in_features
                        for _ in range(k):
                            h = acc[n]
                            h.sq += flat[off : off + di]
                            h.ab += flat[off + di : off + 2 * di]
                            off += 2 * di
                            if hess:
                                h.h += flat[off : off + di * di].view(di, di)
                                off += di * di
                            h.n += int(flat[off : off + 2].contiguous().view(torch.int64))
                            off += 2
                for p in parts.values():
                    p.parts.clear()
                d.add("comm_s", time.perf_counter() - tc)
        finally:
            for h in handles:
                h.remove()
        return acc

    def _compress_block(
        self,
        engine: Any,
        i: int,
        block: nn.Module,
        lin: dict[str, nn.Linear],
        inputs: list[torch.Tensor],
        kwargs: list[dict],
    ) -> dict[str, CompressedLinear]:
        """Statistics of all ranks' batches; each rank compresses its share of the linears
        (greedy LPT on the previous block's measured seconds, ``d_in * d_out`` for the first)
        and broadcasts the results; every rank returns all of them in the block's order."""
        d = self.ctx
        acc = self._stats(engine, i, block, lin, inputs, kwargs)
        # (every rank holds the same sums: the same permutations everywhere; checked on the
        # rank's own first batch, or none)
        permuted = permute_block(engine, block, lin, acc, inputs[:1], kwargs[:1])
        every = d.all_gather_object(sorted(permuted))
        if any(x != every[0] for x in every):
            raise RuntimeError(f"lowrank.permute: the ranks permuted different linears: {every}")
        names = list(lin)
        costs = [self._costs.get(n, float(m.in_features * m.out_features)) for n, m in lin.items()]
        owner = lpt_assign(costs, d.world_size)
        mine: dict[str, CompressedLinear] = {}
        err = None
        try:
            for j, (name, m) in enumerate(lin.items()):
                if owner[j] == d.rank:
                    c = engine.compress_one(i, j, m, acc[name].stats())
                    if name in permuted:
                        c.metrics["permuted"] = 1.0
                    d.add("compress_s", c.metrics["time_s"])
                    d.add("linears", 1)
                    if c.weight_q is not None:  # recomputed from the codes on arrival
                        c.weight = torch.empty(0)
                    mine[name] = c
        except Exception as e:  # noqa: BLE001 - agreed, then raised on every rank
            err = e
        del acc
        tc = time.perf_counter()
        d.agree(err, f"compressing block {i}")
        got: dict[str, CompressedLinear] = {}
        for r in range(d.world_size):
            if r in owner:
                got.update(d.broadcast_object(mine if r == d.rank else None, src=r))
        d.add("comm_s", time.perf_counter() - tc)
        results = {n: canonicalize(got[n]) for n in names}
        self._costs = {n: float(c.metrics.get("time_s", 0.0)) or 1e-9 for n, c in results.items()}
        return results

    def gather(self, mine: list) -> list:
        """Every rank's share of a per-batch list, in batch order, on every rank (block
        reconstruction trains on all batches, identically on each rank)."""
        from ..models.arch import to_device

        ws = self.ctx.world_size
        shares = self.ctx.all_gather_object([to_device(x, "cpu") for x in mine])  # (on CPU)
        return [shares[b % ws][b // ws] for b in range(self.n_batches)]

    def forward(
        self, engine: Any, i: int, block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]
    ) -> list[torch.Tensor]:
        """This rank's batches through the compressed block: the next block's inputs."""
        d, err, outs = self.ctx, None, inputs
        tf = time.perf_counter()
        try:
            outs = engine.run_block(block, inputs, kwargs)
        except Exception as e:  # noqa: BLE001 - agreed, then raised on every rank
            err = e
        d.add("forward_s", time.perf_counter() - tf)
        d.agree(err, f"running block {i} for the next block's inputs")
        return outs


def make_step(ctx: DistContext | None) -> LocalStep | DistributedStep:
    """The block step of a run: ``LocalStep`` for one process, else ``DistributedStep(ctx)``."""
    return LocalStep() if ctx is None else DistributedStep(ctx)
