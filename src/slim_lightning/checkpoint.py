"""Packed compressed checkpoints: save a compressed model, load it back without the original weights.

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
  "files": {file name: sha256} of every other file}``, written last.

The directory is written under a temporary name and renamed when complete, so a crash never leaves
a half-written checkpoint. ``load_compressed`` builds the model skeleton from ``config.json`` on
the meta device (no dense weights are ever allocated), swaps in empty ``SLiMLinear`` modules from
their metadata and assigns the stored tensors. It verifies the files' sha256 by default and
always checks metadata against config and tensors and that every scale is finite.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint_checks import (
    _FLOAT,
    FORMAT,
    META,
    VERSION,
    WEIGHTS,
    CheckpointError,
    _st_dtype,
    read_meta,
    verify_files,
    written_sizes,
)
from .io import atomic_dir, load_tensors


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
) -> Path:
    """Writes ``model`` (with ``SLiMLinear`` layers installed) as a packed checkpoint.

    Each thing is stored once: packed weights and quantised adapters as their codes and scales
    (the fp32 adapter parameters are rebuilt from them on load, bit-exactly; off-grid parameters
    are re-quantised first, which is what the forward computes anyway), fp adapters at their
    ``adapter_dtype``, everything else (embeddings, norms, lm_head, biases) at ``dtype``.
    ``slim.json`` records the sizes measured from the written file.

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

    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.torch import save_file

    from .adapters import state_hashes
    from .embeddings import PackedEmbedding
    from .io import fault_point, file_sha256
    from .modules import SLiMLinear
    from .report import package_versions

    out_dir = Path(out_dir)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, SLiMLinear)}
    if not mods:
        raise ValueError("save_compressed: the model has no SLiMLinear layers (nothing is packed)")
    compute = str(next(model.parameters()).dtype).removeprefix("torch.")
    store = dtype or compute
    if store not in _FLOAT:
        raise ValueError(f"save_compressed: dtype {store!r}; allowed: {', '.join(_FLOAT)}")
    for m in mods.values():
        if not m.adapters_on_grid():
            m.requantize_adapters()
    layers = {n: m.meta() for n, m in mods.items()}
    embeddings = {n: m.meta() for n, m in model.named_modules() if isinstance(m, PackedEmbedding)}
    head = model.get_output_embeddings()
    sized = {n: m for n, m in mods.items() if m is not head}  # the head counts with the rest
    sd = model.state_dict()
    tied_to = _tied_keys(model, sd)
    tied = list(tied_to)
    tensors = {}
    for k, v in sd.items():
        if k in tied:
            continue
        owner, _, attr = k.rpartition(".")
        mod = mods.get(owner)
        if mod is not None and attr in ("lora_l", "lora_r"):
            if mod.adapter_bits is not None:
                continue  # rebuilt from the packed codes on load
            v = v.to(_FLOAT[mod.adapter_dtype])
        elif mod is not None and attr == "bias":
            v = v.to(_FLOAT[store])
            layers[owner]["bias_dtype"] = store
        elif mod is None and v.is_floating_point():
            v = v.to(_FLOAT[store])
        tensors[k] = v.detach().to("cpu").contiguous()
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "layers": layers,
        "tied": tied,
        "tied_to": tied_to,
        "embeddings": embeddings,
        "dtype": store,
        "compute_dtype": compute,
        "base_sha256": base_sha256 or state_hashes(model)["base"],
        "versions": package_versions(),
        "calibration": calibration,
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
    with atomic_dir(out_dir) as tmp:
        fault_point(f"write {out_dir.name}/{WEIGHTS}")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        config = copy.deepcopy(model.config)  # the caller's model keeps its own config
        # what transformers' "slim" quantizer (hf_quantizer.py) builds the model from
        config.quantization_config = hf_quantization_config(
            layers, embeddings, tied_to, store, compute
        )
        fault_point(f"write {out_dir.name}/config.json")
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta["size"] = written_sizes(tmp / WEIGHTS, model, sized, tied)
        # every file's sha256, so a load can verify that nothing changed since it was written
        meta["files"] = {
            f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file() and f.name != META
        }
        fault_point(f"write {out_dir.name}/{META}")
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    return out_dir


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


