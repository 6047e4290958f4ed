"""The compression driver shared by ``compress.py`` and ``train.py``.

``compress_model`` walks the model with the calibration engine and installs the results;
``install_slim_linear`` swaps each compressed ``nn.Linear`` for a packed ``SLiMLinear``.
(``merge_to_dense`` lives in :mod:`slim_lightning.adapters`; it is re-exported here.)
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import merge_to_dense as merge_to_dense  # re-export
from .calibration import CalibrationEngine, CalibrationResult, capture_block_inputs, merge_install
from .config import CompressPlan, resolve_device
from .core.types import CompressedLinear, CompressSpec


def is_identity(spec: CompressSpec) -> bool:
    """True for the ``dense`` method: nothing is pruned, quantised or added."""
    return (
        spec.sparsity.pattern == "dense"
        and spec.quant.method == "none"
        and spec.lowrank.method == "none"
    )


def install_slim_linear(
    block: nn.Module,
    name: str,
    linear: nn.Linear,
    c: CompressedLinear,
    adapter_dtype: str = "float32",
) -> None:
    """Replaces ``block.<name>`` by a packed ``SLiMLinear`` built from ``c`` (reference backend).

    fp adapters are rounded to ``adapter_dtype`` (their storage dtype) before anything uses them.
    """
    from .modules import SLiMLinear

    bias = None if linear.bias is None else linear.bias.detach().float()
    new = SLiMLinear.from_compressed(c, bias, adapter_dtype=adapter_dtype)
    if new.rank and new.adapter_bits is None:  # the next blocks see the stored adapters
        c.lora_l, c.lora_r = new.lora_l.detach().clone(), new.lora_r.detach().clone()
    c.metrics["bits_per_weight"] = packed_bits_per_weight(new)
    new.to(linear.weight.device)
    block.set_submodule(name, new)


def packed_bits_per_weight(layer: nn.Module) -> float:
    """Bits per dense weight of a packed ``SLiMLinear``: 8 x its stored bytes / (d_out x d_in).

    Every stored byte counts (codes, N:M positions or bitmap, row offsets, scales, adapters and
    their scales, padding): the one accounting of size that reports use.
    """
    return 8.0 * layer.packed_nbytes() / (layer.in_features * layer.out_features)


def merge_install_counted(
    block: nn.Module, name: str, linear: nn.Linear, c: CompressedLinear
) -> None:
    """``merge_install`` that still reports the packed size the layer would have."""
    from .modules import SLiMLinear

    if c.weight_q is not None or c.mask is not None or c.lora_l is not None:
        c.metrics["bits_per_weight"] = packed_bits_per_weight(SLiMLinear.from_compressed(c))
    merge_install(block, name, linear, c)


def plan_fingerprint(
    plan: CompressPlan,
    calib_ids: torch.Tensor,
    model_digest: str,
    packed: bool = True,
    export_dtype: str = "float32",
) -> str:
    """Hash of everything that determines the compressed weights (keys the resume state).

    Covers the compression spec, the model config and its weights' digest, the calibration
    token ids, the seed, ``engine.batch_size`` (it sets the order of the fp32 statistic sums),
    the device type, whether layers are installed packed (the next block's inputs differ in
    rounding) and the torch / slim-lightning versions.
    """
    from . import __version__

    h = hashlib.sha256()
    record = {
        "spec": asdict(plan.spec),
        "model": _plain(plan.model),
        "weights": model_digest,
        "seed": plan.seed,
        "batch_size": plan.engine.batch_size,
        "device": torch.device(resolve_device(plan.device)).type,
        "packed": packed,
        "export_dtype": export_dtype,
        "torch": torch.__version__,
        "slim_lightning": __version__,
    }
    h.update(json.dumps(record, sort_keys=True, default=str).encode())
    ids = calib_ids.detach().cpu().contiguous()
    h.update(f"{ids.dtype}|{tuple(ids.shape)}".encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()[:16]


def _plain(obj: Any) -> Any:
    try:
        return asdict(obj)
    except TypeError:
        return str(obj)


def compress_model(
    model: nn.Module,
    plan: CompressPlan,
    calib_ids: torch.Tensor,
    run_dir: str | Path | None,
    *,
    packed: bool = True,
    keep_layers: bool = False,
    model_digest: str | None = None,
    export_dtype: str = "float32",
) -> CalibrationResult:
    """Compresses ``model`` in place with the plan's spec, one decoder block at a time.

    Args:
        model: a Hugging Face causal LM on CPU.
        calib_ids: int64 ``(nsamples, seqlen)`` calibration windows.
        run_dir: where resume state goes (``run_dir/calib_state``); None disables resume.
        packed: install ``SLiMLinear`` modules (True) or merge into dense weights (False).
        model_digest: digest of the uncompressed weights (``models.weights_digest``); computed
            from ``model``'s tensors when None.
        export_dtype: storage dtype of fp adapters (and of the uncompressed tensors, which the
            caller has already rounded with ``models.round_uncompressed``).
    """
    from .core.compress import compress_linear
    from .io import tensors_sha256
    from .models import get_arch, get_blocks

    arch = get_arch(model)
    blocks = get_blocks(model, arch)
    if is_identity(plan.spec):
        return CalibrationResult()
    device = resolve_device(plan.device)
    inputs, kwargs = capture_block_inputs(model, blocks[0], calib_ids, plan.engine.batch_size)
    state_dir = None
    if run_dir is not None and plan.engine.resume:
        state_dir = Path(run_dir) / "calib_state"
    engine = CalibrationEngine(
        blocks,
        tuple(arch.linear_names),
        plan.spec,
        compress_linear,
        install_fn=(
            functools.partial(install_slim_linear, adapter_dtype=export_dtype)
            if packed
            else merge_install_counted
        ),
        device=device,
        state_dir=state_dir,
        fingerprint=plan_fingerprint(
            plan,
            calib_ids,
            model_digest or tensors_sha256(model.state_dict()),
            packed,
            export_dtype,
        ),
        seed=plan.seed,
        progress=plan.engine.progress,
        offload_inputs=plan.engine.offload_inputs,
        block_prefix=arch.blocks_path,
        keep_layers=keep_layers,
    )
    return engine.run(inputs, kwargs)
