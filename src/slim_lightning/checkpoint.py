"""Packed compressed checkpoints: save a compressed model, load it back without the original weights.

A checkpoint directory holds:

* ``model.safetensors``: the model's ``state_dict``. Every ``SLiMLinear`` contributes its packed
  buffers (4-bit codes, sparsity metadata, scales, packed adapters) and its adapter parameters;
  the rest (embeddings, norms, LM head) is stored as it is in the model. A tied LM head is stored
  once (under the embedding's name).
* ``config.json`` and the tokenizer files: the base model's Hugging Face config and tokenizer.
* ``slim.json``: ``{"format": "slim-lightning", "version": 1, "layers": {module name:
  SLiMLinear.meta()}, "plan": method and every option, "versions": package versions,
  "calibration": fingerprint, "results": evaluation results of the run that wrote it}``.

The directory is written under a temporary name and renamed when complete, so a crash never leaves
a half-written checkpoint. ``load_compressed`` builds the model skeleton from ``config.json`` on
the meta device (no dense weights are ever allocated), swaps in empty ``SLiMLinear`` modules from
their metadata and assigns the stored tensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import atomic_dir, load_tensors

FORMAT = "slim-lightning"
VERSION = 1
WEIGHTS = "model.safetensors"
META = "slim.json"


def _tied_keys(model: nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensor shares storage with an earlier key (tied embeddings)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    dup = []
    for k, v in sd.items():
        if v.device.type == "meta":
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            dup.append(k)
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
) -> Path:
    """Writes ``model`` (with ``SLiMLinear`` layers installed) as a packed checkpoint.

    Args:
        model: a Hugging Face causal LM whose compressed linears are ``SLiMLinear`` modules.
        tokenizer: its tokenizer (saved alongside; may be None).
        out_dir: target directory (replaced atomically if it exists).
        plan: the ``CompressPlan`` (method and every option are recorded).
        results: evaluation results to record (e.g. the run's ``ppl``).
        calibration: calibration-data fingerprint.

    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.torch import save_file

    from .modules import SLiMLinear
    from .report import package_versions

    out_dir = Path(out_dir)
    layers = {n: m.meta() for n, m in model.named_modules() if isinstance(m, SLiMLinear)}
    if not layers:
        raise ValueError("save_compressed: the model has no SLiMLinear layers (nothing is packed)")
    sd = model.state_dict()
    tied = _tied_keys(model, sd)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if k not in tied}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "layers": layers,
        "tied": tied,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
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
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    return out_dir


def _jsonable(obj: Any) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``slim.json``; raises a clear error for anything else."""
    path = Path(path)
    f = path / META
    if not f.is_file():
        raise FileNotFoundError(
            f"{path} is not a slim-lightning checkpoint (no {META}); compress.py writes one to "
            "RUN_DIR/packed"
        )
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT or int(meta.get("version", -1)) != VERSION:
        raise ValueError(
            f"{f}: format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this slim-lightning reads {FORMAT!r} version {VERSION}"
        )
    return meta


def load_compressed(
    path: str | Path, *, device: str | torch.device = "cpu", backend: str = "reference"
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuilds a compressed model from a packed checkpoint (no original weights needed).

    Args:
        path: a directory written by ``save_compressed``.
        device: where the tensors go.
        backend: ``SLiMLinear`` backend (``reference`` or ``triton``).

    Returns:
        ``(model, tokenizer, meta)``: the model in eval mode, its tokenizer (None if none was
        saved) and the checkpoint's metadata.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models import get_arch, get_module
    from .modules import SLiMLinear, set_backend

    path = Path(path)
    meta = read_meta(path)
    config = AutoConfig.from_pretrained(path)
    dtype = getattr(torch, meta.get("dtype", "float32"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, layer_meta in meta["layers"].items():
        model.set_submodule(name, SLiMLinear.from_meta(layer_meta, device="meta"))
    sd = load_tensors(path / WEIGHTS, device=str(device))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{path / WEIGHTS}: unexpected tensors {unexpected[:5]}")
    missing = [k for k in missing if k not in meta.get("tied", [])]
    if missing:
        raise ValueError(f"{path / WEIGHTS}: missing tensors {missing[:5]}")
    for k in meta.get("tied", []):
        # re-tie: the LM head shares the embedding's tensor
        owner, _, attr = k.rpartition(".")
        src = _tied_source(model, k, sd)
        setattr(get_module(model, owner), attr, src)
    _materialise_buffers(model, get_arch(model), device)
    model.to(device)
    set_backend(model, backend)  # type: ignore[arg-type]
    model.eval()
    model.config.use_cache = False
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, meta


def _tied_source(model: nn.Module, key: str, sd: dict[str, torch.Tensor]) -> nn.Parameter:
    emb = model.get_input_embeddings()
    if emb is None or not key.endswith("weight"):
        raise ValueError(f"cannot re-tie {key}: the model has no input embedding")
    return emb.weight


def _materialise_buffers(model: nn.Module, arch: Any, device: str | torch.device) -> None:
    """Recomputes non-persistent buffers (e.g. rotary ``inv_freq``) left on the meta device."""
    from .models import get_module

    if arch.rotary_path is not None:
        rot = get_module(model, arch.rotary_path)
        if rot is not None and any(b.is_meta for b in rot.buffers()):
            with torch.device(device):
                fresh = type(rot)(config=model.config)
            model.set_submodule(arch.rotary_path, fresh)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"tensors not restored from the checkpoint: {left[:5]}")
