"""The checks every loader of a packed checkpoint runs before it returns a model.

``load_compressed`` and the transformers quantizer (``deploy.hf_quantizer``; also what
``train.py compressed.path=``, ``generate`` and the servable export reach through
``load_compressed``) share them, so a damaged or edited directory is refused the same way
whichever door it comes through:

* ``open_checkpoint``: ``slim.json`` is readable, every file (each shard too) matches its recorded
  sha256 (unless ``verify=False``, or ``SLIM_LIGHTNING_VERIFY=0`` for ``from_pretrained``), the
  weights are one ``model.safetensors`` or exactly the shards the index lists (``layout.
  weight_files``), and ``config.json``'s ``quantization_config`` lists the same layers,
  embeddings and ties as ``slim.json``;
* ``check_file_tensors``: every stored tensor has the shape and dtype the metadata gives it (a
  sharded checkpoint's shards hold exactly what ``model.safetensors.index.json`` maps to them);
* ``check_complete``: no tensor of the model is left unloaded (nothing falls back to fresh
  weights) and the file holds nothing the model does not take;
* ``check_finite``: every floating-point tensor the model holds is finite.

Errors are ``CheckpointError`` naming the file and the tensor or layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .layout import INDEX, META, _st_dtype, read_index, read_meta, verify_files, weight_files

VERIFY_ENV = "SLIM_LIGHTNING_VERIFY"


def verify_default() -> bool:
    """``verify`` for loaders without an argument for it: ``SLIM_LIGHTNING_VERIFY=0`` turns the
    sha256 check off (the structural checks always run)."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def open_checkpoint(path: str | Path, *, verify: bool) -> dict[str, Any]:
    """``slim.json`` of ``path`` after the directory-level checks (see the module docstring)."""
    path = Path(path)
    meta = read_meta(path)
    if verify:
        verify_files(path, meta)
    weight_files(path)  # one file, or every shard the index lists and no other
    cfg_file = path / "config.json"
    try:
        qc = json.loads(cfg_file.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{cfg_file}: unreadable ({type(e).__name__}: {e})") from None
    if qc is not None:
        check_config_matches(qc, meta, f"{cfg_file} quantization_config")
    return meta


def check_config_matches(qc: Any, meta: dict[str, Any], where: str) -> None:
    """``config.json``'s ``quantization_config`` (dict or transformers config object) against
    ``slim.json``: the layers, embeddings and ties must be the same (else one was edited)."""
    get = qc.get if isinstance(qc, dict) else lambda k, d=None: getattr(qc, k, d)
    pairs = (
        ("layers", meta.get("layers") or {}),
        ("embeddings", meta.get("embeddings") or {}),
        ("tied_to", meta.get("tied_to") or {}),
    )
    for key, want in pairs:
        got = get(key, None) or {}
        if _canon(got) != _canon(want):
            diff = _differing(got, want)
            detail = f" (differing entries: {diff[:5]})" if diff else ""
            raise CheckpointError(
                f"{where}: {key!r} differs from the one in {META}{detail}; config.json was "
                "edited or the files do not belong together"
            )


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _differing(a: Any, b: Any) -> list[str]:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return []
    return sorted(
        k for k in set(a) | set(b) if k not in a or k not in b or _canon(a[k]) != _canon(b[k])
    )


def check_file_tensors(weights: Path | list[Path], model: nn.Module) -> set[str]:
    """Every tensor in ``weights`` (one file, or a sharded checkpoint's shards) that the model
    has must match its shape, and its dtype unless both are floating point (16-bit storage
    upcasts exactly); shards must hold exactly what their index maps to them, no tensor twice.
    Returns the tensor names of all files."""
    from safetensors import safe_open

    files = [weights] if isinstance(weights, Path) else list(weights)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    index = files[0].parent / INDEX if files else None
    weight_map = read_index(index) if index is not None and index.is_file() else None
    keys: set[str] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                mine = set(f.keys())
                for k in mine & set(expected):
                    sl = f.get_slice(k)
                    got = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
                    both_float = isinstance(got[1], torch.dtype) and (
                        got[1].is_floating_point and expected[k][1].is_floating_point
                    )
                    if got[0] != expected[k][0] or (got[1] != expected[k][1] and not both_float):
                        raise CheckpointError(
                            f"{file}: tensor {k} is {got[0]} {got[1]}, the metadata says "
                            f"{expected[k][0]} {expected[k][1]}"
                        )
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated or garbled safetensors
            raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from None
        twice = sorted(mine & keys)
        if twice:
            raise CheckpointError(f"{file}: tensors {twice[:5]} are stored in another shard too")
        if weight_map is not None:
            wrong = sorted(k for k in mine if weight_map.get(k) != file.name)
            if wrong:
                raise CheckpointError(
                    f"{file}: holds {wrong[:5]}, which {INDEX} maps elsewhere (or not at all)"
                )
        keys |= mine
    if weight_map is not None and set(weight_map) - keys:
        lost = sorted(set(weight_map) - keys)
        raise CheckpointError(
            f"{index}: maps {lost[:5]} to {weight_map[lost[0]]}, which does not hold them"
        )
    return keys


def rebuilt_keys(model: nn.Module) -> set[str]:
    """Parameters not stored because they are rebuilt on load (4-bit adapters' fp32 masters)."""
    from ..nn.linear import SLiMLinear

    out: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, SLiMLinear) and mod.adapter_bits is not None and mod.rank:
            out |= {f"{name}.lora_l", f"{name}.lora_r"}
    return out


def check_complete(
    model: nn.Module, file_keys: set[str], meta: dict[str, Any], weights: Path
) -> None:
    """No persistent tensor of the model may be missing from the file (it would keep fresh,
    random weights) unless it is tied or rebuilt; no tensor of the file may go unused."""
    model_keys = set(model.state_dict())
    tied = set(meta.get("tied") or []) | set(meta.get("tied_to") or {})
    missing = sorted(model_keys - file_keys - tied - rebuilt_keys(model))
    if missing:
        raise CheckpointError(
            f"{weights}: missing tensors {missing[:5]} (the model would keep fresh weights there)"
        )
    unexpected = sorted(file_keys - model_keys)
    if unexpected:
        raise CheckpointError(
            f"{weights}: unexpected tensors {unexpected[:5]} (no layer of the model takes them; "
            "the layer list and the weights do not belong together)"
        )
    for key, src in (meta.get("tied_to") or {}).items():
        if src is not None and src not in file_keys:
            raise CheckpointError(f"{weights}: {key} is tied to {src}, which is not stored")


def check_finite(model: nn.Module, where: str) -> None:
    """Every floating-point parameter and buffer is finite."""
    for k, t in model.state_dict().items():
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: tensor {k} has NaN/Inf values")
