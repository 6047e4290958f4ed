"""Layer-wise calibration engine: the driver every compression method plugs into.

For each decoder block, in order:
  1. run the block on the calibration activations (inputs come from the already-compressed
     previous blocks) with forward hooks that accumulate each linear's input statistics in fp32;
  2. compress every linear of the block with ``compress_fn`` (``core.compress.compress_linear_rows``);
  3. install the result (``install_fn``: merge into the dense weight, or a packed ``SLiMLinear``);
  4. re-run the block to produce the next block's inputs;
  5. commit the block's results and the next inputs in ``state_dir`` (files first, then the
     ``progress.json`` record that names them with their sha256) so a killed run resumes from
     the last committed block and ends bit-identical to an uninterrupted one.

The model stays on CPU; only the current block and its activations go to ``device``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calib_state import BlockStore, canonicalize

# the resume state's public names live in .calib_state; re-exported here for compatibility
from .calib_state import ResumeStateDiscarded as ResumeStateDiscarded
from .calib_state import compressed_from_tensors as compressed_from_tensors
from .calib_state import compressed_to_tensors as compressed_to_tensors
from .core.types import CompressedLinear, CompressSpec, LayerStats, QuantTensor

log = logging.getLogger(__name__)

CompressFn = Callable[[torch.Tensor, LayerStats, CompressSpec], CompressedLinear]
InstallFn = Callable[[nn.Module, str, nn.Linear, CompressedLinear], None]


class _StopForward(Exception):
    """Raised by the first block's pre-hook once its inputs are captured."""


@dataclass
class CalibrationResult:
    """What the engine returns: per-layer compressed results and diagnostics."""

    layers: dict[str, CompressedLinear] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)
    resumed_blocks: int = 0
    discarded_state: str | None = None
    fingerprint: str = ""
    seconds: float = 0.0
    embeddings: dict[str, Any] | None = None  # quantize_embeddings' report (embeddings.bits)
    block_seconds: list[float] = field(default_factory=list)  # wall time of each block run


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Moves every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def merge_install(block: nn.Module, name: str, linear: nn.Linear, c: CompressedLinear) -> None:
    """Default install: the dense weight becomes exactly what the compressed layer computes."""
    linear.weight.data.copy_(c.effective_weight().to(linear.weight.dtype))


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Runs the model (on its own device) up to its first decoder block, for each batch.

    Args:
        ids: int64 ``(n_samples, seqlen)`` calibration token ids.

    Returns:
        Per batch: the hidden states entering block 0, ``(b, seqlen, hidden)``, and the keyword
        arguments the model passed to the block (masks, rotary embeddings, positions).
    """
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.detach())
        kwargs_list.append(
            {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        )
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        dev = next(model.parameters()).device
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start : start + batch_size].to(dev), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_list


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _StatsHook:
    """Accumulates a linear's input statistics in fp32 (sum x^2, sum |x|, optional X X^T)."""

    def __init__(self, d_in: int, device: torch.device, hessian: bool):
        self.sq = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.ab = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.h = torch.zeros(d_in, d_in, dtype=torch.float32, device=device) if hessian else None
        self.n = 0

    def __call__(self, _mod: nn.Module, inp: tuple, _out: Any) -> None:
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()  # (tokens, d_in)
        self.sq += (x * x).sum(0)
        self.ab += x.abs().sum(0)
        if self.h is not None:
            self.h += x.T @ x
        self.n += x.shape[0]

    def stats(self) -> LayerStats:
        return LayerStats(sq_sum=self.sq, abs_sum=self.ab, n_tokens=self.n, hessian=self.h)