def _jsonable(obj: Any) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def load_compressed(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    verify: bool = True,
    dtype: str | torch.dtype | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuilds a compressed model from a packed checkpoint (no original weights needed).

    Args:
        path: a directory written by ``save_compressed``.
        device: where the tensors go.
        backend: ``SLiMLinear`` backend: ``auto`` (triton on CUDA where the kernels support the
            layer, else reference), ``reference`` or ``triton``.
        verify: check every file against its recorded sha256 first (seconds per GB).
        dtype: dtype of the uncompressed tensors and activations (default: the dtype the run
            computed in, so the run's perplexity is reproduced; the file may store 16 bits).

    Every load, verified or not, checks the layer metadata against ``config.json`` and against
    the stored tensors' shapes and dtypes, and that every floating-point tensor and every decoded
    scale is finite. Errors are ``CheckpointError`` naming the file and the tensor or layer.

    Returns:
        ``(model, tokenizer, meta)``: the model in eval mode, its tokenizer (None if none was
        saved) and the checkpoint's metadata.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .arch import get_arch
    from .modules import SLiMLinear
    from .runtime import set_backend

    path = Path(path)
    meta = read_meta(path)
    if verify:
        verify_files(path, meta)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path / 'config.json'}: unreadable ({type(e).__name__}: {e})"
        ) from None
    if dtype is None:
        dtype = meta.get("compute_dtype", meta.get("dtype", "float32"))
    dtype = _FLOAT[dtype] if isinstance(dtype, str) and dtype in _FLOAT else dtype
    if dtype not in _FLOAT.values():
        raise ValueError(f"load_compressed: dtype {dtype!r}; allowed: {', '.join(_FLOAT)}")
    if hasattr(config, "quantization_config"):  # this path builds the layers itself
        del config.quantization_config
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        get_arch(model)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path / 'config.json'}: cannot build the model ({e})") from None
    install_layers(model, meta["layers"], f"{path / META}")
    if meta.get("embeddings"):
        from .embeddings import install_embeddings

        install_embeddings(model, meta["embeddings"], f"{path / META}")
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for k in f.keys():
                if k in expected:
                    sl = f.get_slice(k)
                    got = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
                    both_float = isinstance(got[1], torch.dtype) and (
                        got[1].is_floating_point and expected[k][1].is_floating_point
                    )
                    if got[0] != expected[k][0] or (got[1] != expected[k][1] and not both_float):
                        raise CheckpointError(
                            f"{weights}: tensor {k} is {got[0]} {got[1]}, the metadata says "
                            f"{expected[k][0]} {expected[k][1]}"
                        )
        sd = load_tensors(weights, device=str(device))
        for k, v in sd.items():  # 16-bit storage -> the compute dtype (exact: an upcast)
            if k in expected and v.dtype != expected[k][1] and v.is_floating_point():
                sd[k] = v.to(expected[k][1])
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or garbled safetensors
        raise CheckpointError(f"{weights}: unreadable ({type(e).__name__}: {e})") from None
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    if unexpected:
        raise CheckpointError(f"{weights}: unexpected tensors {unexpected[:5]}")
    rebuilt = set()
    for name, mod in model.named_modules():
        if isinstance(mod, SLiMLinear) and mod.adapter_bits is not None and mod.rank:
            rebuilt |= {f"{name}.lora_l", f"{name}.lora_r"}
    missing = [k for k in missing if k not in meta.get("tied", []) and k not in rebuilt]
    if missing:
        raise CheckpointError(f"{weights}: missing tensors {missing[:5]}")
    retie(model, meta.get("tied_to") or dict.fromkeys(meta.get("tied", [])), sd)
    for k, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{weights}: tensor {k} has NaN/Inf values")
    restore_packed(model, f"{weights}: ")
    _materialise_buffers(model, get_arch(model), device)
    model.to(device)
    set_backend(model, backend)  # type: ignore[arg-type]
    model.eval()
    model.config.use_cache = False
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{path}: tokenizer unreadable ({type(e).__name__}: {e})"
            ) from None
    return model, tokenizer, meta


