"""Layer-wise calibration engine: the driver every compression method plugs into.

For each decoder block, in order:
  1. run the block on the calibration activations (inputs come from the already-compressed
     previous blocks) with forward hooks that accumulate each linear's input statistics in fp32;
  2. compress every linear of the block with ``compress_fn`` (``core.compress.compress_linear``);
  3. install the result (``install_fn``: merge into the dense weight, or a packed ``SLiMLinear``);
  4. re-run the block to produce the next block's inputs;
  5. commit the block's results and the next inputs in ``state_dir`` (files first, then the
     ``progress.json`` record that names them with their sha256) so a killed run resumes from
     the last committed block and ends bit-identical to an uninterrupted one.

The model stays on CPU; only the current block and its activations go to ``device``.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .core.types import CompressedLinear, CompressSpec, LayerStats, QuantTensor
from .io import (
    atomic_save_tensors,
    atomic_write_json,
    file_sha256,
    load_tensors,
    make_dir,
    remove_stale_temps,
)

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


class ResumeStateDiscarded(UserWarning):
    """Saved calibration state could not be reused (other configuration, missing or corrupt)."""


STATE_FORMAT = 2


def _inputs_name(i: int) -> str:
    return f"inputs_{i:04d}.safetensors"


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


def canonicalize(c: CompressedLinear) -> CompressedLinear:
    """Recomputes the dense views from the quantised parts so a reload is bit-identical."""
    if c.weight_q is not None:
        w = c.weight_q.dequantize()
        c.weight = w * c.mask.to(w.dtype) if c.mask is not None else w
    if c.lora_l_q is not None:
        c.lora_l = c.lora_l_q.dequantize().T.contiguous()
    if c.lora_r_q is not None:
        c.lora_r = c.lora_r_q.dequantize().T.contiguous()
    return c


def _qt_to(prefix: str, qt: QuantTensor, out: dict, meta: dict) -> None:
    out[f"{prefix}.q"] = qt.q
    out[f"{prefix}.scale"] = qt.scale
    if qt.in_scale is not None:
        out[f"{prefix}.in_scale"] = qt.in_scale
    meta[prefix] = {"group_size": qt.group_size, "bits": qt.bits}


def _qt_from(prefix: str, t: dict, meta: dict) -> QuantTensor | None:
    if prefix not in meta:
        return None
    return QuantTensor(
        q=t[f"{prefix}.q"],
        scale=t[f"{prefix}.scale"],
        in_scale=t.get(f"{prefix}.in_scale"),
        **meta[prefix],
    )


def compressed_to_tensors(name: str, c: CompressedLinear) -> tuple[dict, dict]:
    """Flattens a CompressedLinear into safetensors-ready tensors and JSON metadata."""
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {f"{name}.metrics": c.metrics}
    if c.weight_q is not None:
        _qt_to(f"{name}.weight_q", c.weight_q, out, meta)
    else:
        out[f"{name}.weight"] = c.weight
    if c.mask is not None:
        out[f"{name}.mask"] = c.mask
    for attr in ("lora_l_q", "lora_r_q"):
        qt = getattr(c, attr)
        if qt is not None:
            _qt_to(f"{name}.{attr}", qt, out, meta)
    for attr in ("lora_l", "lora_r"):
        if getattr(c, attr) is not None and getattr(c, attr + "_q") is None:
            out[f"{name}.{attr}"] = getattr(c, attr)
    return out, meta


def compressed_from_tensors(name: str, t: dict, meta: dict) -> CompressedLinear:
    """Inverse of :func:`compressed_to_tensors`."""
    c = CompressedLinear(
        weight=t.get(f"{name}.weight", torch.empty(0)),
        weight_q=_qt_from(f"{name}.weight_q", t, meta),
        mask=t.get(f"{name}.mask"),
        lora_l=t.get(f"{name}.lora_l"),
        lora_r=t.get(f"{name}.lora_r"),
        lora_l_q=_qt_from(f"{name}.lora_l_q", t, meta),
        lora_r_q=_qt_from(f"{name}.lora_r_q", t, meta),
        metrics=meta.get(f"{name}.metrics", {}),
    )
    return canonicalize(c)


class CalibrationEngine:
    """Compresses a decoder-only model block by block.

    Args:
        blocks: the model's decoder blocks, in order.
        linear_names: dotted names of the linears to compress inside each block.
        spec: the compression spec handed to ``compress_fn``.
        compress_fn: ``(W fp32 (d_out, d_in), LayerStats, spec) -> CompressedLinear``.
        install_fn: puts a result into the model (default: merge into the dense weight).
        device: where the current block and its activations run.
        state_dir: where per-block state is saved for resume (None: no resume).
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
    ):
        self.blocks, self.linear_names, self.spec = blocks, linear_names, spec
        self.compress_fn, self.install_fn = compress_fn, install_fn
        self.device = torch.device(device)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.fingerprint, self.seed, self.progress = fingerprint, seed, progress
        self.offload_inputs, self.block_prefix = offload_inputs, block_prefix
        self.keep_layers = keep_layers

    # -- resume state -------------------------------------------------------------------------
    # Layout of ``state_dir`` (format 2):
    #   block_NNNN.safetensors / block_NNNN.json  block NNNN's compressed layers and metadata
    #   inputs_NNNN.safetensors                   the calibration activations entering block NNNN
    #   progress.json                             the commit record, written last (fsync'd):
    #       {"format": 2, "fingerprint", "n_blocks", "next_block", "files": {name: sha256}}
    # Block i is committed only when progress.json names its files and inputs_{i+1}; the
    # previous inputs file is deleted after that. A kill anywhere leaves either the old record
    # (block i is recomputed from inputs_i, which still exists) or the new one (complete files).
    # On resume every file in the record is verified against its sha256; a record written by
    # another configuration (fingerprint) or with missing/corrupt files is discarded loudly.
    def _progress_file(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "progress.json"

    def _discard_state(self, reason: str) -> None:
        assert self.state_dir is not None
        msg = f"discarding resume state in {self.state_dir}: {reason}; compressing from block 0"
        log.warning(msg)
        warnings.warn(msg, ResumeStateDiscarded, stacklevel=3)
        self.discarded = reason
        for f in self.state_dir.iterdir():
            if f.is_file() and (f.name.startswith(("block_", "inputs", "progress", "."))):
                f.unlink(missing_ok=True)

    def _load_progress(self) -> int:
        pf = self._progress_file()
        if pf is None or not pf.parent.is_dir():
            return 0
        if not pf.exists():
            if any(pf.parent.glob("block_*")) or any(pf.parent.glob("inputs*")):
                self._discard_state("block files without a progress record")
            return 0
        try:
            prog = json.loads(pf.read_text())
            if not isinstance(prog, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            self._discard_state(f"{pf} is unreadable ({e})")
            return 0
        if prog.get("format") != STATE_FORMAT:
            self._discard_state(f"{pf} has state format {prog.get('format')!r}, not {STATE_FORMAT}")
            return 0
        if prog.get("fingerprint") != self.fingerprint or prog.get("n_blocks") != len(self.blocks):
            self._discard_state(
                f"it was written by a different run (fingerprint {prog.get('fingerprint')!r} != "
                f"{self.fingerprint!r}: the model weights, calibration data, method options, "
                "seed, engine.batch_size or device differ)"
            )
            return 0
        nxt = prog.get("next_block")
        files = prog.get("files")
        if (
            not isinstance(nxt, int)
            or not 0 <= nxt <= len(self.blocks)
            or not isinstance(files, dict)
        ):
            self._discard_state(f"{pf} is malformed")
            return 0
        need = [f"block_{i:04d}.{ext}" for i in range(nxt) for ext in ("safetensors", "json")]
        if 0 < nxt < len(self.blocks):
            need.append(_inputs_name(nxt))
        for name in need:
            f = self.state_dir / name
            if name not in files or not f.is_file():
                self._discard_state(f"{f} is missing")
                return 0
            if file_sha256(f) != files[name]:
                self._discard_state(f"{f} does not match its sha256 in {pf.name} (corrupt)")
                return 0
        self._committed = {k: files[k] for k in need}
        return nxt

    def _save_block(
        self, i: int, results: dict[str, CompressedLinear], inputs: list[torch.Tensor]
    ) -> None:
        assert self.state_dir is not None
        tensors, meta = {}, {}
        for name, c in results.items():
            t, m = compressed_to_tensors(name, c)
            tensors.update(t)
            meta.update(m)
        written = {}
        for fname, write in (
            (f"block_{i:04d}.safetensors", lambda p: atomic_save_tensors(tensors, p)),
            (f"block_{i:04d}.json", lambda p: atomic_write_json(p, meta)),
        ):
            write(self.state_dir / fname)
            written[fname] = file_sha256(self.state_dir / fname)
        if i + 1 < len(self.blocks):
            fname = _inputs_name(i + 1)
            atomic_save_tensors({f"b{j}": x for j, x in enumerate(inputs)}, self.state_dir / fname)
            written[fname] = file_sha256(self.state_dir / fname)
        files = {k: v for k, v in self._committed.items() if k.startswith("block_")}
        files.update(written)
        # progress.json is written last: it is the commit point of block i
        atomic_write_json(
            self._progress_file(),
            {
                "format": STATE_FORMAT,
                "fingerprint": self.fingerprint,
                "n_blocks": len(self.blocks),
                "next_block": i + 1,
                "files": files,
            },
        )
        self._committed = files
        (self.state_dir / _inputs_name(i)).unlink(missing_ok=True)  # superseded

    def _load_block(self, i: int) -> dict[str, CompressedLinear]:
        assert self.state_dir is not None
        t = load_tensors(self.state_dir / f"block_{i:04d}.safetensors")
        meta = json.loads((self.state_dir / f"block_{i:04d}.json").read_text())
        return {n: compressed_from_tensors(n, t, meta) for n in self.linear_names}

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
        self._committed: dict[str, str] = {}
        self.discarded: str | None = None
        start = 0
        if self.state_dir is not None:
            make_dir(self.state_dir)
            remove_stale_temps(self.state_dir)
            start = self._load_progress()
        kwargs = [to_device(kw, self.device) for kw in kwargs]
        for i in range(start):  # re-install finished blocks from their saved state
            block = self.blocks[i]
            lin = self._linears(block)
            for name, c in self._load_block(i).items():
                self._install(i, block, name, lin[name], c, result)
        if start > 0 and start < len(self.blocks):
            saved = load_tensors(self.state_dir / _inputs_name(start))
            inputs = [saved[f"b{j}"] for j in range(len(saved))]
        result.resumed_blocks = start
        result.discarded_state = self.discarded
        result.fingerprint = self.fingerprint
        inputs = [x if self.offload_inputs else x.to(self.device) for x in inputs]

        bar = tqdm(
            range(start, len(self.blocks)),
            desc="Compressing blocks",
            disable=not self.progress,
            initial=start,
            total=len(self.blocks),
        )
        for i in bar:
            block = self.blocks[i].to(self.device)
            lin = self._linears(block)
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
                # a fixed per-layer seed keeps randomized SVDs identical across resumes
                torch.manual_seed(self.seed * 1_000_003 + i * 1009 + j)
                tl = time.perf_counter()
                c = self.compress_fn(m.weight.data.float(), hooks[name].stats(), self.spec)
                c = canonicalize(_to_cpu(c))
                c.metrics["time_s"] = time.perf_counter() - tl
                results[name] = c
            del hooks
            for name, c in results.items():
                self._install(i, block, name, lin[name], c, result)
            inputs = self._run_block(block, inputs, kwargs)
            self.blocks[i].to("cpu")
            if self.state_dir is not None:
                self._save_block(i, results, [x.to("cpu") for x in inputs])
            bar.set_postfix(block=i, err=f"{_mean_metric(results, 'err_final'):.3g}")
        result.seconds = time.perf_counter() - t0
        return result

    def _install(
        self,
        i: int,
        block: nn.Module,
        name: str,
        linear: nn.Linear,
        c: CompressedLinear,
        result: CalibrationResult,
    ) -> None:
        full = f"{self.block_prefix}.{i}.{name}"
        on_dev = _to_dev(c, linear.weight.device)
        self.install_fn(block, name, linear, on_dev)
        c.metrics.update(on_dev.metrics)  # install may add metrics (packed bits per weight)
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
    return _map_tensors(c, lambda t: t.detach().to("cpu"))


def _to_dev(c: CompressedLinear, device: torch.device) -> CompressedLinear:
    return c if device.type == "cpu" else _map_tensors(c, lambda t: t.to(device))