class _PartsHook:
    """Keeps each forward call's partial statistics (the terms ``_StatsHook`` adds), flattened
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


class CalibrationEngine:
    """Compresses a decoder-only model block by block.

    Args:
        blocks: the model's decoder blocks, in order.
        linear_names: dotted names of the linears to compress inside each block.
        spec: the compression spec handed to ``compress_fn``.
        compress_fn: ``(W (d_out, d_in), LayerStats, spec) -> CompressedLinear``; W is fp32,
            or fp16/bf16 when the linear is stored so (streaming), to be computed on in fp32.
        install_fn: puts a result into the model (default: merge into the dense weight).
        device: where the current block and its activations run.
        state_dir: where per-block state is saved for resume (None: no resume); layout and
            commit protocol: ``calib_state.BlockStore``.
        fingerprint: identifies everything that determines the result (model weights, data,
            spec, seed, batch size, device); saved state with another fingerprint is discarded
            with a ``ResumeStateDiscarded`` warning, never mixed into this run.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        linear_names: tuple[str, ...],
        spec: CompressSpec,
        compress_fn: CompressFn,
        *,
        install_fn: InstallFn = merge_install,
        device: str | torch.device = "cpu",
        state_dir: str | Path | None = None,
        fingerprint: str = "",
        seed: int = 0,
        progress: bool = True,
        offload_inputs: bool = False,
        block_prefix: str = "blocks",
        keep_layers: bool = False,
        block_hook: Callable[[int, nn.Module, str], None] | None = None,
        dist: Any = None,
        offload_blocks: bool = False,
        dense_views: bool = True,
    ):
        self.blocks, self.linear_names, self.spec = blocks, linear_names, spec
        self.compress_fn, self.install_fn = compress_fn, install_fn
        self.device = torch.device(device)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.fingerprint, self.seed, self.progress = fingerprint, seed, progress
        self.offload_inputs, self.block_prefix = offload_inputs, block_prefix
        self.keep_layers = keep_layers
        # streaming (slim_lightning.streaming): called with stage "resume" / "load" before a
        # block is re-installed / processed (materialises it) and "done" after it is committed
        self.block_hook = block_hook
        # streaming: a finished block is written to disk once committed and dropped from memory
        # (hook stage "offload"), read back by reinstall_offloaded()
        self.offload_blocks = offload_blocks and block_hook is not None
        # False (streaming packed installs): a quantised result's dense view is not computed;
        # its ``weight`` is a meta tensor of the right shape (installs and the resume state use
        # the codes)
        self.dense_views = dense_views
        self.offloaded: list[int] = []
        # distributed (slim_lightning.distributed.DistContext; default: the active one, set by
        # compress_run under torchrun/srun): run() keeps this rank's batches (b % world_size ==
        # rank), exchanges statistics, spreads the linears over ranks; no resume state
        if dist is None:
            from .distributed import current

            dist = current()
        self.dist, self.n_batches = dist, 0
        self._costs: dict[str, float] = {}

    # -- main loop ----------------------------------------------------------------------------
    def _linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        mods = dict(block.named_modules())
        missing = [n for n in self.linear_names if n not in mods]
        if missing:
            raise KeyError(f"block has no modules {missing}; it has {sorted(mods)[:20]}...")
        return {n: mods[n] for n in self.linear_names}

    def _run_block(
        self, block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]
    ) -> list[torch.Tensor]:
        outs = []
        for x, kw in zip(inputs, kwargs):
            y = _block_output(block(x.to(self.device), **kw))
            outs.append(y.to("cpu") if self.offload_inputs else y)
        return outs

    @torch.no_grad()
    def run(self, inputs: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> CalibrationResult:
        """Compresses every block, given the first block's inputs and kwargs (per batch)."""
        t0 = time.perf_counter()
        result = CalibrationResult()
        self.discarded: str | None = None
        store, start = None, 0
        if self.state_dir is not None and self.dist is None:
            store = BlockStore(
                self.state_dir, self.fingerprint, len(self.blocks), self.linear_names
            )
            start = store.load_progress()
            self.discarded = store.discarded
        if self.dist is not None:
            self.n_batches = len(inputs)
            mine = self.dist.batches(self.n_batches)
            inputs, kwargs = [inputs[b] for b in mine], [kwargs[b] for b in mine]
            self.dist.shares["batches"] = len(mine)
        kwargs = [to_device(kw, self.device) for kw in kwargs]
        offload = self.offload_blocks
        for i in range(start):  # re-install finished blocks from their saved state
            self._reinstall(store, i, result)
            if offload:  # (one at a time: each resumed block goes back to disk)
                self.block_hook(i, self.blocks[i], "offload")
                self.offloaded.append(i)
        if start > 0 and start < len(self.blocks):
            inputs = store.load_inputs(start)
        result.resumed_blocks = start
        result.discarded_state = self.discarded
        result.fingerprint = self.fingerprint
        inputs = [x if self.offload_inputs else x.to(self.device) for x in inputs]

        bar = tqdm(
            range(start, len(self.blocks)),
            desc="Compressing blocks",
            disable=not self.progress or (self.dist is not None and not self.dist.is_main),
            initial=start,
            total=len(self.blocks),
        )
        for i in bar:
            tb = time.perf_counter()
            if self.block_hook is not None:
                self.block_hook(i, self.blocks[i], "load")
            block = self.blocks[i].to(self.device)
            lin = self._linears(block)
            if self.dist is not None:  # statistics exchanged, linears spread over ranks
                results = self._compress_block_dist(i, block, lin, inputs, kwargs)
                for name, c in results.items():
                    self._install(i, block, name, lin[name], c, result)
            else:  # each linear installed as soon as it is compressed (its dense weight can go)
                results = self._compress_block(
                    i,
                    block,
                    lin,
                    inputs,
                    kwargs,
                    lambda n, c, i=i, block=block, lin=lin: self._install(
                        i, block, n, lin[n], c, result
                    ),
                )
            if self.dist is not None:
                inputs = self._forward_dist(i, block, inputs, kwargs)
            else:
                inputs = self._run_block(block, inputs, kwargs)
            self.blocks[i].to("cpu")
            if store is not None:
                store.save_block(i, results, [x.to("cpu") for x in inputs])
            if self.block_hook is not None:
                self.block_hook(i, self.blocks[i], "done")
            bar.set_postfix(block=i, err=f"{_mean_metric(results, 'err_final'):.3g}")
            result.block_seconds.append(round(time.perf_counter() - tb, 4))
            del results, lin, block  # nothing of this block is held while the next one is read
            if offload:
                self.block_hook(i, self.blocks[i], "offload")
                self.offloaded.append(i)
        result.seconds = time.perf_counter() - t0
        return result

    def _reinstall(self, store: BlockStore, i: int, result: CalibrationResult) -> None:
        """Installs block ``i``'s compressed linears from the resume state."""
        block = self.blocks[i]
        if self.block_hook is not None:
            self.block_hook(i, block, "resume")
        lin = self._linears(block)
        for name, c in store.load_block(i).items():
            self._install(i, block, name, lin[name], c, result)

    def reinstall_offloaded(self) -> None:
        """Reads back the blocks ``run`` offloaded (``offload_blocks``; hook stage ``reload``):
        afterwards the model is whole again (packed)."""
        for i in self.offloaded:
            self.block_hook(i, self.blocks[i], "reload")
        self.offloaded = []

    def _compress_one(self, i: int, j: int, m: nn.Linear, stats: LayerStats) -> CompressedLinear:
        # a fixed per-layer seed keeps randomized SVDs identical across resumes (and ranks)
        torch.manual_seed(self.seed * 1_000_003 + i * 1009 + j)
        tl = time.perf_counter()
        # as stored: fp32, or the 16-bit weight of a streaming run (exact; compress_fn works in
        # fp32, one row block at a time for large weights, so no whole fp32 copy is made here)
        w = m.weight.data
        c = self.compress_fn(
            w if w.dtype in (torch.float16, torch.bfloat16) else w.float(), stats, self.spec
        )
        if self.dense_views or c.weight_q is None:
            c = canonicalize(_to_cpu(c))
        else:
            c.weight = torch.empty(c.weight.shape, dtype=torch.float32, device="meta")
            c = _to_cpu(c)
        c.metrics["time_s"] = time.perf_counter() - tl
        return c

    def _compress_block(
        self,
        i: int,
        block: nn.Module,
        lin: dict[str, nn.Linear],
        inputs: list[torch.Tensor],
        kwargs: list[dict],
        install: Callable[[str, CompressedLinear], None],
    ) -> dict[str, CompressedLinear]:
        hooks = {
            n: _StatsHook(m.in_features, self.device, self.spec.needs_hessian)
            for n, m in lin.items()
        }
        handles = [lin[n].register_forward_hook(h) for n, h in hooks.items()]
        try:
            self._run_block(block, inputs, kwargs)
        finally:
            for h in handles:
                h.remove()
        results = {}
        for j, (name, m) in enumerate(lin.items()):
            results[name] = c = self._compress_one(i, j, m, hooks.pop(name).stats())
            install(name, c)
        return results

    # -- distributed (slim_lightning.distributed) ---------------------------------------------
    def _stats_dist(
        self,
        i: int,
        block: nn.Module,
        lin: dict[str, nn.Linear],
        inputs: list[torch.Tensor],
        kwargs: list[dict],
    ) -> dict[str, _StatsHook]:
        """Every linear's statistics over all ranks' batches, summed in batch order.

        In round ``t`` rank ``r`` forwards batch ``t * world_size + r``; the owners then broadcast
        their per-call partial sums in batch order and every rank adds them to zero-initialised
        accumulators exactly as ``_StatsHook`` does in one process (bit-identical sums).
        """
        d, n_b = self.dist, self.n_batches
        ws, hess, dev = d.world_size, self.spec.needs_hessian, self.device
        acc = {n: _StatsHook(m.in_features, dev, hess) for n, m in lin.items()}
        parts = {n: _PartsHook(hess) for n in lin}
        handles = [lin[n].register_forward_hook(h) for n, h in parts.items()]
        calls: list[int] | None = None  # hook calls per linear per batch (rank 0's batch 0)
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
                if calls is None:
                    calls = d.broadcast_object([len(parts[n].parts) for n in lin], src=0)
                for src in range(ws):
                    if t * ws + src >= n_b:
                        break
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

    def _compress_block_dist(
        self,
        i: int,
        block: nn.Module,
        lin: dict[str, nn.Linear],
        inputs: list[torch.Tensor],
        kwargs: list[dict],
    ) -> dict[str, CompressedLinear]:
        """Statistics of all ranks' batches; each rank compresses its share of the linears
        (greedy LPT on the previous block's measured seconds, ``d_in * d_out`` for the first)
        and broadcasts the results; every rank returns all of them in the block's order."""
        from .distributed import lpt_assign

        d = self.dist
        acc = self._stats_dist(i, block, lin, inputs, kwargs)
        names = list(lin)
        costs = [self._costs.get(n, float(m.in_features * m.out_features)) for n, m in lin.items()]
        owner = lpt_assign(costs, d.world_size)
        mine: dict[str, CompressedLinear] = {}
        err = None
        try:
            for j, (name, m) in enumerate(lin.items()):
                if owner[j] == d.rank:
                    c = self._compress_one(i, j, m, acc[name].stats())
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

    def _forward_dist(
        self, i: int, block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]
    ) -> list[torch.Tensor]:
        """This rank's batches through the compressed block: the next block's inputs."""
        d, err, outs = self.dist, None, inputs
        tf = time.perf_counter()
        try:
            outs = self._run_block(block, inputs, kwargs)
        except Exception as e:  # noqa: BLE001 - agreed, then raised on every rank
            err = e
        d.add("forward_s", time.perf_counter() - tf)
        d.agree(err, f"running block {i} for the next block's inputs")
        return outs

    def _install(
        self,
        i: int,
        block: nn.Module,
        name: str,
        linear: nn.Linear,
        c: CompressedLinear,
        result: CalibrationResult,
    ) -> None:
        on_dev = _to_dev(c, linear.weight.device)
        self.install_fn(block, name, linear, on_dev)
        c.metrics.update(on_dev.metrics)  # install may add metrics (packed bits per weight)
        self._record(i, name, linear, c, result)

    def _record(
        self, i: int, name: str, linear: nn.Module, c: CompressedLinear, result: CalibrationResult
    ) -> None:
        full = f"{self.block_prefix}.{i}.{name}"
        if self.keep_layers:
            result.layers[full] = c
        result.reports.append(
            {
                "name": full,
                "block": i,
                "d_out": linear.out_features,
                "d_in": linear.in_features,
                **{k: float(v) for k, v in c.metrics.items()},
            }
        )


