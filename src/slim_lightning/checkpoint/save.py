"""Packed compressed checkpoints: the layout, and saving a compressed model.

A checkpoint directory holds:

* ``model.safetensors``: the model's ``state_dict``. Every ``SLiMLinear`` contributes its packed
  buffers (4-bit codes, sparsity metadata, scales, packed adapters) and its adapter parameters;
  the rest (embeddings, norms, LM head) is stored as it is in the model. A tied LM head is stored
  once (under the embedding's name).
* ``config.json`` and the tokenizer files: the base model's Hugging Face config and tokenizer.
* ``slim.json``: ``{"format": "slim-lightning", "version": 1, "layers": {module name:
  SLiMLinear.meta()}, "plan": method and every option, "versions": package versions,
  "calibration": fingerprint, "results": evaluation results of the run that wrote it,
  "base_sha256": digest of the packed base (what fine-tuning checkpoints are tied to),
  "source_sha256": ``models.weights_digest`` of the dense model it came from (distillation's
  teacher is checked against it; null when unknown), "files": {file name: sha256} of every
  other file}``, written last.

The directory is written under a temporary name and renamed when complete, so a crash never leaves
a half-written checkpoint. Loading is in ``checkpoint.load``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..dtypes import FLOAT_DTYPES as _FLOAT
from ..io import atomic_dir
from .layout import FORMAT, META, VERSION, WEIGHTS, written_sizes


def _tied_keys(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{key: earlier key}`` for every tensor that shares storage with an earlier one (tied
    embeddings: a float LM head weight, or a quantised head's packed buffers)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    dup = {}
    for k, v in sd.items():
        if v.device.type == "meta":
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            dup[k] = seen[key]
        else:
            seen[key] = k
    return dup


def save_compressed(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    plan: Any = None,
    results: dict[str, Any] | None = None,
    calibration: str | None = None,
    dtype: str | None = None,
    base_sha256: str | None = None,
    source_sha256: str | None = None,
) -> Path:
    """Writes ``model`` (with ``SLiMLinear`` layers installed) as a packed checkpoint.

    Each thing is stored once: packed weights and quantised adapters as their codes and scales
    (the fp32 adapter parameters are rebuilt from them on load, bit-exactly; off-grid parameters
    are re-quantised first, which is what the forward computes anyway), fp adapters at their
    ``adapter_dtype``, everything else (embeddings, norms, lm_head, biases) at ``dtype``.
    ``slim.json`` records the sizes measured from the written file. A model whose decoder
    blocks wait on disk (a streaming run) is written by ``stream_save.save_streaming`` instead:
    sharded, one block at a time, the same tensors and metadata.

    Args:
        model: a Hugging Face causal LM whose compressed linears are ``SLiMLinear`` modules.
        tokenizer: its tokenizer (saved alongside; may be None).
        out_dir: target directory (replaced atomically if it exists).
        plan: the ``CompressPlan`` (method and every option are recorded).
        results: evaluation results to record (e.g. the run's ``ppl``).
        calibration: calibration-data fingerprint.
        dtype: storage dtype of the uncompressed tensors (default: the model's own). Lossless
            when the values were rounded to it (``models.round_uncompressed``; the pipeline does).
        base_sha256: ``adapters.state_hashes(model)["base"]`` when the caller already has it
            (hashing a large packed base twice is avoidable work); computed otherwise.
        source_sha256: ``models.weights_digest`` of the dense model it was compressed from
            (recorded, so distillation can refuse a teacher that is not its parent).

    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.torch import save_file

    from ..io import dir_sha256, fault_point
    from ..nn.adapters import state_hashes
    from ..nn.linear import SLiMLinear

    out_dir = Path(out_dir)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, SLiMLinear)}
    if not mods:
        raise ValueError("save_compressed: the model has no SLiMLinear layers (nothing is packed)")
    compute = str(next(model.parameters()).dtype).removeprefix("torch.")
    store = storage_dtype(dtype, compute)
    for m in mods.values():
        if not m.adapters_on_grid():
            m.requantize_adapters()
    layers = {n: m.meta() for n, m in mods.items()}
    embeddings = packed_embeddings(model)
    head = model.get_output_embeddings()
    sized = {n: m for n, m in mods.items() if m is not head}  # the head counts with the rest
    sd = model.state_dict()
    tied_to = _tied_keys(model, sd)
    tied = list(tied_to)
    tensors = {}
    for k, v in sd.items():
        if k in tied:
            continue
        v = stored_tensor(k, v, mods, store, layers)
        if v is not None:
            tensors[k] = v
    meta = checkpoint_meta(
        layers,
        tied_to,
        embeddings,
        store,
        compute,
        base_sha256 or state_hashes(model)["base"],
        plan=plan,
        results=results,
        calibration=calibration,
        source_sha256=source_sha256,
    )
    with atomic_dir(out_dir) as tmp:
        fault_point(f"write {out_dir.name}/{WEIGHTS}")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        write_config(tmp, model, tokenizer, meta, out_dir.name)
        meta["size"] = written_sizes(tmp / WEIGHTS, model, sized, tied)
        # every file's sha256, so a load can verify that nothing changed since it was written
        meta["files"] = dir_sha256(tmp, exclude=(META,))
        fault_point(f"write {out_dir.name}/{META}")
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    return out_dir


def storage_dtype(dtype: str | None, compute: str) -> str:
    """The dtype the uncompressed tensors are stored in (``dtype``, default ``compute``)."""
    store = dtype or compute
    if store not in _FLOAT:
        raise ValueError(f"save_compressed: dtype {store!r}; allowed: {', '.join(_FLOAT)}")
    return store