def install_layers(model: nn.Module, layers: dict[str, dict], where: str) -> None:
    """Swaps each named ``nn.Linear`` of a (meta-device) model for an empty ``SLiMLinear`` built
    from its metadata, after checking the metadata against the model; raises ``CheckpointError``
    naming ``where`` and the layer. Shared by ``load_compressed`` and the transformers quantizer.
    """
    from .arch import get_module
    from .formats import check_meta
    from .modules import SLiMLinear

    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{where}: no compressed layers listed")
    for name, layer_meta in layers.items():
        at = f"{where}: layer {name}"
        old = get_module(model, name)
        if not isinstance(old, nn.Linear):
            raise CheckpointError(
                f"{at}: config.json's model has no linear layer there (got "
                f"{type(old).__name__}); the layer list and config.json do not belong together"
            )
        try:
            for key in ("weight", "adapter_l", "adapter_r"):
                if key in layer_meta:
                    check_meta(layer_meta[key])
            if tuple(layer_meta["weight"]["shape"]) != (old.out_features, old.in_features):
                raise ValueError(
                    f"weight shape {layer_meta['weight']['shape']} != the model's "
                    f"({old.out_features}, {old.in_features})"
                )
            new = SLiMLinear.from_meta(layer_meta, device="meta")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{at}: {type(e).__name__}: {e}") from None
        model.set_submodule(name, new)


def restore_packed(model: nn.Module, where: str, *, rebuild_all: bool = False) -> None:
    """Rebuilds 4-bit adapters' fp32 parameters from their stored codes (bit-exact; those left on
    the meta device, or all with ``rebuild_all``) and range-checks every packed tensor of every
    ``SLiMLinear``; errors are ``CheckpointError`` prefixed with ``where``. Shared by
    ``load_compressed`` and the transformers quantizer."""
    from .formats import check_values
    from .modules import SLiMLinear

    for name, mod in model.named_modules():
        if not isinstance(mod, SLiMLinear):
            continue
        if mod.rank and mod.adapter_bits is not None and (rebuild_all or mod.lora_l.is_meta):
            device = mod.packed_weight().tensors["values"].device
            mod.rebuild_adapter_params()
            mod.to(device)
        for label, pw in (
            ("weight", mod.packed_weight()),
            ("adapter_l", mod.packed_adapter("l")),
            ("adapter_r", mod.packed_adapter("r")),
        ):
            if pw is not None:
                try:
                    check_values(pw)
                except ValueError as e:
                    raise CheckpointError(f"{where}{name}.{label}: {e}") from None


def retie(model: nn.Module, tied_to: dict[str, str | None], sd: dict[str, torch.Tensor]) -> None:
    """Points every tied key at its source's tensor (stored once). A source of None (checkpoints
    written before ``tied_to`` was recorded) is the input embedding's weight."""
    from .arch import get_module

    for key, src in tied_to.items():
        owner, _, attr = key.rpartition(".")
        if src is None:
            emb = model.get_input_embeddings()
            if emb is None or not hasattr(emb, "weight"):
                raise CheckpointError(f"cannot re-tie {key}: the model has no input embedding")
            value = emb.weight
        elif src in sd:
            value = sd[src]
        else:
            raise CheckpointError(f"cannot re-tie {key}: its source {src} is not stored")
        mod = get_module(model, owner)
        if mod is None:
            raise CheckpointError(f"cannot re-tie {key}: no module {owner}")
        setattr(mod, attr, value)


def _materialise_buffers(model: nn.Module, arch: Any, device: str | torch.device) -> None:
    """Recomputes non-persistent buffers (e.g. rotary ``inv_freq``) left on the meta device."""
    from .arch import get_module

    if arch.rotary_path is not None:
        rot = get_module(model, arch.rotary_path)
        if rot is not None and any(b.is_meta for b in rot.buffers()):
            with torch.device(device):
                fresh = type(rot)(config=model.config)
            model.set_submodule(arch.rotary_path, fresh)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"tensors not restored from the checkpoint: {left[:5]}")