def _mean_metric(results: dict[str, CompressedLinear], key: str) -> float:
    vals = [c.metrics[key] for c in results.values() if key in c.metrics]
    return sum(vals) / len(vals) if vals else float("nan")


def _map_tensors(
    c: CompressedLinear, fn: Callable[[torch.Tensor], torch.Tensor]
) -> CompressedLinear:
    def qt(q: QuantTensor | None) -> QuantTensor | None:
        if q is None:
            return None
        return QuantTensor(
            fn(q.q),
            fn(q.scale),
            q.group_size,
            q.bits,
            None if q.in_scale is None else fn(q.in_scale),
        )

    opt = lambda t: None if t is None else fn(t)
    return CompressedLinear(
        weight=fn(c.weight),
        weight_q=qt(c.weight_q),
        mask=opt(c.mask),
        lora_l=opt(c.lora_l),
        lora_r=opt(c.lora_r),
        lora_l_q=qt(c.lora_l_q),
        lora_r_q=qt(c.lora_r_q),
        metrics=dict(c.metrics),
    )


def _to_cpu(c: CompressedLinear) -> CompressedLinear:
    return _map_tensors(c, lambda t: t if t.is_meta else t.detach().to("cpu"))


def _to_dev(c: CompressedLinear, device: torch.device) -> CompressedLinear:
    if device.type == "cpu":
        return c
    return _map_tensors(c, lambda t: t if t.is_meta else t.to(device))
