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

from ..core.grouped import GroupQuant
from ..core.types import CompressedLinear, CompressSpec, LayerStats, QuantTensor
from ..memory import PROGRESS
from ..models.arch import block_kwargs, block_output, to_device
from .resume import BlockStore, canonicalize
from .steps import LocalStep

log = logging.getLogger(__name__)

CompressFn = Callable[[torch.Tensor, LayerStats, CompressSpec], CompressedLinear]
InstallFn = Callable[[nn.Module, str, nn.Linear, CompressedLinear], None]


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
    experts: dict[str, Any] | None = None  # MoE: calibration tokens per expert (pipeline)


def merge_install(block: nn.Module, name: str, linear: nn.Linear, c: CompressedLinear) -> None:
    """Default install: the dense weight becomes exactly what the compressed layer computes."""
    linear.weight.data.copy_(c.effective_weight().to(linear.weight.dtype))


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
        block_step: Any = None,
        offload_blocks: bool = False,
        dense_views: bool = True,
        reconstruct: Any = None,
        norm_dtype: torch.dtype = torch.float32,
    ):
        self.blocks, self.linear_names, self.spec = blocks, linear_names, spec
        self.compress_fn, self.install_fn = compress_fn, install_fn
        self.device = torch.device(device)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.fingerprint, self.seed, self.progress = fingerprint, seed, progress
        self.offload_inputs, self.block_prefix = offload_inputs, block_prefix
        self.keep_layers = keep_layers
        # streaming (slim_lightning.compress.streaming): called with stage "resume" / "load" before a
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
        # how one block's statistics, compression and forward run (``steps.make_step``): this
        # process alone (default), or a rank of a distributed run (``steps.DistributedStep``:
        # this rank's batches, statistics exchanged, linears spread over ranks; no resume state)
        self.step = LocalStep() if block_step is None else block_step
        # block-wise reconstruction (``reconstruct.ReconConfig`` with mode "block", else None):
        # the dense path's activations are carried beside the compressed ones as its targets
        self.recon = reconstruct if getattr(reconstruct, "mode", "none") == "block" else None
        self.norm_dtype = norm_dtype

    # -- main loop ----------------------------------------------------------------------------
    def _linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        mods = dict(block.named_modules())
        missing = [n for n in self.linear_names if n not in mods]
        if missing:
            raise KeyError(f"block has no modules {missing}; it has {sorted(mods)[:20]}...")
        return {n: mods[n] for n in self.linear_names}

    def run_block(
        self, block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]
    ) -> list[torch.Tensor]:
        outs = []
        for x, kw in zip(inputs, kwargs):
            y = block_output(block(x.to(self.device), **kw))
            outs.append(y.to("cpu") if self.offload_inputs else y)
        return outs

    @torch.no_grad()
    def run(self, inputs: list[torch.Tensor], kwargs: list[Any]) -> CalibrationResult:
        """Compresses every block, given the first block's inputs and, per batch, the blocks'
        keyword arguments (``arch.capture_block_inputs``: a ``PerBlock`` or one shared dict)."""
        t0 = time.perf_counter()
        result = CalibrationResult()
        self.discarded: str | None = None
        store, start = None, 0
        if self.state_dir is not None and self.step.resumable:
            store = BlockStore(
                self.state_dir, self.fingerprint, len(self.blocks), self.linear_names
            )
            start = store.load_progress()
            self.discarded = store.discarded
        inputs, kwargs = self.step.select(inputs, kwargs)
        memo: dict[int, Any] = {}  # arguments the blocks share move once
        all_kwargs = [to_device(kw, self.device, memo) for kw in kwargs]
        offload = self.offload_blocks
        for i in range(start):  # re-install finished blocks from their saved state
            self._reinstall(store, i, result)
            if offload:  # (one at a time: each resumed block goes back to disk)
                self.block_hook(i, self.blocks[i], "offload")
                self.offloaded.append(i)
        dense = list(inputs) if self.recon is not None else None  # the dense path's inputs
        if start > 0 and start < len(self.blocks):
            inputs = store.load_inputs(start)
            if dense is not None:
                dense = store.load_inputs(start, dense=True)
        result.resumed_blocks = start
        result.discarded_state = self.discarded
        result.fingerprint = self.fingerprint
        inputs = [x if self.offload_inputs else x.to(self.device) for x in inputs]
        if dense is not None:
            dense = [x if self.offload_inputs else x.to(self.device) for x in dense]

        bar = tqdm(
            range(start, len(self.blocks)),
            desc="Compressing blocks",
            disable=not self.progress or not self.step.shows_progress,
            initial=start,
            total=len(self.blocks),
        )
        for i in bar:
            tb = time.perf_counter()
            if self.block_hook is not None:
                self.block_hook(i, self.blocks[i], "load")
            block = self.blocks[i].to(self.device)
            lin = self._linears(block)
            kwargs = block_kwargs(all_kwargs, i)  # block i's own masks and position tables
            install = lambda n, c, i=i, block=block, lin=lin: self._install(  # noqa: E731
                i, block, n, lin[n], c, result
            )
            norms: dict[str, torch.Tensor] = {}
            if self.recon is None:
                # each linear installed as soon as the step hands it over (its dense weight can go)
                results = self.step.compress(self, i, block, lin, inputs, kwargs, install)
            else:  # installed once the block is reconstructed
                results, norms, dense = self._reconstructed(i, block, lin, inputs, dense, kwargs)
                for name, c in results.items():
                    install(name, c)
            inputs = self.step.forward(self, i, block, inputs, kwargs)
            self.blocks[i].to("cpu")
            if store is not None:
                store.save_block(
                    i,
                    results,
                    [x.to("cpu") for x in inputs],
                    dense=None if dense is None else [x.to("cpu") for x in dense],
                    extra=norms,
                )
            if self.block_hook is not None:
                self.block_hook(i, self.blocks[i], "done")
            bar.set_postfix(block=i, err=f"{_mean_metric(results, 'err_final'):.3g}")
            PROGRESS.update(last_block=i, blocks=len(self.blocks))  # (saved when resumable)
            result.block_seconds.append(round(time.perf_counter() - tb, 4))
            del results, lin, block  # nothing of this block is held while the next one is read
            if offload:
                self.block_hook(i, self.blocks[i], "offload")
                self.offloaded.append(i)
        result.seconds = time.perf_counter() - t0
        return result

    def _reconstructed(
        self,
        i: int,
        block: nn.Module,
        lin: dict[str, nn.Linear],
        inputs: list[torch.Tensor],
        dense: list[torch.Tensor],
        kwargs: list[dict],
    ) -> tuple[dict[str, CompressedLinear], dict[str, torch.Tensor], list[torch.Tensor]]:
        """One-shot compression of block ``i``, then block-wise reconstruction
        (:mod:`.reconstruct`) against the dense block's outputs on the dense path.

        Returns the results to install, the trained norm gains and the next dense inputs.
        """
        from .reconstruct import reconstruct_block

        targets = self.run_block(block, dense, kwargs)  # the block is still dense here
        targets_c = self.run_block(block, inputs, kwargs) if self.recon.target_mix > 0 else None
        pending: dict[str, CompressedLinear] = {}
        # streaming packed installs (no dense views) read nothing of a compressed linear's dense
        # weight; the mask refinement scores positions with it
        free_dense = self.dense_views is False and self.recon.mask != "refine"

        def park(name: str, c: CompressedLinear) -> None:
            # the codes hold a quantised weight until it is reconstructed: its dense copy goes
            # now, not after the block's last linear (4 bytes per block weight)
            if c.weight_q is not None:
                c.weight = c.weight.new_empty(0)
            if free_dense:  # the packed install replaces the linear: its 16-bit weight goes
                w = lin[name].weight
                lin[name].weight = nn.Parameter(w.new_empty(0), requires_grad=False)
            pending[name] = c

        results = self.step.compress(self, i, block, lin, inputs, kwargs, park)
        gather = getattr(self.step, "gather", lambda xs: xs)  # every batch, on every rank
        results, norms, rep = reconstruct_block(
            block,
            lin,
            results,
            gather(inputs),
            gather(kwargs),
            gather(targets),
            self.recon,
            seed=self.seed * 1_000_003 + i * 1009 + 17,
            device=self.device,
            norm_dtype=self.norm_dtype,
            targets_c=None if targets_c is None else gather(targets_c),
            label=f"reconstruct block {i}",
            dense_views=self.dense_views is not False,
            mask_group=self.spec.sparsity.m if self.spec.sparsity.pattern == "nm" else 0,
        )
        log.info(
            "block %d reconstructed: held-out error %.4g -> %.4g (epoch %d, %.1f s)",
            i,
            rep["recon_err_before"],
            rep["recon_err_after"],
            rep["recon_best_epoch"],
            rep["recon_s"],
        )
        return results, norms, targets

    def _reinstall(self, store: BlockStore, i: int, result: CalibrationResult) -> None:
        """Installs block ``i``'s compressed linears (and trained norm gains) from the resume
        state."""
        block = self.blocks[i]
        if self.block_hook is not None:
            self.block_hook(i, block, "resume")
        lin = self._linears(block)
        for name, c in store.load_block(i).items():
            self._install(i, block, name, lin[name], c, result)
        params = dict(block.named_parameters())
        with torch.no_grad():
            for name, t in store.load_extra(i).items():
                params[name].data.copy_(t.to(params[name].dtype))

    def reinstall_offloaded(self) -> None:
        """Reads back the blocks ``run`` offloaded (``offload_blocks``; hook stage ``reload``):
        afterwards the model is whole again (packed)."""
        for i in self.offloaded:
            self.block_hook(i, self.blocks[i], "reload")
        self.offloaded = []

    def compress_one(self, i: int, j: int, m: nn.Linear, stats: LayerStats) -> CompressedLinear:
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
            c = canonicalize(to_cpu(c))
        else:
            c.weight = torch.empty(c.weight.shape, dtype=torch.float32, device="meta")
            c = to_cpu(c)
        c.metrics["time_s"] = time.perf_counter() - tl
        return c

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
    def qt(q: QuantTensor | GroupQuant | None) -> QuantTensor | GroupQuant | None:
        if q is None:
            return None
        if isinstance(q, GroupQuant):
            return q.map(fn)
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