def packed_embeddings(model: nn.Module) -> dict[str, dict]:
    """``{name: meta}`` of the quantised vocabulary tables (``PackedEmbedding``)."""
    from ..nn.embedding import PackedEmbedding

    return {n: m.meta() for n, m in model.named_modules() if isinstance(m, PackedEmbedding)}


def stored_tensor(
    key: str, value: torch.Tensor, mods: dict[str, nn.Module], store: str, layers: dict
) -> torch.Tensor | None:
    """One state-dict entry as the checkpoint stores it (None: not stored; ``stored_dtype``).

    Args:
        key: the full state-dict key.
        value: its tensor.
        mods: the compressed layers (``SLiMLinear``) by full name (at least the key's owner).
        store: storage dtype of the uncompressed tensors.
        layers: the layers' metadata (``bias_dtype`` is updated in place).
    """
    dtype = stored_dtype(key, value.dtype, mods, store, layers)
    if dtype is None:
        return None
    return value.to(dtype).detach().to("cpu").contiguous()


def stored_dtype(
    key: str, dtype: torch.dtype, mods: dict[str, nn.Module], store: str, layers: dict
) -> torch.dtype | None:
    """The dtype a state-dict entry is stored in (None: not stored).

    4-bit adapters' fp32 parameters are not stored (rebuilt from their codes on load); fp
    adapters go to their ``adapter_dtype``; a compressed layer's bias and every other floating
    tensor to ``store`` (recorded as the layer's ``bias_dtype`` in ``layers``); packed buffers
    stay as they are. Arguments as ``stored_tensor``'s.
    """
    owner, _, attr = key.rpartition(".")
    mod = mods.get(owner)
    if mod is not None and attr in ("lora_l", "lora_r"):
        if mod.adapter_bits is not None:
            return None  # rebuilt from the packed codes on load
        return _FLOAT[mod.adapter_dtype]
    if mod is not None and attr == "bias":
        layers[owner]["bias_dtype"] = store
        return _FLOAT[store]
    if mod is None and dtype.is_floating_point:
        return _FLOAT[store]
    return dtype


def checkpoint_meta(
    layers: dict[str, dict],
    tied_to: dict[str, str],
    embeddings: dict[str, dict],
    store: str,
    compute: str,
    base_sha256: str,
    *,
    plan: Any,
    results: dict[str, Any] | None,
    calibration: str | None,
    source_sha256: str | None = None,
) -> dict[str, Any]:
    """``slim.json`` without ``size`` and ``files`` (see the module docstring)."""
    from .layout import package_versions

    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "layers": layers,
        "tied": list(tied_to),
        "tied_to": tied_to,
        "embeddings": embeddings,
        "dtype": store,
        "compute_dtype": compute,
        "base_sha256": base_sha256,
        "versions": package_versions(),
        "calibration": calibration,
        "source_sha256": source_sha256,
        "results": _jsonable(results or {}),
    }
    if plan is not None:
        meta["plan"] = {
            "method": getattr(plan, "method_name", None),
            "spec": asdict(plan.spec),
            "model": _jsonable(plan.model),
            "calib": _jsonable(getattr(plan, "calib", None)),
            "seed": getattr(plan, "seed", None),
        }
    return meta


def write_config(tmp: Path, model: nn.Module, tokenizer: Any, meta: dict, label: str) -> None:
    """``config.json`` (with the ``quantization_config`` transformers' ``slim`` quantizer
    builds the model from), ``generation_config.json`` and the tokenizer files into ``tmp``."""
    from ..io import fault_point

    config = copy.deepcopy(model.config)  # the caller's model keeps its own config
    # what transformers' "slim" quantizer (hf_quantizer.py) builds the model from
    config.quantization_config = hf_quantization_config(
        meta["layers"], meta["embeddings"], meta["tied_to"], meta["dtype"], meta["compute_dtype"]
    )
    config.use_cache = True  # generate() with the KV cache, as users expect
    fault_point(f"write {label}/config.json")
    config.save_pretrained(tmp)
    _generation_config(model, config).save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def hf_quantization_config(
    layers: dict[str, dict],
    embeddings: dict[str, dict],
    tied_to: dict[str, str],
    dtype: str,
    compute_dtype: str,
) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``: everything ``from_pretrained`` needs to build
    the compressed skeleton (``quant_method: slim``; read by ``hf_quantizer.SLiMHfQuantizer``)."""
    return {
        "quant_method": "slim",
        "format": FORMAT,
        "version": VERSION,
        "layers": layers,
        "embeddings": embeddings,
        "tied_to": tied_to,
        "dtype": dtype,
        "compute_dtype": compute_dtype,
    }


def record_meta(out_dir: str | Path, model: nn.Module, loaded_meta: dict[str, Any]) -> None:
    """Writes ``slim.json`` into a directory that transformers' ``save_pretrained`` just wrote
    from a loaded packed model: the loaded metadata with the stored dtype and every file's
    sha256 brought up to date, so the copy loads (and verifies) like the original."""
    from ..io import atomic_write_bytes, dir_sha256

    out_dir = Path(out_dir)
    meta = copy.deepcopy(loaded_meta)
    dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    if dtype in _FLOAT:
        meta["dtype"] = dtype
    meta["files"] = dir_sha256(out_dir, exclude=(META,))
    atomic_write_bytes(out_dir / META, json.dumps(meta, indent=2, default=str).encode())


def _generation_config(model: nn.Module, config: Any) -> Any:
    """The model's generation config (or one derived from ``config``) with the KV cache on."""
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None)
    gen = copy.deepcopy(gen) if gen is not None else GenerationConfig.from_model_config(config)
    gen.use_cache = True
    return gen


def _jsonable(obj: Any) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return json.loads(json.dumps(obj, default=str))
