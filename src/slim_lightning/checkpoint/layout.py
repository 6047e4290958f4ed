"""Checks and measurements of packed checkpoints: what ``load_compressed`` verifies.

* ``read_meta``: reads and validates ``slim.json`` (format, version, layers, tied, dtype);
* ``verify_files``: every file against the sha256 recorded in ``slim.json`` when it was written;
* ``written_sizes``: the sizes ``save_compressed`` records, measured from the written file;
* ``CheckpointError``: raised for a missing, damaged, edited or inconsistent checkpoint.

The checkpoint layout is described in ``slim_lightning.checkpoint.save``.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

FORMAT = "slim-lightning"
VERSION = 1
WEIGHTS = "model.safetensors"
META = "slim.json"


def written_sizes(
    weights: Path, model: nn.Module, mods: dict[str, nn.Module], tied: list[str]
) -> dict[str, Any]:
    """Sizes measured from the written safetensors file, against the model's 16-bit bytes.

    ``linears``: every tensor stored under a compressed layer (packed weight, adapters, scales,
    bias) vs that layer's weight and bias at 16 bits; ``rest``: everything else (embeddings,
    norms, lm_head; quantised or not) vs its 16-bit bytes; ``checkpoint``: the whole file (header included) vs
    the whole model at 16 bits.
    """
    from safetensors import safe_open

    lin = rest = 0
    with safe_open(str(weights), framework="pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            n = math.prod(sl.get_shape()) * _st_dtype(sl.get_dtype()).itemsize
            if k.rpartition(".")[0] in mods:
                lin += n
            else:
                rest += n
    lin16 = sum(
        2 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
        for m in mods.values()
    )
    rest16 = 0
    for k, v in model.state_dict().items():
        if k not in tied and k.rpartition(".")[0] not in mods and v.is_floating_point():
            rest16 += 2 * v.numel()
    for name, m in model.named_modules():  # quantised embedding / LM head: their 16-bit tables
        if name not in mods and hasattr(m, "packed_weight") and f"{name}.weight_values" not in tied:
            rest16 += 2 * math.prod(m.packed_weight().shape)
    file_bytes = weights.stat().st_size
    weights_numel = sum(m.in_features * m.out_features for m in mods.values())
    return {
        "checkpoint_bytes": file_bytes,
        "checkpoint_fp16_bytes": lin16 + rest16,
        "checkpoint_ratio_vs_fp16": file_bytes / (lin16 + rest16),
        "linears_bytes": lin,
        "linears_fp16_bytes": lin16,
        "linears_ratio_vs_fp16": lin / lin16 if lin16 else None,
        "linears_bits_per_weight": 8 * lin / weights_numel if weights_numel else None,
        "rest_bytes": rest,
        "rest_fp16_bytes": rest16,
        # the summary table's keys: the compressed linears
        "packed_bytes": lin,
        "dense_fp16_bytes": lin16,
        "ratio_vs_fp16": lin / lin16 if lin16 else None,
    }


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``slim.json``; raises CheckpointError naming the file for anything else."""
    path = Path(path)
    f = path / META
    if not f.is_file():
        raise CheckpointError(
            f"{path} is not a slim-lightning checkpoint (no {META}); compress.py writes one to "
            "RUN_DIR/packed"
        )
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"{f}: unreadable ({type(e).__name__}: {e}); the checkpoint is damaged"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: not a JSON object; the checkpoint is damaged")
    version = meta.get("version", -1)
    if meta.get("format") != FORMAT or not isinstance(version, int) or version != VERSION:
        raise CheckpointError(
            f"{f}: format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this slim-lightning reads {FORMAT!r} version {VERSION}"
        )
    layers, tied = meta.get("layers"), meta.get("tied", [])
    if (
        not isinstance(layers, dict)
        or not layers
        or not all(isinstance(v, dict) for v in layers.values())
    ):
        raise CheckpointError(f"{f}: 'layers' must map module names to layer metadata")
    if not isinstance(tied, list) or not all(isinstance(k, str) for k in tied):
        raise CheckpointError(f"{f}: 'tied' must be a list of tensor names")
    if meta.get("dtype", "float32") not in ("float32", "float16", "bfloat16"):
        raise CheckpointError(
            f"{f}: dtype {meta.get('dtype')!r}; allowed float32, float16, bfloat16"
        )
    return meta


def verify_files(path: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checks every file against the sha256 that ``slim.json`` recorded when it was written.

    Returns:
        The metadata. Raises CheckpointError naming the first missing or changed file.
    """
    from ..io import first_digest_mismatch

    path = Path(path)
    meta = read_meta(path) if meta is None else meta
    files = meta.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise CheckpointError(
            f"{path / META}: no file digests (written by an older slim-lightning); load it with "
            "verify=False to trust it as is"
        )
    bad = first_digest_mismatch(path, files)
    if bad is not None and bad[1] == "missing":
        raise CheckpointError(
            f"{bad[0]}: missing (slim.json lists it); the checkpoint is incomplete"
        )
    if bad is not None:
        raise CheckpointError(
            f"{bad[0]}: sha256 differs from the one recorded in {META} when it was written (the "
            "file is corrupt or was edited); re-export it, or pass verify=False to load anyway"
        )
    return meta


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _st_dtype(name: str) -> Any:
    return _ST_DTYPES.get(name, name)


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine a run's numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in (
        "slim-lightning",
        "torch",
        "transformers",
        "lightning",
        "triton",
        "datasets",
        "hydra-core",
        "safetensors",
        "wandb",
        "bitsandbytes",
        "lm-eval",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def linear_sizes(model: torch.nn.Module) -> dict[str, float]:
    """Packed bytes of the compressed linears vs their fp16 size, from the modules in memory
    (an estimate used only when nothing is written; written runs report the file's bytes)."""
    from ..nn.linear import SLiMLinear

    packed = dense = 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for mod in model.modules():
        if isinstance(mod, SLiMLinear) and mod is not head:
            packed += mod.packed_nbytes()
            dense += mod.in_features * mod.out_features * 2
    if dense == 0:
        return {}
    return {"packed_bytes": packed, "dense_fp16_bytes": dense, "ratio_vs_fp16": packed / dense}