def to_cpu(c: CompressedLinear) -> CompressedLinear:
    return _map_tensors(c, lambda t: t if t.is_meta else t.detach().to("cpu"))


def _to_dev(c: CompressedLinear, device: torch.device) -> CompressedLinear:
    if device.type == "cpu":
        return c
    return _map_tensors(c, lambda t: t if t.is_meta else t.to(device))


def summarize_layers(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Parameter-weighted averages of per-layer statistics over all compressed linears."""
    if not reports:
        return {}
    numel = [r["d_in"] * r["d_out"] for r in reports]
    total = float(sum(numel))
    out: dict[str, float] = {"n_layers": float(len(reports)), "compressed_params": total}
    for key in (
        "bits_per_weight",
        "bits_formula",  # SpQR / SliM-LLM: the papers' count (codes, statistics, outliers)
        "outlier_share",
        "sparsity",
        "err_before_adapters",
        "err_after_adapters",
        "err_final",
    ):
        vals = [(r[key], n) for r, n in zip(reports, numel) if key in r and r[key] == r[key]]
        if vals:
            out[key] = sum(v * n for v, n in vals) / sum(n for _, n in vals)
    ranks = [r["rank"] for r in reports if "rank" in r]
    if ranks:
        out["mean_rank"] = sum(ranks) / len(ranks)
    return out
